"""Every ```python block of README.md runs as written: each in a fresh interpreter (its own
imports and inputs, no state shared with the other blocks or with this process).

A block that uses CUDA is skipped only where torch sees no CUDA device; a block that uses the
wgpu backend only where no wgpu adapter exists (CI installs lavapipe, so it runs there).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(
    r"^```python\n(.*?)^```$", README.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL
)


def _first_line(block: str) -> str:
    return next(ln for ln in block.splitlines() if ln.strip() and not ln.startswith(("import", "from")))


def _uses_cuda(block: str) -> bool:
    return 'device="cuda"' in block


def _uses_wgpu(block: str) -> bool:
    return 'device="wgpu"' in block or 'set_backend("wgpu")' in block


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _wgpu_available() -> bool:
    from normax._backends import wgpu

    try:
        wgpu.adapter()
    except RuntimeError as e:
        if not str(e).startswith("no wgpu adapter"):
            raise  # a build without the feature or a failing adapter is an error, not a skip
        return False
    return True


def test_readme_has_the_blocks():
    # The API, torch, JAX, CUDA and wgpu blocks at least: a broken fence would drop them silently.
    assert len(BLOCKS) >= 5
    assert sum(map(_uses_cuda, BLOCKS)) >= 1 and sum(map(_uses_wgpu, BLOCKS)) >= 1


@pytest.mark.parametrize("block", BLOCKS, ids=[_first_line(b)[:40] for b in BLOCKS])
def test_readme_block_runs(block, tmp_path):
    if _uses_cuda(block) and not _cuda_available():
        pytest.skip("README block needs a CUDA GPU (torch.cuda.is_available() is False)")
    if _uses_wgpu(block) and not _wgpu_available():
        pytest.skip("README block needs a wgpu adapter: install mesa-vulkan-drivers (lavapipe)")
    script = tmp_path / "block.py"
    script.write_text(block, encoding="utf-8")
    # From a scratch directory, so `import normax` is what the tests import (wheel or PYTHONPATH).
    env = dict(os.environ)
    package_parent = str(Path(__import__("normax").__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"README block failed:\n{block}\n--- stderr ---\n{done.stderr[-4000:]}"
