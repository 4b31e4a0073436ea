"""Per-tet elastic force kernels: forward, Warp's generated adjoint, hand-written VJP.

On ../shared/assets/bunny.msh (centred, 0.3 m tall, smoothly deformed so that every tet
is stretched and rotated a little), float32, CPU, one thread, chunks of 64 tets per
thread as the Warp backend launches them. Lame constants from E = 1e5 Pa, nu = 0.4
(re-parameterised for Stable Neo-Hookean). Prints ns per tet (best of the repeats) and
the ratios, per material.

    .venv/bin/python benchmarks/bench_force_vjp.py [--repeats 15] [--per-tet]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
NAMES = ("SNH", "NH", "StVK", "Corotated", "Linear")
CHUNK = 64


def _best_ns_per_tet(launches, n_tets: int, repeats: int, inner: int = 5) -> list[float]:
    """Best time per launch of each function, in ns per tet; the functions take turns in
    every repeat, so a load change on the machine hits all of them alike."""
    for launch in launches:
        launch()  # warm-up (loads the module)
    best = [float("inf")] * len(launches)
    for _ in range(repeats):
        for i, launch in enumerate(launches):
            t0 = time.perf_counter()
            for _ in range(inner):
                launch()
            best[i] = min(best[i], (time.perf_counter() - t0) / inner)
    return [t * 1e9 / n_tets for t in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats (best kept)")
    parser.add_argument("--per-tet", action="store_true", help="per-tet mu, lambda arrays")
    args = parser.parse_args()
    import torch
    import warp as wp

    import diffsim as ds
    from diffsim.kernels import grad_kernels_for, kernels_for
    from diffsim.kernels.runtime import init_warp
    from diffsim.physics.materials import lame_parameters

    torch.set_num_threads(1)
    init_warp()
    k = kernels_for(wp.float32)
    grad = grad_kernels_for(wp.float32)
    reference = grad.tet_forces  # Warp-generated adjoints
    mesh = ds.TetMesh.load(ASSETS / "bunny.msh").centered().scaled_to(0.3)
    m = mesh.n_tets
    rest = torch.tensor(mesh.vertices, dtype=torch.float64)
    x = rest + 0.01 * torch.sin(10.0 * rest.roll(1, dims=1))  # |grad| <= 0.1: no inversions
    x = x.contiguous()  # positions are float64 for every scalar type (precision rule)
    mu, lam = (float(v) for v in lame_parameters(1e5, 0.4))
    n_par = m if args.per_tet else 1

    def scalars(value: float) -> torch.Tensor:
        return torch.full((n_par,), value, dtype=torch.float32)

    gen = torch.Generator().manual_seed(0)
    adj_f = torch.randn(x.shape, generator=gen).to(torch.float32)
    f, adj_x = torch.zeros_like(adj_f), torch.zeros_like(adj_f)

    def w(t: torch.Tensor, dtype):
        return wp.from_torch(t, dtype=dtype)

    tets = wp.from_torch(torch.tensor(mesh.tets, dtype=torch.int32), dtype=wp.vec4i)
    dm_inv = w(torch.tensor(mesh.dm_inv, dtype=torch.float32), k.mat33)
    volume = w(torch.tensor(mesh.rest_volumes, dtype=torch.float32), k.scalar)
    adj_x64 = w(torch.zeros_like(x), k.position)  # Warp's adjoint of float64 positions
    xw, fw, adj_fw, adj_xw = w(x, k.position), w(f, k.vec3), w(adj_f, k.vec3), w(adj_x, k.vec3)
    dim = (m + CHUNK - 1) // CHUNK
    params = "per-tet" if args.per_tet else "global"
    print(f"bunny.msh: {m} tets, {mesh.n_vertices} vertices; float32, CPU, 1 thread, ", end="")
    print(f"chunk {CHUNK}, {params} mu/lambda; ns per tet")
    header = ("material", "forward", "generated", "hand VJP", "gen/fwd", "vjp/fwd", "gen/vjp")
    print("{:<10} {:>9} {:>10} {:>9} {:>8} {:>8} {:>8}".format(*header))
    for material, name in enumerate(NAMES):
        mu_m, lam_m = (4.0 / 3.0 * mu, lam + 5.0 / 6.0 * mu) if material == 0 else (mu, lam)
        mu_t, lam_t = scalars(mu_m), scalars(lam_m)
        amu, alam = torch.zeros_like(mu_t), torch.zeros_like(lam_t)
        el, el_ref = k.TetElements(), grad.TetElements()
        for struct in (el, el_ref):
            struct.tets, struct.dm_inv, struct.volume = tets, dm_inv, volume
            struct.per_tet = int(args.per_tet)
        el.mu, el.lam = w(mu_t, k.scalar), w(lam_t, k.scalar)
        # Warp's generated adjoint accumulates into the .grad of the struct's arrays.
        el_ref.mu, el_ref.lam = (
            wp.from_torch(t.clone(), dtype=k.scalar, requires_grad=True) for t in (mu_t, lam_t)
        )
        common, common_ref = [xw, el, 0, m, CHUNK], [xw, el_ref, 0, m, CHUNK]
        amu_w, alam_w = w(amu, k.scalar), w(alam, k.scalar)

        def forward(material=material, common=common) -> None:
            wp.launch(k.tet_forces_chunked[material], dim=dim, inputs=[*common, fw])

        def generated(material=material, common=common_ref) -> None:
            wp.launch(
                reference[material], dim=dim, inputs=common, outputs=[fw],
                adj_inputs=[adj_x64, grad.TetElements(), 0, 0, 0],
                adj_outputs=[adj_fw], adjoint=True, record_tape=False,
            )  # fmt: skip

        def hand(material=material, common=common, amu_w=amu_w, alam_w=alam_w) -> None:
            wp.launch(
                k.tet_force_vjp[material], dim=dim,
                inputs=[*common, adj_fw, adj_xw, amu_w, alam_w],
            )  # fmt: skip

        t_fwd, t_gen, t_vjp = _best_ns_per_tet((forward, generated, hand), m, args.repeats)
        ratios = f"{t_gen / t_fwd:8.2f} {t_vjp / t_fwd:8.2f} {t_gen / t_vjp:8.2f}"
        print(f"{name:<10} {t_fwd:9.1f} {t_gen:10.1f} {t_vjp:9.1f} {ratios}")


if __name__ == "__main__":
    main()
