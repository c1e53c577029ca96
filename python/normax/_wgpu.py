"""``normax._wgpu``: the wgpu backend (normax._backends.wgpu) under the name the README uses
(``normax._wgpu.available()``, ``normax._wgpu.adapter()``). The one alias in the package, kept
for those callers."""

import sys

from ._backends import wgpu

sys.modules[__name__] = wgpu
