"""The online monitor's numbers and the per-epoch curve the pretraining stage records."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ssl_pipeline.monitor import VAL_ACCURACY_KEY, OnlineKNNMonitor
from ssl_pipeline.pretrain import epoch_curve


def _loader(x, y):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


class _Module(nn.Module):
    """A stand-in LightningModule: identity backbone, a fixed linear head, logs collected."""

    def __init__(self, head: nn.Linear | None, needs_labels: bool):
        super().__init__()
        self.backbone = nn.Flatten()
        if head is not None:
            self.head = head
        self.needs_labels = needs_labels
        self.logged = {}

    @property
    def device(self):
        return torch.device("cpu")

    def log(self, key, value, **_):
        self.logged[key] = value


def _trainer(epoch):
    strategy = SimpleNamespace(broadcast=lambda value, src=0: value)
    return SimpleNamespace(current_epoch=epoch - 1, max_epochs=10, strategy=strategy)


def _data():
    # two well separated classes in 2-D; the head below gets exactly 3 of the 4 val points right
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    bank_y = torch.tensor([0, 0, 1, 1])
    val = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.8, 0.2], [0.4, 0.6]])
    val_y = torch.tensor([0, 1, 0, 1])
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():  # logits (x0, x1 / 2): (0.4, 0.6) comes out as class 0
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
    return _loader(bank, bank_y), _loader(val, val_y), head


def test_knn_and_head_accuracy_measured_on_the_validation_split():
    bank, val, head = _data()
    monitor = OnlineKNNMonitor(bank, val, num_classes=2, every_n_epochs=1, k=2)
    module = _Module(head, needs_labels=True)
    monitor.on_train_epoch_end(_trainer(1), module)
    assert monitor.by_epoch[1] == pytest.approx(1.0)  # k-NN gets all four
    assert monitor.val_accuracy_by_epoch[1] == pytest.approx(0.75)  # (0.4, 0.6) -> class 0
    assert module.logged[VAL_ACCURACY_KEY] == pytest.approx(0.75)
    assert monitor.key == "monitor/knn_top1" and module.logged[monitor.key] == pytest.approx(1.0)


def test_ssl_methods_get_no_head_accuracy_and_skipped_epochs_are_not_measured():
    bank, val, _ = _data()
    monitor = OnlineKNNMonitor(bank, val, num_classes=2, every_n_epochs=2, k=2)
    module = _Module(None, needs_labels=False)
    monitor.on_train_epoch_end(_trainer(1), module)
    assert monitor.by_epoch == {} and module.logged == {}
    monitor.on_train_epoch_end(_trainer(2), module)
    assert list(monitor.by_epoch) == [2] and monitor.val_accuracy_by_epoch == {}
    assert VAL_ACCURACY_KEY not in module.logged


def test_multi_label_data_is_monitored_by_the_mean_per_label_auc_of_knn_votes():
    """No top-1 for label vectors: each label is scored by the neighbours' weighted votes and
    the monitor reports, logs and selects on the mean per-label ROC AUC."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from ssl_pipeline.evals.knn import knn_classify

    rng = np.random.default_rng(0)
    bank_y = (rng.random((60, 3)) < 0.5).astype(np.int64)
    val_y = (rng.random((30, 3)) < 0.5).astype(np.int64)
    val_y[:, 2] = np.arange(30) % 2
    # label j lights up feature j; noise keeps the AUC below 1
    bank_x = (bank_y * 1.0 + rng.normal(0, 0.6, (60, 3))).astype(np.float32)
    val_x = (val_y * 1.0 + rng.normal(0, 0.6, (30, 3))).astype(np.float32)
    bank, val = (_loader(torch.from_numpy(x), torch.from_numpy(y))
                 for x, y in ((bank_x, bank_y), (val_x, val_y)))
    monitor = OnlineKNNMonitor(bank, val, num_classes=3, every_n_epochs=1, k=10, multi_label=True)
    assert (monitor.metric, monitor.key) == ("knn_auc", "monitor/knn_auc")
    module = _Module(None, needs_labels=False)
    monitor.on_train_epoch_end(_trainer(1), module)
    scores = knn_classify(bank_x, bank_y, val_x, 3, (10,), 0.07)[10]
    expected = np.mean([roc_auc_score(val_y[:, j], scores[:, j]) for j in range(3)])
    assert 0.6 < expected < 1.0
    assert monitor.by_epoch[1] == pytest.approx(expected)
    assert module.logged == {"monitor/knn_auc": pytest.approx(expected)}
    # a val split where no label has both classes has no AUC: NaN is logged (never selected
    # as best), None recorded
    empty = _loader(torch.from_numpy(val_x), torch.zeros(30, 3, dtype=torch.int64))
    monitor = OnlineKNNMonitor(bank, empty, num_classes=3, every_n_epochs=1, k=10, multi_label=True)
    module = _Module(None, needs_labels=False)
    monitor.on_train_epoch_end(_trainer(1), module)
    assert monitor.by_epoch == {1: None} and np.isnan(module.logged["monitor/knn_auc"])


