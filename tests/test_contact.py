"""Surface contact: distances, barrier, gradients and HVPs against ipctk; Warp/torch parity;
broad phase; CCD step limit; friction; float64 FD checks of rollouts through contact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.contact import ContactWarning, SurfaceContact, ccd
from diffsim.contact.candidates import SurfacePrimitives, brute_force_candidates, find_candidates
from diffsim.contact.distances import (
    edge_edge_cross_squared,
    edge_edge_distance,
    edge_edge_mollifier,
    edge_edge_parameters,
    mollifier_threshold,
    point_triangle_distance,
    point_triangle_type,
)
from diffsim.contact.potential import barrier_energy, barrier_forces, pair_distances
from diffsim.physics.ground import Ground
from diffsim.sim.state import State

ipctk = pytest.importorskip("ipctk")
F64 = torch.float64


def random_stencils(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4, 3))


def two_boxes(res: int = 2, rotation: float = 0.0, gap: float = 0.03) -> ds.TetMesh:
    """A unit box and a second one above it (optionally turned about y by ``rotation``)."""
    lower = ds.TetMesh.box(size=(1.0, 1.0, 1.0), resolution=res)
    c, s = np.cos(rotation), np.sin(rotation)
    rot = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    upper = ds.TetMesh.box(size=(1.0, 1.0, 1.0), resolution=res, origin=(-0.5, -0.5, -0.5))
    upper = upper.transformed(rotation=rot, translation=(0.8, 1.5 + gap, 0.7))
    return ds.TetMesh.merge([lower, upper])


# ----------------------------------------------------------------- distances
def test_point_triangle_distances_and_types_match_ipctk():
    x = random_stencils(500, 0)
    t = torch.tensor(x)
    d = point_triangle_distance(*t.unbind(1)).numpy()
    kind = point_triangle_type(*t.unbind(1)).numpy()
    ref = np.array([ipctk.point_triangle_distance(*s) for s in x])
    ref_kind = np.array([int(ipctk.point_triangle_distance_type(*s)) for s in x])
    np.testing.assert_allclose(d, ref, rtol=1e-12, atol=1e-14)
    assert (kind == ref_kind).all()
    assert len(np.unique(ref_kind)) == 7  # every closest-feature type was exercised


def test_edge_edge_distances_and_types_match_ipctk():
    x = random_stencils(500, 1)
    t = torch.tensor(x)
    d = edge_edge_distance(*t.unbind(1)).numpy()
    _, _, kind = edge_edge_parameters(*t.unbind(1))
    ref = np.array([ipctk.edge_edge_distance(*s) for s in x])
    ref_kind = np.array([int(ipctk.edge_edge_distance_type(*s)) for s in x])
    np.testing.assert_allclose(d, ref, rtol=1e-12, atol=1e-14)
    assert (kind.numpy() == ref_kind).all()
    assert len(np.unique(ref_kind)) == 9


def parallel_stencils(n: int, seed: int) -> np.ndarray:
    """Edge pairs ``[n, 4, 3]`` that are parallel up to rounding: each a random edge and a
    copy rotated by a random rotation (so not exactly parallel in floating point), scaled
    and slid along itself (overlapping, touching end to end, or apart) and moved off it."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 4, 3))
    for k in range(n):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        skew = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        angle = rng.uniform(0, 2 * np.pi)
        rot = np.eye(3) + np.sin(angle) * skew + (1 - np.cos(angle)) * skew @ skew
        length = 10 ** rng.uniform(-3, -1)
        d = rot @ np.array([1.0, 0.0, 0.0])
        side = rot @ np.array([0.0, np.cos(k), np.sin(k)])
        p0 = rng.normal(size=3) * 0.1
        gap = length * 10 ** rng.uniform(-3, 0)
        q0 = p0 + gap * side + rng.uniform(-1.5, 1.5) * length * d
        out[k] = [p0, p0 + length * d, q0, q0 + rng.uniform(0.5, 2.0) * length * d]
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parallel_edges_are_measured_as_ipctk_measures_them(dtype):
    """Edges parallel up to rounding (a box's edges, two boxes side by side) by the torch
    formulas and the Warp kernels. The products ``a e - b^2`` cancel to noise there and
    once passed the parallel test: two cubes' edges 1.5 mm apart measured 3.8 mm, which let
    the step limit skip the pair."""
    from diffsim.contact.warp_broad_phase import squared_distances

    x = parallel_stencils(300, 6)
    # The pair of the two colliding cubes (benchmarks/check_cuda.py) that measured 3.8 mm.
    cubes = [
        [-0.00075, -0.005, -0.03], [-0.00075, 0.02, -0.005],
        [0.00075, 0.005, -0.02], [0.00075, 0.03, 0.005],
    ]  # fmt: skip
    x = np.concatenate([x, np.array(cubes)[None]])
    ref = np.sqrt([ipctk.edge_edge_distance(*s) for s in x])
    assert abs(ref[-1] - 1.5e-3) < 1e-12
    t = torch.tensor(x, dtype=dtype)
    torch_d = edge_edge_distance(*t.unbind(1)).sqrt().double().numpy()
    rows = torch.arange(4 * len(x)).view(-1, 4)
    warp_d = squared_distances(t.reshape(-1, 3), rows[:0], rows).sqrt().double().numpy()
    # Within the rounding of the coordinates: measured in units of eps |x| (each stencil's
    # largest coordinate), it was up to 7.7e14 in float64 and 3.5e5 in float32 before.
    rounding = torch.finfo(dtype).eps * np.abs(x).max(axis=(1, 2))
    for name, got in (("torch", torch_d), ("warp", warp_d)):
        error = np.abs(got - ref) / rounding
        print(f"{name} {dtype}: worst error {error.max():.3g} eps |x|")
        assert error.max() < 10.0, f"{name}: stencil {error.argmax()} off by {error.max():.3g}"


