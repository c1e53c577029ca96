"""The demo's training runs: a few steps with torch's ops and with normax.torch from the same seed.

Same initial weights and batches, so the first losses differ only by the ops' rounding (float32:
a few ULP of values near log(vocabulary) ~ 3.7, so 1e-5 is a loose bound), and a handful of steps
keeps them that close.
"""

from __future__ import annotations

from normax import demo


def test_demo_trains_identically_with_both_op_sets(capsys):
    result = demo.main(["--steps", "6", "--batch", "4", "--context", "32", "--threads", "1"])
    torch_losses, normax_losses = result["torch"], result["normax"]
    assert len(torch_losses) == len(normax_losses) == 6
    assert max(abs(a - b) for a, b in zip(torch_losses, normax_losses)) < 1e-5
    assert normax_losses[-1] < normax_losses[0]  # it learns
    out = capsys.readouterr().out
    assert "per-step time" in out and "loss curves" in out


def test_demo_text_ships_with_the_package():
    text = demo.load_text()
    assert len(text) > 4000 and "Lighthouse" in text
