"""The recipe schema: strict, typed, helpful errors, overrides, resolved dump."""

from pathlib import Path

import pytest
import yaml

from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.recipe import Recipe, apply_overrides, dump_recipe, load_recipe, recipe_from_dict
from ssl_pipeline.suite import is_suite_file

# suite files are recipes of recipes: tests/test_suite.py validates and runs those
RECIPES = sorted(p for p in Path(__file__).parents[1].joinpath("recipes").glob("*.yaml")
                 if not is_suite_file(p))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def error_of(raw: dict) -> str:
    with pytest.raises(SSLPipelineError) as info:
        recipe_from_dict(raw)
    return str(info.value)


def test_defaults_are_valid():
    recipe = Recipe()
    assert recipe.method.name == "simclr"
    assert recipe.stages == ["pretrain"]
    assert recipe.method_settings.temperature == 0.5


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_file_validates(path):
    load_recipe(path)


def test_unknown_key_names_itself_and_nearest_sibling():
    message = error_of({"pretrain": {"lrr": 0.1}})
    assert "unknown key 'pretrain.lrr'" in message and "'pretrain.lr'" in message


def test_key_in_wrong_block_points_to_the_right_block():
    message = error_of({"pretrain": {"temperature": 0.1}})
    assert "pretrain.temperature" in message and "method.simclr.temperature" in message


def test_unknown_top_level_key():
    message = error_of({"trainr": {}})
    assert "unknown key 'trainr'" in message and "'trainer'" in message


def test_wrong_type_names_field():
    message = error_of({"pretrain": {"epochs": "many"}})
    assert "pretrain.epochs" in message and "many" in message


def test_wrong_choice_lists_allowed_values():
    message = error_of({"pretrain": {"optimizer": "adam"}})
    assert "pretrain.optimizer" in message
    assert "'sgd'" in message and "'lars'" in message and "'adamw'" in message


def test_unknown_dataset_method_and_stage_suggest_nearest():
    assert "did you mean 'digits'" in error_of({"data": {"name": "digit"}})
    assert "did you mean 'simsiam'" in error_of({"method": {"name": "simsam"}})
    assert "did you mean 'pretrain'" in error_of({"stages": ["pretrian"]})


def test_other_methods_settings_do_not_invalidate_the_recipe():
    raw = {"method": {"name": "simclr", "simclr": {"temperature": 0.1},
                      "simsiam": {"projection_dim": 256}}}
    assert recipe_from_dict(raw).method_settings.temperature == 0.1
    switched = recipe_from_dict(apply_overrides(raw, ["method.name=simsiam"]))
    assert switched.method_settings.projection_dim == 256
    assert "method.simsiam.temprature" in error_of(
        {"method": {"name": "simsiam", "simsiam": {"temprature": 1}}}
    )


def test_overrides_parse_yaml_values_at_dotted_paths(tmp_path):
    path = write(tmp_path, "pretrain:\n  epochs: 3\n")
    recipe = load_recipe(path, ["trainer.devices=2", "data.name=fake", "pretrain.lr=1e-3",
                                "views.hflip_prob=0", "tracking.wandb.tags=[a, b]"])
    assert recipe.trainer.devices == 2 and recipe.data.name == "fake"
    assert recipe.pretrain.lr == pytest.approx(1e-3) and recipe.pretrain.epochs == 3
    assert recipe.tracking.wandb.tags == ["a", "b"]
    assert recipe.name == "r"  # from the file stem


def test_a_named_block_may_be_given_by_its_name_alone(tmp_path):
    short = load_recipe(write(tmp_path, "data: fake\nbackbone: timm:resnet50\nmethod: simsiam\n"))
    long = load_recipe(write(tmp_path, "data: {name: fake}\nbackbone: {name: timm:resnet50}\n"
                                       "method: {name: simsiam}\n"))
    assert short == long and short.method.name == "simsiam" and short.backbone.name == "timm:resnet50"
    assert recipe_from_dict({"method": "supervised"}).method.name == "supervised"  # the Python API
    # an override into the block keeps the name (written out before overrides merge)
    recipe = load_recipe(write(tmp_path, "method: simsiam\n"), ["method.simsiam.projection_dim=64"])
    assert (recipe.method.name, recipe.method.simsiam.projection_dim) == ("simsiam", 64)
    # and a name given to a block keeps its other keys
    path = write(tmp_path, "method:\n  name: simclr\n  simsiam: {projection_dim: 64}\n")
    recipe = load_recipe(path, ["method=simsiam", "data=fake"])
    assert (recipe.method.name, recipe.method.simsiam.projection_dim, recipe.data.name) == ("simsiam", 64, "fake")


