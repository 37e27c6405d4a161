"""Progress bars: on terminals for every long step, nothing in CI logs or with --quiet."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import ssl_pipeline
from ssl_pipeline.progress import on_terminal, progress_bar

QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
EVAL_STAGES = ["pretrain", "knn", "linear_probe", "few_shot", "finetune"]
SMALL_EVAL = ["eval.finetune.epochs=1", "eval.finetune.label_fractions=[1.0]",
              "eval.few_shot.shots=[1]", "eval.few_shot.seeds=2", "eval.linear_probe.epochs=3",
              "eval.seeds=2", "eval.baselines=[random_init]"]


class FakeTerminal:
    """A stream that says it is a terminal and keeps what is written to it."""

    def __init__(self):
        self.parts: list[str] = []

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(self.parts)


def test_bar_only_on_a_terminal_and_only_when_named(monkeypatch):
    items = [1, 2, 3]
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert on_terminal()
    assert progress_bar(items, None) is items  # quiet: the items themselves
    assert list(progress_bar(items, "counting")) == items
    assert "counting" in terminal.text and "0/3" in terminal.text  # a bar with the total
    monkeypatch.setattr(sys, "stderr", open("/dev/null", "w"))  # a redirected stream: no bar
    assert not on_terminal()
    assert progress_bar(items, "counting") is items


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [False, True])
def test_every_long_step_shows_a_bar_on_a_terminal(tmp_path, tiny_overrides, monkeypatch, quiet):
    out, err = FakeTerminal(), FakeTerminal()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    ssl_pipeline.run(QUICKSTART, out_dir=tmp_path / "run", quiet=quiet,
                     overrides=[*tiny_overrides, f"stages={EVAL_STAGES}", *SMALL_EVAL,
                                f"eval.cache_dir={tmp_path / 'cache'}"])  # extract, not read
    shown = out.text + err.text
    expected = ["features train backbone", "features test random_init", "knn backbone",
                "linear probe backbone grid", "linear probe random_init seed 1",
                "few-shot backbone 1-shot", "Epoch 0"]  # "Epoch": Lightning's bars (pretrain, finetune)
    if quiet:
        assert shown == ""
    else:
        missing = [name for name in expected if name not in shown]
        assert missing == [], shown[-2000:]
