"""Our linear probe on cached features against lightly's `LinearClassifier`, on Fashion-MNIST.

Same backbone, same images, same number of epochs, same batch size, one process:

- ours, as the pipeline runs it (`evaluation.features` then `probe_result`): extract the
  train, val and test features once (eval mode, no gradients, the weights in channels_last
  layout as `trainer.channels_last` has it by default), then `linear_probe` with the
  recipe's defaults (lr x weight-decay grid chosen on val, `eval.seeds` seeds, AdamW on
  standardized features); only the epochs are set here. Time = extraction + probe.
- lightly: `LinearClassifier(backbone)` trained by pytorch_lightning's `Trainer.fit` with a
  train and a val loader, as lightly's linear-eval benchmarks do (SGD, lr 0.1 x batch/256,
  cosine, frozen backbone run on every batch of every epoch, val every epoch), then
  `Trainer.validate` on the test loader for its test top-1, on a copy of the weights in the
  default layout, as users write it. Time = fit + test pass.

Both see the images through the pipeline's eval transform (no augmentation: our probe works on
cached features by design). Backbone: timm ResNet-18 with the small 3x3 stem at 28 px,
randomly initialized (seeded), with the zero-initialized BatchNorm scales reset to one as
`evaluation.random_init_like` does. Train, val and test are stratified subsets (--train, --val,
--test).

    python -m benchmarks.probe_speed            # ~11 minutes on 2 cores
    python benchmarks/probe_speed.py --quick    # under a minute: a smoke run
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import BenchmarkRun, benchmark_parser, RESULTS_DIR
from ssl_pipeline import create_backbone
from ssl_pipeline.data import TransformedDataset, build_dataset
from ssl_pipeline.data.base import stratified_subsample
from ssl_pipeline.data.transforms import eval_transform
from ssl_pipeline.evals.linear_probe import linear_probe
from ssl_pipeline.compute import channels_last
from ssl_pipeline.features import extract_features
from ssl_pipeline.recipe import DataConfig, EvalConfig

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # lightly freezes BN
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def load_splits(args) -> tuple[dict, object]:
    """Stratified, seeded subsets of Fashion-MNIST's train (val carved from it) and test."""
    bundle = build_dataset(DataConfig(name="fashion_mnist", max_train_samples=args.train,
                                      split_seed=args.seed))
    splits = {"train": bundle.train}
    for name, size in (("val", args.val), ("test", args.test)):
        split = getattr(bundle, name)
        splits[name] = split.subset(stratified_subsample(split.labels, size, args.seed))
    return splits, bundle


def random_backbone(bundle, seed: int):
    torch.manual_seed(seed)
    backbone = create_backbone("timm:resnet18", in_chans=bundle.channels, input_size=28,
                               mean=bundle.mean, std=bundle.std, stem="small").eval()
    for module in backbone.modules():  # as evaluation.random_init_like: no dead residual branches
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.modules.batchnorm._NormBase) and weight is not None \
                and not weight.detach().any():
            torch.nn.init.ones_(weight)
    return backbone


def eval_datasets(splits: dict, backbone) -> dict:
    p = backbone.preprocessing
    transform = eval_transform(p.input_size, p.mean, p.std)  # what the pipeline extracts with
    return {name: TransformedDataset(split, transform) for name, split in splits.items()}


def run_ours(backbone, splits: dict, args, cfg: EvalConfig) -> dict:
    """Extract once with the pipeline's loaders (eval.batch_size, in order), then probe."""
    start = time.perf_counter()
    # a copy in channels_last layout, as the pipeline extracts (trainer.channels_last, default)
    backbone = channels_last(copy.deepcopy(backbone))
    features, extract_seconds = {}, {}
    for name, dataset in eval_datasets(splits, backbone).items():
        t = time.perf_counter()
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size)
        features[name] = extract_features(backbone, loader)
        extract_seconds[name] = time.perf_counter() - t
    t = time.perf_counter()
    probe = cfg.linear_probe
    result = linear_probe(*features["train"], *features["val"], *features["test"], 10,
                          grid={"lr": tuple(probe.lr_grid), "weight_decay": tuple(probe.weight_decay_grid)},
                          seeds=cfg.seeds, epochs=args.epochs, batch_size=probe.batch_size)
    probe_seconds = time.perf_counter() - t
    return {
        "seconds": time.perf_counter() - start,
        "extract_seconds": extract_seconds,
        "probe_seconds": probe_seconds,
        "test_top1": result["top1"],
        "test_top1_std": result["top1_std"],
        "test_top1_seed0": result["by_seed"][0]["top1"],
        "val_top1": result["val_top1"],
        "chosen": result["chosen"],
        "heads_trained": len(result["grid"]) + cfg.seeds - 1,
        # the scale lightly's SGD (lr 0.1, raw features) meets; ours standardizes first
        "train_feature_l2_norm_mean": float(np.linalg.norm(features["train"][0], axis=1).mean()),
    }


