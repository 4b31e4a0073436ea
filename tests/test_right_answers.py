"""Right answers in the configuration users run: float32 by default, ground on.

Each test makes its mechanism act (the ground is touched, the clamp cuts speeds, the body
is far from the origin) and checks float32 against float64 and against the textbook.
"""

import warnings

import pytest
import torch

import diffsim as ds

G = 9.81
MATERIAL = dict(youngs_modulus=1e5, poissons_ratio=0.4, density=1000.0)
BOX = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(2, 2, 2), origin=(0.0, 0.5, 0.0))
# (frame dt, substeps, frames): substeps h = 1e-3 .. 1e-6 s, a few thousand substeps at most.
SUBSTEPS = [(1e-3, 1, 60), (1e-3, 10, 20), (1e-4, 1, 300), (1e-5, 10, 100), (1e-6, 1, 2000)]


def sim_for(mesh, dtype=torch.float32, backend="warp", **kwargs):
    kwargs.setdefault("ground", 0.0)
    return ds.Simulator(
        mesh, ds.StableNeoHookean(**MATERIAL), dtype=dtype, backend=backend, **kwargs
    )


@pytest.mark.parametrize("backend", ["warp", "torch"])
@pytest.mark.parametrize(("dt", "substeps", "frames"), SUBSTEPS)
def test_float32_free_fall_is_g_t_with_the_ground_on(backend, dt, substeps, frames):
    sim = sim_for(BOX, dt=dt, substeps=substeps, backend=backend)
    traj = sim.rollout(frames)
    t = frames * dt
    h = dt / substeps
    v = traj.velocities[-1, :, 1].double().mean().item()
    fall = (traj.positions[0, :, 1] - traj.positions[-1, :, 1]).double().mean().item()
    # Symplectic Euler: v_n = -g n h exactly; the fall is g h^2 n (n + 1) / 2.
    n = round(t / h)
    v_err = abs(v / (-G * t) - 1)
    fall_err = abs(fall / (G * h * h * n * (n + 1) / 2) - 1)
    print(f"{backend} h={h:g}: velocity error {v_err:.2e}, fall error {fall_err:.2e}")
    assert v_err < 2e-3, f"float32 free fall velocity {v:.6g} vs g t = {-G * t:.6g}"
    assert fall_err < 2e-3, f"float32 fall {fall:.6g} m vs {G * h * h * n * (n + 1) / 2:.6g} m"


@pytest.mark.parametrize("backend", ["warp", "torch"])
def test_float32_bounce_and_rest_agree_with_float64(backend):
    """A box dropped 2 cm onto the ground bounces and comes to rest; float32 == float64."""
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(2, 2, 2), origin=(0.0, 0.02, 0.0))
    runs = {}
    for dtype in (torch.float32, torch.float64):
        sim = sim_for(mesh, dtype, backend, dt=1e-3, substeps=4, damping=2.0, friction=0.5)
        traj = sim.rollout(400)
        runs[dtype] = traj.positions[:, :, 1].double()
    heights = {k: v.min(dim=1).values for k, v in runs.items()}
    dhat = sim.model.ground.dhat
    assert float(heights[torch.float64].min()) < dhat, "the ground was never touched"
    diff = float((runs[torch.float32] - runs[torch.float64]).abs().max())
    print(f"{backend}: max |y32 - y64| over 400 frames = {diff:.2e} m (dhat {dhat:.2e} m)")
    assert diff < 1e-4 * 0.1  # 1e-4 of the body size
    lowest = runs[torch.float32][-100:].min(dim=1).values
    assert (lowest < dhat).all(), "the box does not stay on the ground"


@pytest.mark.parametrize("backend", ["warp", "torch"])
def test_float32_far_from_the_origin(backend):
    """A cube 1 cm above a ground at y = 1000 m falls at g; thrown down at 10 m/s it stays
    above the plane and agrees with float64."""
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(2, 2, 2), origin=(1000.0, 1000.01, 0.0))
    sim = sim_for(mesh, backend=backend, ground=1000.0, dt=1e-4, substeps=1)
    traj = sim.rollout(30)  # 3 ms: falls 44 um, still 1 cm above the ground
    v = traj.velocities[-1, :, 1].double().mean().item()
    assert abs(v / (-G * 3e-3) - 1) < 2e-3, f"v = {v} m/s after 3 ms, expected {-G * 3e-3}"
    ends = {}
    for dtype in (torch.float32, torch.float64):
        sim = sim_for(mesh, dtype, backend, ground=1000.0, dt=1e-3, substeps=10)
        state = sim.initial_state(velocities=(0.0, -10.0, 0.0))
        traj = sim.rollout(40, state=state)
        gaps = traj.positions[..., 1] - 1000.0
        assert (gaps > 0).all(), f"{int((gaps <= 0).sum())} vertex-frames on or below the plane"
        ends[dtype] = traj.positions[-1].double()
    diff = float((ends[torch.float32] - ends[torch.float64]).abs().max())
    print(f"{backend}: far from the origin, |x32 - x64| = {diff:.2e} m")
    assert diff < 1e-4


