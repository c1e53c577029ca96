"""The CUDA backend's device plumbing where no GPU is needed: NVRTC compiles every kernel for sm_80
and sm_90 (and is looked for once), the raw-array checks refuse bad arrays before any address
reaches a kernel, the dry-run recorder lists what a GPU would be asked for, and CUDA arrays are
routed to the CUDA path (which says why when it cannot run). The kernels' results are checked on
a GPU by the `gpu`-marked tests."""

import sys
import threading

import normax
import numpy as np
import pytest
from normax import _core
from normax._backends import cuda

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the NVRTC wheel and these checks are Linux-only"
)


def test_nvrtc_comes_from_the_wheel():
    path = cuda.load_nvrtc()
    assert path is not None and "libnvrtc.so" in path, "pip install nvidia-cuda-nvrtc (a test dependency)"
    major, _ = _core.cuda_nvrtc_version()
    assert major >= 12


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])  # sm_75: cargo test -p normax-cuda
def test_every_kernel_compiles(arch):
    probes = _core.cuda_nvrtc_probes()
    modules = dict(cuda.compile_check(arch))
    assert set(modules) == {"softmax", "cross_entropy", "norms", "power_norm", "stablemax", "logprobs"}
    assert all(size > 10_000 for size in modules.values())  # real cubins, not empty images
    # Five compiles, NVRTC looked for at most once (never again once found).
    assert _core.cuda_nvrtc_probes() - probes <= 1


def test_nvrtc_is_looked_for_until_found_then_never_again():
    cuda.load_nvrtc()
    probes = _core.cuda_nvrtc_probes()
    for _ in range(3):
        assert _core.cuda_nvrtc_version()[0] >= 12
    assert 1 <= _core.cuda_nvrtc_probes() <= probes + 1


def test_bad_architecture_is_a_value_error():
    with pytest.raises(ValueError, match="arch"):
        cuda.compile_check("compute_90; rm")


# -- Raw arrays (ptr, dtype code, len) built by hand: addresses whose memory is never touched here.

F32, F16, BF16, I64 = 0, 1, 2, 3


def raw(*shape, code=F32, ptr=1 << 20):
    return (ptr, code, int(np.prod(shape)))


S = _core.CudaStream(0, 0)  # device 0, the legacy default stream


def test_raw_arrays_are_checked_before_any_cuda_call():
    x, y = raw(2, 3), raw(2, 3)
    with pytest.raises(ValueError, match="out: expected 6 elements"):
        _core.cuda_softmax(x, raw(2, 2), (2, 3), False, S)
    with pytest.raises(TypeError, match="x: unknown dtype code 4"):
        _core.cuda_softmax(raw(2, 3, code=4), y, (2, 3), False, S)
    with pytest.raises(ValueError, match="out: expected F32 elements, got F16"):
        _core.cuda_softmax(x, raw(2, 3, code=F16), (2, 3), False, S)
    with pytest.raises(TypeError, match="x: expected a floating-point array"):
        _core.cuda_softmax(raw(2, 3, code=I64), y, (2, 3), False, S)
    with pytest.raises(TypeError, match=r"x: expected a raw device array \(ptr, dtype, len\)"):
        _core.cuda_softmax(np.zeros((2, 3), np.float32), y, (2, 3), False, S)
    with pytest.raises(TypeError, match="out: expected a raw device array"):
        _core.cuda_softmax(x, (1 << 20, F32), (2, 3), False, S)
    with pytest.raises(ValueError, match="out: a raw array's address and length are non-negative"):
        _core.cuda_softmax(x, (1 << 20, F32, -6), (2, 3), False, S)
    with pytest.raises(ValueError, match="x: address 0x100002 is not aligned to its 4-byte elements"):
        _core.cuda_softmax(raw(2, 3, ptr=(1 << 20) + 2), y, (2, 3), False, S)
    with pytest.raises(ValueError, match="out: null device address"):
        _core.cuda_softmax(x, raw(2, 3, ptr=0), (2, 3), False, S)
    with pytest.raises(ValueError, match="target: expected 2 class indices"):
        _core.cuda_cross_entropy((x, raw(3, code=I64), None), _core.CeOptions(), (2, 3), raw(2), None, S)
    with pytest.raises(TypeError, match="target: expected int64 class indices"):
        shard = _core.VocabParallelLayout(2, 0, 3, 3)
        _core.cuda_vocab_parallel_stats(x, (raw(2), None), shard, _core.CeOptions(), raw(2, 3), S)
    with pytest.raises(ValueError, match="rstd: expected 2 elements"):
        rms = _core.NormOptions("rms", 1e-6)
        _core.cuda_norm_backward(rms, (x, x, None), (None, raw(3)), (y, (None, None), None), (2, 3), S)
    with pytest.raises(ValueError, match="weight: expected F32 or x's F32 elements"):
        _core.cuda_norm_forward(rms, x, (raw(3, code=F16), None), y, (None, None), (2, 3), S)
    # An empty array may have any address (torch's empty tensors have 0): nothing to compute,
    # so the call may return without reaching the driver.
    try:
        _core.cuda_softmax(raw(5, 0, ptr=0), raw(5, 0, ptr=0), (5, 0), False, S)
    except RuntimeError as e:
        assert "CUDA driver" in str(e)


