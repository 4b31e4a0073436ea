"""The symplectic Euler update: the one torch definition of a substep.

The torch backend uses it for every substep; the Warp backend fuses the same update, and
on the CPU the same contact substeps with their splits, into kernels, and falls back to
:func:`substep` for what those do not take.

Time of impact (``Simulator(contact_time_of_impact=True)``, off by default). With surface
contact, a substep whose step the continuous collision limit would cut
(:meth:`SurfaceContact.step_scales` below 1 for some vertex) is not truncated: it is taken
again as two half substeps, forces recomputed at the middle, and each half the same way,
recursively, down to ``1 / 2**split_levels`` of the substep (the contact's
``split_levels``: ``SPLIT_LEVELS`` when asked for, else 0); only a step of that
length is truncated as the limit says (``v *= alpha``, the inelastic correction; its scales
carry the gradient of the pair bounds that set them). The splits are discrete decisions,
taken on detached values and held constant in the backward pass, so the gradient is the
exact derivative of the sequence of steps actually taken (docs/contact.md, "The
guarantee"). With worlds, each world splits its own substep: a world
takes the same steps as it does alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffsim.backends.worlds import WorldContact
from diffsim.contact.surface_contact import BLOW_UP_CAPS, BLOW_UP_FRACTION, CappedStep
from diffsim.physics.velocity import clamp_speed
from diffsim.sim.model import Model

# With contact_time_of_impact=True, a substep the step limit would cut is split in halves at most
# this many times (6: the shortest step 1/64 of the substep, at most 127 updates for a substep).
# Off by default (truncate at the whole substep): with splits, two elastic balls meeting at 5 m/s
# at 1e-4 s substeps (half the speed the barrier stops) came apart with 1.71 times their energy
# and inverted tets, and two cubes at 6 m/s approached to 1% of dhat, closer than a straight line
# between substeps stays clear (tests/test_contact_physics.py, tests/test_contact_scenes.py); 1.00
# and clear without. With the default stiffness at rho = 1/8 the balls keep 0.94, 1.014 and 1.026
# at 2, 5 and 10 substeps with splits (0.84, 0.95, 0.98 without), but the colliding spheres' pairs
# came so close at 4 substeps that the straight line between two frames crossed
# (scenes/spheres_collide.py, step 45), and where cuts are closings no shorter step avoids (the
# Armadillo's crushed crease, the bunny's ear fold) splits cost 2.5 and 1.2 times the run on the
# general path and still truncate; in the fused launches (which split as this function does) the
# bunny's costs 1.7 times and the Armadillo's crease over 10 times, every cut substep taken in 64
# steps (docs/contact.md, "Time of impact"), so they stay off. Steps of the shortest length are
# truncated and counted in ``contact.timings["truncated_vertex_steps"]``; splits in
# ``["split_substeps"]``.
SPLIT_LEVELS = 6
# The volume limit and the continuous collision limit alternate on a step at most this many
# times before the step is left untaken (each only shortens it). Two soft cubes pressed
# together at 2 m/s with a floor of 0.6 left 9 substeps untaken at 4 turns, none at 8.
LIMIT_ALTERNATIONS = 8


def symplectic_euler_update(
    model: Model,
    x: torch.Tensor,
    v: torch.Tensor,
    forces: torch.Tensor,
    mass: torch.Tensor,
    damping: torch.Tensor | float,
    x_fixed: torch.Tensor,
    h: float | None = None,
    ground_roots: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of length h from the explicit forces (everything but the ground barrier),
    with the continuous collision limit truncating it where it would cut it (no split).

    Precision rule: positions are float64 and the increment ``h v`` (in the working dtype)
    is added to them in float64, so no increment is lost however small the substep or far
    the body from the origin. Velocities are never recomputed from position differences:
    they change by the forces, and where a contact acts, by its own impulse.

    Args:
        model: the static model (clamp, fixed vertices, ground, contact).
        x: positions ``[n, 3]`` (m), float64.
        v: velocities ``[n, 3]`` (m/s), working dtype.
        forces: explicit forces ``[n, 3]`` (N): elastic + gravity + surface contact.
        mass: lumped masses ``[n]`` (kg).
        damping: mass-proportional damping rate (1/s): ``[]``, or ``[n]`` per vertex (worlds).
        x_fixed: positions ``[k, 3]`` of the fixed vertices at the end of the step.
        h: the step (s); default ``model.substep_dt``.
        ground_roots: the roots of the ground's implicit step another way
            (:meth:`~diffsim.physics.ground.Ground.solve`'s ``roots``); default its own.

    Returns:
        ``(x_new, v_new)``, each ``[n, 3]`` (float64 and working dtype).
    """
    m = model
    h = m.substep_dt if h is None else h
    contacts = _world_contacts(m.contact, len(x))
    x_new, v = _propose(
        m, x, v, forces, mass, damping, h, contacts, range(len(contacts)), ground_roots
    )
    if contacts:
        # The continuous collision limit: a vertex whose step is cut keeps the same
        # fraction of its velocity.
        alpha = torch.cat(
            [
                c.scales_with_gradient(
                    _at(x, rows), _at(x_new, rows), c.step_scales(_at(x, rows), _at(x_new, rows))
                )
                for c, rows in contacts
            ]
        )
        x_new = x + alpha.to(x.dtype)[:, None] * (x_new - x)
        v = v * alpha.to(v.dtype)[:, None]
    x_new, v = _limit_volumes(m, x, x_new, v, contacts)
    return x_new.index_put((m.fixed_indices,), x_fixed.to(x_new.dtype)), v