@pytest.mark.parametrize("kind", ["point_triangle", "edge_edge"])
def test_distance_gradients_and_hessians_match_ipctk(kind):
    fn = point_triangle_distance if kind == "point_triangle" else edge_edge_distance
    grad_ref = getattr(ipctk, f"{kind}_distance_gradient")
    hess_ref = getattr(ipctk, f"{kind}_distance_hessian")
    for s in random_stencils(40, 2):
        x = torch.tensor(s.reshape(-1))

        def f(y):
            return fn(*y.reshape(4, 3).unbind(0))

        g = torch.func.grad(f)(x).numpy()
        h = torch.func.hessian(f)(x).numpy()
        np.testing.assert_allclose(g, grad_ref(*s), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(h, hess_ref(*s), rtol=1e-8, atol=1e-9)


def test_mollifier_matches_ipctk():
    rest = random_stencils(50, 3)
    x = rest + 0.01 * random_stencils(50, 4)
    eps = mollifier_threshold(*torch.tensor(rest).unbind(1)).numpy()
    ref_eps = np.array([ipctk.edge_edge_mollifier_threshold(*s) for s in rest])
    np.testing.assert_allclose(eps, ref_eps, rtol=1e-12)
    # Scale eps so that about half the stencils fall inside the mollified range.
    eps = eps * 5e2
    cross = edge_edge_cross_squared(*torch.tensor(x).unbind(1))
    m = edge_edge_mollifier(cross, torch.tensor(eps)).numpy()
    ref = np.array([ipctk.edge_edge_mollifier(*s, e) for s, e in zip(x, eps, strict=True)])
    np.testing.assert_allclose(m, ref, rtol=1e-12)
    assert 0 < (m < 1).sum() < len(m)


# ----------------------------------------------------------------- barrier on a mesh
def ipctk_reference(mesh: ds.TetMesh, x: np.ndarray, dhat: float):
    cmesh = ipctk.CollisionMesh.build_from_full_mesh(
        mesh.vertices, mesh.surface_edges, mesh.surface_faces
    )
    v = cmesh.vertices(x)
    collisions = ipctk.NormalCollisions()
    collisions.build(cmesh, v, dhat)
    potential = ipctk.BarrierPotential(dhat, 1.0)
    energy = potential(collisions, cmesh, v)
    grad = cmesh.to_full_dof(potential.gradient(collisions, cmesh, v))
    hess = cmesh.to_full_dof(potential.hessian(collisions, cmesh, v))
    return len(collisions), energy, grad, hess


@pytest.mark.parametrize("rotation", [0.3, 0.01], ids=["crossing", "near_parallel"])
def test_mesh_energy_gradient_and_hvp_match_ipctk(rotation):
    mesh = two_boxes(rotation=rotation)
    rng = np.random.default_rng(5)
    x = mesh.vertices + rng.normal(scale=0.01, size=mesh.vertices.shape)
    dhat = 0.08
    n, energy, grad, hess = ipctk_reference(mesh, x, dhat)
    assert n > 10  # a real contact configuration
    surface = SurfacePrimitives.from_mesh(mesh)
    xt = torch.tensor(x, requires_grad=True)
    mass = torch.ones(len(x), dtype=F64)
    c = brute_force_candidates(surface, xt, dhat)
    e = barrier_energy(xt, mass, c, dhat, 1.0)
    np.testing.assert_allclose(float(e.detach()), energy, rtol=1e-10)
    f = barrier_forces(xt, mass, c, dhat, 1.0)
    np.testing.assert_allclose(-f.detach().numpy().reshape(-1), grad, rtol=1e-8, atol=1e-12)
    direction = torch.tensor(rng.normal(size=x.shape))
    (hvp,) = torch.autograd.grad(-(f * direction).sum(), xt)
    ref = hess @ direction.numpy().reshape(-1)
    np.testing.assert_allclose(hvp.numpy().reshape(-1), ref, rtol=1e-7, atol=1e-7 * abs(ref).max())
    if rotation < 0.05:  # the mollifier is active on some edge-edge pairs
        cross = edge_edge_cross_squared(*xt.detach()[c.edge_edge].unbind(1))
        assert (cross < c.mollifier_eps).any()


# ----------------------------------------------------------------- Warp parity
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_warp_forces_and_vjp_match_torch(dtype):
    mesh = two_boxes(rotation=0.01, res=3)
    rng = np.random.default_rng(6)
    x = torch.tensor(mesh.vertices + rng.normal(scale=0.01, size=mesh.vertices.shape), dtype=dtype)
    mass = torch.tensor(rng.uniform(0.5, 1.5, len(x)), dtype=dtype)
    kwargs = dict(dhat=0.08, stiffness=3.0)
    ref = SurfaceContact(mesh, implementation="torch", broad_phase="brute", **kwargs)
    fast = SurfaceContact(mesh, implementation="warp", broad_phase="bvh", **kwargs)
    xr, mr = x.clone().requires_grad_(True), mass.clone().requires_grad_(True)
    f_ref, f_fast = ref.forces(xr, mr), fast.forces(xr, mr)
    scale = f_ref.abs().max()
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    assert scale > 0
    assert (f_ref - f_fast).abs().max() <= tol * scale
    w = torch.tensor(rng.normal(size=x.shape), dtype=dtype)
    g_ref = torch.autograd.grad((f_ref * w).sum(), (xr, mr))
    g_fast = torch.autograd.grad((f_fast * w).sum(), (xr, mr))
    for a, b in zip(g_ref, g_fast, strict=True):
        assert (a - b).abs().max() <= (1e-10 if dtype == torch.float64 else 1e-4) * a.abs().max()
    dx = torch.tensor(rng.normal(scale=0.05, size=x.shape), dtype=dtype)
    torch.testing.assert_close(ref.limit(x, x + dx), fast.limit(x, x + dx))


def test_bvh_broad_phase_finds_the_brute_force_pairs_and_no_adjacent_ones():
    mesh = two_boxes(rotation=0.2, res=3)
    surface = SurfacePrimitives.from_mesh(mesh)
    x = torch.tensor(mesh.vertices)
    for radius in (0.05, 0.3):
        a = brute_force_candidates(surface, x, radius)
        b = find_candidates(surface, x, radius, "bvh")
        for name in ("point_triangle", "edge_edge"):
            sa = {tuple(r) for r in getattr(a, name).tolist()}
            sb = {tuple(r) for r in getattr(b, name).tolist()}
            assert sa == sb and len(sa) > 0
        pt, ee = b.point_triangle, b.edge_edge
        assert not (pt[:, 1:] == pt[:, :1]).any()  # a point is never paired with its own face
        assert not (ee[:, :2, None] == ee[:, None, 2:]).any()  # edges never share a vertex
    # Within one body, pairs between non-adjacent primitives are kept (self-contact).
    assert (torch.as_tensor(mesh.body_ids)[b.point_triangle[:, 0]] == 0).any()


# ----------------------------------------------------------------- CCD
@pytest.mark.parametrize("implementation", ["torch", "warp"])
def test_ccd_limit_keeps_random_steps_intersection_free(implementation):
    mesh = two_boxes(rotation=0.3, gap=0.02)
    cmesh = ipctk.CollisionMesh.build_from_full_mesh(
        mesh.vertices, mesh.surface_edges, mesh.surface_faces
    )
    contact = SurfaceContact(mesh, dhat=0.01, stiffness=1.0, implementation=implementation)
    rng = np.random.default_rng(7)
    x = torch.tensor(mesh.vertices)
    upper = torch.as_tensor(mesh.body_ids == 1)
    limited = 0
    # Each limited step closes at most 90% of a gap; 8 steps keep gaps above ipctk's CCD
    # tolerance (its conservative check reports contact for gaps of about 1e-8 m).
    for _ in range(8):
        # A large step: the upper box falls through the lower one unless limited.
        dx = torch.tensor(rng.normal(scale=0.02, size=x.shape))
        dx[upper, 1] -= 0.1
        x_new = contact.limit(x, x + dx)
        assert ipctk.is_step_collision_free(
            cmesh, cmesh.vertices(x.numpy()), cmesh.vertices(x_new.numpy())
        )
        limited += int(((x_new - x) - dx).abs().max() > 0)
        x = x_new
    assert limited > 0
    assert contact.min_distance(x) > 0


def test_apart_agrees_with_the_measured_closest_pair_near_and_far_from_the_anchor():
    # apart() settles most calls by the candidate set's bound without measuring: it must
    # give the measured answer on both sides of the gap, also after the bodies moved.
    mesh = two_boxes(rotation=0.3, gap=0.02)
    contact = SurfaceContact(mesh, dhat=0.01, stiffness=1.0)
    x0 = torch.tensor(mesh.vertices)
    upper = torch.as_tensor(mesh.body_ids == 1)
    for drop in (0.0, 0.004, 0.012, 0.0185):
        x = x0.clone()
        x[upper, 1] -= drop
        closest = contact.min_distance(x)
        for gap in (0.5 * closest, 0.999 * closest, 1.001 * closest, 2.0 * closest):
            assert contact.apart(x, gap) == (closest > gap), (drop, gap, closest)
    assert 0.0 < closest < 0.002  # the last drop brought the boxes within the barrier


def falling_box_step(drop: float = 0.25):
    """Two boxes and a step in which the upper one falls ``drop`` m: 12 times the 2 cm gap
    and more than the 19 cm between its own non-adjacent surface elements."""
    mesh = two_boxes(res=3, rotation=0.3, gap=0.02)
    x = torch.tensor(mesh.vertices)
    dx = torch.tensor(np.random.default_rng(8).normal(scale=0.005, size=x.shape))
    dx[torch.as_tensor(mesh.body_ids == 1), 1] -= drop
    return mesh, x, dx


def test_ccd_scales_are_verified_at_the_limited_motion_and_agree_on_both_paths():
    mesh, x, dx = falling_box_step()
    scales = {}
    for implementation in ("torch", "warp"):
        contact = SurfaceContact(
            mesh, dhat=0.01, stiffness=1.0, implementation=implementation, broad_phase="brute"
        )
        scales[implementation] = contact.step_scales(x, x + dx)
    torch.testing.assert_close(scales["warp"], scales["torch"], rtol=1e-9, atol=1e-12)
    alpha = scales["torch"]
    assert 0 < float(alpha.min()) < 0.2 and float(alpha.max()) == 1.0
    c = contact.candidates(x)
    pairs = torch.cat([c.point_triangle, c.edge_edge])
    side = ccd._sides(c, "cpu")
    bound = (1 - ccd.MIN_GAP_FRACTION) * torch.cat(pair_distances(x, c)).sqrt()
    y = dx[pairs]
    # Pass 1 alone (each vertex the smallest relative limit of its pairs) is not enough:
    # vertices held by the lower box let their neighbours run into them.
    t = ((1 - ccd.SCALE_SLACK) * bound / ccd.pair_reach(y, side)).clamp(max=1.0)
    first = torch.ones(len(x), dtype=x.dtype).scatter_reduce(
        0, pairs.reshape(-1), t.repeat_interleave(4), reduce="amin"
    )
    assert (ccd.pair_reach(first[pairs, None] * y, side) > bound).any()
    # The verified scales keep every pair's bound, relative or absolute.
    relative_ok = ccd.pair_reach(alpha[pairs, None] * y, side) <= bound
    t_abs = ((1 - ccd.SCALE_SLACK) * bound / ccd.pair_reach(y, side, relative=False)).clamp(max=1)
    absolute_ok = (alpha[pairs] <= t_abs[:, None]).all(dim=1)
    assert (relative_ok | absolute_ok).all()
    cmesh = ipctk.CollisionMesh.build_from_full_mesh(
        mesh.vertices, mesh.surface_edges, mesh.surface_faces
    )
    x_new = x + alpha[:, None] * dx
    assert ipctk.is_step_collision_free(
        cmesh, cmesh.vertices(x.numpy()), cmesh.vertices(x_new.numpy())
    )


def test_ccd_leaves_a_common_translation_alone_however_fast():
    mesh, x, _ = falling_box_step()
    for implementation in ("torch", "warp"):
        contact = SurfaceContact(mesh, dhat=0.01, stiffness=1.0, implementation=implementation)
        step = torch.tensor([0.3, -0.2, 0.1], dtype=F64).expand_as(x)  # 15x the 2 cm gap
        assert bool((contact.step_scales(x, x + step) == 1).all())


def test_ccd_scale_is_held_constant_in_the_backward_pass():
    mesh = two_boxes(gap=0.01)
    contact = SurfaceContact(mesh, dhat=0.01, stiffness=1.0, implementation="torch")
    x = torch.tensor(mesh.vertices)
    dx = torch.zeros_like(x)
    dx[torch.as_tensor(mesh.body_ids == 1), 1] = -0.05
    x_new = (x + dx).requires_grad_(True)
    out = contact.limit(x, x_new)
    alpha = ((out - x).norm(dim=1) / dx.norm(dim=1).clamp_min(1e-30)).detach()
    (g,) = torch.autograd.grad(out.sum(), x_new)
    moving = dx.norm(dim=1) > 0
    assert alpha[moving].min() < 0.5
    torch.testing.assert_close(g[moving], alpha[moving, None].expand(-1, 3))


# ----------------------------------------------------------------- friction
def sliding_block(
    mu: float, implementation: str = "torch", backend: str = "torch"
) -> tuple[ds.Simulator, State]:
    base = ds.TetMesh.box(size=(0.3, 0.05, 0.3), resolution=(3, 1, 3), origin=(-0.15, 0.0, -0.15))
    block = ds.TetMesh.box(size=(0.1, 0.05, 0.1), resolution=1, origin=(-0.037, 0.0555, -0.061))
    mesh = ds.TetMesh.merge([base, block])
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3, density=1000.0),
        dt=1e-3,
        ground=None,
        fixed=np.flatnonzero(mesh.body_ids == 0),
        backend=backend,
        dtype=F64,
        contact=True,
        contact_dhat=0.005,
        contact_stiffness=Ground.default_stiffness(0.005),  # holds 4 g at dhat / 4
        contact_friction=mu,
        contact_friction_velocity=1e-3,
    )
    sim.model.contact.implementation = implementation
    v = torch.zeros((mesh.n_vertices, 3), dtype=F64)
    v[torch.as_tensor(mesh.body_ids == 1), 0] = 0.3
    return sim, sim.initial_state(velocities=v)


