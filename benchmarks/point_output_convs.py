"""Training steps with and without `PointOutputConv2d` (convolutions with a 1x1 output computed
as one matrix product), side by side.

Where a network's feature maps shrink to one pixel, the convolutions of that stage have a 1x1
output: ResNet-18's last stage on 8 px images with the small stem (the quickstart's digits), or
on 32 px images with the default stem. oneDNN's CPU backward for such a conv is slow (one 3x3
conv on a 1x1 map: 70 ms backward against 2.7 ms forward, Zen 3, fp32, batch 128), and
`ssl_pipeline.backbones` runs them as matrix products over the taps that see the input.

For each case, two copies of one seeded timm ResNet-18 (channels_last, as the pipeline trains
by default), one with plain `nn.Conv2d`s and one converted as every `Backbone` is, take
training steps (forward, cross-entropy, backward, AdamW) on the same batch, alternating, in the
precision `trainer.precision: auto` picks on this CPU; the median step time of each and their
ratio are printed, and the largest difference of their losses.

    python -m benchmarks.point_output_convs            # about a minute on 2 cores
    python benchmarks/point_output_convs.py --quick    # seconds: a smoke run
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn import functional as F

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import RESULTS_DIR, BenchmarkRun, benchmark_parser
from ssl_pipeline.backbones import point_output_convs
from ssl_pipeline.compute import channels_last, resolve_precision

# (name, image size, stem, batch)
CASES = [("8 px, small stem (quickstart digits)", 8, "small", 256),
         ("32 px, default stem", 32, "default", 128)]


def resnet18(size_stem: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    if size_stem == "small":
        model.conv1, model.maxpool = nn.Conv2d(1, 64, 3, 1, 1, bias=False), nn.Identity()
    return channels_last(model)


def step_seconds(model: nn.Module, optimizer, x, y, bf16: bool) -> tuple[float, float]:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start, loss.item()


def run_case(name: str, size: int, stem: str, batch: int, steps: int, warmup: int, bf16: bool) -> dict:
    plain = resnet18(stem, seed=0)
    point = point_output_convs(copy.deepcopy(plain))
    converted = sum(type(m) is not nn.Conv2d for m in point.modules() if isinstance(m, nn.Conv2d))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=generator)
    sides = {"plain": plain, "point": point}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in sides.items()}
    times: dict[str, list[float]] = {k: [] for k in sides}
    losses: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(warmup + steps):
        for k, model in sides.items():  # alternating: both sides see the same machine load
            seconds, loss = step_seconds(model, optimizers[k], x, y, bf16)
            if i >= warmup:
                times[k].append(seconds)
            losses[k].append(loss)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "case": name, "image_size": size, "stem": stem, "batch": batch, "steps": steps,
        "convs_converted": converted,
        "median_step_seconds": median,
        "images_per_second": {k: batch / v for k, v in median.items()},
        "speedup_point_over_plain": median["plain"] / median["point"],
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses["plain"], losses["point"])),
    }
    print(f"{name:<38} plain {median['plain'] * 1000:7.1f} ms  point {median['point'] * 1000:7.1f} ms"
          f"  x{result['speedup_point_over_plain']:.2f}  (max loss difference "
          f"{result['max_loss_difference']:.1e} over {warmup + steps} steps)", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args(argv)
    args.out = args.out or RESULTS_DIR / "point_output_convs.json"
    run = BenchmarkRun("point_output_convs", args)
    steps, warmup = (2, 1) if args.quick else (args.steps, 3)
    precision = resolve_precision("auto", "cpu")
    print(f"ResNet-18 training steps, precision {precision} (auto on this CPU), channels_last")
    cases = [run_case(n, s, stem, 16 if args.quick else b, steps, warmup, precision == "bf16-mixed")
             for n, s, stem, b in CASES]
    return run.finish({"precision": precision, "cases": cases})


if __name__ == "__main__":
    main()
