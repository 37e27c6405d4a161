"""Pretraining methods, one file each, registered by name with their recipe settings.

The classes are imported on first use (`methods.get(name).obj`, or `from ssl_pipeline.methods
import SimCLR`): registering them, and checking a recipe's method block against their settings
(read from their source, see settings.py), does not import torch or Lightning.
"""

from ssl_pipeline.methods.settings import settings_for
from ssl_pipeline.registry import Registry, load

methods: Registry = Registry("method")

for _name, _target, _description in [
    ("simclr", "ssl_pipeline.methods.simclr:SimCLR",
     "SimCLR (Chen et al. 2020): two views, projection MLP, NT-Xent loss"),
    ("simsiam", "ssl_pipeline.methods.simsiam:SimSiam",
     "SimSiam (Chen & He 2021): projector, predictor, stop-gradient"),
    ("supervised", "ssl_pipeline.methods.supervised:Supervised",
     "supervised baseline: cross-entropy on labels, same engine"),
]:
    methods.register_lazy(_name, _description, _target, settings=settings_for(_target))

_LAZY = {
    "OptimSettings": "ssl_pipeline.methods.base",
    "PretrainMethod": "ssl_pipeline.methods.base",
    "SimCLR": "ssl_pipeline.methods.simclr",
    "SimSiam": "ssl_pipeline.methods.simsiam",
    "Supervised": "ssl_pipeline.methods.supervised",
}


def __getattr__(name: str):
    if name in _LAZY:
        return load(f"{_LAZY[name]}:{name}")
    raise AttributeError(f"module 'ssl_pipeline.methods' has no attribute {name!r}")


__all__ = ["methods", "OptimSettings", "PretrainMethod", "SimCLR", "SimSiam", "Supervised"]