def substep(
    model: Model,
    x: torch.Tensor,
    v: torch.Tensor,
    x_fixed: torch.Tensor,
    forces: Callable[[torch.Tensor], torch.Tensor],
    mass: torch.Tensor,
    damping: torch.Tensor | float,
    ground_roots: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One substep of ``model.substep_dt``, split at times of impact (module docstring).

    The steps of a substep: the first tries the whole substep; a step the limit would cut
    (and longer than the shortest) is dropped and tried again at half its length; after a
    step is taken at time t (in units of the shortest step), the next tries the largest
    power of two that t is an odd multiple of, which is the recursion "two halves, each
    split the same way" written as a loop. Worlds (``model.worlds``) each follow their own
    steps: a step of one world never moves another, and the surface contact of a world is
    called exactly as it is for the world alone.

    Args:
        model: the static model.
        x: positions ``[n, 3]`` (m), float64.
        v: velocities ``[n, 3]`` (m/s), working dtype.
        x_fixed: positions ``[k, 3]`` of the fixed vertices at the end of the substep; within
            it they move on the straight line from their positions in x.
        forces: explicit forces ``[n, 3]`` (N) at positions x: elastic + gravity, without
            surface contact (added here) and the ground barrier (implicit, in the update).
        mass: lumped masses ``[n]`` (kg).
        damping: mass-proportional damping rate (1/s): ``[]``, or ``[n]`` per vertex.
        ground_roots: see :func:`symplectic_euler_update`.

    Returns:
        ``(x_new, v_new)``, each ``[n, 3]``.
    """
    m = model
    contacts = _world_contacts(m.contact, len(x))
    if not contacts:
        return symplectic_euler_update(
            m, x, v, forces(x), mass, damping, x_fixed, ground_roots=ground_roots
        )
    n_worlds, steps = len(contacts), 2 ** contacts[0][0].split_levels
    done = [0] * n_worlds  # time taken, in shortest steps
    size = [steps] * n_worlds  # the length of the next step tried
    f_other: torch.Tensor | None = None  # forces at x (reused after a dropped step)
    f_contact: list[torch.Tensor | None] = [None] * n_worlds
    start_fixed = x[m.fixed_indices]
    vertex_world = fixed_world = None
    if n_worlds > 1:
        per_world = len(x) // n_worlds
        vertex_world = torch.arange(len(x), device=x.device) // per_world
        fixed_world = m.fixed_indices // per_world
    while True:
        active = [w for w in range(n_worlds) if done[w] < steps]
        if not active:
            return x, v
        if f_other is None:
            f_other = forces(x)
        for w in active:
            if f_contact[w] is None:
                c, rows = contacts[w]
                f_contact[w] = c.forces(_at(x, rows), _at(mass, rows))
        if n_worlds == 1:
            f = f_other + f_contact[0]
        else:
            zero = torch.zeros_like(f_other[: len(x) // n_worlds])
            f = f_other + torch.cat(
                [zero if p is None or done[w] >= steps else p for w, p in enumerate(f_contact)]
            )
        moved: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
        for length in sorted({size[w] for w in active}, reverse=True):
            group = [w for w in active if size[w] == length]
            h = m.substep_dt * length / steps
            x_new, v_new = _propose(m, x, v, f, mass, damping, h, contacts, group, ground_roots)
            taken, scales = [], []
            for w in group:
                c, rows = contacts[w]
                alpha = c.step_scales(_at(x, rows), _at(x_new, rows))
                scale, relative, absolute = c.last_cap
                c.caps_in_a_row = c.caps_in_a_row + 1 if scale < 1.0 else 0
                if c.caps_in_a_row >= BLOW_UP_CAPS or (
                    scale < 1.0 and relative > BLOW_UP_FRACTION * c.scene_size
                ):  # a blow-up, which the cap would hide
                    c.caps_in_a_row = 0
                    world = w if n_worlds > 1 else None
                    raise CappedStep(world, relative, absolute, c.scene_size)
                limited = int((alpha < 1).sum())
                if limited and length > 1:
                    c.timings["split_substeps"] += 1
                    size[w] = length // 2
                    continue
                if limited:
                    # Truncated: the scales' values, with the gradient of the bounds that
                    # set them (constant only where no bound matches, a capped step).
                    c.timings["truncated_vertex_steps"] += limited
                    alpha = c.scales_with_gradient(_at(x, rows), _at(x_new, rows), alpha)
                    scales.append((rows, alpha))
                taken.append(w)
            if not taken:
                continue
            if scales:
                alpha = torch.ones(len(x), dtype=x.dtype, device=x.device)
                for rows, a in scales:
                    alpha[rows if rows is not None else slice(None)] = a.to(x.dtype)
                x_new = x + alpha[:, None] * (x_new - x)
                v_new = v_new * alpha.to(v_new.dtype)[:, None]
            x_new, v_new = _limit_volumes(m, x, x_new, v_new, contacts)
            # Prescribed vertices at their place on the line at the step's end.
            end = [(done[w] + length) / steps for w in range(n_worlds)]
            x_new = x_new.index_put(
                (m.fixed_indices,),
                _fixed_at(start_fixed, x_fixed, end, fixed_world).to(x_new.dtype),
            )
            mask = None
            if n_worlds > 1:
                mask = torch.isin(vertex_world, torch.tensor(taken, device=x.device))[:, None]
            moved.append((mask, x_new, v_new))
            for w in taken:
                done[w] += length
                size[w] = done[w] & -done[w]
                f_contact[w] = None
        for mask, x_new, v_new in moved:
            if mask is None:
                x, v = x_new, v_new
            else:
                x, v = torch.where(mask, x_new, x), torch.where(mask, v_new, v)
        if moved:
            f_other = None


def _limit_volumes(
    m: Model,
    x: torch.Tensor,
    x_new: torch.Tensor,
    v_new: torch.Tensor,
    contacts: list[tuple[object, slice | None]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step ``x -> x_new`` (and ``v_new``) after the volume limit
    (:mod:`diffsim.physics.volume_limit`), where the model has one: each vertex keeps the
    fraction of its step and velocity the limit gives it. A step it cuts is checked by the
    continuous collision limit again (a vertex held back can let another close on it), and
    the two alternate until neither cuts; after ``LIMIT_ALTERNATIONS`` turns the step is
    not taken (no vertex moves; velocities keep the scales so far). Both limits' scales
    carry their gradients (the crossings', and the pair bounds' that set them)."""
    limit = m.volume_limit
    if limit is None:
        return x_new, v_new
    cut = torch.zeros(len(x), dtype=torch.bool, device=x.device)  # the vertices it cut
    for _ in range(LIMIT_ALTERNATIONS):
        alpha = limit.scales(x, x_new - x, m.tets, m.dm_inv)
        if alpha is not None:
            x_new = x + alpha.to(x.dtype)[:, None] * (x_new - x)
            v_new = v_new * alpha.to(v_new.dtype)[:, None]
            cut |= alpha.detach() < 1.0
        if alpha is None or not contacts:
            limit.record(int(cut.sum()))
            return x_new, v_new
        scales = [c.step_scales(_at(x, rows), _at(x_new, rows)) for c, rows in contacts]
        if all(bool((s >= 1).all()) for s in scales):
            limit.record(int(cut.sum()))
            return x_new, v_new
        alpha = torch.cat(
            [
                c.scales_with_gradient(_at(x, rows), _at(x_new, rows), s)
                for (c, rows), s in zip(contacts, scales, strict=True)
            ]
        )
        x_new = x + alpha.to(x.dtype)[:, None] * (x_new - x)
        v_new = v_new * alpha.to(v_new.dtype)[:, None]
    limit.record(int(cut.sum()))
    limit.counts["cancelled_substeps"] += 1
    return x.clone(), v_new


def _fixed_at(
    start: torch.Tensor, end: torch.Tensor, fraction: list[float], world: torch.Tensor | None
) -> torch.Tensor:
    """Fixed vertices ``[k, 3]`` at ``fraction`` (of their world) of the way from start to
    end: exactly ``end`` at 1."""
    if world is None:
        if fraction[0] == 1.0:
            return end
        return start + (end.to(start.dtype) - start) * fraction[0]
    f = torch.tensor(fraction, dtype=start.dtype, device=start.device)[world][:, None]
    return torch.where(f == 1.0, end.to(start.dtype), start + (end.to(start.dtype) - start) * f)


def _world_contacts(contact, n: int) -> list[tuple[object, slice | None]]:
    """The surface contact of each world with its vertex rows (None: all rows; an empty
    list without contact)."""
    if contact is None:
        return []
    if isinstance(contact, WorldContact):
        k = contact.world_vertices
        return [(c, slice(w * k, (w + 1) * k)) for w, c in enumerate(contact.contacts)]
    return [(contact, None)]


def _at(t: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """The rows of t (t itself for None, so the contact's caches keyed on it apply)."""
    return t if rows is None else t[rows]


def _propose(
    m: Model,
    x: torch.Tensor,
    v: torch.Tensor,
    forces: torch.Tensor,
    mass: torch.Tensor,
    damping: torch.Tensor | float,
    h: float,
    contacts: list[tuple[object, slice | None]],
    group,
    ground_roots: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step of length h before the continuous collision limit and the prescribed
    positions: forces, damping, clamp, fixed mask, the surface friction of the worlds in
    ``group`` (those taking this step; of ``contacts``, every world's), ground. Returns
    ``(x_new, v_new)``; rows of worlds outside ``group`` are not meant to be used."""
    v = v + h * forces / mass[:, None]
    if isinstance(damping, torch.Tensor) and damping.dim() == 1:
        damping = damping[:, None]
    v = v / (1.0 + h * damping)
    if m.max_speed is not None:
        v = clamp_speed(v, m.max_speed)
    v = v * (~m.fixed_mask).to(v.dtype)[:, None]
    if len(contacts) == 1:
        # Surface friction (lagged: from the barrier at x) acts on all three components
        # before the ground solve, so it does not depend on the scene's orientation.
        v = contacts[0][0].apply_friction(v, x, mass, h)
    elif contacts:
        taking = set(group)
        v = torch.cat(
            [
                c.apply_friction(v[rows], x[rows], mass[rows], h) if w in taking else v[rows]
                for w, (c, rows) in enumerate(contacts)
            ]
        )
    x_new = x + h * v
    if m.ground is not None:
        x_new, v = _ground_contact(m.ground, x, v, h, ground_roots)
    return x_new, v


def _ground_contact(ground, x: torch.Tensor, v: torch.Tensor, h: float, roots=None):
    """The implicit ground barrier and friction; returns ``(x_new, v_new)``.

    Where a vertex's predicted gap is inside the barrier, its new gap d' is solved
    implicitly (:meth:`Ground.solve`), its height is ``height + d'`` (never on or below the
    plane) and its vertical velocity gains the barrier's impulse ``h a(d')``; friction then
    acts on the tangential velocity. Elsewhere the step is the free one.
    """
    d_pred = ground.gap(x, v.dtype) + h * v[:, 1]
    active = d_pred < ground.dhat
    if not bool(active.any()):
        return x + h * v, v
    d_new = ground.solve(d_pred, h, roots)
    normal = ground.normal_acceleration(d_new)
    v = torch.stack([v[:, 0], v[:, 1] + h * normal, v[:, 2]], dim=1)
    v = ground.apply_friction(v, d_new, h)
    step = x + h * v
    y_new = torch.where(active, ground.height + d_new.to(x.dtype), step[:, 1])
    return torch.stack([step[:, 0], y_new, step[:, 2]], dim=1), v
