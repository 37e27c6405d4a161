"""ssl_pipeline: pretrain image backbones without labels and measure how good they are.

Public API: `run`, `run_suite`, `load_recipe`, `load_suite`, `create_backbone`, `load_backbone`, `list_methods`,
`list_backbones`, `list_datasets`, `list_stages`, and `SSLPipelineError`. Names are imported
on first use, so `import ssl_pipeline` stays fast and submodules import without cycles.
"""

import sys

from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.registry import load

__version__ = "0.1.0"

_LAZY = {
    "run": "ssl_pipeline.pipeline",
    "RunResult": "ssl_pipeline.pipeline",
    "load_recipe": "ssl_pipeline.recipe",
    "Recipe": "ssl_pipeline.recipe",
    "create_backbone": "ssl_pipeline.backbones",
    "load_backbone": "ssl_pipeline.backbones",
    "run_suite": "ssl_pipeline.suite",
    "load_suite": "ssl_pipeline.suite",
}
_REGISTRIES = {
    "methods": "ssl_pipeline.methods:methods",
    "backbones": "ssl_pipeline.backbones:backbones",
    "datasets": "ssl_pipeline.data:datasets",
    "stages": "ssl_pipeline.pipeline:stage_registry",
}


def __getattr__(name: str):
    if name in _LAZY:
        return load(f"{_LAZY[name]}:{name}")
    raise AttributeError(f"module 'ssl_pipeline' has no attribute {name!r}")


# kind -> (the module holding its registry, the built-in entries' descriptions in names.py)
_BUILT_IN = {"backbones": ("ssl_pipeline.backbones", "BACKBONE_DESCRIPTIONS"),
             "datasets": ("ssl_pipeline.data.base", "DATASET_DESCRIPTIONS"),
             "stages": ("ssl_pipeline.stages", "STAGE_DESCRIPTIONS")}


def _list(kind: str) -> list[tuple[str, str]]:
    registry_module, descriptions = _BUILT_IN.get(kind, (None, None))
    if registry_module is not None and registry_module not in sys.modules:
        # Nothing can have registered more than the built-ins without importing the registry:
        # list them from names.py rather than import torch, timm and Lightning (2-8 s).
        from ssl_pipeline import names

        return sorted(getattr(names, descriptions).items())
    return [(e.name, e.description) for e in load(_REGISTRIES[kind])]


def list_methods() -> list[tuple[str, str]]:
    """(name, description) of every registered pretraining method."""
    return _list("methods")


def list_backbones() -> list[tuple[str, str]]:
    """(name, description) of every backbone family and registered variant."""
    return _list("backbones")


def list_datasets() -> list[tuple[str, str]]:
    """(name, description) of every registered dataset."""
    return _list("datasets")


def list_stages() -> list[tuple[str, str]]:
    """(name, description) of every pipeline stage a recipe can list."""
    return _list("stages")


__all__ = [
    "run", "RunResult", "load_recipe", "Recipe", "create_backbone", "load_backbone",
    "list_methods", "list_backbones", "list_datasets", "list_stages", "SSLPipelineError",
]
