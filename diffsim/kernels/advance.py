"""Whole steps in one CPU launch per worker thread: forces and update fused, no Python between.

On the CPU a Warp launch runs on one thread, and handing half of every substep to a second
Python thread costs a thread wake-up and a GIL hand-over per substep (hundreds of
microseconds on a virtual machine: as long as the vertex update). Instead each worker
thread launches :func:`advance` once for a block of steps, and the workers meet at a
spinning barrier (native code, below) twice per substep: after the tet forces, and after
the vertex update. Per substep a worker

1. adds the forces of its half of the tets into its own force buffer,
2. waits for the other worker,
3. updates its half of the vertices in place (the same ``integrate_vertex`` as the
   per-substep kernels, so the results are the same numbers), zeroing their force slots,
4. waits again, so that no worker reads positions that are still being written.

With one worker there are no barriers. CPU only: CUDA runs the per-substep kernels.
"""

from types import SimpleNamespace

import warp as wp

# A waiting worker spins this many times, then also yields its core on every spin (so that a
# partner descheduled by other load can run). It gives up on a partner that never arrives
# after ``spin_limit`` spins (a kernel argument; seconds in use): a safety net against a hang.
SPINS_BEFORE_YIELD = 2000

# sync[0]: workers arrived at the current barrier; sync[1]: the barrier's generation;
# sync[2]: set to 1 when a worker gave up (the launch then ends early on every worker).
BARRIER = f"""
if (workers < 2) return 0;
int* s = (int*)sync.data;
if (__atomic_load_n(s + 2, __ATOMIC_ACQUIRE)) return 1;
int generation = __atomic_load_n(s + 1, __ATOMIC_ACQUIRE);
if (__atomic_add_fetch(s, 1, __ATOMIC_ACQ_REL) == workers) {{
    __atomic_store_n(s, 0, __ATOMIC_RELAXED);
    __atomic_store_n(s + 1, generation + 1, __ATOMIC_RELEASE);
    return 0;
}}
#if !defined(_WIN32)
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
"""


def build_advance(dtype, module: str, elastic: SimpleNamespace, integrate) -> SimpleNamespace:
    """The fused multi-step kernels for one scalar type, one per material.

    Args:
        dtype: the Warp scalar type.
        module: the Warp module of the forward-only kernels.
        elastic: the namespace of :func:`diffsim.kernels.elastic.build_elastic`.
        integrate: the namespace of :func:`diffsim.kernels.integrate.build_integrate`.

    Returns:
        A namespace with ``advance``, a tuple of kernels indexed by the material id.
    """
    T = dtype
    vec3 = wp.types.vector(3, T)
    mat33 = wp.types.matrix((3, 3), T)
    integrate_vertex = integrate.integrate_vertex

    @wp.func_native(BARRIER)
    def barrier(sync: wp.array(dtype=wp.int32), workers: int, spin_limit: wp.int64) -> int: ...

    def advance_kernel(add_tet_forces):
        @wp.kernel(module=module, enable_backward=False)
        def advance(
            x: wp.array(dtype=vec3),
            v: wp.array(dtype=vec3),
            tets: wp.array(dtype=wp.vec4i),
            dm_inv: wp.array(dtype=mat33),
            volume: wp.array(dtype=T),
            mu: wp.array(dtype=T),
            lam: wp.array(dtype=T),
            per_tet: int,
            mass: wp.array(dtype=T),
            gravity: wp.array(dtype=vec3),
            damping: wp.array(dtype=T),
            fixed_slot: wp.array(dtype=int),
            fixed_start: wp.array(dtype=vec3),
            targets: wp.array2d(dtype=vec3),
            h: T,
            has_ground: int,
            height: T,
            dhat: T,
            kappa: T,
            friction: T,
            eps_v: T,
            max_speed: T,
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
            x_out: wp.array2d(dtype=vec3),
            v_out: wp.array2d(dtype=vec3),
            save: int,
            x_saved: wp.array2d(dtype=vec3),
            v_saved: wp.array2d(dtype=vec3),
            f_saved: wp.array2d(dtype=vec3),
        ):
            """``targets.shape[0]`` steps of ``substeps`` substeps; launched with dim 1.

            x and v ``[n]`` are advanced in place and each step's result is written to row
            ``step`` of x_out and v_out ``[steps, n]``. ``targets`` ``[steps, k]`` are the
            prescribed positions at the end of each step (``k >= 1``; a dummy row when no
            vertex is fixed), reached linearly over the substeps from ``fixed_start`` ``[k]``.
            ``forces`` ``[workers, n]`` must be zero and is left zero. With ``save`` set, row
            ``step * substeps + j`` of x_saved, v_saved and f_saved ``[steps * substeps, n]``
            receives the positions, velocities and elastic forces at the start of substep j
            (what the backward pass needs).
            """
            own = forces[worker]
            for step in range(targets.shape[0]):
                for j in range(substeps):
                    for e in range(tet_start, tet_stop):
                        add_tet_forces(x, tets, dm_inv, volume, mu, lam, per_tet, e, own)
                    if barrier(sync, workers, spin_limit) != 0:
                        return
                    fraction = T(j + 1) / T(substeps)
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
                        m = mass[i]
                        slot = fixed_slot[i]
                        xf = vec3()
                        is_fixed = int(0)  # noqa: UP018 - a Warp variable, not a constant
                        if slot >= 0:
                            if j == 0:
                                fixed_start[slot] = x[i]
                            start = fixed_start[slot]
                            xf = start + (targets[step, slot] - start) * fraction
                            is_fixed = 1
                        xn, vn = integrate_vertex(
                            x[i], v[i], f_el + m * gravity[0], m, damping[0], is_fixed, xf, h,
                            has_ground, height, dhat, kappa, friction, eps_v, max_speed,
                        )  # fmt: skip
                        x[i] = xn
                        v[i] = vn
                        if j == substeps - 1:
                            x_out[step, i] = xn
                            v_out[step, i] = vn
                    if barrier(sync, workers, spin_limit) != 0:
                        return

        return advance

    return SimpleNamespace(advance=tuple(advance_kernel(add) for add in elastic.add_tet_forces))
