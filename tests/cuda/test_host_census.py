"""The host census of the normax.torch CUDA path (issue 22): CPU tensors driven through the CUDA thin
path with the Rust side's dry-run recorder on (benches/gpu/host_cost.py), so the real bindings and
launch sequences run and every launch is counted, with torch's profiler listing the torch ops."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from normax import _core

if not hasattr(_core, "cuda_record"):
    pytest.skip("normax was built without the CUDA backend", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benches" / "gpu"))
import host_cost

# (op, the most launches of forward + backward); every direction of every op is one `_core` call.
LIMITS = {"cross_entropy": 2, "rms_norm": 3, "layer_norm": 3, "softmax": 2, "log_softmax": 2}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", sorted(LIMITS))
def test_each_direction_is_launches_and_output_allocations_only(name, dtype):
    fwd, bwd = host_cost.census(host_cost.cases(8, 64, dtype)[name])
    assert fwd.launches and bwd.launches, (fwd, bwd)
    assert len(fwd.launches) + len(bwd.launches) <= LIMITS[name], (fwd.launches, bwd.launches)
    if name.endswith("softmax"):
        assert len(fwd.launches) == len(bwd.launches) == 1
    # No torch op but the outputs' allocations; no driver allocation, no synchronisation.
    assert fwd.torch_ops == [] and bwd.torch_ops == [], (fwd.torch_ops, bwd.torch_ops)
    for event, what in fwd.other_events + bwd.other_events:
        assert event == "memset", (event, what)


def test_cross_entropy_backward_reads_the_saved_lse_not_the_logits_statistics():
    fwd, bwd = host_cost.census(host_cost.cases(8, 64)["cross_entropy"])
    assert len(fwd.launches) == len(bwd.launches) == 1
    assert fwd.launches[0][1] != bwd.launches[0][1]  # two kernels, not one called twice


def test_census_sees_what_it_should():
    """The harness itself: a path that runs a torch op or launches twice is caught."""
    from normax import torch as nt

    x = torch.randn(8, 64, requires_grad=True)
    case = (lambda: (nt.softmax(x * 2.0, -1), (x,)), torch.ones(8, 64), None)
    fwd, _ = host_cost.census(case)
    assert "aten::mul" in fwd.torch_ops
    twice = (lambda: (nt.softmax(nt.softmax(x, -1), -1), (x,)), torch.ones(8, 64), None)
    fwd, bwd = host_cost.census(twice)
    assert len(fwd.launches) == 2 and len(bwd.launches) == 2


def test_the_cuda_only_ops_refuse_host_tensors():
    x, t = torch.randn(4, 8), torch.randint(0, 8, (4,))
    with pytest.raises(NotImplementedError, match="takes CUDA tensors"):
        torch.ops.normax.cross_entropy_cuda(x, t, None, -100, "mean", 0.0, 0.0, None)