def test_lib_raw_gives_the_address_dtype_code_and_length(cuda_kernels):
    torch = pytest.importorskip("torch")
    from normax._backends.cuda import device

    base = torch.zeros(10, 8, dtype=torch.bfloat16)
    lib = device.Lib(base, "normax.softmax")
    assert lib.raw(base) == (base.data_ptr(), 2, 80)
    rows = base[3:5]  # a view: its own first element's address
    assert lib.raw(rows) == (base.data_ptr() + 3 * 8 * 2, 2, 16)
    assert lib.raw(torch.zeros(3, dtype=torch.int64))[1:] == (3, 3)
    assert [lib.raw(torch.zeros(1, dtype=t))[1] for t in (torch.float32, torch.float16)] == [0, 1]
    with pytest.raises(AssertionError, match="C-contiguous"):
        lib.raw(base.T)
    with pytest.raises(TypeError, match="normax.softmax: no CUDA kernel takes float64 arrays"):
        lib.raw(torch.zeros(3, dtype=torch.float64))


def test_the_emulation_writes_through_raw_arrays(cuda_kernels):
    torch = pytest.importorskip("torch")

    x = torch.randn(3, 5)
    y = cuda.softmax(x, axis=-1)
    torch.testing.assert_close(y, torch.softmax(x, -1))
    assert cuda_kernels.names() == ["cuda_softmax"]


def test_the_recorder_lists_what_a_gpu_would_be_asked_for():
    torch = pytest.importorskip("torch")

    def raw_of(t):
        return (t.data_ptr(), 0, t.numel())

    x = torch.randn(4, 65536)
    y = torch.full_like(x, float("nan"))
    assert _core.cuda_record(True) is None
    _core.cuda_softmax(raw_of(x.view(-1)[:8192]), raw_of(y.view(-1)[:8192]), (64, 128), False, S)
    _core.cuda_softmax(raw_of(x), raw_of(y), (4, 65536), True, S)
    # The recorder is the calling thread's: another thread's calls are not recorded.
    other = []
    thread = threading.Thread(target=lambda: other.append(_core.cuda_record(False)))
    thread.start()
    thread.join()
    events = _core.cuda_record(False)
    assert other == [None] and _core.cuda_record(False) is None
    # 64 rows of 128 floats: one warp per row, 8 rows per block, each row held in registers.
    # 4 rows of 65536 on an H100's 132 SMs: 16 pieces per row, their (max, sum) pairs in scratch.
    assert events == [
        ("launch", "softmax_cached_f32_p1", (8, 1, 1), (32, 8, 1)),
        ("alloc", "cuMemAllocAsync", (4 * 16 * 8, 1, 1), (1, 1, 1)),
        ("launch", "max_sum_part_f32_v4", (64, 1, 1), (512, 1, 1)),
        ("launch", "softmax_f32_v4", (64, 1, 1), (512, 1, 1)),
        ("free", "cuMemFreeAsync", (4 * 16 * 8, 1, 1), (1, 1, 1)),
    ]
    assert torch.isnan(y).all()  # nothing ran
    # The host checks still run in record mode.
    _core.cuda_record(True)
    try:
        with pytest.raises(ValueError, match="out: expected 262144 elements"):
            _core.cuda_softmax(raw_of(x), raw_of(y[:2]), (4, 65536), False, S)
    finally:
        assert _core.cuda_record(False) == []


@pytest.mark.skipif(cuda.available(), reason="checks the error of a machine without a CUDA driver")
def test_without_a_driver_the_error_says_why():
    with pytest.raises(RuntimeError, match="CUDA driver library"):
        _core.cuda_softmax(raw(2, 3), raw(2, 3), (2, 3), False, S)


class FakeCudaArray:
    """Looks like a CUDA array of an unsupported library (DLPack device type 2)."""

    ndim = 2
    shape = (2, 3)

    def __array_namespace__(self, api_version=None):
        import array_api_strict

        return array_api_strict

    def __dlpack_device__(self):
        return (2, 0)


