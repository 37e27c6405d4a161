"""Our SimCLR pretraining throughput against a plain loop written as lightly's docs show.

Views per second (2 views per image), side by side in one run, at two sizes:

- 28 px: Fashion-MNIST (`/usr/share/datasets/fashion-mnist/` via `build_dataset`), timm
  ResNet-18 with our small stem (3x3, stride 1, no max-pool), global batch 128;
- 224 px: a folder of random-pattern 224 px JPEGs in class folders that this script writes to
  a temporary directory (our `image_folder` dataset), the default stem, global batch 32.

The two sides:

- ours: the real pipeline, `ssl_pipeline.run(overrides=[stages=[pretrain], method simclr,
  pretrain.max_steps=...])` with its defaults: views made on the device from uint8 batches
  (`views.augment_on: device`), `trainer.precision: auto` (bf16-mixed on CPUs with native
  bf16), `data.num_workers: 0`, the Lightning Trainer. A callback timestamps the end of every
  training step.
- reference: lightly's documented loop: `lightly.transforms.SimCLRTransform` (settings matching
  ours: `fit_views` for the data) applied per image in 2 DataLoader workers, then a plain fp32
  step: the same backbone + `SimCLRProjectionHead` (2048 hidden, 128 out, our SimCLR defaults)
  + `NTXentLoss(temperature=0.5)`, SGD (lr 0.06 x batch / 256, momentum 0.9, weight decay
  5e-4, as ours), no Lightning.

Both time N steps after W warm-up steps: from the end of step W to the end of step W + N, so
start-up (dataset, model, workers, the first steps) is excluded the same way for both. The
reference's workers may prefetch up to 2 x 2 batches during the warm-up steps, which favours
the reference a little.

Three ratios (ours / reference, above 1: ours is faster):
(1) each at its default (ours: device views + auto precision; reference: workers + fp32);
(2) both at fp32 (ours with `trainer.precision=32`): the data path alone differs;
(3) augmentation alone, no model: ours = DataLoader uint8 batches -> `DeviceViews`; the
    reference = `SimCLRTransform` in 2 DataLoader workers.

And each speed option of ours against our own defaults, one recipe setting changed at a time
(`--options`): `bf16` (`trainer.precision=bf16-mixed`), `contiguous`
(`trainer.channels_last=false`) and `compiled` (`trainer.compile=true`; its compilation falls in
the warm-up steps, so the row also gives the seconds from the start of training to the end of
the warm-up). These show which combination is fastest on the machine, the one `auto` should
pick. On a CPU without native bf16 (no AVX512-BF16 or AMX) the bf16 row is not run (emulated
bf16 would take hours here): the script times one convolution's forward pass in fp32 and under
bf16 autocast instead and records that ratio as the reason.

    python -m benchmarks.pretrain_throughput            # ~13 minutes on 2 cores (~7 with --options '')
    python benchmarks/pretrain_throughput.py --quick    # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import BenchmarkRun, benchmark_parser, RESULTS_DIR

REFERENCE_WORKERS = 2  # lightly's examples use DataLoader workers; this machine has 2 cores
BACKBONE = "timm:resnet18"  # both sides: the reference loop and run_ours
SGD_LR, SGD_MOMENTUM, SGD_WEIGHT_DECAY = 0.06, 0.9, 5e-4  # our pretrain defaults (and lightly's)
# Our speed options, each one recipe setting changed from the defaults (--options)
OPTIONS = {
    "bf16": ["trainer.precision=bf16-mixed"],
    "contiguous": ["trainer.channels_last=false"],
    "compiled": ["trainer.compile=true"],
}


# ------------------------------------------------------------------ data


def write_image_folder(root: Path, images: int, classes: int, size: int, seed: int) -> Path:
    """`images` random-pattern RGB JPEGs `size` px square in `classes` class folders.

    Each image is smooth colour noise (a random 8 x 8 RGB grid upsampled bicubically) plus fine
    noise, so that JPEG decoding, crops, jitter and blur have real content to work on.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
            (size, size), Image.BICUBIC)
        fine = rng.normal(0, 12, (size, size, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + fine, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def data_settings(case: dict) -> dict:
    """The `data` recipe block of a case, used by both sides (the same images)."""
    if case["dataset"] == "fashion_mnist":
        return {"name": "fashion_mnist", "max_train_samples": case["train_images"]}
    return {"name": "image_folder", "root": case["root"]}


def build_train(case: dict):
    """(train split of PIL images, DataBundle) exactly as the pipeline builds it."""
    from ssl_pipeline.data import build_dataset
    from ssl_pipeline.recipe import DataConfig

    bundle = build_dataset(DataConfig(**data_settings(case)))
    return bundle.train, bundle


def fitted_views(bundle):
    from ssl_pipeline.data.transforms import fit_views

    return fit_views(bundle.image_size, bundle.channels, {})


def lightly_transform(bundle):
    """lightly's `SimCLRTransform` with the settings our pipeline fits to this data."""
    from lightly.transforms import SimCLRTransform

    v = fitted_views(bundle)
    return SimCLRTransform(
        input_size=bundle.image_size, cj_prob=v.color_jitter_prob, cj_strength=v.color_jitter_strength,
        min_scale=v.crop_min_scale, random_gray_scale=v.grayscale_prob, gaussian_blur=v.blur_prob,
        sigmas=v.blur_sigmas, vf_prob=v.vflip_prob, hf_prob=v.hflip_prob, rr_prob=v.rotation_prob,
        normalize={"mean": list(bundle.mean), "std": list(bundle.std)},
    )


def views_per_second(step_ends: list[float], case: dict) -> dict:
    """Timed steps: from the end of warm-up step W to the end of step W + N."""
    w, n = case["warmup"], case["steps"]
    if len(step_ends) < w + n:
        raise RuntimeError(f"only {len(step_ends)} steps ran; expected {w + n}")
    seconds = step_ends[w + n - 1] - step_ends[w - 1]
    return {"timed_steps": n, "seconds": round(seconds, 3),
            "views_per_second": round(2 * case["batch"] * n / seconds, 1)}


# ------------------------------------------------------------------ ours


def run_ours(case: dict, precision: str, workdir: Path, label: str = "",
             settings: list[str] = ()) -> dict:
    """The pipeline's pretrain stage, with a callback that timestamps every step's end;
    `settings`: recipe overrides on top of the defaults (one of OPTIONS)."""
    import pytorch_lightning as pl

    import ssl_pipeline
    import ssl_pipeline.pretrain as pretrain_module
    from ssl_pipeline.recipe import apply_overrides, recipe_from_dict

    step_ends: list[float] = []
    started: list[float] = []

    class StepTimer(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            started.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step_ends.append(time.perf_counter())

    build_trainer = pretrain_module.build_trainer

    def build_trainer_with_timer(ctx, callbacks, loggers):
        return build_trainer(ctx, [*callbacks, StepTimer()], loggers)

    overrides = [f"data.{k}={v}" for k, v in data_settings(case).items()] + [
        "stages=[pretrain]", "method.name=simclr", f"backbone.name={BACKBONE}",
        f"pretrain.batch_size={case['batch']}",
        "pretrain.epochs=1", f"pretrain.max_steps={case['warmup'] + case['steps']}",
        "pretrain.monitor_every_n_epochs=0", "tracking.wandb.mode=disabled",
        f"trainer.precision={precision}", "trainer.accelerator=cpu", *settings,
    ]
    run_dir = workdir / f"{case['name']}_ours_{label or precision}"
    after_pretrain_error = None
    pretrain_module.build_trainer = build_trainer_with_timer
    try:
        recipe = recipe_from_dict(apply_overrides({"name": "pretrain_throughput"}, overrides))
        ssl_pipeline.run(recipe, out_dir=run_dir, quiet=True)
    except Exception as err:  # e.g. the report written after the stages; the steps are timed
        if not (run_dir / "results.json").exists():
            raise
        after_pretrain_error = f"{type(err).__name__}: {err}"
    finally:
        pretrain_module.build_trainer = build_trainer
    stage = json.loads((run_dir / "results.json").read_text())["pretrain"]
    written = yaml.safe_load((run_dir / "recipe.yaml").read_text())  # what the run ran with
    row = {**views_per_second(step_ends, case), "precision": precision,
           "ran_with": {"precision": written["resolved"]["precision"],
                        "channels_last": written["trainer"]["channels_last"],
                        "compile": written["trainer"]["compile"]},
           "pipeline_images_per_second_incl_startup": stage["images_per_second"]}
    if settings:
        row["settings"] = list(settings)
        row["seconds_to_end_of_warmup"] = round(step_ends[case["warmup"] - 1] - started[0], 3)
    if after_pretrain_error:
        row["error_after_pretrain_stage"] = after_pretrain_error
    return row


def augment_ours(case: dict, train) -> dict:
    """Our device views alone: uint8 batches from the DataLoader -> DeviceViews."""
    import torch

    from ssl_pipeline.data import TransformedDataset
    from ssl_pipeline.data.device_views import DeviceViews, ToUint8Tensor
    from ssl_pipeline.recipe import DataConfig

    bundle = case["bundle"]
    views = DeviceViews(fitted_views(bundle), bundle.image_size, bundle.mean, bundle.std, 2)
    loader = torch.utils.data.DataLoader(
        TransformedDataset(train, ToUint8Tensor(bundle.image_size)), batch_size=case["batch"],
        shuffle=True, drop_last=True, num_workers=DataConfig().num_workers)  # our default, 0
    return {**time_batches(loader, views, case), "workers": DataConfig().num_workers}


# ------------------------------------------------------------------ the reference


def reference_loader(case: dict, train):
    import torch

    from ssl_pipeline.data import TransformedDataset  # (image, label) -> (transform(image), label)

    return torch.utils.data.DataLoader(
        TransformedDataset(train, lightly_transform(case["bundle"])), batch_size=case["batch"],
        shuffle=True, drop_last=True, num_workers=REFERENCE_WORKERS)


def reference_backbone(case: dict):
    """The case's backbone, freshly initialized from torch's global generator: timm ResNet-18
    at the data's channels, size and normalization, `case["stem"]` (default `auto`)."""
    from ssl_pipeline import create_backbone

    bundle = case["bundle"]
    return create_backbone(BACKBONE, in_chans=bundle.channels, input_size=bundle.image_size,
                           mean=tuple(bundle.mean), std=tuple(bundle.std),
                           stem=case.get("stem", "auto"))


def reference_training(case: dict, seed: int = 0):
    """lightly's documented SimCLR setup, seeded: `(backbone, step)`, where `step(x0, x1)` runs
    one plain fp32 training step of the backbone + `SimCLRProjectionHead(512, 2048, 128)` with
    `NTXentLoss(0.5)` and SGD (lr 0.06 x batch / 256, momentum 0.9, weight decay 5e-4) and
    returns the loss. The backbone: timm ResNet-18, `case["stem"]` (default `auto`)."""
    import torch
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    torch.manual_seed(seed)
    backbone = reference_backbone(case)
    model = torch.nn.Sequential(backbone, SimCLRProjectionHead(backbone.feature_dim, 2048, 128))
    criterion = NTXentLoss(temperature=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR * case["batch"] / 256,
                                momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY)
    model.train()

    def step(x0, x1):
        z0, z1 = model(torch.cat([x0, x1])).chunk(2)  # (B, 128) each
        loss = criterion(z0, z1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return backbone, step


def run_reference(case: dict, train) -> dict:
    """lightly's documented SimCLR loop: fp32, plain PyTorch, per-image views in workers."""
    _, step = reference_training(case)
    step_ends: list[float] = []
    for (x0, x1), _ in reference_loader(case, train):
        step(x0, x1)
        step_ends.append(time.perf_counter())
        if len(step_ends) == case["warmup"] + case["steps"]:
            break
    return {**views_per_second(step_ends, case), "precision": "32", "workers": REFERENCE_WORKERS}


def augment_reference(case: dict, train) -> dict:
    """lightly's SimCLRTransform alone, in 2 DataLoader workers."""
    result = time_batches(reference_loader(case, train), None, case)
    return {**result, "workers": REFERENCE_WORKERS}


def time_batches(loader, views, case: dict) -> dict:
    """Views per second of a loader (and DeviceViews on its batches), after W warm-up batches."""
    ends: list[float] = []
    for images, _ in loader:
        if views is not None:
            views(images)
        ends.append(time.perf_counter())
        if len(ends) == case["warmup"] + case["steps"]:
            break
    return views_per_second(ends, case)


# ------------------------------------------------------------------ the benchmark


def emulated_bf16_probe() -> dict:
    """One 3x3 convolution (64 -> 64 channels, 28 px, batch 64, channels_last) forward, fp32
    against bf16 autocast, on this CPU: why the bf16 row is not run without native bf16."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(64, 64, 28, 28).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).to(memory_format=torch.channels_last)

    def timed(bf16: bool, repeats: int) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            conv(x)  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                conv(x)
        return (time.perf_counter() - start) / repeats

    fp32, bf16 = timed(False, 5), timed(True, 2)
    return {"reason": "this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated",
            "conv_forward_ms": {"fp32": round(fp32 * 1e3, 1), "bf16_autocast": round(bf16 * 1e3, 1)},
            "conv_forward_bf16_over_fp32_time": round(bf16 / fp32, 1)}


def measure_case(case: dict, workdir: Path, options: list[str] = ()) -> dict:
    from ssl_pipeline.compute import cpu_has_native_bf16

    skipped = {}
    if "bf16" in options and not cpu_has_native_bf16():
        skipped["bf16"] = emulated_bf16_probe()
        options = [o for o in options if o != "bf16"]
    train, bundle = build_train(case)
    case = dict(case, bundle=bundle)
    need = (case["warmup"] + case["steps"]) * case["batch"]
    if len(train) < need:
        raise RuntimeError(f"{case['name']}: {len(train)} training images, {need} needed")
    rows = {}
    for name, measure in (
        ("reference", lambda: run_reference(case, train)),
        ("ours_default", lambda: run_ours(case, "auto", workdir)),
        ("ours_fp32", lambda: run_ours(case, "32", workdir)),
        ("augment_reference", lambda: augment_reference(case, train)),
        ("augment_ours", lambda: augment_ours(case, train)),
        *[(f"ours_{o}", lambda o=o: run_ours(case, "auto", workdir, o, OPTIONS[o])) for o in options],
    ):
        print(f"  {case['name']}: {name} ...", flush=True)
        rows[name] = measure()
    ratio = lambda a, b: round(rows[a]["views_per_second"] / rows[b]["views_per_second"], 2)  # noqa: E731
    setup = {k: v for k, v in case.items() if k not in ("bundle", "root")}
    return {
        "setup": {**setup, "train_images": len(train), "channels": bundle.channels,
                  "image_size": bundle.image_size, "views": asdict(fitted_views(bundle))},
        "rows": rows,
        "ratios": {
            "defaults_ours_over_reference": ratio("ours_default", "reference"),
            "fp32_ours_over_reference": ratio("ours_fp32", "reference"),
            "augmentation_ours_over_reference": ratio("augment_ours", "augment_reference"),
            "options_over_ours_default": {o: ratio(f"ours_{o}", "ours_default") for o in options},
        },
        "options_not_run": skipped,
    }


def print_case(c: dict) -> None:
    s = c["setup"]
    print(f"\n{s['name']}: {s['image_size']} px, {s['channels']} channel(s), batch {s['batch']}, "
          f"{s['warmup']} warm-up + {s['steps']} timed steps")
    print(f"{'row':<20} {'views/s':>9} {'seconds':>8}  notes")
    for name, row in c["rows"].items():
        notes = ", ".join(f"{k}={row[k]}" for k in ("precision", "workers", "settings",
                                                     "seconds_to_end_of_warmup") if k in row)
        print(f"{name:<20} {row['views_per_second']:>9.1f} {row['seconds']:>8.2f}  {notes}")
    r = c["ratios"]
    print(f"  ours / reference: (1) defaults x{r['defaults_ours_over_reference']:.2f}, "
          f"(2) both fp32 x{r['fp32_ours_over_reference']:.2f}, "
          f"(3) augmentation alone x{r['augmentation_ours_over_reference']:.2f}")
    if r["options_over_ours_default"]:
        print("  ours with one option / ours at defaults: " + ", ".join(
            f"{o} x{v:.2f}" for o, v in r["options_over_ours_default"].items()))
    for o, why in c.get("options_not_run", {}).items():
        print(f"  {o} not run: {why['reason']}; one convolution's forward takes "
              f"x{why['conv_forward_bf16_over_fp32_time']} the fp32 time")


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--batch-28", type=int, default=128, help="global batch at 28 px")
    p.add_argument("--steps-28", type=int, default=8, help="timed steps at 28 px")
    p.add_argument("--batch-224", type=int, default=32, help="global batch at 224 px")
    p.add_argument("--steps-224", type=int, default=4, help="timed steps at 224 px")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--sizes", default="28,224", help="which cases to run: 28, 224 or both")
    p.add_argument("--options", default=",".join(OPTIONS),
                   help=f"our speed options to time against our defaults, of {','.join(OPTIONS)}"
                        " ('' for none; --quick: contiguous)")
    if p.parse_known_args(argv)[0].quick:  # smaller defaults; sizes given explicitly still win
        p.set_defaults(batch_28=16, steps_28=2, batch_224=4, steps_224=2, warmup=1,
                       options="contiguous")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.options = [o for o in args.options.split(",") if o]
    if set(args.sizes) - {28, 224} or args.warmup < 1:
        p.error("--sizes takes 28 and/or 224; --warmup must be at least 1")
    if set(args.options) - set(OPTIONS):
        p.error(f"--options takes {', '.join(OPTIONS)}; got {', '.join(args.options)}")
    name = "pretrain_throughput_quick.json" if args.quick else "pretrain_throughput.json"
    args.out = args.out or RESULTS_DIR / name
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = BenchmarkRun("pretrain_throughput", args)
    cases = {}
    with tempfile.TemporaryDirectory(prefix="pretrain_throughput_") as tmp:
        tmp = Path(tmp)
        if 28 in args.sizes:
            case = dict(name="fashion_mnist_28px", dataset="fashion_mnist", batch=args.batch_28,
                        steps=args.steps_28, warmup=args.warmup,
                        train_images=(args.warmup + args.steps_28 + 1) * args.batch_28)
            cases["28px"] = measure_case(case, tmp, args.options)
            print_case(cases["28px"])
        if 224 in args.sizes:
            # image_folder carves val (10%) and test (20% of the rest) from the files: write
            # enough for one epoch of warm-up + timed steps plus a spare batch
            need = (args.warmup + args.steps_224 + 1) * args.batch_224
            files = max(64, int(np.ceil(need / 0.72)) + 8)  # >= 64: a stratified val split
            root = write_image_folder(tmp / "images", files, classes=4, size=224, seed=0)
            case = dict(name="image_folder_224px", dataset="image_folder", root=str(root),
                        batch=args.batch_224, steps=args.steps_224, warmup=args.warmup,
                        jpeg_files=files)
            cases["224px"] = measure_case(case, tmp, args.options)
            print_case(cases["224px"])
    result = run.finish({
        "cases": cases,
        "notes": [
            "views_per_second = 2 x batch x timed steps / seconds from the end of the last"
            " warm-up step to the end of the last timed step (same rule for both sides).",
            "ours: ssl_pipeline.run with stages=[pretrain], simclr, its defaults (device views,"
            " data.num_workers 0, precision auto or 32); a callback timestamps each step end.",
            "reference: lightly SimCLRTransform (settings from fit_views) in 2 DataLoader"
            " workers, same backbone, SimCLRProjectionHead(512, 2048, 128), NTXentLoss(0.5),"
            " SGD lr 0.06 x batch/256, fp32, plain PyTorch loop.",
            "augment rows: no model; ours = DataLoader uint8 batches (0 workers) -> DeviceViews,"
            " reference = SimCLRTransform in 2 workers.",
            "pipeline_images_per_second_incl_startup: the pipeline's own figure (images/s over"
            " trainer.fit, start-up and warm-up included).",
            "ours_<option> rows: ours at its defaults with one recipe setting changed (settings);"
            " options_over_ours_default = their views/s over ours_default's, same timing rule.",
        ],
    })
    return result


if __name__ == "__main__":
    main()
