"""What the CUDA kernels compile to, read without a GPU: every module compiled by NVRTC (as the
device would load it), disassembled by the ``cuobjdump`` that the triton wheel ships.

    python benches/gpu/sass.py [sm_80 sm_90 ...]

prints the registers per thread of every kernel per architecture, its stack (local memory: spills
or a printf's arguments) and the widths of its global loads and stores. tests/cuda/test_sass.py
checks the same facts (16-byte row accesses in the 16-bit kernels, no spills).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field

MODULES = ("softmax", "cross_entropy", "norms", "power_norm", "stablemax", "logprobs")
ARCHS = ("sm_80", "sm_90")


def cuobjdump() -> str | None:
    """The path of triton's ``cuobjdump`` (site-packages/triton/backends/nvidia/bin), or None."""
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


@dataclass
class Kernel:
    """One kernel of one cubin: its resources and its memory instructions.

    ``loads`` and ``stores`` count global (and generic) accesses by width in bits; ``local`` the
    local-memory instructions (``LDL``/``STL``: spills or a printf's argument buffer).
    """

    name: str
    module: str
    arch: str
    registers: int = 0
    stack: int = 0
    local_bytes: int = 0
    loads: Counter = field(default_factory=Counter)
    stores: Counter = field(default_factory=Counter)
    local: Counter = field(default_factory=Counter)
    calls_printf: bool = False


# A memory instruction's opcode and modifiers, e.g. "LDG.E.128.CONSTANT", "STG.E.U16", "STL.64".
_MEMORY = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?((?:LDG|STG|LD|ST|LDL|STL)(?:\.[\w]+)*)\s")
_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def _width(opcode: str) -> int:
    """Bits moved by one load or store: 32 unless a modifier says otherwise."""
    for modifier in opcode.split(".")[1:]:
        if modifier in _WIDTHS:
            return _WIDTHS[modifier]
    return 32


def _parse_sass(text: str, module: str, arch: str) -> dict[str, Kernel]:
    kernels: dict[str, Kernel] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"\s*Function : (\S+)", line)
        if head:
            current = kernels.setdefault(head.group(1), Kernel(head.group(1), module, arch))
            continue
        if current is None:
            continue
        m = _MEMORY.match(line)
        if not m:
            continue
        opcode = m.group(1)
        op = opcode.split(".")[0]
        bits = _width(opcode)
        if op in ("LDL", "STL"):
            current.local[op] += 1
        elif op in ("LDG", "LD"):
            current.loads[bits] += 1
        else:
            current.stores[bits] += 1
    return kernels


def _parse_resources(text: str, kernels: dict[str, Kernel]) -> None:
    current = None
    for line in text.splitlines():
        head = re.match(r"\s*Function (\S+):", line)
        if head:
            current = kernels.get(head.group(1))
            continue
        if current is None:
            continue
        fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", line))
        if fields:
            current.registers = int(fields.get("REG", 0))
            current.stack = int(fields.get("STACK", 0))
            current.local_bytes = int(fields.get("LOCAL", 0))


def _parse_externs(text: str, kernels: dict[str, Kernel]) -> None:
    """Marks the kernels that call printf. SASS does not name the callee (``CALL.ABS.NOINC R2``
    through an address in constant bank 4, relocated to ``vprintf``), so this reads each kernel's
    ``EIATTR_EXTERNS`` attribute in its ``.nv.info.<kernel>`` section (``cuobjdump -elf``)."""
    current = None
    for line in text.splitlines():
        head = re.match(r"\.nv\.info\.(\S+)$", line.strip())
        if head:
            current = kernels.get(head.group(1))
        elif current is not None and "externs:" in line and re.search(r"\bvprintf\b", line):
            current.calls_printf = True


def read_module(module: str, arch: str, tool: str | None = None) -> dict[str, Kernel]:
    """Every kernel of one module compiled by NVRTC for ``arch``, read from its SASS.

    Raises RuntimeError when NVRTC or cuobjdump is missing or a kernel does not compile.
    """
    from normax import _core
    from normax._backends import cuda

    tool = tool or cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found: it comes with the triton wheel (pip install triton)")
    if cuda.load_nvrtc() is None:
        raise RuntimeError("NVRTC not found: pip install nvidia-cuda-nvrtc")
    image = _core.cuda_compile_cubin(module, arch)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{module}_{arch}.cubin")
        with open(path, "wb") as f:
            f.write(image)
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True)
        elf = subprocess.run([tool, "-elf", path], capture_output=True, text=True, check=True).stdout
    kernels = _parse_sass(sass, module, arch)
    _parse_resources(usage.stdout, kernels)
    _parse_externs(elf, kernels)
    return kernels


def read_all(archs=ARCHS, modules=MODULES) -> list[Kernel]:
    """Every kernel of every module for every architecture in ``archs``."""
    tool = cuobjdump()
    return [k for arch in archs for module in modules for k in read_module(module, arch, tool).values()]


def _widths(counts: Counter) -> str:
    return " ".join(f"{bits // 8}B:{n}" for bits, n in sorted(counts.items())) or "-"


def register_table(kernels: list[Kernel]) -> str:
    """A table of registers per thread (and stack bytes, access widths) per kernel per arch."""
    archs = sorted({k.arch for k in kernels})
    rows: dict[tuple[str, str], dict[str, Kernel]] = {}
    for k in kernels:
        rows.setdefault((k.module, k.name), {})[k.arch] = k
    width = max(len(name) for _, name in rows) + 2
    head = f"{'module':<14}{'kernel':<{width}}" + "".join(f"{a + ' reg':>12}" for a in archs)
    lines = [head + "  stack  loads (bytes:count)  stores", "-" * (len(head) + 40)]
    for (module, name), per_arch in sorted(rows.items()):
        last = per_arch[archs[-1]] if archs[-1] in per_arch else next(iter(per_arch.values()))
        regs = "".join(f"{per_arch[a].registers if a in per_arch else '-':>12}" for a in archs)
        lines.append(
            f"{module:<14}{name:<{width}}{regs}  {last.stack:>5}  {_widths(last.loads):<20} "
            f"{_widths(last.stores)}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(register_table(read_all(tuple(sys.argv[1:]) or ARCHS)))
