"""Names that light modules share without importing the heavy ones (torch, torchvision, timm
and Lightning take 5-8 seconds here): the built-in dataset and stage names, which a recipe is
checked against without importing the registries (a name not among them is looked up in the
registry, where code may have registered its own; tests/test_recipe.py checks that these are
exactly the built-in registered names); the descriptions of the built-in datasets, stages and
backbone entries, which their registrations use and `ssl-pipeline list` shows without importing
them; and what the online monitor measures, for the reports."""

DATASET_DESCRIPTIONS = {
    "cifar10": "CIFAR-10 color photos (32 px, 3 channels, 10 classes)",
    "cifar100": "CIFAR-100 color photos (32 px, 3 channels, 100 classes)",
    "csv": "image files listed in a CSV: path, optional label and split columns",
    "digits": "scikit-learn's 8x8 handwritten digits (1 channel, 10 classes)",
    "eurosat": "EuroSAT Sentinel-2 tiles: data.eurosat.bands rgb (JPEG) or ms (13-band GeoTIFF, "
               "per-band normalized reflectance)",
    "fake": "synthetic class patterns plus noise (any size, channels, classes)",
    "fashion_mnist": "Fashion-MNIST clothing photos (28 px, 1 channel, 10 classes)",
    "image_folder": "a folder of images: class sub-folders, or unlabeled",
    "imagenet": "ILSVRC-2012: train/<wnid>/, val/ in class folders or flat with the devkit",
    "medmnist": "MedMNIST v2 .npz files: data.medmnist.subset at data.medmnist.size px",
    "webdataset": "WebDataset tar shards (.tar): images with optional .cls labels",
}
DATASETS = tuple(sorted(DATASET_DESCRIPTIONS))
STAGE_DESCRIPTIONS = {
    "pretrain": "train the backbone with the recipe's method, then export it",
    "knn": "weighted k-NN (exact cosine: faiss, or bf16 + float32 on AMX) on cached features; "
           "test split",
    "linear_probe": "linear probe on cached features, tuned on validation",
    "few_shot": "k examples per class, logistic regression and k-NN, over seeds",
    "finetune": "fine-tune the whole network on label fractions; best epoch on val",
    "linear_probe_classic":
        "the papers' linear probe: frozen backbone on augmented images, LARS, best epoch on val",
}
STAGES = tuple(sorted(STAGE_DESCRIPTIONS))
# "timm" and "torchvision" build headless models; the others are modifications on top
BACKBONE_DESCRIPTIONS = {
    "timm": "timm:<model>  any timm model, e.g. timm:resnet50, timm:vit_small_patch16_224 "
            "img_size=32 (pretrained weights need internet)",
    "torchvision": "torchvision:<model>  any torchvision classifier, e.g. torchvision:alexnet; "
                   "its classifier becomes Identity (pretrained weights need internet)",
    "in_chans": "in_chans=N  N input bands (1 gray, 13 Sentinel-2): timm builds it, "
                "torchvision's first conv is swapped; pretrained RGB filters adapted by timm's "
                "adapt_input_conv",
    "small_stem": "stem=small  3x3 stride-1 conv1 and no max-pool for 28-64 px images; ResNet "
                  "family (resnet*, seresnet*, resnext*, wide_resnet*); stem=auto picks it at "
                  "input_size <= 64",
}
# what the online monitor measures -> how reports and progress lines name it
MONITOR_METRICS = {"knn_top1": "val k-NN top-1", "knn_auc": "val k-NN AUC (mean over labels)"}
