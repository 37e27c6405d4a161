"""The recipe: a strict, typed schema, YAML loading, `--set` overrides and the resolved dump.

A recipe file states only what differs from the defaults below. Unknown keys are errors that
name the key and the nearest valid one; wrong types or values name the field and what is
allowed. Settings of every method live in their own block under `method` (`method.simclr`,
`method.simsiam`, ...), so switching `method.name` never invalidates a recipe.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from ssl_pipeline import names
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.methods import methods
from ssl_pipeline.registry import check_name, nearest


class Strict(BaseModel):
    """Base of every recipe block: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FakeDataConfig(Strict):
    """Shape of the synthetic `fake` dataset (data.image_size/channels/num_classes override)."""

    train_samples: int = Field(256, ge=2)
    val_samples: int = Field(64, ge=1)
    test_samples: int = Field(64, ge=1)
    image_size: int = Field(16, ge=4)
    channels: int = Field(3, ge=1)


class ImageNetDataConfig(Strict):
    """`data.name: imagenet` (see data/imagenet.py)."""

    # Keep only these classes: "imagenet100" (CMC's ImageNet-100) or a file of wnids.
    class_list: str | None = None
    # Labels of a flat val/ folder: the devkit folder or .tar.gz, its ground-truth .txt, or
    # Kaggle's LOC_val_solution.csv. None: looked for in data.root and the two folders above.
    val_labels: str | None = None


class MedMNISTDataConfig(Strict):
    """`data.name: medmnist` (see data/medmnist.py)."""

    subset: Literal["pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist",
                    "retinamnist", "breastmnist", "bloodmnist", "tissuemnist", "organamnist",
                    "organcmnist", "organsmnist"] = "pathmnist"
    size: Literal[28, 64, 128, 224] = 28


class EuroSATDataConfig(Strict):
    """`data.name: eurosat` (see data/eurosat.py)."""

    # rgb: the JPEG release; ms: all 13 bands of the GeoTIFF release; or a list of band names
    bands: Literal["rgb", "ms"] | list[str] = "rgb"
    # the order of the 13 bands the backbone sees: wavelength (B8A after B08) or stored (B8A last)
    band_order: Literal["wavelength", "stored"] = "wavelength"


class DataConfig(Strict):
    name: str = "digits"
    root: str | None = None
    # Seeds every split carved out of the data; independent of `seed`, so all variants of a
    # comparison see the same train/val/test samples.
    split_seed: int = 0
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)  # only for datasets without a test split
    # None: taken from the dataset.
    image_size: int | None = Field(None, ge=4)
    channels: int | None = Field(None, ge=1)
    num_classes: int | None = Field(None, ge=2)
    mean: list[float] | None = None
    std: list[float] | None = None
    download: bool = False  # cifar, medmnist and eurosat (RGB); needs internet
    num_workers: int = Field(0, ge=0)
    # image_folder and webdataset: who decodes 8-bit RGB JPEG/PNG/WebP files for the consumers
    # that take uint8 tensors (the device-view path): torchvision.io, skipping PIL, or pil.
    # auto: torchvision where its image codecs load. Per-image (PIL) transforms always get PIL.
    decode: Literal["auto", "pil", "torchvision"] = "auto"
    # image_folder: an image file that cannot be read (corrupt, truncated, empty) stops the run
    # naming it (error, exit status 2), or is left out and listed in the report (skip; every
    # file is decoded once before training, verdicts cached). See data/bad_images.py.
    on_bad_image: Literal["error", "skip"] = "error"
    max_train_samples: int | None = Field(None, ge=2)  # seeded stratified cap, for quick runs
    fake: FakeDataConfig = FakeDataConfig()
    imagenet: ImageNetDataConfig = ImageNetDataConfig()
    medmnist: MedMNISTDataConfig = MedMNISTDataConfig()
    eurosat: EuroSATDataConfig = EuroSATDataConfig()

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        # a built-in name, or one the caller's code registered
        check_name("dataset", name, names.DATASETS, registry="ssl_pipeline.data:datasets")
        return name