def test_gravity_gradient_with_the_ground_touched():
    """d loss / d gravity agrees with central differences while the box rests on the ground
    (the default ground stiffness does not depend on gravity)."""
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(1, 1, 1), origin=(0.0, 1e-4, 0.0))

    def loss(g: torch.Tensor) -> torch.Tensor:
        sim = sim_for(mesh, torch.float64, "torch", gravity=g, dt=1e-3, friction=0.3)
        traj = sim.rollout(40, state=sim.initial_state(velocities=(0.3, 0.0, 0.0)))
        assert float(traj.positions[..., 1].detach().min()) < sim.model.ground.dhat  # touched
        return traj.positions[-1].square().sum() + traj.velocities[-1, :, 0].sum()

    g = torch.tensor([0.5, -9.81, 0.2], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(g), g)
    eps = 1e-5
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = eps
        with torch.no_grad():
            fd = float((loss(g + e) - loss(g - e)) / (2 * eps))
        err = abs(float(grad[i]) - fd) / max(abs(fd), 1e-12)
        print(f"d loss / d g[{i}]: autograd {float(grad[i]):.9g}, FD {fd:.9g}, rel {err:.1e}")
        assert err < 1e-6


class MooneyRivlin(ds.Material):
    """A user's own material: parameters registered the torch way, psi only."""

    def __init__(self, c10, c01, kappa, density):
        super().__init__(density=density)
        self.c10 = torch.nn.Parameter(torch.as_tensor(c10, dtype=torch.float64))
        self.c01 = torch.nn.Parameter(torch.as_tensor(c01, dtype=torch.float64))
        self.kappa = torch.as_tensor(kappa, dtype=torch.float64)

    def energy_density(self, F):
        C = F.transpose(1, 2) @ F
        J = torch.linalg.det(F)
        tr = C.diagonal(dim1=1, dim2=2).sum(-1)
        i1 = tr * J ** (-2 / 3)
        i2 = 0.5 * (tr**2 - (C @ C).diagonal(dim1=1, dim2=2).sum(-1)) * J ** (-4 / 3)
        c10, c01, kappa = (t.to(F.dtype) for t in (self.c10, self.c01, self.kappa))
        return c10 * (i1 - 3) + c01 * (i2 - 3) + 0.5 * kappa * (J - 1) ** 2


SAG_MESH = ds.TetMesh.box(size=(0.2, 0.04, 0.04), resolution=(4, 1, 1))
SAG_FIXED = [i for i, x in enumerate(SAG_MESH.vertices) if x[0] == 0.0]


def _sag(material, dtype=torch.float64, backend="torch"):
    sim = ds.Simulator(
        SAG_MESH, material, dt=1e-3, substeps=4, ground=None, fixed=SAG_FIXED, dtype=dtype,
        backend=backend, damping=5.0,
    )  # fmt: skip
    return sim.rollout(30, checkpoint_every=10).positions[-1, :, 1].mean()


def test_user_module_material_trains_with_torch_optim():
    material = MooneyRivlin(c10=2e4, c01=5e3, kappa=2e5, density=1000.0)
    names = [name for name, _ in material.named_parameters()]
    assert names == ["c10", "c01"]
    assert set(material.state_dict()) >= {"c10", "c01", "youngs_modulus", "density"}
    target = _sag(MooneyRivlin(c10=1.4e4, c01=5e3, kappa=2e5, density=1000.0)).detach()
    optimiser = torch.optim.Adam(material.parameters(), lr=2e3)
    losses = []
    for _ in range(8):
        optimiser.zero_grad()
        loss = (_sag(material) - target).square() * 1e6
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    print(
        f"Mooney-Rivlin fit: loss {losses[0]:.3g} -> {losses[-1]:.3g}, "
        f"c10 = {float(material.c10):.4g}"
    )
    assert losses[-1] < 0.2 * losses[0]
    assert float(material.c10) < 2e4


def test_plain_tensor_attribute_gets_its_gradient():
    """``self.c10 = torch.tensor(..., requires_grad=True)``, as written in a hurry."""
    material = MooneyRivlin(c10=2e4, c01=5e3, kappa=2e5, density=1000.0)
    c10 = torch.tensor(2e4, dtype=torch.float64, requires_grad=True)
    del material.c10
    material.c10 = c10  # a plain attribute, not a Parameter
    assert material.needs_grad
    _sag(material).backward()
    assert c10.grad is not None and float(c10.grad) != 0.0
    eps = 1.0
    with torch.no_grad():
        material.c10 = c10.detach() + eps
        up = float(_sag(material))
        material.c10 = c10.detach() - eps
        down = float(_sag(material))
    fd = (up - down) / (2 * eps)
    err = abs(float(c10.grad) - fd) / abs(fd)
    print(f"d sag / d c10: autograd {float(c10.grad):.6g}, FD {fd:.6g}, rel {err:.1e}")
    assert err < 1e-6


