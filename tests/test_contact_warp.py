"""The contact stages in Warp kernels against the torch reference: friction (values and
gradients, float64 and float32, sticking and sliding pairs), and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.contact import SurfaceContact, friction
from diffsim.contact.potential import smallest_mass
from diffsim.physics.barrier import barrier_derivative
from tests.helpers import tumbling_cubes

F64 = torch.float64
DHAT, KAPPA, H, MU, EPS_V = 0.08, 3.0, 0.5, 0.8, 1e-3


def two_boxes(rotation: float = 0.01, gap: float = 0.03) -> ds.TetMesh:
    """A unit box and a second one above it, turned about y by ``rotation``."""
    lower = ds.TetMesh.box(size=(1.0, 1.0, 1.0), resolution=3)
    c, s = np.cos(rotation), np.sin(rotation)
    rot = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    upper = ds.TetMesh.box(size=(1.0, 1.0, 1.0), resolution=3, origin=(-0.5, -0.5, -0.5))
    upper = upper.transformed(rotation=rot, translation=(0.8, 1.5 + gap, 0.7))
    return ds.TetMesh.merge([lower, upper])


def configuration(dtype=F64, seed: int = 6):
    """Positions, velocities, masses and the candidate pairs of two boxes in contact: the
    vertices on one side (x > 0.8) move fast, so their pairs slide (|u| >> eps_v), those on
    the other side barely move, so theirs stick; some edge-edge pairs are near-parallel
    (mollified)."""
    mesh = two_boxes()
    rng = np.random.default_rng(seed)
    x = torch.tensor(mesh.vertices + rng.normal(scale=0.003, size=mesh.vertices.shape), dtype=F64)
    v = torch.tensor(rng.normal(size=x.shape), dtype=F64)
    v = torch.where(x[:, :1] > 0.8, 0.3 * v, 2e-4 * v)
    mass = torch.tensor(rng.uniform(0.5, 1.5, len(x)), dtype=F64)
    contact = SurfaceContact(mesh, dhat=DHAT, stiffness=KAPPA, implementation="warp")
    c = contact.candidates(x)
    return x.to(dtype), v.to(dtype), mass.to(dtype), c


def run(implementation: str, v, x, mass, candidates, passes=None):
    return friction.apply_friction(
        v, x, mass, H, candidates, DHAT, KAPPA, MU, EPS_V, implementation, passes
    )


def test_the_configuration_has_sticking_sliding_and_mollified_pairs():
    x, v, mass, c = configuration()
    ids, weights, sep, mol = friction._pair_geometry(x, c)
    d2 = sep.square().sum(1)
    active = d2 < DHAT**2
    assert 100 < int(active.sum()) < c.n_pairs  # pairs out of reach are skipped in-kernel
    ids, weights, sep, mol, d2 = ids[active], weights[active], sep[active], mol[active], d2[active]
    assert (mol < 1).any()
    # The reference's intermediate terms (friction.apply_friction).
    normal = -KAPPA * smallest_mass(mass[ids]) * mol * 2 * d2.sqrt()
    normal = normal * barrier_derivative(d2, DHAT**2)
    n = sep / d2.sqrt()[:, None]
    v_rel = (weights[:, :, None] * v[ids]).sum(1)
    speed = (v_rel - (v_rel * n).sum(1, keepdim=True) * n).norm(dim=1)
    slope = torch.where(speed < EPS_V, 2 / EPS_V - speed / EPS_V**2, 1 / speed)
    m_eff = 1 / (weights.square() / mass[ids]).sum(1)
    stop = 1 - 1 / (1 + H * MU * normal * slope / m_eff)
    load = torch.zeros(len(v), dtype=F64).index_add(0, ids.reshape(-1), stop.repeat_interleave(4))
    assert (load > 1).sum() >= 20  # sticking vertices: their shares are relaxed
    assert ((speed > EPS_V) & (stop < 0.1)).sum() >= 50  # sliding pairs: pure Coulomb


@pytest.mark.parametrize("passes", [1, None])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_warp_friction_equals_torch(dtype, passes):
    x, v, mass, c = configuration(dtype)
    ref = run("torch", *(t.to(F64) for t in (v, x, mass)), c, passes)
    fast = run("warp", v, x, mass, c, passes)
    assert fast.dtype == dtype
    change = (ref - v.to(F64)).abs().max()
    assert change > 1e-3  # friction acted
    err = float((fast.to(F64) - ref).abs().max() / change)
    assert err < (1e-12 if dtype == F64 else 2e-5), err
    if dtype == torch.float32:  # as close as the torch reference in float32
        ref32 = run("torch", v, x, mass, c, passes)
        err32 = float((ref32.to(F64) - ref).abs().max() / change)
        assert err < 3 * err32 + 1e-6


def test_friction_passes_converge_and_keep_momentum():
    # More passes approach the converged solve (64 passes) steadily; every pass keeps the
    # total momentum (one relaxation factor per pair, whose weights sum to zero). Measured
    # distances after 1, 2, 4, 8, 16 passes: 0.026, 0.019, 0.013, 0.0095, 0.0022 m/s (this
    # configuration's fast and slow sides pull on shared vertices, so it converges slowly).
    x, v, mass, c = configuration()
    converged = run("torch", v, x, mass, c, 64)
    distances = []
    for passes in (1, 2, 4, 8, 16):
        for implementation in ("torch", "warp"):
            out = run(implementation, v, x, mass, c, passes)
            momentum = float(((out - v) * mass[:, None]).sum(0).abs().max())
            assert momentum < 1e-12 * float(((out - v).abs() * mass[:, None]).sum()), passes
        distances.append(float((out - converged).abs().max()))
    print("distance to the converged friction after 1, 2, 4, 8, 16 passes:", distances)
    assert all(b < a for a, b in zip(distances, distances[1:], strict=False)), distances
    assert distances[-1] < 0.15 * distances[0], distances


def test_warp_friction_gradients_match_torch_autograd():
    x, v, mass, c = configuration()
    w = torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    grads = {}
    for implementation in ("torch", "warp"):
        inputs = [t.clone().requires_grad_(True) for t in (v, x, mass)]
        out = run(implementation, *inputs, c)
        grads[implementation] = torch.autograd.grad((out * w).sum(), inputs)
    for name, a, b in zip(("v", "x", "mass"), grads["torch"], grads["warp"], strict=True):
        err = float((a - b).abs().max() / a.abs().max())
        assert err < 1e-11, (name, err)


def test_warp_friction_gradients_match_finite_differences():
    x, v, mass, c = configuration()
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(v.shape, generator=gen, dtype=F64)
    inputs = [t.clone().requires_grad_(True) for t in (v, x, mass)]
    grads = torch.autograd.grad((run("warp", *inputs, c) * w).sum(), inputs)
    for k, (t, g) in enumerate(zip((v, x, mass), grads, strict=True)):
        direction = torch.randn(t.shape, generator=gen, dtype=F64)
        eps = (1e-5 if k == 2 else 1e-7) * float(t.abs().max())  # truncation vs rounding
        args = [v, x, mass]
        args[k] = t + eps * direction
        plus = (run("warp", *args, c) * w).sum()
        args[k] = t - eps * direction
        minus = (run("warp", *args, c) * w).sum()
        fd = float(plus - minus) / (2 * eps)
        analytic = float((g * direction).sum())
        assert abs(analytic - fd) <= 1e-6 * abs(fd), (k, analytic, fd)


def test_warp_friction_without_pairs_in_reach_is_the_identity():
    x, v, mass, c = configuration()
    far = x + torch.as_tensor(two_boxes().body_ids == 1)[:, None] * torch.tensor([0, 1.0, 0])
    vr = v.clone().requires_grad_(True)
    out = run("warp", vr, far, mass, c)
    assert torch.equal(out, v)
    (g,) = torch.autograd.grad(out.sum(), vr)
    assert torch.equal(g, torch.ones_like(v))


def test_warp_friction_on_a_subset_runs_on_the_parents_arrays():
    x, v, mass, c = configuration()
    index = torch.randperm(c.n_pairs, generator=torch.Generator().manual_seed(3))[: c.n_pairs // 2]
    sub = c.subset(index)
    ref = run("torch", v, x, mass, sub)
    fast = run("warp", v, x, mass, sub)
    assert (ref - run("torch", v, x, mass, c)).abs().max() > 1e-3  # a different problem
    assert float((fast - ref).abs().max() / (ref - v).abs().max()) < 1e-12
    assert sub.derived["parent"] is c and F64 in c.derived  # no arrays of its own
    assert F64 not in sub.derived


def test_the_near_selection_holds_every_pair_within_dhat_as_bodies_slide(monkeypatch):
    """The Warp barrier and friction look for active pairs among a near subset, selected
    every few substeps: at every substep of a cube thrown sliding and tumbling over
    another (float32, friction on), it must hold every candidate within dhat."""
    from diffsim.contact import surface_contact
    from diffsim.contact.surface_contact import SurfaceContact as Contact
    from diffsim.contact.warp_broad_phase import squared_distances

    sim, state = tumbling_cubes(torch.float32)
    calls = {"substeps": 0, "subsets": 0, "active": 0}
    select = Contact._near_set

    def checked(self, x):
        near = select(self, x)
        c = self._candidates
        d2 = squared_distances(x.detach(), c.point_triangle, c.edge_edge)
        within = set(torch.nonzero(d2 < self.dhat**2).flatten().tolist())
        assert within <= set(near.derived["index"].tolist())
        calls["substeps"] += 1
        calls["subsets"] += int(near.n_pairs < c.n_pairs)
        calls["active"] += len(within)
        return near

    monkeypatch.setattr(Contact, "_near_set", checked)
    # The general path selects them every substep (the fused contact substeps check that
    # they hold at every substep, and are compared with this path in test_contact_fused.py).
    sim.backend.fused_contact.usable = lambda: False
    # The selection acts on sets of any size (by default only from NEAR_MIN_PAIRS pairs).
    monkeypatch.setattr(surface_contact, "NEAR_MIN_PAIRS", 0)
    traj = sim.rollout(40, state)
    print(calls)
    # Pairs were within dhat, and the selection was smaller than the set (it acted).
    assert calls["active"] > 0 and calls["subsets"] > 0.2 * calls["substeps"]
    assert float(traj.positions[-1, sim.mesh.n_vertices // 2 :, 0].mean()) > 0.03  # it slid
