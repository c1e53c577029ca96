"""``normax._wgpu``: the wgpu backend (normax._backends.wgpu) under the short name the README
gives users for its probe (``normax._wgpu.available()``, ``normax._wgpu.adapter()``).

The package's one alias: this module replaces itself in ``sys.modules`` by the backend, so both
names are the same module object. Code inside normax imports ``normax._backends`` directly.
"""

import sys

from ._backends import wgpu

sys.modules[__name__] = wgpu
