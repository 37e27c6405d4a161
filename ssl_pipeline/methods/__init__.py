"""Pretraining methods, one file each, registered by name with their recipe settings."""

from ssl_pipeline.methods.base import OptimSettings, PretrainMethod, settings_model
from ssl_pipeline.methods.simclr import SimCLR
from ssl_pipeline.methods.simsiam import SimSiam
from ssl_pipeline.methods.supervised import Supervised
from ssl_pipeline.registry import Registry

methods: Registry = Registry("method")

for _name, _cls, _description in [
    ("simclr", SimCLR, "SimCLR (Chen et al. 2020): two views, projection MLP, NT-Xent loss"),
    ("simsiam", SimSiam, "SimSiam (Chen & He 2021): projector, predictor, stop-gradient"),
    ("supervised", Supervised, "supervised baseline: cross-entropy on labels, same engine"),
]:
    methods.register(_name, _description, settings=settings_model(_cls))(_cls)

__all__ = ["methods", "OptimSettings", "PretrainMethod", "SimCLR", "SimSiam", "Supervised"]
