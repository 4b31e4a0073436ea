"""Whole steps in one CPU launch per worker thread: forces and update fused, no Python between.

On the CPU a Warp launch runs on one thread, and handing part of every substep to other
Python threads costs a thread wake-up and a GIL hand-over per substep (hundreds of
microseconds on a virtual machine: as long as the vertex update). Instead each worker
thread launches :func:`advance` once for a block of steps, and the workers meet at a
spinning barrier (native code, below) twice per substep: after the tet forces, and after
the vertex update. Per substep a worker

1. adds the forces of its share of the tets into its own force buffer,
2. waits for the other workers,
3. updates its share of the vertices in place (the same ``integrate_vertex`` as the
   per-substep kernels, so the results are the same numbers), zeroing their force slots,
4. waits again, so that no worker reads positions that are still being written.

``retreat`` runs the adjoint of those substeps in reverse in the same way (vertex
adjoints, barrier, force VJPs, barrier, sums). With one worker there are no barriers.
CPU only: CUDA runs the per-substep kernels."""

from types import SimpleNamespace

import warp as wp

from diffsim.kernels.inversion import volume_ratio

# A waiting worker spins this many times, then also yields its core on every spin (so that a
# partner descheduled by other load can run). It gives up on a partner that never arrives
# after ``spin_limit`` spins (a kernel argument; seconds in use): a safety net against a hang.
SPINS_BEFORE_YIELD = 2000

# sync[0]: workers arrived at the current barrier; sync[1]: the barrier's generation;
# sync[2]: set to 1 when a worker gave up (the launch then ends early on every worker).
BARRIER = f"""
#if defined(__CUDA_ARCH__)
return 0;  // CPU only: the module is also compiled for CUDA, where these kernels never run
#else
if (workers < 2) return 0;
int* s = (int*)sync.data;
if (__atomic_load_n(s + 2, __ATOMIC_ACQUIRE)) return 1;
int generation = __atomic_load_n(s + 1, __ATOMIC_ACQUIRE);
if (__atomic_add_fetch(s, 1, __ATOMIC_ACQ_REL) == workers) {{
    __atomic_store_n(s, 0, __ATOMIC_RELAXED);
    __atomic_store_n(s + 1, generation + 1, __ATOMIC_RELEASE);
    return 0;
}}
#if defined(__APPLE__)
extern int diffsim_sched_yield(void) __asm__("_sched_yield");  // Mach-O: C names take a _
#elif !defined(_WIN32)
extern int diffsim_sched_yield(void) __asm__("sched_yield");
#endif
long long spins = 0;
while (__atomic_load_n(s + 1, __ATOMIC_ACQUIRE) == generation) {{
    if (__atomic_load_n(s + 2, __ATOMIC_ACQUIRE)) return 1;
    if (++spins > spin_limit) {{
        __atomic_store_n(s + 2, 1, __ATOMIC_RELEASE);
        return 1;
    }}
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
#if !defined(_WIN32)
    if (spins > {SPINS_BEFORE_YIELD}) diffsim_sched_yield();
#endif
}}
return 0;
#endif
"""


@wp.func_native(BARRIER)
def barrier(sync: wp.array(dtype=wp.int32), workers: int, spin_limit: wp.int64) -> int:
    """Waits until ``workers`` workers have arrived (0), or returns 1 where one gave up."""
    ...