@pytest.mark.parametrize("key, value", [("method", 3), ("data", [1]), ("backbone", None)])
def test_a_named_block_that_is_neither_a_name_nor_a_mapping_says_what_to_write(key, value):
    message = error_of({key: value})
    assert f"{key}: give a name ({key}: " in message and f"or a mapping ({key}: {{name: " in message


@pytest.mark.parametrize("bad", ["novalue", "=3", "a.b=[unclosed"])
def test_malformed_overrides_are_clear(tmp_path, bad):
    with pytest.raises(SSLPipelineError, match="--set"):
        load_recipe(write(tmp_path, "{}"), [bad])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SSLPipelineError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(SSLPipelineError, match="mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(SSLPipelineError, match="not valid YAML"):
        load_recipe(write(tmp_path, "a: [\n"))


def test_precision_accepts_a_number(tmp_path):
    assert load_recipe(write(tmp_path, "trainer: {precision: 32}")).trainer.precision == "32"


def test_resolved_dump_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, "method: {name: simsiam}\npretrain: {epochs: 7}\n"))
    recipe = recipe.model_copy(update={"resolved": {"effective_lr": 0.1}})
    dumped = yaml.safe_load(dump_recipe(recipe))
    assert dumped["resolved"]["effective_lr"] == 0.1
    assert dumped["pretrain"]["batch_size"] == 256  # defaults written out in full
    again = recipe_from_dict(dumped)
    assert again.model_dump() == recipe.model_dump()


def test_views_are_made_on_the_device_unless_the_recipe_says_workers():
    assert Recipe().views.augment_on == "device"
    assert recipe_from_dict({"views": {"augment_on": "workers"}}).views.augment_on == "workers"
    assert "views.augment_on" in error_of({"views": {"augment_on": "gpu"}})


def test_precision_is_auto_by_default_and_resolved_per_device(monkeypatch):
    import torch

    from ssl_pipeline import compute
    from ssl_pipeline.pipeline import resolve

    assert Recipe().trainer.precision == "auto" and Recipe().trainer.compile is False
    for native_bf16, gpu, cpu in [(True, "bf16-mixed", "bf16-mixed"), (False, "16-mixed", "32")]:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native_bf16)
        monkeypatch.setattr(compute, "cpu_has_native_bf16", lambda: native_bf16)
        assert compute.resolve_precision("auto", "gpu") == gpu
        assert compute.resolve_precision("auto", "cpu") == cpu
        assert compute.resolve_precision("32", "gpu") == "32"  # an explicit choice stays
        on_cpu = recipe_from_dict({"trainer": {"accelerator": "cpu"}})
        assert resolve(on_cpu).precision == cpu
    assert resolve(recipe_from_dict({"trainer": {"accelerator": "cpu", "precision": 32}})).precision == "32"


HEAVY_MODULES = ("torch", "torchvision", "pytorch_lightning", "lightly", "timm", "faiss")


def heavy_modules_imported_by(code: str) -> list[str]:
    """Which of HEAVY_MODULES a fresh interpreter has imported after running `code`."""
    import subprocess
    import sys

    probe = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])


def test_checking_a_recipe_imports_neither_torch_nor_lightning():
    """`ssl-pipeline validate` answers at once: the names and method settings a recipe is
    checked against come without importing the modules that register them."""
    recipes = Path(__file__).parents[1] / "recipes"
    assert heavy_modules_imported_by(
        "from ssl_pipeline.recipe import load_recipe\n"
        "from ssl_pipeline.suite import load_suite, variant_recipes\n"
        f"load_recipe({str(recipes / 'quickstart.yaml')!r})\n"
        f"variant_recipes(load_suite({str(recipes / 'fashion_mnist_suite.yaml')!r}, []), source='suite')") == []


