"""What every CUDA kernel compiles to, for sm_80 and sm_90, read without a GPU: NVRTC compiles each
module as the device would load it and triton's ``cuobjdump`` disassembles it (benches/gpu/sass.py).

Checked for every kernel found in the cubins (so kernels added later are checked too):
- the 16-bit kernels move row data in 16-byte global loads and stores (``LDG.E.128``/``STG.E.128``),
  except the unaligned fallbacks (``_v1``), the per-row scalars listed in ``PER_ROW_SCALARS`` and
  the row data not yet vectorized, listed in ``NARROW_ROW_DATA`` (each with the widths it makes);
- no kernel keeps anything in local memory (a spill): no ``LDL``/``STL``, stack 0 (a kernel that
  calls printf, as its ``cuobjdump -elf`` externs say, may store its arguments there, never load
  them back);
- at most 64 registers per thread (two 512-thread blocks per SM).

``pytest -s tests/cuda/test_sass.py`` prints the registers of every kernel per architecture.
"""

import os
import re
import sys

import pytest
from normax import _core
from normax._backends import cuda

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benches", "gpu"))
import sass

ARCHS = ("sm_80", "sm_90")
MAX_REGISTERS = 64

# Global accesses narrower than 16 bytes that a 16-bit kernel may make, by kernel name: (pattern,
# {"loads"/"stores": allowed widths in bits}, why). Only values that are one per row (or per piece
# of a split row) belong here, never row data. A kernel that reads no row at all says rows=False.
PER_ROW_SCALARS = [
    (r"^max_sum_part_", {"stores": {64}}, "the (max, sum) float pair of its piece of a split row"),
    (r"^softmax_(f16|bf16)_v", {"loads": {64}}, "the (max, sum) pairs of a split row's pieces"),
    (r"^dot_part_", {"stores": {32}}, "the float dot product of its piece of a split row"),
    (r"^softmax_backward_", {"loads": {32}}, "the dot products of a split row's pieces"),
    (
        r"^logsumexp_",
        {"loads": {64}, "stores": {16}, "rows": False},
        "combines the pieces' (max, sum) pairs into one value per row: reads no row",
    ),
    (
        r"^ce_cached_",
        {"loads": {32, 64}, "stores": {32}},
        (
            "per row: the int64 class id, the float32 gradient scale and class weight w_y (loads); "
            "the float32 loss (store)"
        ),
    ),
    (
        r"^ce_part_",
        {"loads": {64}, "stores": {64}},
        (
            "the row's int64 class id; the CeStats of its piece of a split row (32 bytes, stored as "
            "float pairs)"
        ),
    ),
    (
        r"^cross_entropy_(f16|bf16)_v",
        {"loads": {32, 64}, "stores": {32}},
        (
            "per row: the int64 class id, the gradient scale and w_y, the CeStats of a split row's "
            "pieces (float pairs and floats); the float32 loss (store)"
        ),
    ),
    (
        r"^cross_entropy_stats_(f16|bf16)_v",
        {"loads": {32, 64}, "stores": {32}},
        (
            "as cross_entropy_: per row the int64 class id, the gradient scale, w_y and the token "
            "weight (loads); the float32 loss, lse, entropy and correct flag (stores)"
        ),
    ),
    (
        r"^logprobs_forward_",
        {"loads": {64}, "stores": {32}},
        "the row's int64 class id; its float32 logprob, entropy and lse",
    ),
    (
        r"^logprobs_backward_",
        {"loads": {16, 32, 64}},
        (
            "per row: the int64 class id, the 16-bit incoming gradients of logprob and entropy, the "
            "saved float32 lse, logprob and entropy"
        ),
    ),
    (
        r"^ce_forward(_smooth)?_",
        {"loads": {32, 64}, "stores": {16, 32}},
        (
            "per row: the int64 class id and w_y, the row's loss (16-bit: 'none') and float32 lse; "
            "per block: the (loss, weight) partials, read back by the last block, which stores the "
            "reduced loss and the mean's denominator"
        ),
    ),
    (
        r"^ce_backward(_smooth)?_",
        {"loads": {16, 32, 64}, "stores": {16}},
        (
            "per row: the int64 class id, the 16-bit grad_loss, the saved lse, the denominator and "
            "w_y (loads); the target's own entry, rewritten once where p_y > 1/2 (store)"
        ),
    ),
    (
        r"^ce_vocab_parallel_stats_",
        {"loads": {64}, "stores": {32}},
        "the row's int64 class id; its 3 or 5 packed float32 statistics",
    ),
    (
        r"^ce_vocab_parallel_backward_",
        {"loads": {32, 64}},
        "per row: the int64 class id, the lse (hi, lo), the gradient scale and w_y",
    ),
    (
        r"^norm_forward(_wx)?_",
        {"stores": {32}},
        "the row's float32 statistics (mean, rstd), saved for the backward",
    ),
    (r"^norm_backward(_wx)?_", {"loads": {32}}, "the row's saved float32 statistics (mean, rstd)"),
    (r"^power_scale_", {"stores": {32}}, "the float32 scale s of each (token, group) row"),
    (r"^power_backward_", {"stores": {32}}, "the float32 scale s of each (token, group) row"),
]