def test_epoch_curve_accumulates_wall_time_and_keeps_gaps():
    history = [
        {"epoch": 1, "seconds": 10.0, "loss": 2.0},
        {"epoch": 2, "seconds": 12.5, "loss": 1.5, "knn_top1": 0.61234567},
        {"epoch": 3, "seconds": 11.0, "loss": 1.25},
    ]
    curve = epoch_curve(history)
    assert curve == {"epoch": [1, 2, 3], "seconds": [10.0, 22.5, 33.5], "loss": [2.0, 1.5, 1.25],
                     "knn_top1": [None, 0.61235, None]}
    assert epoch_curve([]) == {"epoch": [], "seconds": []}


def test_the_monitor_caps_keep_class_proportions_with_one_seeded_draw():
    import numpy as np

    from ssl_pipeline.data.base import ArrayDataset, Split

    labels = np.repeat([0, 1, 2], [60, 30, 10])
    split = Split(ArrayDataset(np.zeros((100, 2, 2), np.uint8), labels), np.arange(100)[::-1])
    assert split.stratified(None, seed=0) is split and split.stratified(100, seed=0) is split
    drawn = split.stratified(50, seed=0)
    assert len(drawn) == 50 and np.bincount(drawn.labels).tolist() == [30, 15, 5]
    assert set(drawn.indices) <= set(split.indices)  # the same source, no sample twice
    assert len(set(drawn.indices)) == 50
    assert drawn.indices.tolist() == split.stratified(50, seed=0).indices.tolist()  # every process
    assert drawn.indices.tolist() != split.stratified(50, seed=1).indices.tolist()


def test_a_capped_monitor_searches_only_its_share_and_records_it(tmp_path, tiny_overrides, capsys):
    import ssl_pipeline

    recipe = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    overrides = [*tiny_overrides, "stages=[pretrain]", "pretrain.epochs=1",
                 "pretrain.monitor_max_bank=20", "pretrain.monitor_max_queries=8"]
    result = ssl_pipeline.run(recipe, overrides=overrides, out_dir=tmp_path / "capped")
    pre = result.results["pretrain"]
    assert (pre["monitor_bank_images"], pre["monitor_query_images"]) == (20, 8)
    assert set(pre["monitor_knn_top1_by_epoch"]) == {"1"}
    assert "monitor: bank 20 of 48 train images, queries 8 of 16 val images" in capsys.readouterr().out
    whole = ssl_pipeline.run(recipe, overrides=overrides[:-2], out_dir=tmp_path / "whole", quiet=True)
    assert (whole.results["pretrain"]["monitor_bank_images"],
            whole.results["pretrain"]["monitor_query_images"]) == (48, 16)