def test_cuda_arrays_are_routed_and_unsupported_libraries_named():
    assert cuda.is_cuda_array(FakeCudaArray())
    assert not cuda.is_cuda_array(np.zeros(3))
    with pytest.raises(NotImplementedError, match="softmax: CUDA arrays of .* are not supported"):
        normax.softmax(FakeCudaArray())
    # PowerNorm and the linear cross-entropy have a CUDA path too: they reach it (and name the
    # unsupported library there) instead of the CPU code.
    with pytest.raises(NotImplementedError, match="power_norm: CUDA arrays of .* are not supported"):
        normax.power_norm(FakeCudaArray(), None, None, normax.PowerNormState(3))
    with pytest.raises(
        NotImplementedError, match="linear_cross_entropy: CUDA arrays of .* are not supported"
    ):
        normax.linear_cross_entropy(FakeCudaArray(), np.zeros((4, 3)), np.zeros(2, np.int64))


def test_backend_and_device_arguments_are_validated():
    assert normax.get_backend() == "cpu"
    with pytest.raises(ValueError, match="name: expected one of"):
        normax.set_backend("cuda")
    with pytest.raises(ValueError, match="device: expected None, 'cpu' or 'wgpu'"):
        normax.softmax(np.zeros(3), device="tpu")
    np.testing.assert_array_equal(normax.softmax(np.zeros(2), device="cpu"), [0.5, 0.5])
    assert "device" in str(__import__("inspect").signature(normax.softmax))


def test_power_norm_raw_arrays_are_checked_before_any_cuda_call():
    x = raw(4, 6)
    c6 = raw(6)
    options = _core.PowerNormOptions(6, 1, 1e-5)
    with pytest.raises(ValueError, match="group_num 4 does not divide the 6 channels"):
        _core.PowerNormOptions(6, 4, 1e-5)
    with pytest.raises(ValueError, match="eps: must be finite and >= 0"):
        _core.PowerNormOptions(6, 1, float("nan"))
    with pytest.raises(ValueError, match="pad_mask: expected 4 elements"):
        _core.cuda_power_norm_forward(options, x, raw(3), c6, None, S)
    with pytest.raises(ValueError, match="sumsq: expected F32 elements, got F16"):
        _core.cuda_power_norm_forward(options, x, None, raw(6, code=F16), None, S)
    with pytest.raises(ValueError, match="y: expected 24 elements"):
        _core.cuda_power_norm_forward(options, x, None, None, (c6, c6, raw(5, 6)), S)
    # backward: options, (dy, x, weight), (zscale, ema, dscale), (dx, sums), stream
    ok = {"weight": c6, "zscale": c6, "ema": c6, "dscale": c6, "dx": raw(4, 6), "sums": raw(18)}
    grouped = _core.PowerNormOptions(6, 2, 1e-5)

    def backward(**changed):
        a = {**ok, **changed}
        _core.cuda_power_norm_backward(
            grouped, (raw(4, 6), x, a["weight"]), (a["zscale"], a["ema"], a["dscale"]), (a["dx"], a["sums"]), S
        )

    for name in ("weight", "zscale", "ema", "dscale"):
        with pytest.raises(ValueError, match=f"{name}: expected 6 elements"):
            backward(**{name: raw(5)})
    with pytest.raises(ValueError, match="sums: expected 18 elements"):
        backward(sums=raw(12))
    with pytest.raises(ValueError, match="dx: expected F32 elements, got F16"):
        backward(dx=raw(4, 6, code=F16))
    with pytest.raises(TypeError, match="ema: expected a raw device array"):
        backward(ema=np.zeros(6, np.float32))
    with pytest.raises(TypeError, match="dscale: unknown dtype code -1"):
        backward(dscale=raw(6, code=-1))


@pytest.mark.skipif(cuda.available(), reason="checks the error of a machine without a CUDA driver")
def test_power_norm_without_a_driver_the_error_says_why():
    with pytest.raises(RuntimeError, match="CUDA driver library"):
        _core.cuda_power_norm_forward(_core.PowerNormOptions(6, 1, 1e-5), raw(4, 6), None, raw(6), None, S)


def test_the_stub_file_lists_every_extension_function():
    import pathlib
    import re

    stub = (pathlib.Path(_core.__file__).parent / "_core.pyi").read_text()
    listed = set(re.findall(r"^(?:def|class) (\w+)[(:]", stub, flags=re.MULTILINE))
    built = {name for name in dir(_core) if not name.startswith("_") and callable(getattr(_core, name))}
    assert built <= listed, f"missing from _core.pyi: {sorted(built - listed)}"


def test_the_emulated_kernels_are_the_real_ones():
    from cuda_emulation import EmulatedKernels

    for family in (
        "softmax", "logsumexp", "softmax_backward", "cross_entropy", "norm_forward", "norm_backward",
        "norm_workspace", "power_norm_forward", "power_norm_backward", "compile_all",
    ):  # fmt: skip
        assert hasattr(_core, "cuda_" + family) and hasattr(EmulatedKernels, "_" + family), family
