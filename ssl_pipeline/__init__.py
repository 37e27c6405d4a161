"""ssl_pipeline: pretrain image backbones without labels and measure how good they are."""