# Row data that a 16-bit kernel still moves in narrow accesses, not per-row scalars: each entry
# says so, with the widths it makes today (a kernel making others fails). Not yet vectorized.
NARROW_ROW_DATA = [
    (
        r"^power_forward_",
        {"loads": {16, 32}, "stores": {16, 32}},
        (
            "NOT YET VECTORIZED: a column kernel (a thread per channel, a loop over tokens) loads and "
            "stores its 16-bit elements one at a time; 32-bit: s per (token, group) and pad per token "
            "in the loop, scale/shift per channel, the float32 column partials"
        ),
    ),
    (
        r"^power_param_part_",
        {"loads": {16, 32}, "stores": {32}},
        (
            "NOT YET VECTORIZED: a column kernel loads its 16-bit dy and x one element at a time; "
            "32-bit: s per (token, group) in the loop, the per-channel floats, the float32 partials"
        ),
    ),
]


def _tools():
    """The reason the SASS cannot be read here, or None."""
    if not hasattr(_core, "cuda_compile_cubin"):
        return "normax was built without the CUDA backend (Cargo feature 'cuda')"
    if sass.cuobjdump() is None:
        return "triton's cuobjdump is absent (CI installs triton, torch's dependency on Linux)"
    if cuda.load_nvrtc() is None:
        return "NVRTC is absent (CI installs nvidia-cuda-nvrtc, a test dependency)"
    return None


_KERNELS = []


def _kernels():
    """Every kernel of every module for sm_80 and sm_90 (compiled once per session)."""
    if not _KERNELS and _tools() is None:
        _KERNELS.extend(sass.read_all(ARCHS))
    return _KERNELS


def _selected(config):
    """Whether ``-m`` selects these unmarked tests: a ``-m gpu`` run (benches/gpu/run.sh, on its
    time budget) then compiles nothing for them."""
    expr = config.getoption("markexpr")
    if not expr:
        return True
    try:
        from _pytest.mark.expression import Expression
    except ImportError:  # another pytest: compile, and let -m deselect the tests
        return True
    return Expression.compile(expr).evaluate(lambda name, **kwargs: False)


def _sixteen_bit_rows(k) -> bool:
    """A 16-bit kernel's vectorized variant: float32 and untyped kernels have per-row scalars as
    wide as their elements, and the unaligned fallbacks (``_v1``) move one element by design."""
    return _dtype(k.name) in ("f16", "bf16") and not k.name.endswith("_v1")


def pytest_generate_tests(metafunc):
    if "kernel" in metafunc.fixturenames:
        found = _kernels() if _selected(metafunc.config) else []
        if metafunc.function.__name__ == "test_sixteen_bit_rows_move_sixteen_bytes":
            found = [k for k in found if _sixteen_bit_rows(k)]
        ids = [f"{k.arch}-{k.name}" for k in found]
        if not found:  # one test that says why, rather than none
            found, ids = [None], ["no-sass"]
        metafunc.parametrize("kernel", found, ids=ids)


@pytest.fixture
def k(kernel):
    """The kernel under test, or a skip saying why none could be read."""
    if kernel is None:
        pytest.skip(_tools() or "no kernel found")
    return kernel


def _dtype(name):
    m = re.search(r"_(f32|f16|bf16)(_|$)", name)
    return m.group(1) if m else None


def _allowance(name):
    """The narrow widths allowed besides 16 bytes, why, and whether the kernel's row data moves in
    16-byte accesses (False for ``NARROW_ROW_DATA``)."""
    for pattern, allowed, why in PER_ROW_SCALARS:
        if re.search(pattern, name):
            return allowed, why, True
    for pattern, allowed, why in NARROW_ROW_DATA:
        if re.search(pattern, name):
            return allowed, why, False
    return {}, None, True