def build_advance(dtype, module: str, elastic, integrate, force_vjp) -> SimpleNamespace:
    """The fused multi-step kernels for one scalar type, one per material.

    Args:
        dtype: the Warp scalar type.
        module: the Warp module of the forward-only kernels.
        elastic: the namespace of :func:`diffsim.kernels.elastic.build_elastic`.
        integrate: the namespace of :func:`diffsim.kernels.integrate.build_integrate`.
        force_vjp: the namespace of :func:`diffsim.kernels.force_vjp.build_force_vjp`.

    Returns:
        A namespace with ``advance`` (steps forward) and ``retreat`` (their adjoint), tuples
        of kernels indexed by the material id.
    """
    T = dtype
    vec3 = wp.types.vector(3, T)
    integrate_vertex = integrate.integrate_vertex
    integrate_vertex_vjp = integrate.integrate_vertex_vjp
    VertexUpdate, VertexCoefficients = integrate.VertexUpdate, integrate.VertexCoefficients
    TetElements = elastic.TetElements

    @wp.func
    def check_ratio(
        x: wp.array(dtype=wp.vec3d),
        el: TetElements,
        e: int,
        compare: bool,
        min_ratio: wp.float64,
        slack: wp.float64,
        det_dm_inv: wp.array(dtype=wp.float64),
        ratios: wp.array(dtype=wp.float64),
        below: wp.array(dtype=wp.int32),
    ):
        """Tet e's volume ratio at x into ``ratios[e]``; with ``compare``, ``below[0] = 1``
        where it fell below ``min(ratios[e], min_ratio) - slack`` since."""
        tet = el.tets[e]
        ratio = volume_ratio(x[tet[0]], x[tet[1]], x[tet[2]], x[tet[3]], det_dm_inv[e])
        if compare and ratio < wp.min(ratios[e], min_ratio) - slack:
            below[0] = 1
        ratios[e] = ratio

    def advance_kernel(add_tet_forces):
        @wp.kernel(module=module, enable_backward=False)
        def advance(
            x: wp.array(dtype=wp.vec3d),
            v: wp.array(dtype=vec3),
            el: TetElements,
            c: VertexCoefficients,
            fixed_start: wp.array(dtype=wp.vec3d),
            targets: wp.array2d(dtype=wp.vec3d),
            s: VertexUpdate,
            substeps: int,
            worker: int,
            workers: int,
            tet_start: int,
            tet_stop: int,
            vertex_start: int,
            vertex_stop: int,
            forces: wp.array2d(dtype=vec3),
            sync: wp.array(dtype=wp.int32),
            spin_limit: wp.int64,
            x_out: wp.array2d(dtype=wp.vec3d),
            v_out: wp.array2d(dtype=vec3),
            save: int,
            x_saved: wp.array2d(dtype=wp.vec3d),
            v_saved: wp.array2d(dtype=vec3),
            f_saved: wp.array2d(dtype=vec3),
            min_ratio: wp.float64,
            volume_slack: wp.float64,
            det_dm_inv: wp.array(dtype=wp.float64),
            ratios: wp.array(dtype=wp.float64),
            below: wp.array(dtype=wp.int32),
        ):
            """``targets.shape[0]`` steps of ``substeps`` substeps; launched with dim 1.

            x and v ``[n]`` are advanced in place and each step's result is written to row
            ``step`` of x_out and v_out ``[steps, n]``. ``targets`` ``[steps, k]`` are the
            prescribed positions at the end of each step (``k >= 1``; a dummy row when no
            vertex is fixed), reached linearly over the substeps from ``fixed_start`` ``[k]``.
            ``forces`` ``[workers, n]`` must be zero and is left zero. With ``save`` set, row
            ``step * substeps + j`` of x_saved, v_saved and f_saved ``[steps * substeps, n]``
            receives the positions, velocities and elastic forces at the start of substep j
            (what the backward pass needs). With ``min_ratio`` > 0 (the volume limit) it
            checks that no substep took a tet's volume ratio below ``min(its ratio at the
            substep's start, min_ratio) - volume_slack``, keeping each tet's last ratio in
            ``ratios [m]``, and sets ``below[0]`` where one did (the volume limit would
            have cut that substep: the caller takes the steps another way).
            """
            own = forces[worker]
            for step in range(targets.shape[0]):
                for j in range(substeps):
                    for e in range(tet_start, tet_stop):
                        add_tet_forces(x, el, e, own)
                        if min_ratio > wp.float64(0.0):
                            later = step + j > 0
                            check_ratio(
                                x, el, e, later, min_ratio, volume_slack, det_dm_inv, ratios, below
                            )
                    if barrier(sync, workers, spin_limit) != 0:
                        return
                    fraction = wp.float64(j + 1) / wp.float64(substeps)
                    for i in range(vertex_start, vertex_stop):
                        f_el = forces[0, i]
                        forces[0, i] = vec3()
                        for w in range(1, workers):
                            f_el = f_el + forces[w, i]
                            forces[w, i] = vec3()
                        if save != 0:
                            row = step * substeps + j
                            x_saved[row, i] = x[i]
                            v_saved[row, i] = v[i]
                            f_saved[row, i] = f_el
                        m = c.mass[i]
                        world = i // c.world_size
                        slot = c.fixed_slot[i]
                        xf = wp.vec3d()
                        is_fixed = int(0)  # noqa: UP018 - a Warp variable, not a constant
                        if slot >= 0:
                            if j == 0:
                                fixed_start[slot] = x[i]
                            start = fixed_start[slot]
                            xf = start + (targets[step, slot] - start) * fraction
                            is_fixed = 1
                        xn, vn = integrate_vertex(
                            x[i], v[i], f_el + m * c.gravity[world], m, c.damping[world],
                            is_fixed, xf, s,
                        )  # fmt: skip
                        x[i] = xn
                        v[i] = vn
                        if j == substeps - 1:
                            x_out[step, i] = xn
                            v_out[step, i] = vn
                    if barrier(sync, workers, spin_limit) != 0:
                        return
            if min_ratio > wp.float64(0.0):  # the last substep's end
                for e in range(tet_start, tet_stop):
                    check_ratio(x, el, e, True, min_ratio, volume_slack, det_dm_inv, ratios, below)

        return advance

    def retreat_kernel(add_tet_force_vjp):
        @wp.kernel(module=module, enable_backward=False)
        def retreat(
            el: TetElements,
            c: VertexCoefficients,
            steps: int,
            s: VertexUpdate,
            substeps: int,
            worker: int,
            workers: int,
            tet_start: int,
            tet_stop: int,
            vertex_start: int,
            vertex_stop: int,
            sync: wp.array(dtype=wp.int32),
            spin_limit: wp.int64,
            x_saved: wp.array2d(dtype=wp.vec3d),
            v_saved: wp.array2d(dtype=vec3),
            f_saved: wp.array2d(dtype=vec3),
            grad_x: wp.array2d(dtype=vec3),
            grad_v: wp.array2d(dtype=vec3),
            adj_x: wp.array(dtype=vec3),
            adj_v: wp.array(dtype=vec3),
            adj_f: wp.array(dtype=vec3),
            adj_hvp: wp.array2d(dtype=vec3),
            adj_mass: wp.array(dtype=T),
            adj_mu: wp.array2d(dtype=T),
            adj_lam: wp.array2d(dtype=T),
            adj_gravity: wp.array2d(dtype=vec3),
            adj_damping: wp.array2d(dtype=T),
            adj_targets: wp.array2d(dtype=vec3),
            adj_start: wp.array(dtype=vec3),
        ):
            """The adjoint of ``advance`` over ``steps`` steps, in reverse; dim 1 per worker.

            Reads the states and elastic forces ``advance`` saved ``[steps * substeps, n]``
            and the cotangents of its frames ``grad_x``, ``grad_v`` ``[steps, n]``. Leaves in
            ``adj_x``, ``adj_v`` ``[n]`` (zero on entry) the cotangents of the initial state;
            adds those of the masses to ``adj_mass`` ``[n]``, of mu and lambda to row
            ``worker`` of ``adj_mu``, ``adj_lam`` (index e * el.per_tet; rows at least a cache
            line long, or the workers' adds to index 0 contend for one line), of gravity and
            damping to row ``worker`` of ``adj_gravity``, ``adj_damping`` ``[workers, W]``
            (column: the world, vertex i in world ``i // c.world_size``), of the targets to
            ``adj_targets`` ``[steps, k]``.
            ``adj_hvp`` ``[workers, n]`` must be zero and is left zero; ``adj_f`` and
            ``adj_start`` ``[k]`` are scratch. Per substep: each worker runs the vertex
            adjoint of its vertices, waits, adds the force VJP of its tets into its own row
            of ``adj_hvp``, waits, and sums those rows into ``adj_x`` for its vertices.
            """
            hvp = adj_hvp[worker]
            amu = adj_mu[worker]
            alam = adj_lam[worker]
            first_world = vertex_start // c.world_size
            for back in range(steps):
                step = steps - 1 - back
                for back_j in range(substeps):
                    j = substeps - 1 - back_j
                    row = step * substeps + j
                    fraction = T(j + 1) / T(substeps)
                    # Gravity and damping cotangents are summed per world over this
                    # worker's vertices (consecutive, so the world changes at most W times).
                    sum_gravity = vec3()
                    sum_damping = T(0.0)
                    world = first_world
                    for i in range(vertex_start, vertex_stop):
                        vertex_world = i // c.world_size
                        if vertex_world != world:
                            adj_gravity[worker, world] = adj_gravity[worker, world] + sum_gravity
                            adj_damping[worker, world] = adj_damping[worker, world] + sum_damping
                            sum_gravity = vec3()
                            sum_damping = T(0.0)
                            world = vertex_world
                        g = c.gravity[world]
                        ax = adj_x[i]
                        av = adj_v[i]
                        if j == substeps - 1:
                            ax = ax + grad_x[step, i]
                            av = av + grad_v[step, i]
                        m = c.mass[i]
                        slot = c.fixed_slot[i]
                        is_fixed = int(0)  # noqa: UP018 - a Warp variable, not a constant
                        if slot >= 0:
                            is_fixed = 1
                        gx, gv, gf, gm, gd, gxf = integrate_vertex_vjp(
                            x_saved[row, i], v_saved[row, i], f_saved[row, i] + m * g, m,
                            c.damping[world], is_fixed, s, ax, av,
                        )  # fmt: skip
                        adj_x[i] = gx
                        adj_v[i] = gv
                        adj_f[i] = gf
                        adj_mass[i] = adj_mass[i] + gm + wp.dot(gf, g)
                        sum_gravity = sum_gravity + m * gf
                        sum_damping = sum_damping + gd
                        if slot >= 0:
                            # x_fixed = start + (target - start) * fraction
                            adj_targets[step, slot] = adj_targets[step, slot] + gxf * fraction
                            toward_start = gxf * (T(1.0) - fraction)
                            if j == substeps - 1:
                                adj_start[slot] = toward_start
                            else:
                                adj_start[slot] = adj_start[slot] + toward_start
                    if vertex_stop > vertex_start:
                        adj_gravity[worker, world] = adj_gravity[worker, world] + sum_gravity
                        adj_damping[worker, world] = adj_damping[worker, world] + sum_damping
                    if barrier(sync, workers, spin_limit) != 0:
                        return
                    x = x_saved[row]
                    for e in range(tet_start, tet_stop):
                        add_tet_force_vjp(x, adj_f, el, e, hvp, amu, alam)
                    if barrier(sync, workers, spin_limit) != 0:
                        return
                    for i in range(vertex_start, vertex_stop):
                        total = adj_x[i]
                        for w in range(workers):
                            total = total + adj_hvp[w, i]
                            adj_hvp[w, i] = vec3()
                        slot = c.fixed_slot[i]
                        if j == 0 and slot >= 0:
                            total = total + adj_start[slot]  # start = x at the step's start
                        adj_x[i] = total

        return retreat

    return SimpleNamespace(
        advance=tuple(advance_kernel(add) for add in elastic.add_tet_forces),
        retreat=tuple(retreat_kernel(add) for add in force_vjp.add_tet_force_vjp),
    )