class ViewsConfig(Strict):
    """SSL view augmentations. None means "fitted to the data" (see data/transforms.py)."""

    crop_min_scale: float | None = Field(None, gt=0, le=1)
    crop_max_scale: float | None = Field(None, gt=0, le=1)
    hflip_prob: float | None = Field(None, ge=0, le=1)
    vflip_prob: float | None = Field(None, ge=0, le=1)
    rotation_prob: float | None = Field(None, ge=0, le=1)
    color_jitter_prob: float | None = Field(None, ge=0, le=1)
    color_jitter_strength: float | None = Field(None, ge=0)
    grayscale_prob: float | None = Field(None, ge=0, le=1)
    blur_prob: float | None = Field(None, ge=0, le=1)
    solarize_prob: float | None = Field(None, ge=0, le=1)
    # device: workers only decode to uint8 tensors; the views are made batched on the training
    # device (data/device_views.py). workers: per-image lightly/torchvision transforms in the
    # DataLoader workers. Same augmentations and distributions either way.
    augment_on: Literal["device", "workers"] = "device"


class BackboneConfig(Strict):
    # "timm:<model>", "torchvision:<model>" or a bare timm name.
    name: str = "timm:resnet18"
    # small: 3x3 stride-1 stem without max-pool, for 28-64 px inputs (ResNet family).
    stem: Literal["auto", "default", "small"] = "auto"
    # false: every BatchNorm layer becomes Identity (the batch-norm ablation; see backbones.py)
    batchnorm: bool = True
    pretrained: bool = False  # timm/torchvision weights: needs internet
    weights: str | None = None  # a local weights file to start from
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to the model constructor


def _method_config_model() -> type[BaseModel]:
    """`method`: the chosen `name` plus one settings block per registered method."""
    blocks = {e.name: (e.extra["settings"], e.extra["settings"]()) for e in methods}

    def known_method(cls, name: str) -> str:
        methods.get(name)  # raises with the nearest registered name
        return name

    return create_model(  # type: ignore[call-overload]
        "MethodConfig",
        __base__=Strict,
        __validators__={"known_method": field_validator("name")(known_method)},
        name=(str, "simclr"),
        **blocks,
    )


MethodConfig = _method_config_model()