def test_the_names_a_recipe_is_checked_against_are_the_registered_ones():
    import ssl_pipeline
    from ssl_pipeline import names

    from ssl_pipeline.backbones import backbones
    from ssl_pipeline.data import datasets
    from ssl_pipeline.pipeline import stage_registry

    assert names.DATASETS == tuple(n for n, _ in ssl_pipeline.list_datasets())
    assert names.STAGES == tuple(n for n, _ in ssl_pipeline.list_stages())
    # what `ssl-pipeline list` shows before the registries are imported is what they hold
    assert sorted(names.STAGE_DESCRIPTIONS.items()) == [(e.name, e.description) for e in stage_registry]
    assert sorted(names.BACKBONE_DESCRIPTIONS.items()) == [(e.name, e.description) for e in backbones]
    assert sorted(names.DATASET_DESCRIPTIONS.items()) == [(e.name, e.description) for e in datasets]


def test_listing_stages_backbones_and_datasets_imports_neither_torch_nor_timm():
    """`ssl-pipeline list stages|backbones|datasets` answered in 2-8 s while importing them."""
    code = ("import ssl_pipeline\n"
            "listed = ssl_pipeline.list_stages() + ssl_pipeline.list_backbones()"
            " + ssl_pipeline.list_datasets()\n"
            "assert ('pretrain', 'train the backbone with the recipe\\'s method, then export it') in listed\n"
            "assert len(listed) == 21, listed")
    assert heavy_modules_imported_by(code) == []


def test_a_stage_registered_by_code_is_listed(monkeypatch):
    import ssl_pipeline
    from ssl_pipeline.pipeline import stage_registry  # the built-ins registered before the copy

    monkeypatch.setattr(stage_registry, "_entries", dict(stage_registry._entries))
    stage_registry.register("my_stage", "a stage of our own")(lambda ctx: {})
    assert ("my_stage", "a stage of our own") in ssl_pipeline.list_stages()


def test_method_settings_read_from_source_equal_the_imported_constructors():
    from ssl_pipeline.methods import methods
    from ssl_pipeline.methods.settings import settings_model

    def described(model):
        return {k: (str(f.annotation), f.default) for k, f in model.model_fields.items()}

    for entry in methods:
        assert described(entry.extra["settings"]) == described(settings_model(methods.get(entry.name).obj))
    assert set(described(methods.get("simsiam").extra["settings"])) == {
        "projection_dim", "prediction_hidden_dim", "fixed_predictor_lr", "collapse_warn_below"}


def test_a_constructor_the_source_reading_cannot_follow_is_imported(tmp_path, monkeypatch):
    """A default that is not a literal (or a type it does not know) falls back to importing the
    class; a readable one is not imported at all."""
    import sys

    from ssl_pipeline.methods.settings import settings_for

    (tmp_path / "plain_method.py").write_text(
        "from __future__ import annotations\n"
        "from typing import Literal\n"
        "class Plain:\n"
        "    def __init__(self, backbone, optim, num_classes: int | None = None,\n"
        "                 width: int = 64, mode: Literal['a', 'b'] = 'a'):\n"
        "        pass\n")
    (tmp_path / "computed_method.py").write_text(
        "WIDTH = 64\n"
        "class Computed:\n"
        "    def __init__(self, backbone, optim, width: int = WIDTH * 2, ratio: float = 0.5):\n"
        "        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plain = settings_for("plain_method:Plain")
    assert "plain_method" not in sys.modules
    assert plain().width == 64 and plain().mode == "a" and list(plain.model_fields) == ["width", "mode"]
    with pytest.raises(Exception, match="mode"):
        plain(mode="c")
    computed = settings_for("computed_method:Computed")
    assert "computed_method" in sys.modules  # imported: WIDTH * 2 is not a literal
    assert computed().width == 128 and computed().ratio == 0.5


def test_a_dataset_registered_by_the_callers_code_is_accepted(monkeypatch):
    """Built-in names are checked without the registry; any other name is looked up in it."""
    from ssl_pipeline.data import datasets

    monkeypatch.setattr(datasets, "_entries", dict(datasets._entries))  # undone after the test
    datasets.register("my_scans", "the caller's own dataset")(lambda cfg: None)
    assert recipe_from_dict({"data": {"name": "my_scans"}}).data.name == "my_scans"
    with pytest.raises(SSLPipelineError, match="did you mean 'my_scans'"):
        recipe_from_dict({"data": {"name": "my_scan"}})