def test_friction_slows_a_sliding_block_like_coulomb_and_never_reverses_it():
    vel = {}
    for mu in (0.0, 0.5):
        sim, state = sliding_block(mu)
        block = torch.as_tensor(sim.mesh.body_ids == 1)
        with torch.no_grad():
            traj = sim.rollout(60, state)
        vel[mu] = traj.velocities[:, block].mean(dim=1)
    assert vel[0.0][-1, 0] > 0.29  # no friction: it keeps sliding
    assert vel[0.5][-1, 0] < 0.1  # friction took out most of the speed
    assert (vel[0.5][:, 0] > -1e-6).all()  # and never pushed the block backwards
    # Coulomb while it slides (steps 5 to 30): tangential impulse = mu * normal impulse.
    a, b = 5, 30
    tangential = float(vel[0.5][a, 0] - vel[0.5][b, 0])
    normal = float(vel[0.5][b, 1] - vel[0.5][a, 1]) + 9.81 * (b - a) * 1e-3
    assert 0.7 * 0.5 * normal < tangential < 1.05 * 0.5 * normal


# ----------------------------------------------------------------- rollout gradients
@pytest.mark.parametrize(
    "backend, implementation", [("torch", "torch"), ("torch", "warp"), ("warp", "warp")]
)
def test_rollout_gradient_through_contact_and_friction_matches_fd(backend, implementation):
    sim, state = sliding_block(0.5, implementation, backend)
    block = torch.as_tensor(sim.mesh.body_ids == 1)
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn((sim.mesh.n_vertices, 3), generator=gen, dtype=F64)
    direction = torch.randn((sim.mesh.n_vertices, 3), generator=gen, dtype=F64) * block[:, None]

    def loss(v0):
        traj = sim.rollout(15, State(state.positions, v0))
        return (traj.positions[-1] * weights).sum()

    v0 = state.velocities.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(v0), v0)
    eps = 1e-5
    with torch.no_grad():
        fd = (loss(v0 + eps * direction) - loss(v0 - eps * direction)) / (2 * eps)
        end = sim.rollout(15, state).positions[-1]
    analytic = (g * direction).sum()
    assert abs(float(analytic - fd)) <= 1e-7 * abs(float(fd))
    # The contact really acted: the block ends inside the barrier's range, and slid.
    assert sim.model.contact.min_distance(end) < sim.model.contact.dhat


