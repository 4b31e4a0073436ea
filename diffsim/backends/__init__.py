"""Force and time-integration backends. Each implements :class:`Backend`.

``torch``: the reference; forces by autograd of psi, runs any material.
``warp``: fused Warp kernels with adjoint backward passes (built-in materials).
"""

from __future__ import annotations

from diffsim.backends.base import Backend
from diffsim.backends.torch_backend import TorchBackend

BACKENDS: dict[str, type[Backend]] = {"torch": TorchBackend}

try:  # the Warp backend registers itself when its module is present
    from diffsim.backends.warp.backend import WarpBackend

    BACKENDS["warp"] = WarpBackend
except ImportError:  # pragma: no cover - only while the Warp backend is not built
    pass

__all__ = ["BACKENDS", "Backend", "TorchBackend"]
