"""The demo's training runs: a few steps with torch's ops and with normax.torch from the same seed.

Same initial weights and batches, so the first losses differ only by the ops' rounding (float32:
a few ULP of values near log(vocabulary) ~ 3.7, so 1e-5 is a loose bound), and a handful of steps
keeps them that close.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# The demo is a script beside the package, not in it: loaded from its file.
DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"
_spec = importlib.util.spec_from_file_location("demo", DEMO)
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def test_demo_trains_identically_with_both_op_sets(capsys):
    result = demo.main(["--steps", "6", "--batch", "4", "--context", "32", "--threads", "1"])
    torch_losses, normax_losses = result["torch"], result["normax"]
    assert len(torch_losses) == len(normax_losses) == 6
    assert max(abs(a - b) for a, b in zip(torch_losses, normax_losses)) < 1e-5
    assert normax_losses[-1] < normax_losses[0]  # it learns
    out = capsys.readouterr().out
    assert "per-step time" in out and "loss curves" in out


def test_demo_text_is_beside_the_demo():
    text = demo.load_text()
    assert len(text) > 4000 and "Lighthouse" in text
