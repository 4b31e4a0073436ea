"""Warp kernels, one file per concern, generated once per scalar type.

All kernels of one dtype live in one Warp module (``diffsim_float32`` or
``diffsim_float64``), so a process compiles (or loads from the kernel cache) at most one
module per dtype it uses. Nothing depends on the mesh or on parameter values, so nothing
recompiles when they change.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch


@functools.cache
def kernels_for(dtype: torch.dtype) -> SimpleNamespace:
    """The kernels and Warp types for ``torch.float32`` or ``torch.float64`` (built once)."""
    import warp as wp

    from diffsim.kernels.elastic import build_elastic
    from diffsim.kernels.integrate import build_integrate

    scalars = {torch.float32: wp.float32, torch.float64: wp.float64}
    if dtype not in scalars:
        raise ValueError(f"Warp kernels exist for float32 and float64, not {dtype}")
    scalar = scalars[dtype]
    module = f"diffsim_{scalar.__name__}"
    return SimpleNamespace(
        scalar=scalar,
        vec3=wp.types.vector(3, scalar),
        mat33=wp.types.matrix((3, 3), scalar),
        **vars(build_elastic(scalar, module)),
        **vars(build_integrate(scalar, module)),
    )