# ----------------------------------------------------------------- simulator options
def test_simulator_builds_contact_with_scene_defaults_and_overrides():
    mesh = two_boxes(gap=0.05)
    mat = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3)
    sim = ds.Simulator(mesh, mat, dt=1e-3, substeps=2, ground=None, contact=True, backend="torch")
    c = sim.model.contact
    diag = np.linalg.norm(np.ptp(mesh.vertices, axis=0))
    assert c.dhat == pytest.approx(5e-3 * diag)
    assert c.stiffness == pytest.approx(SurfaceContact.default_stiffness(c.dhat, 5e-4))
    assert c.implementation == "torch"
    sim = ds.Simulator(
        mesh, mat, ground=None, contact=True, contact_dhat=0.01, contact_stiffness=5.0
    )
    assert (sim.model.contact.dhat, sim.model.contact.stiffness) == (0.01, 5.0)
    assert ds.Simulator(mesh, mat, ground=None).model.contact is not None  # on by default
    assert ds.Simulator(mesh, mat, ground=None, contact=False).model.contact is None


def test_bad_contact_settings_raise_clear_errors():
    mat = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3)
    mesh = two_boxes(gap=0.05)
    with pytest.raises(ValueError, match="contact_dhat"):
        ds.Simulator(mesh, mat, ground=None, contact=True, contact_dhat=-1.0)
    with pytest.raises(ValueError, match="contact_friction"):
        ds.Simulator(mesh, mat, ground=None, contact=True, contact_friction=-0.1)
    touching = ds.TetMesh.merge(
        [ds.TetMesh.box(resolution=1), ds.TetMesh.box(resolution=1, origin=(0.0, 1.0, 0.0))]
    )
    with pytest.raises(ValueError, match="surfaces touch at the start"):
        ds.Simulator(touching, mat, ground=None, contact=True)


