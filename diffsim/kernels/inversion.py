"""Counting inverted tets (volume ratio J = det F <= 0) in many frames at once.

One launch covers frames ``[K, N]`` (positions in float32 or float64, read as float64: the
kernels are built per positions' type by :func:`inversion_kernels`) and all tets:
thread ``(k, c)`` evaluates ``chunk`` consecutive tets at frame k
(chunks amortise Warp's per-thread call overhead on the CPU; 1 on a GPU). J is
``det [x1 - x0, x2 - x0, x3 - x0] * det Dm^-1`` with the determinant as the triple product
``e0 . (e1 x e2)`` in the order of the torch fallback in :mod:`diffsim.simulator`;
:func:`volume_ratios` evaluates the same at one frame (to list the tets counted). A thread
touches the outputs only where it found an inverted tet, once per world it found some in,
so the atomics stay uncontended.

World w owns tets ``w * tets_per_world .. (w + 1) * tets_per_world - 1``
(:mod:`diffsim.sim.worlds`).
"""

import functools
from types import SimpleNamespace

import warp as wp


@wp.func
def volume_ratio(
    x0: wp.vec3d, x1: wp.vec3d, x2: wp.vec3d, x3: wp.vec3d, det_dm_inv: wp.float64
) -> wp.float64:
    """J = det [x1 - x0, x2 - x0, x3 - x0] * det Dm^-1 (the triple product, in torch's order)."""
    a = x1 - x0
    b = x2 - x0
    e = x3 - x0
    det = a[0] * (b[1] * e[2] - b[2] * e[1])
    det += a[1] * (b[2] * e[0] - b[0] * e[2])
    det += a[2] * (b[0] * e[1] - b[1] * e[0])
    return det * det_dm_inv


def _build(vec3) -> SimpleNamespace:
    @wp.kernel(enable_backward=False)
    def count_inverted(
        xs: wp.array2d(dtype=vec3),
        tets: wp.array(dtype=wp.vec4i),
        det_dm_inv: wp.array(dtype=wp.float64),
        tets_per_world: int,
        chunk: int,
        counts: wp.array2d(dtype=wp.int32),
        lowest: wp.array(dtype=wp.float64),
    ):
        """Adds the inverted tets of ``chunk`` tets at frame k (thread ``(k, c)``) to
        ``counts[k, world]`` and lowers ``lowest[k]`` to their lowest J.

        Args:
            xs: positions ``[K, N]`` of K frames.
            tets: ``[M]`` vertex indices of every tet (all worlds).
            det_dm_inv: ``[M]`` det Dm^-1 = 1 / (6 V0) per tet.
            tets_per_world: m, the tets of one world (M without worlds).
            chunk: tets per thread.
            counts: ``[K, W]`` inverted tets per frame and world, added to.
            lowest: ``[K]`` the lowest J <= 0 per frame, lowered to (start it at +inf).
        """
        k, c = wp.tid()
        first = c * chunk
        last = wp.min(first + chunk, tets.shape[0])
        world = first // tets_per_world
        found = int(0)  # noqa: UP018 - inverted tets of this world not yet added
        low = wp.float64(0.0)
        any_found = int(0)  # noqa: UP018
        for t in range(first, last):
            tet = tets[t]
            J = volume_ratio(
                wp.vec3d(xs[k, tet[0]]), wp.vec3d(xs[k, tet[1]]), wp.vec3d(xs[k, tet[2]]),
                wp.vec3d(xs[k, tet[3]]), det_dm_inv[t],
            )  # fmt: skip
            if J <= wp.float64(0.0):
                w = t // tets_per_world
                if w != world:
                    if found > 0:
                        wp.atomic_add(counts, k, world, found)
                    world = w
                    found = 0
                found += 1
                if any_found == 0 or J < low:
                    low = J
                any_found = 1
        if found > 0:
            wp.atomic_add(counts, k, world, found)
        if any_found > 0:
            wp.atomic_min(lowest, k, low)

    @wp.kernel(enable_backward=False)
    def volume_ratios(
        x: wp.array(dtype=vec3),
        tets: wp.array(dtype=wp.vec4i),
        det_dm_inv: wp.array(dtype=wp.float64),
        chunk: int,
        J: wp.array(dtype=wp.float64),
    ):
        """J of every tet at one frame ``x [N]`` into ``J [M]`` (``chunk`` tets per thread), by
        the same arithmetic as :func:`count_inverted`: the tets that it counts."""
        first = wp.tid() * chunk
        last = wp.min(first + chunk, tets.shape[0])
        for t in range(first, last):
            tet = tets[t]
            J[t] = volume_ratio(
                wp.vec3d(x[tet[0]]), wp.vec3d(x[tet[1]]), wp.vec3d(x[tet[2]]), wp.vec3d(x[tet[3]]),
                det_dm_inv[t],
            )  # fmt: skip

    return SimpleNamespace(count_inverted=count_inverted, volume_ratios=volume_ratios)


@functools.cache
def inversion_kernels(vec3) -> SimpleNamespace:
    """``count_inverted`` and ``volume_ratios`` for positions of ``wp.vec3f`` or
    ``wp.vec3d``, built on first use."""
    if vec3 not in (wp.vec3f, wp.vec3d):
        raise ValueError(f"inversion kernels exist for wp.vec3f and wp.vec3d, not {vec3}")
    return _build(vec3)
