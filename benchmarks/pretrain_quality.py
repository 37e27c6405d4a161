"""Does our faster pretraining learn as well? k-NN accuracy after the same epochs, ours vs the
reference loop of `pretrain_throughput`.

Same data, backbone, global batch, epochs and seeds on both sides; only the training code
differs:

- ours: `ssl_pipeline.run` with `stages: [pretrain]`, `method.name: simclr` and everything else
  at its defaults (views made on the device from uint8 batches, `trainer.precision: auto`,
  channels_last, SGD lr 0.06 x batch / 256 with a cosine schedule, no weight decay on norms
  and biases), the online monitor and W&B off; the exported backbone is evaluated.
- ours, constant lr: the same with `pretrain.scheduler: constant`, the reference's schedule.
  In a short run the cosine schedule trains at half the mean lr, and that alone can cost
  points (2026-12-02, with brightness/contrast jitter on: 3.8 points of k-NN at k=20), so this
  row is the one that isolates the training code (views, precision, layout, loop).
- reference: lightly's documented loop, as in `pretrain_throughput.py`: `SimCLRTransform`
  (the settings `fit_views` gives the data) per image in 2 DataLoader workers, a plain fp32
  PyTorch step of the same backbone + `SimCLRProjectionHead(512, 2048, 128)` +
  `NTXentLoss(0.5)`, SGD lr 0.06 x batch / 256 (constant, as lightly's examples), momentum
  0.9, weight decay 5e-4, shuffled with the seed.

Data: a seeded, class-stratified subset of Fashion-MNIST's training set (`data.max_train_samples`,
`/usr/share/datasets/fashion-mnist/`), 28 px gray. Backbone: timm ResNet-18 with its default
stem (7x7 stride 2 + max-pool; `--stem small` for the 3x3 stem that `auto` picks at 28 px, about
16x the compute). Evaluation, the same code for every backbone: features of the training subset
(the bank) and of the test split (the queries) in eval mode at the data's normalization, then
our k-NN at both protocols (k=20 T=0.07, k=200 T=0.1). A random-init backbone of the same
architecture is evaluated the same way, to show how far the training moved the features.

Default 15 epochs: at 5, every side still scored below a random-init backbone at k=20 (Xeon
with AMX, 2026-12-07), so a shorter run compares loops that have not yet learned features.

    python -m benchmarks.pretrain_quality            # ~20 minutes on 2 cores (Xeon), 15 epochs
    python benchmarks/pretrain_quality.py --quick    # a smoke run, about 30 seconds
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import RESULTS_DIR, BenchmarkRun, benchmark_parser
from benchmarks.pretrain_throughput import (
    BACKBONE,
    REFERENCE_WORKERS,
    build_train,
    reference_backbone,
    reference_loader,
    reference_training,
)


def case_settings(args) -> dict:
    return {"dataset": "fashion_mnist", "train_images": args.images, "batch": args.batch,
            "epochs": args.epochs, "stem": args.stem}


def run_ours(case: dict, seed: int, workdir: Path, extra: tuple[str, ...] = (), tag: str = "ours"):
    """Our pretraining at its defaults and the `extra` overrides; returns (backbone, seconds,
    steps, last epoch's loss, the lr schedule it ran with)."""
    import yaml

    import ssl_pipeline
    from ssl_pipeline.recipe import apply_overrides, recipe_from_dict

    overrides = [
        "stages=[pretrain]", "method.name=simclr", "data.name=fashion_mnist",
        f"data.max_train_samples={case['train_images']}", f"backbone.name={BACKBONE}",
        f"backbone.stem={case['stem']}", f"pretrain.batch_size={case['batch']}",
        f"pretrain.epochs={case['epochs']}", "pretrain.monitor_every_n_epochs=0",
        "tracking.wandb.mode=disabled", "trainer.accelerator=cpu", f"seed={seed}", *extra,
    ]
    recipe = recipe_from_dict(apply_overrides({"name": "pretrain_quality"}, overrides))
    start = time.perf_counter()
    result = ssl_pipeline.run(recipe, out_dir=workdir / f"{tag}_seed{seed}", quiet=True)
    seconds = time.perf_counter() - start
    pre = result.results["pretrain"]
    written = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    return (ssl_pipeline.load_backbone(result.run_dir), seconds, pre["steps"],
            pre.get("loss_last_epoch"), written["pretrain"]["scheduler"])


def run_reference(case: dict, seed: int, train):
    """lightly's documented loop (`pretrain_throughput.reference_training`) for `epochs` full
    epochs; returns (backbone, seconds, steps, last loss, "constant": lightly's examples keep
    the lr constant)."""
    backbone, step = reference_training(case, seed)
    loader = reference_loader(case, train)  # shuffles from torch's global generator, seeded above
    start, steps, loss = time.perf_counter(), 0, None
    for _ in range(case["epochs"]):
        for (x0, x1), _ in loader:
            loss = step(x0, x1)
            steps += 1
    return (backbone.eval(), time.perf_counter() - start, steps,
            None if loss is None else loss.item(), "constant")


def knn_accuracies(backbone, bundle, queries: int) -> dict[str, float]:
    """k-NN top-1 on the test split (the first `queries` images), bank = the training subset."""
    import torch

    from ssl_pipeline.data import TransformedDataset
    from ssl_pipeline.data.transforms import eval_transform
    from ssl_pipeline.evals.knn import PROTOCOLS, knn_classify
    from ssl_pipeline.features import extract_features

    transform = eval_transform(bundle.image_size, bundle.mean, bundle.std)
    test = torch.utils.data.Subset(bundle.test, range(min(queries, len(bundle.test))))

    def feats(split):
        loader = torch.utils.data.DataLoader(TransformedDataset(split, transform), batch_size=256)
        return extract_features(backbone.eval(), loader, "cpu")

    (bank, bank_y), (query, query_y) = feats(bundle.train), feats(test)
    scores = knn_classify(bank, bank_y, query, bundle.num_classes, ks=tuple(PROTOCOLS),
                          temperature=PROTOCOLS)
    return {f"k{k}": round(float((s.argmax(1) == query_y).mean()), 4) for k, s in scores.items()}


def random_init(case: dict, seed: int):
    """The pipeline's random-init baseline: fresh weights, with the norm layers that timm
    zero-initializes (the last of each residual block) set to one, as `random_init_like` does."""
    import torch

    from ssl_pipeline.evaluation import revive_zero_init_norms

    torch.manual_seed(seed)
    return revive_zero_init_norms(reference_backbone(case))


SIDES = ("ours", "ours_constant_lr", "reference")


def summarize(rows: list[dict]) -> dict:
    out = {}
    for side in (*SIDES, "random_init"):
        mine = [r for r in rows if r["side"] == side]
        if mine:
            out[side] = {k: {"mean": round(float(np.mean([r["knn"][k] for r in mine])), 4),
                             "by_seed": [r["knn"][k] for r in mine]} for k in mine[0]["knn"]}
    for side in ("ours", "ours_constant_lr"):
        if side in out:
            out[f"{side}_minus_reference_points"] = {
                k: round(100 * (out[side][k]["mean"] - out["reference"][k]["mean"]), 2)
                for k in out[side]}
    if "random_init" in out:  # a run this short compares how far each loop moved random features
        out["below_random_init"] = {
            side: [k for k in out[side] if out[side][k]["mean"] < out["random_init"][k]["mean"]]
            for side in SIDES if side in out}
    return out


def parse_args(argv=None):
    p = benchmark_parser(__doc__, quick_help="a smoke configuration: tiny sizes, one epoch, one seed")
    p.add_argument("--images", type=int, default=5000, help="training images (stratified subset)")
    # 15: at 5 every side was still below a random-init backbone at k=20 (Xeon, 2026-12-07), so
    # a 5-epoch run compares loops that have not yet learned features
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=128, help="global batch, both sides")
    p.add_argument("--seeds", default="0,1", help="comma-separated; each side trains once per seed")
    p.add_argument("--queries", type=int, default=10_000, help="test images used as k-NN queries")
    p.add_argument("--stem", choices=("default", "small"), default="default")
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(images=192, epochs=1, batch=32, seeds="0", queries=200)
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.seeds or args.epochs < 1 or args.batch < 2 or args.batch > args.images:
        p.error("need at least one seed, --epochs >= 1 and 2 <= --batch <= --images")
    args.out = args.out or RESULTS_DIR / ("pretrain_quality_quick.json" if args.quick
                                          else "pretrain_quality.json")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = BenchmarkRun("pretrain_quality", args)
    case = case_settings(args)
    train, bundle = build_train(case)
    case["bundle"] = bundle
    rows = []
    with tempfile.TemporaryDirectory(prefix="pretrain_quality_") as tmp:
        runners = {  # side -> seed -> (backbone, seconds, steps, last loss, lr schedule)
            "ours": lambda seed: run_ours(case, seed, Path(tmp)),
            "ours_constant_lr": lambda seed: run_ours(
                case, seed, Path(tmp), ("pretrain.scheduler=constant",), "ours_constant_lr"),
            "reference": lambda seed: run_reference(case, seed, train),
        }
        for seed in args.seeds:
            for side in SIDES:
                print(f"  seed {seed}: {side} ...", flush=True)
                backbone, seconds, steps, loss, schedule = runners[side](seed)
                rows.append({"side": side, "seed": seed, "seconds": round(seconds, 1),
                             "steps": steps, "last_loss": loss, "lr_schedule": schedule,
                             "knn": knn_accuracies(backbone, bundle, args.queries)})
                print(f"    {side}: {steps} steps in {seconds:.0f} s, k-NN {rows[-1]['knn']}",
                      flush=True)
            rows.append({"side": "random_init", "seed": seed,
                         "knn": knn_accuracies(random_init(case, seed), bundle, args.queries)})
    summary = summarize(rows)
    print(f"\nFashion-MNIST, {len(train)} training images, ResNet-18 ({args.stem} stem), batch "
          f"{args.batch}, {args.epochs} epochs, seeds {args.seeds}; k-NN top-1 on "
          f"{min(args.queries, len(bundle.test))} test images (bank: the training images)")
    for k in summary["ours"]:
        print(f"  {k}: ours {summary['ours'][k]['mean']:.4f} {summary['ours'][k]['by_seed']}, "
              f"ours constant lr {summary['ours_constant_lr'][k]['mean']:.4f} "
              f"{summary['ours_constant_lr'][k]['by_seed']}, "
              f"reference {summary['reference'][k]['mean']:.4f} {summary['reference'][k]['by_seed']}, "
              f"random init {summary['random_init'][k]['mean']:.4f}; ours - reference "
              f"{summary['ours_minus_reference_points'][k]:+.2f} points, ours constant lr - "
              f"reference {summary['ours_constant_lr_minus_reference_points'][k]:+.2f}")
    below = {side: ks for side, ks in summary["below_random_init"].items() if ks}
    if below:
        print("  below the random-init backbone: " + "; ".join(
            f"{side} at {', '.join(ks)}" for side, ks in below.items()) + ". The features have not "
            "yet moved past random init there: a longer run (--epochs) compares the loops on "
            "features they learned.")
    setup = {k: v for k, v in case.items() if k != "bundle"}
    return run.finish({
        "setup": {**setup, "train_images": len(train), "seeds": args.seeds,
                  "queries": min(args.queries, len(bundle.test)), "backbone": BACKBONE,
                  "reference_workers": REFERENCE_WORKERS},
        "rows": rows,
        "summary": summary,
        "notes": [
            "ours: ssl_pipeline.run, simclr at its defaults (device views, auto precision, "
            "channels_last, SGD + cosine), monitor and W&B off; the exported backbone.",
            ("ours_constant_lr: the same with pretrain.scheduler=constant (the reference's "
             "schedule), to isolate the training code from the lr schedule."),
            "reference: lightly SimCLRTransform in 2 workers, fp32 plain loop, SGD constant lr "
            "0.06 x batch/256, momentum 0.9, weight decay 5e-4 (pretrain_throughput's loop).",
            "k-NN: our knn_classify, bank = training subset features, queries = test split, "
            "eval mode, the data's normalization; top-1 at k=20 T=0.07 and k=200 T=0.1.",
        ],
    })


if __name__ == "__main__":
    main()
