"""Time budgets (`max_minutes`): a deadline for loops we write, and Lightning's max_time for
the stages the Trainer runs (pretraining, fine-tuning)."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class Deadline:
    """`max_minutes` from now (None: no budget); `passed` once the time is up."""

    def __init__(self, max_minutes: float | None):
        self.at = None if max_minutes is None else time.monotonic() + 60 * max_minutes

    @property
    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


def time_ran_out(trainer: pl.Trainer) -> bool:
    """True when Lightning's max_time (a `max_minutes` budget) ended training."""
    timer = next((c for c in trainer.callbacks if isinstance(c, pl.callbacks.Timer)), None)
    remaining = timer.time_remaining("train") if timer is not None else None
    return remaining is not None and remaining <= 0