def test_material_module_api():
    material = ds.StableNeoHookean(2e5, 0.3, 900.0)
    assert isinstance(material, torch.nn.Module)
    half = material.to(torch.float32)
    assert half.youngs_modulus.dtype == torch.float32
    E = torch.tensor(3e5, requires_grad=True)
    assert ds.StableNeoHookean(E, 0.3, 1000.0).youngs_modulus is E  # same object: E.grad fills
    p = torch.nn.Parameter(torch.tensor(3e5))
    assert [n for n, _ in ds.NeoHookean(p, 0.3, 1000.0).named_parameters()] == ["youngs_modulus"]
    F = torch.eye(3).expand(5, 3, 3)
    assert torch.allclose(material(F), torch.zeros(5))


def test_builtin_kernels_match_their_torch_psi():
    """Every built-in class names a Warp kernel whose forces equal autograd of its psi."""
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(2, 2, 2))
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor(mesh.vertices) + 0.004 * torch.randn(
        mesh.n_vertices, 3, generator=gen, dtype=torch.float64
    )
    for cls in (ds.StableNeoHookean, ds.NeoHookean, ds.StVK, ds.Corotated, ds.LinearElastic):
        assert cls.kernel is not None, f"{cls.__name__} names no kernel"
        forces = {}
        for backend in ("warp", "torch"):
            sim = ds.Simulator(
                mesh,
                cls(1e5, 0.3, 1000.0),
                ground=None,
                gravity=(0, 0, 0),
                dtype=torch.float64,
                backend=backend,
            )
            assert sim.backend_name == backend
            forces[backend] = sim.forces(x)
        err = float((forces["warp"] - forces["torch"]).abs().max() / forces["torch"].abs().max())
        assert err < 1e-10, f"{cls.__name__}: warp vs torch forces {err:.1e}"
        warp = ds.Simulator(mesh, cls(1e5, 0.3, 1000.0), ground=None, dtype=torch.float64)
        prepared = warp.backend.prepare(warp.coefficients())
        energy = float(warp.backend.elastic_energy(prepared, x))
        reference = float(warp.energies(ds.State(x, torch.zeros_like(x)))["elastic"])
        assert energy == pytest.approx(reference, rel=1e-10), f"{cls.__name__}: psi differs"


def test_speed_clamp_that_hides_instability_warns():
    """E = 1e8 at 15x the stable substep raises without the clamp; with max_speed=5 it warns."""
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(2, 2, 2), origin=(0.0, 0.2, 0.0))
    material = ds.StableNeoHookean(1e8, 0.3, 1000.0)
    # Stable step ~ altitude / wave speed ~ 0.02 m / (367 m/s) ~ 5e-5 s: 3e-4 s is unstable.
    kwargs = dict(dt=3e-4, substeps=1, ground=None)
    state_v = (0.0, -1.0, 0.0)
    sim = ds.Simulator(mesh, material, **kwargs)
    with pytest.raises(ds.SimulationError):
        sim.rollout(200, state=sim.initial_state(velocities=state_v))
    sim = ds.Simulator(mesh, material, max_speed=5.0, **kwargs)
    with pytest.warns(ds.StabilityWarning, match="clamp|strained"):
        sim.rollout(200, state=sim.initial_state(velocities=state_v))


def test_no_warning_in_a_calm_run():
    sim = sim_for(BOX, dt=1e-3, substeps=2, max_speed=50.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ds.StabilityWarning)
        sim.rollout(50)


def test_float32_gradients_of_a_long_rollout_with_friction_match_float64():
    """1000 steps sliding on the ground with friction: float32 gradients agree with float64
    (they differed by 37% to 4800%, signs flipped, when positions were float32)."""
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(2, 2, 2), origin=(0.0, 0.02, 0.0))
    grads = {}
    for dtype in (torch.float32, torch.float64):
        E = torch.tensor(1e5, dtype=dtype, requires_grad=True)
        g = torch.tensor([0.0, -9.81, 0.0], dtype=dtype, requires_grad=True)
        v0 = torch.tensor([1.0, 0.0, 0.5], dtype=dtype, requires_grad=True)
        material = ds.StableNeoHookean(E, 0.4, 1000.0)
        sim = ds.Simulator(
            mesh, material, dt=1e-3, substeps=4, friction=0.5, gravity=g, dtype=dtype
        )
        traj = sim.rollout(1000, state=sim.initial_state(velocities=v0), checkpoint_every=100)
        assert float(traj.positions[..., 1].detach().min()) < sim.model.ground.dhat
        loss = traj.positions[-1, :, ::2].mean() * 2 + traj.positions[:, :, 1].mean()
        loss.backward()
        grads[dtype] = torch.cat([E.grad.reshape(1), v0.grad, g.grad]).double()
    rel = (grads[torch.float32] - grads[torch.float64]).abs() / grads[torch.float64].abs()
    print("float32 vs float64 gradients (E, v0, g):", [f"{r:.1e}" for r in rel.tolist()])
    assert float(rel.max()) < 5e-3
    assert (grads[torch.float32].sign() == grads[torch.float64].sign()).all()


def test_kernel_constants_match_the_torch_ones():
    from diffsim.kernels import integrate
    from diffsim.physics import ground

    assert integrate.MIN_GAP_FRACTION == ground.MIN_GAP_FRACTION
