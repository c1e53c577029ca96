"""The demo (``python -m normax.demo``): a few training steps with torch's ops and with
normax.torch from the same seed.

Same initial weights and batches, so the first losses differ only by the ops' rounding (float32:
a few ULP of values near log(vocabulary) ~ 9.7, so 1e-5 is a loose bound), and a handful of steps
keeps them that close.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

demo = pytest.importorskip("normax.demo")  # needs torch, which the test extra installs


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


def _run(*args, cwd):
    env = dict(os.environ)
    package_parent = str(Path(demo.__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "normax.demo", *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_usage_names_the_module_and_every_option_has_help(tmp_path):
    done = _run("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m normax.demo")
    for action in demo.make_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"
        assert all(option in done.stdout for option in action.option_strings)


def test_bad_options_are_usage_errors(tmp_path):
    done = _run("--context", "0", cwd=tmp_path)
    assert done.returncode == 2 and "--context" in done.stderr


def test_plot_draws_losses_and_step_times(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.png"
    done = _run(
        "--steps", "3", "--batch", "2", "--context", "16", "--threads", "1", "--plot", str(path), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {path}" in done.stdout
