"""The CUDA backend's device plumbing where no GPU is needed: NVRTC compiles every kernel for sm_80
and sm_90, the DLPack checks refuse bad arrays before any address reaches a kernel, and CUDA
arrays are routed to the CUDA path (which says why when it cannot run). The kernels' results are
checked on a GPU by the `gpu`-marked tests."""

import ctypes
import sys

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
    modules = dict(cuda.compile_check(arch))
    assert set(modules) == {"softmax", "cross_entropy", "norms", "power_norm", "stablemax"}
    assert all(size > 10_000 for size in modules.values())  # real cubins, not empty images


def test_bad_architecture_is_a_value_error():
    with pytest.raises(ValueError, match="arch"):
        cuda.compile_check("compute_90; rm")


# -- DLPack capsules built by hand: a CUDA tensor description whose memory is never touched here.


class _DlTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("code", ctypes.c_uint8),
        ("bits", ctypes.c_uint8),
        ("lanes", ctypes.c_uint16),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _Managed(ctypes.Structure):
    _fields_ = [("tensor", _DlTensor), ("ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_KEEP = []  # the structs must outlive the capsules that point at them


def capsule(shape, *, device_type=2, device_id=0, code=2, bits=32, strides=None, data=1 << 20):
    shp = (ctypes.c_int64 * len(shape))(*shape)
    std = None if strides is None else (ctypes.c_int64 * len(strides))(*strides)
    m = _Managed()
    m.tensor = _DlTensor(
        data, device_type, device_id, len(shape), code, bits, 1, shp,
        ctypes.cast(std, ctypes.POINTER(ctypes.c_int64)) if std is not None else None, 0,
    )  # fmt: skip
    _KEEP.append((m, shp, std))
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(ctypes.addressof(m), b"dltensor", None)


S = _core.CudaStream(0, 0)  # device 0, the legacy default stream


def test_capsules_are_checked_before_any_cuda_call():
    x, y = capsule((2, 3)), capsule((2, 3))
    with pytest.raises(ValueError, match="out: expected 6 elements"):
        _core.cuda_softmax(x, capsule((2, 2)), (2, 3), False, S)
    with pytest.raises(ValueError, match="x: not a CUDA array"):
        _core.cuda_softmax(capsule((2, 3), device_type=1), y, (2, 3), False, S)
    with pytest.raises(ValueError, match="out: is on cuda:1"):
        _core.cuda_softmax(x, capsule((2, 3), device_id=1), (2, 3), False, S)
    with pytest.raises(ValueError, match="x: must be C-contiguous"):
        _core.cuda_softmax(capsule((2, 3), strides=(1, 2)), y, (2, 3), False, S)
    with pytest.raises(TypeError, match="x: unsupported element type"):
        _core.cuda_softmax(capsule((2, 3), bits=64), y, (2, 3), False, S)
    with pytest.raises(ValueError, match="out: expected F32 elements, got F16"):
        _core.cuda_softmax(x, capsule((2, 3), bits=16), (2, 3), False, S)
    with pytest.raises(TypeError, match="x: expected a DLPack capsule"):
        _core.cuda_softmax(np.zeros((2, 3), np.float32), y, (2, 3), False, S)
    with pytest.raises(ValueError, match="target: expected 2 class indices"):
        _core.cuda_cross_entropy(
            (x, capsule((3,), code=0, bits=64), None), _core.CeOptions(), (2, 3), capsule((2,)), None, S
        )
    with pytest.raises(ValueError, match="rstd: expected 2 elements"):
        rms = _core.NormOptions("rms", 1e-6)
        _core.cuda_norm_backward(rms, (x, x, None), (None, capsule((3,))), y, (None, None), None, (2, 3), S)
    with pytest.raises(ValueError, match="weight: expected F32 or x's F32 elements"):
        _core.cuda_norm_forward(rms, x, (capsule((3,), bits=16), None), y, (None, None), (2, 3), S)
    # Size-1 axes may carry any stride (as torch exports them).
    with pytest.raises((RuntimeError, ValueError)) as info:
        _core.cuda_softmax(capsule((1, 3), strides=(7, 1)), capsule((1, 3)), (1, 3), False, S)
    assert "contiguous" not in str(info.value)
    # So may every axis of an empty array: torch's x[:, 0:0].contiguous() keeps x's strides.
    # (Nothing to compute, so the call may return without reaching the driver.)
    try:
        _core.cuda_softmax(capsule((5, 0), strides=(16, 1)), capsule((5, 0)), (5, 0), False, S)
    except (RuntimeError, ValueError) as e:
        assert "contiguous" not in str(e)


@pytest.mark.skipif(cuda.available(), reason="checks the error of a machine without a CUDA driver")
def test_without_a_driver_the_error_says_why():
    with pytest.raises(RuntimeError, match="CUDA driver library"):
        _core.cuda_softmax(capsule((2, 3)), capsule((2, 3)), (2, 3), False, S)


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


def test_power_norm_capsules_are_checked_before_any_cuda_call():
    x = capsule((4, 6))
    c6 = capsule((6,))
    options = _core.PowerNormOptions(6, 1, 1e-5)
    with pytest.raises(ValueError, match="group_num 4 does not divide the 6 channels"):
        _core.PowerNormOptions(6, 4, 1e-5)
    with pytest.raises(ValueError, match="eps: must be finite and >= 0"):
        _core.PowerNormOptions(6, 1, float("nan"))
    with pytest.raises(ValueError, match="pad_mask: expected 4 elements"):
        _core.cuda_power_norm_forward(options, x, capsule((3,)), c6, None, S)
    with pytest.raises(ValueError, match="sumsq: expected F32 elements, got F16"):
        _core.cuda_power_norm_forward(options, x, None, capsule((6,), bits=16), None, S)
    with pytest.raises(ValueError, match="y: expected 24 elements"):
        _core.cuda_power_norm_forward(options, x, None, None, (c6, c6, capsule((5, 6))), S)
    # backward: options, (dy, x, weight), (zscale, ema, dscale), (dx, sums), stream
    ok = {"weight": c6, "zscale": c6, "ema": c6, "dscale": c6, "dx": capsule((4, 6)), "sums": capsule((18,))}
    grouped = _core.PowerNormOptions(6, 2, 1e-5)

    def backward(**changed):
        a = {**ok, **changed}
        _core.cuda_power_norm_backward(
            grouped, (capsule((4, 6)), x, a["weight"]), (a["zscale"], a["ema"], a["dscale"]), (a["dx"], a["sums"]), S
        )

    for name in ("weight", "zscale", "ema", "dscale"):
        with pytest.raises(ValueError, match=f"{name}: expected 6 elements"):
            backward(**{name: capsule((5,))})
    with pytest.raises(ValueError, match="sums: expected 18 elements"):
        backward(sums=capsule((12,)))
    with pytest.raises(ValueError, match="dx: expected F32 elements, got F16"):
        backward(dx=capsule((4, 6), bits=16))
    with pytest.raises(TypeError, match="ema: expected a DLPack capsule"):
        backward(ema=np.zeros(6, np.float32))
    with pytest.raises(ValueError, match="dscale: is on cuda:1"):
        backward(dscale=capsule((6,), device_id=1))


@pytest.mark.skipif(cuda.available(), reason="checks the error of a machine without a CUDA driver")
def test_power_norm_without_a_driver_the_error_says_why():
    with pytest.raises(RuntimeError, match="CUDA driver library"):
        _core.cuda_power_norm_forward(_core.PowerNormOptions(6, 1, 1e-5), capsule((4, 6)), None, capsule((6,)), None, S)


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