def test_a_huge_step_is_scaled_down_as_a_whole_before_the_ccd_limit():
    mesh = two_boxes(gap=1.0)  # far enough apart that the capped step is never limited
    contact = SurfaceContact(mesh, dhat=0.01, stiffness=1.0, implementation="torch")
    size = contact.scene_size
    x = torch.tensor(mesh.vertices)
    dx = torch.zeros_like(x)
    dx[torch.as_tensor(mesh.body_ids == 1), 0] = 1e5  # sideways, nothing in the way
    out = contact.limit(x, x + dx)
    moved = out - x
    # Relative to the common motion, no vertex moves farther than 10% of the diagonal.
    relative = (moved - moved.mean(dim=0)).norm(dim=1).max()
    assert float(relative) == pytest.approx(0.1 * size)
    # The broad phase searched only as far as the capped step (not 1e5 m).
    assert contact._reach <= 1.02 * 0.1 * size
    # A translation of everything is capped only at the whole diagonal ...
    out = contact.limit(x, x + 1e5)
    assert float((out - x).norm(dim=1).max()) == pytest.approx(size)
    # ... and a fast one below that passes untouched, with the same candidate set.
    rebuilds = contact.timings["rebuilds"]
    torch.testing.assert_close(contact.limit(x, x + 0.5 * size), x + 0.5 * size)
    assert contact.timings["rebuilds"] <= rebuilds + 1


def test_simulator_energies_include_the_surface_barrier():
    mesh = two_boxes(gap=0.005)
    mat = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3)
    with pytest.warns(ContactWarning, match="start inside the barrier"):  # on purpose
        sim = ds.Simulator(
            mesh, mat, ground=None, contact=True, contact_dhat=0.01, backend="torch", dtype=F64
        )
    energies = sim.energies(sim.initial_state())
    assert energies["contact"] > 0
    x = sim.initial_state().positions.requires_grad_(True)
    (grad,) = torch.autograd.grad(sim.model.contact.energy(x, sim.coefficients().mass), x)
    forces = sim.model.contact.forces(x.detach(), sim.coefficients().mass)
    torch.testing.assert_close(forces, -grad)