def run_lightly(backbone, splits: dict, args, batch_size: int) -> dict:
    from lightly.utils.benchmarking import LinearClassifier, MetricCallback
    from pytorch_lightning import Callback, Trainer

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # GPU/TPU and tips banners

    class ValidationSeconds(Callback):
        """Seconds spent in validation loops (the sanity check included)."""

        seconds = 0.0

        def on_validation_start(self, *_):
            self._start = time.perf_counter()

        def on_validation_end(self, *_):
            self.seconds += time.perf_counter() - self._start

    model = copy.deepcopy(backbone)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = eval_datasets(splits, backbone)
    # as lightly's linear_eval benchmarks: shuffled train loader with drop_last, val every epoch
    train = torch.utils.data.DataLoader(data["train"], batch_size=batch_size, shuffle=True,
                                        drop_last=True,
                                        generator=torch.Generator().manual_seed(args.seed))
    val, test = (torch.utils.data.DataLoader(data[n], batch_size=batch_size) for n in ("val", "test"))
    validation, metrics = ValidationSeconds(), MetricCallback()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    classifier = LinearClassifier(model=model, batch_size_per_device=batch_size,
                                  feature_dim=backbone.feature_dim, num_classes=10)
    trainer = Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                      callbacks=[validation, metrics], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(classifier, train_dataloaders=train, val_dataloaders=val)
    fit_seconds, fit_validation_seconds = time.perf_counter() - start, validation.seconds
    val_top1 = list(metrics.val_metrics["val_top1"])  # read before validate() appends the test's
    test_top1 = trainer.validate(classifier, dataloaders=test, verbose=False)[0]["val_top1"]
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "fit_seconds": fit_seconds,
        "fit_validation_seconds": fit_validation_seconds,
        "test_pass_seconds": seconds - fit_seconds,
        "test_top1": float(test_top1),
        "val_top1_last_epoch": val_top1[-1],
        "val_top1_best_epoch": max(val_top1),
        "backbone_unchanged": all(torch.equal(before[k], v) for k, v in model.state_dict().items()),
        "optimizer_steps": trainer.global_step,
    }


