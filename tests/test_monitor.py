"""The online monitor's numbers and the per-epoch curve the pretraining stage records."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ssl_pipeline.monitor import MONITOR_KEY, VAL_ACCURACY_KEY, OnlineKNNMonitor
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
    assert module.logged[MONITOR_KEY] == pytest.approx(1.0)


def test_ssl_methods_get_no_head_accuracy_and_skipped_epochs_are_not_measured():
    bank, val, _ = _data()
    monitor = OnlineKNNMonitor(bank, val, num_classes=2, every_n_epochs=2, k=2)
    module = _Module(None, needs_labels=False)
    monitor.on_train_epoch_end(_trainer(1), module)
    assert monitor.by_epoch == {} and module.logged == {}
    monitor.on_train_epoch_end(_trainer(2), module)
    assert list(monitor.by_epoch) == [2] and monitor.val_accuracy_by_epoch == {}
    assert VAL_ACCURACY_KEY not in module.logged


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