def test_sixteen_bit_rows_move_sixteen_bytes(k):
    allowed, why, vectorized = _allowance(k.name)
    narrow = {
        kind: sorted(bits for bits in counts if bits != 128 and bits not in allowed.get(kind, ()))
        for kind, counts in (("loads", k.loads), ("stores", k.stores))
    }
    assert not narrow["loads"] and not narrow["stores"], (
        f"{k.module}.{k.name} ({k.arch}) makes global accesses narrower than 16 bytes: "
        f"loads {dict(k.loads)}, stores {dict(k.stores)} (bits: count); allowed besides 128: "
        f"{allowed or 'none'}{f' ({why})' if why else ''}"
    )
    if vectorized and allowed.get("rows", True):
        assert k.loads[128] > 0, f"{k.module}.{k.name} ({k.arch}) has no 16-byte load"


# Spills known and not yet removed, by (kernel pattern, arch): each with its reason.
KNOWN_SPILLS = [
    (
        r"^cross_entropy_stats_(f16|bf16)_v8$",
        "sm_80",
        (
            "NOT YET REMOVED: the return_stats row kernel of 16-bit logits keeps 8 values, their class "
            "weights and the extra statistics (entropy sum, argmax) within 64 registers on sm_90 but "
            "spills 2 values on sm_80 (2 STL, 4 LDL per pack loop)"
        ),
    ),
]


def test_no_local_memory(k):
    if any(re.search(p, k.name) and k.arch == arch for p, arch, _ in KNOWN_SPILLS):
        return
    assert k.local["LDL"] == 0, f"{k.module}.{k.name} ({k.arch}) reloads spilled values: {dict(k.local)}"
    if not k.calls_printf:
        assert k.local["STL"] == 0 and k.stack == 0 and k.local_bytes == 0, (
            f"{k.module}.{k.name} ({k.arch}) uses local memory: stack {k.stack} bytes, {dict(k.local)}"
        )


def test_at_most_64_registers(k):
    assert k.registers <= MAX_REGISTERS, f"{k.module}.{k.name} ({k.arch}): {k.registers} registers"


def test_register_table():
    reason = _tools()
    if reason:
        pytest.skip(reason)
    kernels = _kernels()
    assert {k.module for k in kernels} == set(sass.MODULES)
    assert all(k.registers > 0 for k in kernels), "cuobjdump -res-usage gave no REG for some kernel"
    print()
    print(sass.register_table(kernels))


def test_a_bad_architecture_is_a_value_error():
    if not hasattr(_core, "cuda_compile_cubin"):
        pytest.skip("normax was built without the CUDA backend (Cargo feature 'cuda')")
    with pytest.raises(ValueError, match="arch"):
        _core.cuda_compile_cubin("softmax", "sm_9; x")


def test_the_reader_sees_narrow_stores():
    """The check can fail: a 16-bit pack written element by element shows as 2-byte stores."""
    text = """
        Function : demo_bf16_v8
        /*0100*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0110*/              @!P0 STG.E.U16 desc[UR6][R2.64], R5 ;
        /*0120*/                   STL.64 [R1], R6 ;
        /*0130*/                   LDL R8, [R1] ;
    """
    k = sass._parse_sass(text, "demo", "sm_90")["demo_bf16_v8"]
    assert k.loads == {128: 1} and k.stores == {16: 1}
    assert k.local == {"STL": 1, "LDL": 1}


def test_the_reader_sees_printf():
    """A printf shows in SASS as a call through an address (``CALL.ABS.NOINC R2``), not by name:
    the kernel's ``EIATTR_EXTERNS`` attribute in ``cuobjdump -elf`` names ``vprintf``."""
    text = """
        Function : demo_bf16_v8
        /*0100*/                   STL.64 [R1+0x18], R14 ;
        /*0110*/                   CALL.ABS.NOINC R2 ;
        Function : quiet_bf16_v8
        /*0100*/                   STL.64 [R1], R6 ;
    """
    kernels = sass._parse_sass(text, "demo", "sm_90")
    elf = """
.nv.info.quiet_bf16_v8
	Attribute:	EIATTR_MAXREG_COUNT
	Value:	0x40
.nv.info.demo_bf16_v8
	Attribute:	EIATTR_EXTERNS
	Format:	EIFMT_SVAL
	Value:	externs:	vprintf(0xf5)
"""
    sass._parse_externs(elf, kernels)
    assert kernels["demo_bf16_v8"].calls_printf and not kernels["quiet_bf16_v8"].calls_printf
