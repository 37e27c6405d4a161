"""The dataset and stage names a recipe may use, for checking a recipe without importing the
registries (their modules import torch, torchvision and Lightning: about 5 seconds here).
tests/test_recipe.py checks that they are exactly the registered names."""

DATASETS = ("cifar10", "cifar100", "csv", "digits", "eurosat", "fake", "fashion_mnist",
            "image_folder", "imagenet", "medmnist", "webdataset")
STAGES = ("few_shot", "finetune", "knn", "linear_probe", "linear_probe_classic", "pretrain")
