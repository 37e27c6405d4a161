"""Names that light modules share without importing the heavy ones (torch, torchvision and
Lightning take about 5 seconds here): the built-in dataset and stage names, which a recipe is
checked against without importing the registries (a name not among them is looked up in the
registry, where code may have registered its own; tests/test_recipe.py checks that these are
exactly the built-in registered names), and what the online monitor measures, for the reports."""

DATASETS = ("cifar10", "cifar100", "csv", "digits", "eurosat", "fake", "fashion_mnist",
            "image_folder", "imagenet", "medmnist", "webdataset")
STAGES = ("few_shot", "finetune", "knn", "linear_probe", "linear_probe_classic", "pretrain")
# what the online monitor measures -> how reports and progress lines name it
MONITOR_METRICS = {"knn_top1": "val k-NN top-1", "knn_auc": "val k-NN AUC (mean over labels)"}