class PretrainConfig(Strict):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=2)  # global: across all devices, nodes and accumulation
    optimizer: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: float = Field(0.06, gt=0)  # base learning rate, at lr_reference_batch
    # effective lr = lr * batch/ref (linear), lr * sqrt(batch/ref) (sqrt), or lr (none).
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    lr_reference_batch: int = Field(256, ge=1)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = Field(0, ge=0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # final lr / effective lr with cosine
    max_steps: int | None = Field(None, ge=1)  # stop early (smoke runs)
    # Time budget of the whole stage (Lightning's max_time, counted across --resume): training
    # stops there, the backbone is exported and results record `stopped_by_budget`.
    max_minutes: float | None = Field(None, gt=0)
    # checkpoints/last.ckpt also every N optimizer steps (it is always written at epoch ends):
    # a killed run resumes from there, mid-epoch, with the same data order and views.
    checkpoint_every_n_steps: int | None = Field(None, ge=1)
    # A NaN or infinite loss: stop (exit status 1, checkpoints kept) or skip the step (counted
    # in results and report).
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    # Online monitor: k-NN top-1 on the validation split every N epochs (0 = off).
    monitor_every_n_epochs: int = Field(1, ge=0)
    monitor_k: int = Field(20, ge=1)
    monitor_temperature: float = Field(0.07, gt=0)
    # A separate labeled dataset for the monitor (bank: its train split, queries: its val
    # split), e.g. unlabeled domain images pretrained on, a labeled benchmark of the domain
    # watched. Seen at the pretraining data's size, channels and normalization. None: the
    # pretraining data's own train and val splits (when labeled).
    monitor_data: DataConfig | None = None
    # At most this many bank (train) images and queries (val images) for the monitor, a
    # class-proportional draw seeded by the data's split_seed, made once for the run (null:
    # all). Each pass extracts the features of both: over Fashion-MNIST's 57,000 + 3,000 a pass
    # took 36.5 s on a 2-core Zen 4, over 10,000 + 2,000 7.1 s (`ssl-pipeline estimate`). A
    # smaller bank usually gives a lower k-NN top-1 (fewer close neighbours), but the same draw
    # every epoch, so it still ranks the epochs for `best`.
    monitor_max_bank: int | None = Field(None, ge=1)
    monitor_max_queries: int | None = Field(None, ge=1)


class TrainerConfig(Strict):
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: Union[int, Literal["auto"]] = 1
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    # auto: on GPUs bf16-mixed where supported, else 16-mixed (fp16 with loss scaling); on
    # CPUs bf16-mixed where the CPU has native bf16 (AVX512-BF16/AMX), else 32.
    # The choice is recorded under `resolved.precision` in the run's recipe.yaml.
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = "auto"
    # Weights and images in channels_last memory layout in every stage (pretraining,
    # fine-tuning, feature extraction): faster convolutions, same values (compute.channels_last)
    channels_last: bool = True
    compile: bool = False  # torch.compile the backbone (slow first steps, then faster)
    accumulate_grad_batches: int = Field(1, ge=1)
    sync_batchnorm: bool = False
    # Under SLURM (srun): on SIGUSR1 (sbatch --signal=USR1@120) save a checkpoint and requeue the
    # job with `scontrol requeue` (Lightning's auto-requeue); the requeued job resumes. See
    # recipes/cluster/slurm.sbatch. Ignored, with a warning, outside SLURM.
    slurm_requeue: bool = False
    deterministic: bool = False
    log_every_n_steps: int = Field(10, ge=1)
    gradient_clip_val: float | None = Field(None, gt=0)

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value


class KNNConfig(Strict):
    # (k, temperature) pairs, all answered by one search; the first is the headline number.
    # DINO: k=20, T=0.07; InstDisc and lightly's benchmarks: k=200, T=0.1.
    settings: list[tuple[int, float]] = Field(default_factory=lambda: [(20, 0.07), (200, 0.1)])
    # How the exact search runs, here and in pretrain's k-NN monitor: faiss (its GPU index when
    # it sees a GPU); bf16, a bf16 first pass on the CPU's matrix units with exact float32
    # re-scoring (same neighbours; about 4x faiss on CPUs with Intel AMX, slower elsewhere);
    # auto: bf16 on AMX CPUs for banks of 8192+ rows, else faiss.
    search: Literal["auto", "faiss", "bf16"] = "auto"


class LinearProbeConfig(Strict):
    # lr x weight_decay grid (AdamW on standardized cached features), chosen on validation.
    lr_grid: list[float] = Field(default_factory=lambda: [1e-3, 1e-2, 1e-1])
    weight_decay_grid: list[float] = Field(default_factory=lambda: [0.0, 0.1, 1.0])
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=1)
    # Per probe (backbone, each baseline): training stops there, the best setting found so far
    # is reported over the seeds that finished, and the result records `stopped_by_budget`.
    max_minutes: float | None = Field(None, gt=0)


PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class FinetuneConfig(Strict):
    # SimCLR v2 protocol: class-balanced seeded label subsets; best epoch chosen on validation.
    label_fractions: list[float] = Field(default_factory=lambda: [1.0])
    # One number for every label fraction, or one per fraction, as SimCLR fine-tunes 60 epochs
    # on 1% of the labels and 30 on 10% ({0.01: 60, 0.1: 30}): a few images make few steps an
    # epoch, and a handful of steps measures the new head's initialization more than the backbone.
    epochs: PositiveInt | dict[float, PositiveInt] = 10
    # How many epochs of a run are validated, evenly spaced, the last always among them; the
    # best of those is reported (None: every epoch). A validation pass over the val split can
    # cost more than an epoch of training on 1% of the labels: 10 validations of a 30-epoch
    # run validate after epochs 3, 6, ..., 30.
    validations: PositiveInt | None = None
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: PositiveFloat | list[PositiveFloat] = 1e-3  # the new head's lr
    backbone_lr_ratio: NonNegativeFloat | list[NonNegativeFloat] = 0.1  # backbone lr = lr x ratio
    # A list for either (or both) is a grid: each (lr, ratio) pair fine-tunes from the same start
    # (same head init, same batches) and the pair whose best epoch scores highest on validation
    # is the one reported on test, chosen for each backbone, baseline, fraction and seed. One
    # fixed pair favours one backbone over another (a random init wants a low ratio, a
    # pretrained backbone often a higher one); the cost is one fine-tuning run per pair.
    weight_decay: float = Field(1e-4, ge=0)
    max_minutes: float | None = Field(None, gt=0)  # per fine-tuning run
    # Runs at 100% of the labels (seeds 0..N-1: head init, batch order and augmentation); fractions
    # below 1 repeat over eval.seeds (their subsets differ too). 1 follows SimCLR's protocol.
    full_data_seeds: int = Field(1, ge=1)
    # A fraction's images from a list file instead of a class-balanced seeded draw, e.g.
    # SimCLR's ImageNet lists: {0.01: 1percent.txt, 0.1: 10percent.txt} (one file name per line).
    subset_files: dict[float, str] = Field(default_factory=dict)

    @field_validator("lr", "backbone_lr_ratio")
    @classmethod
    def _grid_values(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError(f"a list here is a grid to choose from on validation: it needs "
                             f"at least one value and no repeats, got {value}")
        return value

    @model_validator(mode="after")
    def _epochs_per_fraction(self) -> FinetuneConfig:
        # Entries for fractions not run are allowed (a recipe's mapping outlives
        # `--set eval.finetune.label_fractions=[0.1]`); a misspelt fraction leaves one missing.
        if isinstance(self.epochs, dict) and (
                missing := sorted(set(self.label_fractions) - set(self.epochs))):
            raise ValueError(
                f"epochs has no entry for label fraction(s) {missing}: give one number for every "
                f"fraction, or one per fraction of label_fractions {self.label_fractions}, e.g. "
                f"{{{', '.join(f'{f}: 10' for f in self.label_fractions)}}}")
        return self

    def epochs_for(self, fraction: float) -> int:
        """The epochs of a fine-tuning run on `fraction` of the labels."""
        return self.epochs[fraction] if isinstance(self.epochs, dict) else self.epochs


class ClassicProbeConfig(Strict):
    """`linear_probe_classic`: the papers' probe, for numbers comparable with theirs. The frozen
    backbone (eval mode) runs on every augmented image of every epoch; only a linear head
    trains. Defaults: SimSiam's main_lincls.py (LARS, batch 4096, lr 0.1 x batch/256, no weight
    decay, cosine, 90 epochs, random resized crops and flips; Resize 256 / CenterCrop 224 for
    evaluation). The epoch is chosen on validation, reported on test."""

    epochs: int = Field(90, ge=1)
    batch_size: int = Field(4096, ge=1)  # capped at the training set's size
    optimizer: Literal["lars", "sgd"] = "lars"
    lr: float = Field(0.1, gt=0)  # at lr_reference_batch; scaled linearly with the batch
    lr_reference_batch: int = Field(256, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    crop_pct: float = Field(0.875, gt=0, le=1)  # evaluation: resize to size / crop_pct, crop size
    seeds: int = Field(1, ge=1)
    max_minutes: float | None = Field(None, gt=0)  # per probe run


class FewShotConfig(Strict):
    shots: list[int] = Field(default_factory=lambda: [1, 5, 10])
    seeds: int = Field(5, ge=1)
    # VTAB-1k as well: 800 train + 200 val examples, C chosen on the 200, refitted on all 1000
    vtab_1k: bool = False
    # Per evaluated backbone or baseline: no new draws after it; records `stopped_by_budget`.
    max_minutes: float | None = Field(None, gt=0)


class EvalConfig(Strict):
    # An exported backbone (ours or timm/torchvision weights) to evaluate when the recipe has no
    # pretrain stage; `ssl-pipeline evaluate --backbone` sets it.
    backbone: str | None = None
    # Reference rows through the same stages: the same architecture at random init, and raw
    # pixels (images of at most raw_pixels_max_dims values).
    baselines: list[Literal["random_init", "raw_pixels"]] = Field(
        default_factory=lambda: ["random_init", "raw_pixels"]
    )
    raw_pixels_max_dims: int = Field(4096, ge=1)
    # A baseline evaluated before with exactly the same weights, data, transform and settings
    # (the other variants of a suite, a re-run) is read from <cache_dir>/baselines/, not redone.
    reuse_baselines: bool = True
    seeds: int = Field(3, ge=1)  # linear probe and label-fraction repeats
    batch_size: int = Field(256, ge=1)  # feature extraction
    # Features for every evaluation (and its baselines) computed in float32 (the default,
    # whatever trainer.precision is), or under bf16 autocast: faster where bf16 is native
    # (Intel AMX, recent GPUs), features within bf16 rounding; cached apart from float32 ones.
    feature_precision: Literal["fp32", "bf16"] = "fp32"
    # Fine-tuning and classic-probe runs save a checkpoint (under <run dir>/runs/) at the end of
    # the first epoch that ends this many minutes after the last save (0: every epoch) and when
    # they finish; `--resume` goes on from it. null: none (a run cut off starts over).
    checkpoint_minutes: float | None = Field(5.0, ge=0)
    # In a process group (after DDP pretraining, or under torchrun): "all" processes train each
    # fine-tuning and classic-probe run together, a share of every batch each, gradients
    # averaged (evals/together.py); "rank0" trains them on rank 0 alone; "auto": all on GPUs,
    # rank 0 on CPUs (measured on 2 CPU cores: the gradient exchange cost more than it saved).
    finetune_processes: Literal["auto", "all", "rank0"] = "auto"
    cache_dir: str = "data/cache/features"
    knn: KNNConfig = KNNConfig()
    linear_probe: LinearProbeConfig = LinearProbeConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    linear_probe_classic: ClassicProbeConfig = ClassicProbeConfig()
    few_shot: FewShotConfig = FewShotConfig()


class WandbConfig(Strict):
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "ssl_pipeline"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    name: str | None = None


class TrackingConfig(Strict):
    wandb: WandbConfig = WandbConfig()


# `method: simsiam` is short for `method: {name: simsiam}`; likewise `data: fashion_mnist` and
# `backbone: timm:resnet50`.
NAMED_BLOCKS = ("data", "backbone", "method")


def expand_names(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with each named block given by its name alone written out as `{name: ...}`, in
    place: done before overrides or a suite's variant keys merge into the blocks, so that
    `--set method.simsiam.projection_dim=512` on `method: simsiam` keeps the name."""
    for key in NAMED_BLOCKS:
        if key in raw:
            raw[key] = _named_block(raw[key])
    return raw


def _named_block(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class Recipe(Strict):
    name: str | None = None  # default: the recipe file's stem
    seed: int = 0
    stages: list[str] = Field(default_factory=lambda: ["pretrain"])
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    method: MethodConfig = MethodConfig()  # type: ignore[valid-type]
    views: ViewsConfig = ViewsConfig()
    pretrain: PretrainConfig = PretrainConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    export: Literal["last", "best"] = "last"
    # Written by the pipeline into the run's recipe.yaml (effective lr, per-device batch, data
    # facts); read back for the record only and recomputed on every run.
    resolved: dict[str, Any] | None = None

    @field_validator(*NAMED_BLOCKS, mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        return _named_block(value)  # the Python API's recipes; files go through expand_names

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: list[str]) -> list[str]:
        if not stages:
            raise ValueError("list at least one stage, e.g. [pretrain]")
        for stage in stages:
            check_name("stage", stage, names.STAGES, registry="ssl_pipeline.pipeline:stage_registry")
        return stages

    @property
    def method_settings(self) -> BaseModel:
        """The settings block of the chosen method."""
        return getattr(self.method, self.method.name)


# ---------------------------------------------------------------- loading and overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"a.b=VALUE"` -> `(["a", "b"], value parsed as YAML)`.

    >>> parse_override("trainer.devices=2")
    (['trainer', 'devices'], 2)
    >>> parse_override("data.name=fake")
    (['data', 'name'], 'fake')
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SSLPipelineError(f"--set {text!r}: write KEY=VALUE, e.g. --set pretrain.epochs=5")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as err:
        raise SSLPipelineError(f"--set {text!r}: the value is not valid YAML ({err})") from None
    return key.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of `raw` with each `KEY=VALUE` override set at its dotted path. A named block
    set to a name (`method=simsiam`) sets its name and keeps its other keys."""
    raw = expand_names(copy.deepcopy(raw))
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1 and path[0] in NAMED_BLOCKS and isinstance(value, str):
            path = [path[0], "name"]
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return raw


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SSLPipelineError(
            f"recipe file {str(path)!r} does not exist; pass a path such as recipes/quickstart.yaml"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SSLPipelineError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SSLPipelineError(f"{path}: a recipe is a YAML mapping of keys, got {type(raw).__name__}")
    return raw


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `--set` style overrides and validate it strictly."""
    path = Path(path)
    raw = read_yaml(path)
    if "suite" in raw:  # a suite names its variants; each is a recipe (ssl_pipeline/suite.py)
        raise SSLPipelineError(
            f"{path} is a suite (a top-level 'suite:' block), not one recipe; run it with "
            f"`ssl-pipeline run {path}`, check every variant with `ssl-pipeline validate {path}`, "
            f"time it with `ssl-pipeline estimate {path}`, or load it with ssl_pipeline.suite.load_suite"
        )
    raw = apply_overrides(raw, overrides)
    raw.setdefault("name", path.stem)
    return recipe_from_dict(raw, source=str(path))


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise SSLPipelineError(format_validation_error(err, source)) from None


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (every key, defaults included)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- error messages


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {explain_error(e)}" for e in other_branches_dropped(err.errors())]
    return "\n".join(lines[:5]) + ("" if len(lines) <= 5 else f"\n... and {len(lines) - 5} more")


def key_path(error: dict[str, Any]) -> list[str]:
    """The recipe key of an error, without pydantic's names for the branches of a value that
    may be one number or a list (or mapping) of them (`lr.list[constrained-float].1` -> `lr.1`)."""
    return [str(p) for p in error["loc"] if not (isinstance(p, str) and _BRANCH_TAG.fullmatch(p))]


_BRANCH_TAG = re.compile(r"(constrained-)?(float|int)|(list|dict)\[.*\]")


def other_branches_dropped(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For a value that may be a number or a list (or mapping) of numbers, pydantic reports a
    bad value against both; keep the errors of the branch the value took (a list: its items')."""
    def wrong_branch(e: dict[str, Any]) -> bool:
        a_list_as_a_number = e["type"] in ("float_type", "float_parsing", "int_type") \
            and isinstance(e.get("input"), (list, dict))
        a_number_as_a_list = e["type"] in ("list_type", "dict_type") \
            and _BRANCH_TAG.fullmatch(str(e["loc"][-1])) is not None
        return a_list_as_a_number or a_number_as_a_list

    keys = [".".join(key_path(e)) for e in errors]
    kept = [e for e, key in zip(errors, keys)
            if not (wrong_branch(e) and sum(k.startswith(key) for k in keys) > 1)]
    return kept or errors


def explain_error(error: dict[str, Any]) -> str:
    loc = key_path(error)
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        hint = nearest_key(loc)
        return f"unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else "")
    if error["type"] == "value_error":  # our validators' messages say what is wrong and why
        return f"{key}: {error['msg'].removeprefix('Value error, ')}"
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    if error["type"] == "model_type" and len(loc) == 1 and key in NAMED_BLOCKS:
        return (f"{key}: give a name ({key}: {_EXAMPLE_NAMES[key]}) or a mapping "
                f"({key}: {{name: {_EXAMPLE_NAMES[key]}, ...}}){shown}")
    return f"{key}: {error['msg']}{shown}"


_EXAMPLE_NAMES = {"data": "fashion_mnist", "backbone": "timm:resnet50", "method": "simsiam"}


def all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key path of the schema."""
    keys = []
    for name, field in model.model_fields.items():
        path = prefix + name
        keys.append(path)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys.extend(all_keys(field.annotation, path + "."))
    return keys


def nearest_key(loc: list[str]) -> str | None:
    """The valid key closest to an unknown one: the same name in another block, a sibling
    spelled alike, or a key spelled alike anywhere."""
    keys = all_keys(Recipe)
    parent = ".".join(loc[:-1])
    # A known key in the wrong block (pretrain.temperature -> method.simclr.temperature).
    same_leaf = [k for k in keys if k.rpartition(".")[2] == loc[-1] and k.rpartition(".")[0] != parent]
    if same_leaf:
        return same_leaf[0]
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    hint = nearest(".".join(loc), siblings)
    if hint:
        return hint
    matches = difflib.get_close_matches(loc[-1], [k.rpartition(".")[2] for k in keys], n=1)
    return next((k for k in keys if matches and k.endswith("." + matches[0])), None)
