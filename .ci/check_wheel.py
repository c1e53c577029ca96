"""Checks a built normax wheel against what README.md claims: its platform tag (manylinux_2_N,
abi3), the newest GLIBC symbol version its extension needs (at most 2.N), and the license files.

    python3 .ci/check_wheel.py dist/normax-*.whl

Also used by tests/test_packaging.py on the installed package. Exits non-zero with the reasons.
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
LICENSES = ("LICENSE-MIT", "LICENSE-APACHE")


def claimed_glibc() -> tuple:
    """(2, N) from the README's `manylinux_2_N` claim."""
    found = set(re.findall(r"manylinux_2_(\d+)", README.read_text(encoding="utf-8")))
    if len(found) != 1:
        raise SystemExit(f"README.md should name exactly one manylinux_2_N tag, found {sorted(found)}")
    return (2, int(found.pop()))


def glibc_versions(binary: bytes) -> set:
    """The GLIBC_x.y symbol versions an ELF file refers to (their names are in its string table)."""
    return {(int(a), int(b)) for a, b in re.findall(rb"GLIBC_(\d+)\.(\d+)", binary)}


def problems(wheel: Path) -> list:
    glibc = claimed_glibc()
    out = []
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/WHEEL"))
        tags = [
            ln.split(":", 1)[1].strip() for ln in z.read(meta).decode().splitlines() if ln.startswith("Tag:")
        ]
        want = f"manylinux_{glibc[0]}_{glibc[1]}_"
        if not tags or not all(t.startswith("cp39-abi3-") for t in tags):
            out.append(f"tags {tags}: expected cp39-abi3-*")
        if not any(want in t for t in tags):
            out.append(f"tags {tags}: none is {want}<arch> as README.md claims")
        sos = [n for n in names if n.endswith(".so")]
        if not sos:
            out.append("no extension module (.so) in the wheel")
        for so in sos:
            versions = glibc_versions(z.read(so))
            newest = max(versions, default=(0, 0))
            if newest > glibc:
                out.append(f"{so} needs GLIBC_{newest[0]}.{newest[1]} > the claimed {glibc[0]}.{glibc[1]}")
        for lic in LICENSES:
            if not any(n.endswith((f".dist-info/licenses/{lic}", f".dist-info/{lic}")) for n in names):
                out.append(f"{lic} is not in the wheel's .dist-info")
    return out


def main(argv: list) -> int:
    if not argv:
        print(__doc__)
        return 2
    failed = False
    for path in argv:
        found = problems(Path(path))
        for p in found:
            print(f"{path}: {p}", file=sys.stderr)
        if not found:
            print(f"{Path(path).name}: tag, GLIBC versions and licenses match README.md")
        failed |= bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