def extrapolate(ours: dict, lightly: dict, epochs: int, target: int) -> dict:
    """Rough times at `target` epochs (the recipe default), from this run's per-part timings:
    our extraction stays, our probe scales with epochs; lightly's fit scales with epochs."""
    ours_t = sum(ours["extract_seconds"].values()) + ours["probe_seconds"] * target / epochs
    lightly_t = lightly["fit_seconds"] * target / epochs + lightly["test_pass_seconds"]
    return {"epochs": target, "ours_seconds": ours_t, "lightly_seconds": lightly_t,
            "lightly_over_ours": lightly_t / ours_t}


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser(__doc__, "a smoke configuration, under a minute")
    # small sets, so that lightly's side can run the full 100 epochs (the recipe's default and
    # lightly's linear-eval benchmarks') in ~11 minutes on 2 cores: it re-runs the backbone on
    # train and val every epoch
    p.add_argument("--train", type=int, default=512, help="train images (stratified subset)")
    p.add_argument("--val", type=int, default=128, help="val images (of the 6000 carved from train)")
    p.add_argument("--test", type=int, default=512, help="test images (of the official 10000)")
    p.add_argument("--epochs", type=int, default=100, help="epochs for both")
    p.add_argument("--batch-size", type=int, default=None,
                   help="both probes' batch size (default: the recipe's eval.linear_probe.batch_size)")
    p.add_argument("--seed", type=int, default=0)
    if p.parse_known_args(argv)[0].quick:  # smaller defaults; sizes given explicitly still win
        p.set_defaults(train=256, val=128, test=256, epochs=1)
    args = p.parse_args(argv)
    args.out = args.out or RESULTS_DIR / ("probe_speed_quick.json" if args.quick else "probe_speed.json")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = EvalConfig()  # the recipe's defaults: grid, seeds, batch sizes
    batch_size = args.batch_size or cfg.linear_probe.batch_size
    cfg.linear_probe.batch_size = batch_size
    run = BenchmarkRun("probe_speed", args)
    splits, bundle = load_splits(args)
    sizes = {name: len(split) for name, split in splits.items()}
    backbone = random_backbone(bundle, args.seed)
    print(f"Fashion-MNIST {sizes}, ResNet-18 small stem at 28 px (random init), {args.epochs} "
          f"epochs, batch {batch_size}", flush=True)
    print("  ours: extract features once, then linear_probe ...", flush=True)
    ours = run_ours(backbone, splits, args, cfg)
    print("  lightly: LinearClassifier + Trainer.fit, then Trainer.validate on test ...", flush=True)
    lightly = run_lightly(backbone, splits, args, batch_size)
    comparison = {
        "lightly_time_over_ours": lightly["seconds"] / ours["seconds"],
        "top1_ours_minus_lightly_points": 100 * (ours["test_top1"] - lightly["test_top1"]),
    }
    target = EvalConfig().linear_probe.epochs
    result = run.finish({
        "setup": {
            "dataset": "fashion_mnist", "source": bundle.source, "sizes": sizes,
            "backbone": "timm:resnet18, small stem, 28 px, random init (seed "
                        f"{args.seed}), feature_dim {backbone.feature_dim}",
            "epochs": args.epochs, "batch_size": batch_size,
            "ours": {"lr_grid": cfg.linear_probe.lr_grid,
                     "weight_decay_grid": cfg.linear_probe.weight_decay_grid,
                     "seeds": cfg.seeds, "extract_batch_size": cfg.batch_size,
                     "optimizer": "AdamW, cosine, standardized features"},
            "lightly": {"lr": f"0.1 x {batch_size}/256", "optimizer": "SGD momentum 0.9, cosine",
                        "train_loader": "shuffle, drop_last", "val_every_epoch": True},
        },
        "ours": ours,
        "lightly": lightly,
        "comparison": comparison,
        "extrapolated_not_measured": extrapolate(ours, lightly, args.epochs, target),
    })
    print_result(result)
    return result


def print_result(r: dict) -> None:
    o, li, c, x = r["ours"], r["lightly"], r["comparison"], r["extrapolated_not_measured"]
    print(f"\n{'':<10} {'time s':>8} {'test top-1':>11}  breakdown")
    print(f"{'ours':<10} {o['seconds']:>8.1f} {o['test_top1']:>11.4f}  extract "
          f"{sum(o['extract_seconds'].values()):.1f} s + probe {o['probe_seconds']:.1f} s "
          f"({o['heads_trained']} heads; chosen {o['chosen']}; top-1 std over seeds "
          f"{o['test_top1_std']:.4f})")
    print(f"{'lightly':<10} {li['seconds']:>8.1f} {li['test_top1']:>11.4f}  fit {li['fit_seconds']:.1f} s "
          f"(of which val {li['fit_validation_seconds']:.1f} s) + test pass "
          f"{li['test_pass_seconds']:.1f} s; {li['optimizer_steps']} steps; backbone unchanged: "
          f"{li['backbone_unchanged']}")
    print(f"  lightly / ours time: x{c['lightly_time_over_ours']:.2f}; top-1 ours - lightly: "
          f"{c['top1_ours_minus_lightly_points']:+.2f} points")
    print(f"  extrapolated (not measured) to {x['epochs']} epochs: ours {x['ours_seconds']:.0f} s, "
          f"lightly {x['lightly_seconds']:.0f} s, x{x['lightly_over_ours']:.1f}")


if __name__ == "__main__":
    main()
