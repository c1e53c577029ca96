"""Packaging: licenses, project metadata, the installed wheel's tag and GLIBC versions against the
README's claim (.ci/check_wheel.py), and the typed public API (mypy --strict on user scripts)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import normax
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(normax.__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("check_wheel", ROOT / ".ci" / "check_wheel.py")
check_wheel = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_wheel)


def _installed_from_wheel():
    """The normax distribution whose files are the imported package, or None (source tree)."""
    try:
        dist = importlib.metadata.distribution("normax")
    except importlib.metadata.PackageNotFoundError:
        return None
    init = next((f for f in dist.files or () if str(f).replace("\\", "/") == "normax/__init__.py"), None)
    if init is None or Path(dist.locate_file(init)).resolve() != PACKAGE / "__init__.py":
        return None
    return dist


def test_license_files_are_the_standard_texts():
    mit = (ROOT / "LICENSE-MIT").read_text(encoding="utf-8")
    apache = (ROOT / "LICENSE-APACHE").read_text(encoding="utf-8")
    assert mit.startswith("MIT License") and "Copyright (c) 2026 normax contributors" in mit
    assert "Permission is hereby granted, free of charge" in mit
    assert "Apache License" in apache and "Version 2.0, January 2004" in apache
    assert "END OF TERMS AND CONDITIONS" in apache and "normax contributors" in apache


def test_project_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == {"text": "MIT OR Apache-2.0"}
    assert project["authors"] and project["urls"]["Repository"].startswith("https://github.com/")
    classifiers = project["classifiers"]
    assert "License :: OSI Approved :: MIT License" in classifiers
    assert "License :: OSI Approved :: Apache Software License" in classifiers
    assert "Operating System :: POSIX :: Linux" in classifiers and "Typing :: Typed" in classifiers
    assert {f"Programming Language :: Python :: 3.{v}" for v in range(9, 14)} <= set(classifiers)
    assert "mypy>=1.10" in project["optional-dependencies"]["test"]


def test_glibc_versions_are_read_from_the_string_table():
    assert check_wheel.glibc_versions(b"\0GLIBC_2.2.5\0GLIBC_2.17\0memcpy\0") == {(2, 2), (2, 17)}
    assert check_wheel.claimed_glibc() == (2, 17)  # README.md: manylinux_2_17


def test_installed_wheel_matches_the_readme():
    dist = _installed_from_wheel()
    if dist is None:
        pytest.skip(
            "normax is imported from the source tree, not an installed wheel (.ci/run tests the wheel)"
        )
    wheel = dist.read_text("WHEEL") or ""
    tags = [ln.split(":", 1)[1].strip() for ln in wheel.splitlines() if ln.startswith("Tag:")]
    glibc = check_wheel.claimed_glibc()
    assert any(f"manylinux_{glibc[0]}_{glibc[1]}_" in t for t in tags), tags
    assert all(t.startswith("cp39-abi3-") for t in tags), tags
    for so in PACKAGE.glob("*.so"):
        newest = max(check_wheel.glibc_versions(so.read_bytes()))
        assert newest <= glibc, f"{so.name} needs GLIBC_{newest[0]}.{newest[1]}"
    licenses = {Path(str(f)).name for f in dist.files or () if "licenses" in str(f) or "LICENSE" in str(f)}
    assert {"LICENSE-MIT", "LICENSE-APACHE"} <= licenses


def _mypy(script: str, tmp_path) -> subprocess.CompletedProcess:
    pytest.importorskip("mypy", reason="mypy is in the [test] extra: pip install '.[test]'")
    (tmp_path / "user.py").write_text(textwrap.dedent(script), encoding="utf-8")
    env = dict(os.environ)
    site = {Path(p).resolve() for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    if PACKAGE.parent not in site:
        env["MYPYPATH"] = str(PACKAGE.parent)  # the source tree, as an installed package would be found
    # Only the user script's errors count: normax's own (untyped) implementation modules are
    # silenced, as mypy silences any installed package's.
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--follow-imports=silent",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    return subprocess.run(
        [*cmd, "user.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )


NUMPY_SCRIPT = """
    import numpy as np
    import numpy.typing as npt

    import normax
    from normax.scipy.special import logsumexp


    def probabilities(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return normax.softmax(x, axis=-1)


    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 16)).astype(np.float32)
    y = probabilities(x)
    lse, sign = normax.logsumexp(x, b=np.ones(16), return_sign=True)
    normax.log_softmax([[1.0, 2.0]], axis=None, device="cpu")
    loss, grad = normax.cross_entropy_with_grad(x, np.arange(4), label_smoothing=0.1)
    out, rstd = normax.rms_norm(x, np.ones(16, np.float32), return_stats=True)
    dx, dw = normax.rms_norm_backward(np.ones_like(x), x, np.ones(16, np.float32), rstd=rstd)
    state = normax.PowerNormState(16)
    z, saved = normax.power_norm(x, None, None, state, return_saved=True)
    dz, _, _ = normax.power_norm_backward(np.ones_like(z), saved, state)
    normax.set_num_threads(normax.get_num_threads())
    isas: list[str] = normax.supported_isas()
    total = float(logsumexp(x))
    print(y.shape, lse, sign, loss, grad.shape, out.shape, dx.shape, dw, dz.shape, isas, total)
"""


def test_mypy_strict_passes_on_a_numpy_user_script(tmp_path):
    done = _mypy(NUMPY_SCRIPT, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_catches_a_wrong_call(tmp_path):
    # The stubs are read: a string axis and an unknown device are type errors.
    done = _mypy(
        """
        import numpy as np
        import normax

        normax.softmax(np.ones(3), axis="a")
        normax.rms_norm(np.ones(3), device="cuda")
        """,
        tmp_path,
    )
    assert done.returncode == 1 and "user.py:5: error" in done.stdout and "user.py:6: error" in done.stdout


def test_mypy_strict_passes_on_a_torch_and_jax_user_script(tmp_path):
    done = _mypy(
        """
        import jax
        import numpy as np
        import torch

        import normax
        import normax.jax as nj
        import normax.torch as nt

        logits = torch.randn(4, 16, requires_grad=True)
        loss: torch.Tensor = nt.cross_entropy(logits, torch.arange(4), z_loss=1e-4)
        same: torch.Tensor = normax.softmax(torch.randn(2, 3))
        h = nt.rms_norm(torch.randn(2, 16), (16,), torch.ones(16))
        count: int = nt.patch(torch.nn.Sequential(torch.nn.LayerNorm(16)))
        j = nj.log_softmax(np.ones((2, 3), np.float32))
        state = nj.power_norm_init(3)
        y, state = nj.power_norm(j, None, None, state)
        ce, stats = nj.cross_entropy(j, np.arange(2), temperature=0.5, return_stats=True)
        lse: jax.Array = stats.lse
        logp, entropy = nj.logprobs(j, np.arange(2))
        only: jax.Array = nj.logprobs(j, np.arange(2), return_entropy=False)
        print(loss, same, h, count, j, y, state, ce, lse, logp, entropy, only)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
