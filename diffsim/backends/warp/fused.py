"""Blocks of steps on the CPU in one fused launch per worker thread, forward and backward.

:func:`advance_steps` and :func:`retreat_steps` launch the kernels of
:mod:`diffsim.kernels.advance` once per worker (the workers meet at a spinning barrier
inside them); :class:`Steps` is the autograd Function over a block of steps built on the
two. See docs/backends.md.

With several worlds (:mod:`diffsim.sim.worlds`) the workers split the worlds instead, where
that balances: each worker runs whole worlds with accumulators of its own, as a launch of
one worker, so the workers never wait for each other (worlds share nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import warp as wp
from torch.autograd.function import once_differentiable

from diffsim.backends.warp.bridge import Geometry, WarpCoefficients, torch_dtype, wrap
from diffsim.backends.warp.threads import MIN_TETS_PER_WORKER, one_torch_thread
from diffsim.physics.volume_limit import SLACK as VOLUME_SLACK

# Barrier spins before a fused worker gives up on the others (several seconds).
SPIN_LIMIT = 1 << 25
GAVE_UP_MESSAGE = (
    "a Warp worker thread stopped waiting for the others (a hang of several seconds); "
    "set DIFFSIM_WARP_THREADS=1 to run on one thread"
)
# Per-worker accumulators are padded to this many values (64 bytes of float32 or more),
# so that two workers adding to their own entries do not contend for one line.
CACHE_LINE_VALUES = 16
# Workers split whole worlds where each gets at least this many (or all the same number).
BALANCED_WORLDS = 4
# A worker running whole worlds launches them in groups of about this many tets (at least
# one world): the data of one launch (tets, rest shapes, state) stays in the core's cache.
WORLD_GROUP_TETS = 4096


def _run_workers(g: Geometry, kernel, launcher, args) -> None:
    """Launches a fused kernel once per worker (dim 1) and waits for all of them.

    With worlds split between the workers (:func:`_by_world`), a worker runs its worlds a
    few at a time (at most ``WORLD_GROUP_TETS`` tets per launch, so that a launch's data
    stays in the core's cache over its whole block of steps), one launch after another.

    Args:
        g: the geometry.
        kernel: ``advance[material]`` or ``retreat[material]``.
        launcher: the SplitLauncher, or None for one worker.
        args: ``args(worker, workers, tet_range, vertex_range, sync, alone)``: the kernel's
            argument list for one worker; with ``alone`` the worker runs whole worlds as a
            launch of one worker (``workers`` 1 in the kernel), on accumulators of its own.
    """
    workers = _workers(g, launcher)
    alone = _by_world(g, workers)
    sync = torch.zeros(4, dtype=torch.int32)
    sync_w = wrap(sync, wp.int32)
    per_world_tets, per_world_vertices = g.n_tets // g.worlds, g.n_vertices // g.worlds
    group = max(1, WORLD_GROUP_TETS // max(per_world_tets, 1))
    launches: list[list] = []
    for worker in range(workers):
        if alone:  # whole worlds: the tets of a world touch that world's vertices only
            first, stop = g.worlds * worker // workers, g.worlds * (worker + 1) // workers
            ranges = [
                (
                    [per_world_tets * a, per_world_tets * min(a + group, stop)],
                    [per_world_vertices * a, per_world_vertices * min(a + group, stop)],
                )
                for a in range(first, stop, group)
            ]
        else:
            tets = [g.n_tets * worker // workers, g.n_tets * (worker + 1) // workers]
            vertices = [g.n_vertices * worker // workers, g.n_vertices * (worker + 1) // workers]
            ranges = [(tets, vertices)]
        launches.append(
            [
                wp.launch(
                    kernel,
                    dim=1,
                    inputs=args(worker, workers, tets, vertices, sync_w, alone),
                    device=g.device,
                    record_cmd=True,
                )
                for tets, vertices in ranges
            ]
        )

    def job(mine: list) -> Callable[[], None]:
        def run() -> None:
            try:
                for launch in mine:
                    launch.launch()
            except BaseException:
                sync[2] = 1  # tells the spinning workers to give up instead of waiting
                raise

        return run

    if workers == 1:
        job(launches[0])()
    else:
        launcher.run(*(job(mine) for mine in launches))
    if int(sync[2]):
        raise RuntimeError(GAVE_UP_MESSAGE)


def _workers(g: Geometry, launcher) -> int:
    """Worker threads for a fused launch: the launcher's, at most one per
    MIN_TETS_PER_WORKER tets (below that, the barriers cost more than the split saves)."""
    if launcher is None:
        return 1
    workers = max(1, min(launcher.threads, g.n_tets // MIN_TETS_PER_WORKER))
    return min(workers, g.worlds) if _by_world(g, workers) else workers


def _by_world(g: Geometry, workers: int) -> bool:
    """Whether the workers run whole worlds: several worlds, and one worker, or an even
    split (a multiple) or at least BALANCED_WORLDS worlds per worker (at most 1 in 4 idle)."""
    if g.worlds < 2:
        return False
    if workers < 2:
        return True
    return g.worlds % min(workers, g.worlds) == 0 or g.worlds >= BALANCED_WORLDS * workers


def advance_steps(
    g: Geometry, w: WarpCoefficients, x, v, targets, out, launcher=None, saved=None, volume=None
) -> None:
    """Whole steps on the CPU in one launch of the fused kernel per worker (no autograd).

    Args:
        g, w: the geometry and prepared coefficients.
        x, v: positions and velocities ``[n, 3]`` at the start (not modified).
        targets: ``[K, k, 3]`` prescribed positions at the end of each step.
        out: two ``[K, n, 3]`` buffers for the positions and velocities after each step.
        launcher: splits the work between two threads where given (and the mesh is big
            enough to gain from it).
        saved: optional ``(x, v, f_el)`` buffers ``[K * substeps, n, 3]`` for the state and
            elastic forces at the start of every substep.
        volume: optional ``(min_ratio, below, det_dm_inv)``: check the volume limit's floor
            (no substep may take a tet below it); ``below`` (int32 ``[1]``, zeroed by the
            caller) is set where one did; ``det_dm_inv`` ``[m]`` (float64) per tet.
    """
    k, s = g.kernels, w.scratch
    x_work, v_work = x.clone(), v.clone()  # advanced in place
    if not g.n_fixed:  # the kernel takes at least one (unused) target column
        targets = targets.new_zeros((len(targets), 1, 3))
    targets = targets.contiguous()  # kept alive here: the launch holds only its pointer
    fixed_start = targets.new_empty((max(g.n_fixed, 1), 3))
    head = [
        wrap(x_work, k.position), wrap(v_work, k.vec3), w.elements, w.vertex,
        wrap(fixed_start, k.position), wrap(targets, k.position), w.settings, g.substeps,
    ]  # fmt: skip
    forces = wrap(s.worker_forces[: _workers(g, launcher)], k.vec3)
    save = int(saved is not None)
    saved = saved or (s.dummy_position_rows, s.dummy_rows, s.dummy_rows)
    tail = [
        wrap(out[0], k.position), wrap(out[1], k.vec3), save,
        wrap(saved[0], k.position), wrap(saved[1], k.vec3), wrap(saved[2], k.vec3),
    ]  # fmt: skip
    if volume is None:
        dummy = wrap(s.dummy_ratios, wp.float64)
        tail += [0.0, 0.0, dummy, dummy, wrap(s.dummy_flag, wp.int32)]
    else:
        min_ratio, below, scales = volume
        ratios = torch.empty(g.n_tets, dtype=torch.float64, device=x.device)
        tail += [min_ratio, VOLUME_SLACK, wrap(scales, wp.float64), wrap(ratios, wp.float64)]
        tail.append(wrap(below, wp.int32))

    def args(worker, workers, tets, vertices, sync, alone):
        if alone:  # its own force row, as the only worker of its launch
            own = wrap(s.worker_forces[worker : worker + 1], k.vec3)
            return [*head, 0, 1, *tets, *vertices, own, sync, SPIN_LIMIT, *tail]
        return [*head, worker, workers, *tets, *vertices, forces, sync, SPIN_LIMIT, *tail]

    _run_workers(g, k.advance[w.material], launcher, args)


def retreat_steps(g: Geometry, w: WarpCoefficients, saved, grad_x, grad_v, launcher=None):
    """The adjoint of :func:`advance_steps` (with ``saved``) in one launch per worker.

    Args:
        g, w: the geometry and prepared coefficients of the forward run.
        saved: its ``(x, v, f_el)`` buffers ``[K * substeps, n, 3]``.
        grad_x, grad_v: cotangents ``[K, n, 3]`` of its frames.
        launcher: as for :func:`advance_steps`.

    Returns:
        The cotangents of ``(x, v, targets, mu, lam, mass, gravity, damping)``, shaped as
        the Steps Function's inputs.
    """
    k, s = g.kernels, w.scratch
    workers = _workers(g, launcher)
    n_steps = len(grad_x)
    zeros = dict(dtype=torch_dtype(k.scalar), device=grad_x.device)
    adj = SimpleNamespace(
        x=torch.zeros((g.n_vertices, 3), **zeros),
        v=torch.zeros((g.n_vertices, 3), **zeros),
        f=torch.empty((g.n_vertices, 3), **zeros),
        mass=torch.zeros(g.n_vertices, **zeros),
        mu=torch.zeros((workers, max(len(w.inputs[0]), CACHE_LINE_VALUES)), **zeros),
        lam=torch.zeros((workers, max(len(w.inputs[1]), CACHE_LINE_VALUES)), **zeros),
        gravity=torch.zeros((workers, *w.inputs[3].view(-1, 3).shape), **zeros),
        damping=torch.zeros((workers, len(w.inputs[4])), **zeros),
        targets=torch.zeros((n_steps, max(g.n_fixed, 1), 3), **zeros),
        start=torch.zeros((max(g.n_fixed, 1), 3), **zeros),
    )
    dtype = torch_dtype(k.scalar)
    grad_x, grad_v = grad_x.to(dtype).contiguous(), grad_v.to(dtype).contiguous()
    vec3, scalar = k.vec3, k.scalar
    head = [w.elements, w.vertex, n_steps, w.settings, g.substeps]
    states = [
        wrap(saved[0], k.position), wrap(saved[1], vec3), wrap(saved[2], vec3),
        wrap(grad_x, vec3), wrap(grad_v, vec3), wrap(adj.x, vec3), wrap(adj.v, vec3),
        wrap(adj.f, vec3),
    ]  # fmt: skip
    ends = [wrap(adj.targets, vec3), wrap(adj.start, vec3)]

    def rows(start: int, stop: int) -> list:
        """The per-worker accumulators of workers start..stop - 1."""
        return [
            wrap(s.worker_forces[start:stop], vec3), wrap(adj.mass, scalar),
            wrap(adj.mu[start:stop], scalar), wrap(adj.lam[start:stop], scalar),
            wrap(adj.gravity[start:stop], vec3), wrap(adj.damping[start:stop], scalar),
        ]  # fmt: skip

    def args(worker, workers, tets, vertices, sync, alone):
        if alone:  # its own rows, as the only worker of its launch
            own = rows(worker, worker + 1)
            return [*head, 0, 1, *tets, *vertices, sync, SPIN_LIMIT, *states, *own, *ends]
        return [
            *head, worker, workers, *tets, *vertices, sync, SPIN_LIMIT, *states,
            *rows(0, workers), *ends,
        ]  # fmt: skip

    _run_workers(g, k.retreat[w.material], launcher, args)
    return (
        adj.x, adj.v, adj.targets[:, : g.n_fixed], adj.mu[:, : len(w.inputs[0])].sum(0),
        adj.lam[:, : len(w.inputs[1])].sum(0), adj.mass,
        adj.gravity.sum(0).view(w.inputs[3].shape), adj.damping.sum(0),
    )  # fmt: skip


class Steps(torch.autograd.Function):
    """(x, v, targets, mu, lam, mass, gravity, damping) -> frames ``([K, n, 3], [K, n, 3])``.

    K whole steps on the CPU with the fused kernel (:func:`advance_steps`), saving the state
    and elastic forces at the start of every substep; backward runs the substeps' adjoints
    in reverse. Prescribed positions interpolate linearly from the start of each step to
    its target (as in ``Backend.advance``), so their cotangents flow to the targets and to
    the fixed vertices' positions at the start of the step. An optional last argument, a
    list, receives the saved positions ``[K * substeps, n, 3]`` (read-only, for checks).
    """

    @staticmethod
    def forward(
        ctx, g, w, launcher, x, v, targets, mu, lam, mass, gravity, damping, seen=None,
        volume=None,
    ):  # fmt: skip
        n_sub = len(targets) * g.substeps
        saved = (
            x.new_empty((n_sub, *x.shape)),  # float64 positions
            v.new_empty((n_sub, *v.shape)),
            v.new_empty((n_sub, *v.shape)),
        )
        out = (x.new_empty((len(targets), *x.shape)), v.new_empty((len(targets), *v.shape)))
        advance_steps(g, w, x, v, targets, out, launcher, saved, volume)
        ctx.g, ctx.w, ctx.launcher, ctx.saved = g, w, launcher, saved
        ctx.save_for_backward(targets)
        if seen is not None:
            seen.append(saved[0])
        return out

    @staticmethod
    @once_differentiable
    @one_torch_thread()
    def backward(ctx, grad_xs, grad_vs):
        (targets,) = ctx.saved_tensors
        shape = (len(targets), ctx.g.n_vertices, 3)
        grad_xs = grad_xs if grad_xs is not None else targets.new_zeros(shape)
        grad_vs = grad_vs if grad_vs is not None else ctx.saved[1].new_zeros(shape)
        adjoints = retreat_steps(ctx.g, ctx.w, ctx.saved, grad_xs, grad_vs, ctx.launcher)
        return None, None, None, *adjoints, None, None
