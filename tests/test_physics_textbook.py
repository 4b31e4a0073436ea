"""Physics against textbook results, through the public API only.

Each check runs in float64 and float32 and, where it is cheap, on both backends. Float32
tolerances reflect float32 (about 6e-8 relative rounding), and float32 results are also
compared with the float64 result of the same discrete problem where that is the sharper
check. Several checks also run with a ground plane far below the body ("far-ground"): the
plane is never approached, so the physics must be exactly that without a ground, and any
difference is an error of the ground path (for example velocities recomputed from rounded
position differences).

Every test prints its measured error and puts the numbers in its assertion messages.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.backends import BACKENDS

F64, F32 = torch.float64, torch.float32
G = 9.81
RHO = 1000.0

HAS_WARP = "warp" in BACKENDS
needs_warp = pytest.mark.skipif(not HAS_WARP, reason="warp-lang is not installed")


def case(backend: str, dtype: torch.dtype, *rest):
    """A pytest param with a readable id, skipped for Warp where Warp is missing."""
    ident = "-".join([backend, "f64" if dtype == F64 else "f32", *map(str, rest)])
    marks = [needs_warp] if backend == "warp" else []
    return pytest.param(backend, dtype, *rest, id=ident, marks=marks)


GROUNDS = ("no-ground", "far-ground")


def ground_for(mesh: ds.TetMesh, ground: str) -> float | None:
    """None, or a plane 1 m below the mesh: present but never approached."""
    return None if ground == "no-ground" else float(mesh.bounds[0, 1]) - 1.0


def masses(mesh: ds.TetMesh) -> torch.Tensor:
    return torch.as_tensor(mesh.lumped_masses(RHO), dtype=F64)


def zero_crossings(times: np.ndarray, y: np.ndarray) -> list[float]:
    """Times where y changes sign (linear interpolation), the start excluded."""
    out = []
    for i in range(1, len(y) - 1):
        if y[i] * y[i + 1] < 0:
            out.append(float(times[i] + (times[i + 1] - times[i]) * y[i] / (y[i] - y[i + 1])))
    return out


def report(name: str, **numbers) -> str:
    text = name + ": " + ", ".join(f"{k}={v:.4g}" for k, v in numbers.items())
    print(text)
    return text


# --------------------------------------------------------------------------------------------
# 1. First bending frequency of a cantilever against Euler-Bernoulli
# --------------------------------------------------------------------------------------------
BEAM_L, BEAM_A, BEAM_E = 1.0, 0.1, 1e6  # m, m (square section), Pa; nu = 0
BETA1 = 1.8751040687  # first root of cos(b) cosh(b) = -1


def euler_bernoulli_f1(length: float = BEAM_L) -> float:
    inertia, area = BEAM_A**4 / 12.0, BEAM_A**2
    return BETA1**2 / (2 * math.pi * length**2) * math.sqrt(BEAM_E * inertia / (RHO * area))


def cantilever_mode(xi: np.ndarray) -> np.ndarray:
    """The first mode shape of a clamped-free beam, 1 at the tip."""
    b = BETA1
    s = (math.cosh(b) - math.cos(b)) / (math.sinh(b) + math.sin(b))
    phi = np.cosh(b * xi) - np.cos(b * xi) - s * (np.sinh(b * xi) - np.sin(b * xi))
    return phi / phi[np.argmax(np.abs(phi))]


@functools.cache
def cantilever_frequency(
    cells: int, backend: str, dtype: torch.dtype, ground: str, length: float = BEAM_L
) -> float:
    """f1 of a clamped beam, 0.1 m x 0.1 m, with ``cells`` cubic cells through the depth.

    The beam starts straight with the first mode's velocity profile (tip 1 cm/s, amplitude
    about 3 mm, so linear); the period is the time of the second zero crossing of the
    tip's vertical displacement (the first is half a period). h is a quarter of the time
    a wave takes to cross one cell.
    """
    mesh = ds.TetMesh.beam(length=length, width=BEAM_A, height=BEAM_A, cells_per_width=cells)
    x0 = mesh.vertices
    period_eb = 1.0 / euler_bernoulli_f1(length)
    frames_per_period = 160
    dt = period_eb / frames_per_period
    wave_speed = math.sqrt(BEAM_E / RHO)  # P-wave speed at nu = 0
    substeps = math.ceil(dt / (0.25 * BEAM_A / cells / wave_speed))
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(BEAM_E, 0.0, RHO),
        dt=dt,
        substeps=substeps,
        gravity=(0.0, 0.0, 0.0),
        ground=ground_for(mesh, ground),
        fixed=x0[:, 0] < 1e-9,
        backend=backend,
        dtype=dtype,
    )
    v = np.zeros_like(x0)
    v[:, 1] = 0.01 * cantilever_mode(x0[:, 0] / length)
    with torch.no_grad():
        traj = sim.rollout(int(1.3 * frames_per_period), state=sim.initial_state(velocities=v))
    tip = x0[:, 0] > length - 1e-9
    y = (traj.positions[:, tip, 1].double().mean(dim=1) - float(x0[tip, 1].mean())).numpy()
    crossings = zero_crossings(traj.times, y)
    assert len(crossings) >= 2, f"the tip did not oscillate: zero crossings at {crossings}"
    return 1.0 / crossings[1]


BEAM_CASES = [case("warp", d, g) for g in GROUNDS for d in (F64, F32)]


@pytest.mark.parametrize("backend, dtype, ground", BEAM_CASES)
def test_cantilever_first_bending_frequency_matches_euler_bernoulli(backend, dtype, ground):
    # Linear tets lock in bending: the discrete beam is too stiff, and the error falls like
    # (cell size)^2. Measured for this beam (L/a = 10, nu = 0): f_fem / f_EB = 1.339, 1.164,
    # 1.094 with 2, 3, 4 cells through the depth. So 4 cells is held to +12% (0% below: the
    # FEM must be stiffer; Timoshenko shear and rotary inertia lower the continuum value by
    # well under 1% at L/a = 10), the error must shrink with refinement, and the Richardson
    # extrapolation of 3 and 4 cells (order 2) must land within 3% of Euler-Bernoulli.
    f_eb = euler_bernoulli_f1()
    ratio = cantilever_frequency(4, backend, dtype, ground) / f_eb
    msg = report(
        f"cantilever {backend} {dtype} {ground}",
        f_eb_hz=f_eb,
        f_fem_over_f_eb=ratio,
        rel_err=ratio - 1.0,
    )
    assert 1.0 < ratio < 1.12, msg
    if ground == "no-ground":
        r2 = cantilever_frequency(2, backend, dtype, ground) / f_eb
        r3 = cantilever_frequency(3, backend, dtype, ground) / f_eb
        richardson = (16 * ratio - 9 * r3) / 7
        msg = report(
            f"cantilever convergence {backend} {dtype}",
            cells2=r2,
            cells3=r3,
            cells4=ratio,
            richardson_3_4=richardson,
        )
        assert r2 > r3 > ratio, msg
        assert abs(richardson - 1.0) < 0.03, msg
    if dtype == F32 or ground != "no-ground":
        # The same discrete beam in float64 without a ground: only rounding may differ.
        reference = cantilever_frequency(4, backend, F64, "no-ground") / f_eb
        diff = abs(ratio - reference) / reference
        msg = report(
            f"cantilever {backend} {dtype} {ground} vs f64 no-ground",
            f64=reference,
            this=ratio,
            rel_diff=diff,
        )
        assert diff < 2e-4, msg


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@needs_warp
def test_cantilever_torch_backend_gives_the_same_frequency(dtype):
    # The torch backend is too slow for the fine beam on this machine; on a short, coarse
    # one (L = 0.5 m, L/a = 5, 2 cells through the depth: locking +34%, Timoshenko shear
    # and rotary inertia a few % the other way; measured f_fem / f_EB = 1.30) it must give
    # Warp's frequency.
    f_eb = euler_bernoulli_f1(0.5)
    torch_ratio = cantilever_frequency(2, "torch", dtype, "no-ground", 0.5) / f_eb
    warp_ratio = cantilever_frequency(2, "warp", dtype, "no-ground", 0.5) / f_eb
    diff = abs(torch_ratio - warp_ratio) / warp_ratio
    msg = report(f"cantilever torch {dtype}", torch=torch_ratio, warp=warp_ratio, rel_diff=diff)
    assert diff < (1e-8 if dtype == F64 else 2e-4), msg
    assert 1.15 < torch_ratio < 1.45, msg


# --------------------------------------------------------------------------------------------
# 2. Axial period of a fixed-free bar: 4 L / c
# --------------------------------------------------------------------------------------------
BAR_L, BAR_A, BAR_E, BAR_CELLS = 1.0, 0.05, 1e6, 20


@functools.cache
def bar_period(backend: str, dtype: torch.dtype, ground: str, h: float | None) -> float:
    """Period of a bar clamped at x = 0 and struck: every free vertex starts at 1 cm/s along x.

    nu = 0, so the bar is 1-D: the tip velocity is a square wave, the tip displacement a
    triangle wave with zeros at T/2 and T = 4 L / c. h: the substep (None: a fifth of the
    time a wave takes to cross one cell).
    """
    mesh = ds.TetMesh.box(size=(BAR_L, BAR_A, BAR_A), resolution=(BAR_CELLS, 1, 1))
    x0 = mesh.vertices
    c = math.sqrt(BAR_E / RHO)
    period = 4 * BAR_L / c
    frames = 100
    dt = period / frames
    h = 0.2 * (BAR_L / BAR_CELLS) / c if h is None else h
    fixed = x0[:, 0] < 1e-9
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(BAR_E, 0.0, RHO),
        dt=dt,
        substeps=max(1, round(dt / h)),
        gravity=(0.0, 0.0, 0.0),
        ground=ground_for(mesh, ground),
        fixed=fixed,
        backend=backend,
        dtype=dtype,
    )
    v = np.zeros_like(x0)
    v[~fixed, 0] = 0.01
    with torch.no_grad():
        traj = sim.rollout(int(1.3 * frames), state=sim.initial_state(velocities=v))
    tip = x0[:, 0] > BAR_L - 1e-9
    u = (traj.positions[:, tip, 0].double().mean(dim=1) - BAR_L).numpy()
    crossings = zero_crossings(traj.times, u)
    assert len(crossings) >= 2, f"the bar did not oscillate: zero crossings at {crossings}"
    return crossings[1]


BAR_CASES = [case("warp", d, g, "cfl") for g in GROUNDS for d in (F64, F32)]
BAR_CASES += [case("warp", d, g, "h=1e-5") for g in GROUNDS for d in (F64, F32)]
BAR_CASES += [case("torch", d, g, "cfl") for g in GROUNDS for d in (F64, F32)]


@pytest.mark.parametrize("backend, dtype, ground, step", BAR_CASES)
def test_axial_period_of_a_fixed_free_bar_is_4L_over_c(backend, dtype, ground, step):
    # 20 linear elements along the bar: the lumped-mass dispersion error of the fundamental
    # is about (pi / 40)^2 / 24 = 3e-5, but the struck bar's triangle wave also carries the
    # higher harmonics, whose dispersion shifts the zero crossing: measured +0.12% (20
    # cells) and +0.05% (40 cells). Held to 1%.
    h = None if step == "cfl" else 1e-5
    exact = 4 * BAR_L / math.sqrt(BAR_E / RHO)
    period = bar_period(backend, dtype, ground, h)
    err = (period - exact) / exact
    msg = report(
        f"bar {backend} {dtype} {ground} {step}", period_s=period, exact_s=exact, rel_err=err
    )
    assert abs(err) < 0.01, msg
    if dtype == F32 or ground != "no-ground":
        reference = bar_period(backend, F64, "no-ground", h)
        diff = abs(period - reference) / reference
        msg = report(
            f"bar {backend} {dtype} {ground} {step} vs f64 no-ground",
            f64=reference,
            this=period,
            rel_diff=diff,
        )
        assert diff < 2e-4, msg


# --------------------------------------------------------------------------------------------
# 3. Linear and angular momentum of a spinning, translating, vibrating free body
# --------------------------------------------------------------------------------------------
CORE_CASES = [case(b, d, g) for b in ("warp", "torch") for g in GROUNDS for d in (F64, F32)]


def free_box(size: float = 0.1, cells: int = 2) -> ds.TetMesh:
    return ds.TetMesh.box(size=(size,) * 3, resolution=cells, origin=(0.0, 0.5, 0.0))


def squeezed_spinning_state(mesh: ds.TetMesh, spin: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x_rest = torch.as_tensor(mesh.vertices, dtype=F64)
    m = masses(mesh)
    center = (m[:, None] * x_rest).sum(0) / m.sum()
    x = x_rest + 0.005 * torch.randn(x_rest.shape, generator=gen, dtype=F64)
    v = 0.2 * torch.randn(x_rest.shape, generator=gen, dtype=F64)
    if spin:
        omega = torch.tensor([3.0, -5.0, 8.0], dtype=F64)  # rad/s
        v = v + torch.tensor([0.4, -0.2, 0.3], dtype=F64)  # m/s
        v = v + torch.linalg.cross(omega.expand_as(x), x - center)
    return x, v


@pytest.mark.parametrize("backend, dtype, ground", CORE_CASES)
def test_momentum_and_angular_momentum_are_conserved(backend, dtype, ground):
    # Symplectic Euler conserves both exactly for internal forces of a rotation-invariant
    # energy: P' = P + h sum f = P, and with x' = x + h v', sum m x' x v' = sum m x x v'
    # = L + h sum x x f = L. So both hold to rounding: 1e-11 in float64, 1e-5 in float32
    # (relative to sum |m v| and sum m |x x v|), and the centre of mass moves uniformly.
    mesh = free_box()
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(2e4, 0.3, RHO),
        dt=5e-4,
        gravity=(0.0, 0.0, 0.0),
        ground=None if ground == "no-ground" else 0.0,  # 0.5 m below, no gravity
        backend=backend,
        dtype=dtype,
    )
    x, v = squeezed_spinning_state(mesh, spin=True)
    steps = 400
    with torch.no_grad():
        traj = sim.rollout(steps, state=sim.initial_state(positions=x, velocities=v))
    m = masses(mesh)
    xs, vs = traj.positions.double(), traj.velocities.double()
    p = (m[None, :, None] * vs).sum(dim=1)
    ang = (m[None, :, None] * torch.linalg.cross(xs, vs, dim=-1)).sum(dim=1)
    p_scale = float((m * vs[0].norm(dim=1)).sum())
    l_scale = float((m * torch.linalg.cross(xs[0], vs[0], dim=-1).norm(dim=1)).sum())
    p_err = float((p - p[0]).norm(dim=1).max()) / p_scale
    l_err = float((ang - ang[0]).norm(dim=1).max()) / l_scale
    centers = (m[None, :, None] * xs).sum(dim=1) / m.sum()
    t = torch.as_tensor(traj.times, dtype=F64)[:, None]
    uniform = centers[0] + t * (p[0] / m.sum())
    c_err = float((centers - uniform).norm(dim=1).max()) / float(p[0].norm() / m.sum() * t[-1])
    msg = report(
        f"momentum {backend} {dtype} {ground}",
        p_rel_err=p_err,
        l_rel_err=l_err,
        com_path_rel_err=c_err,
        p_over_scale=float(p[0].norm()) / p_scale,
        l_over_scale=float(ang[0].norm()) / l_scale,
    )
    tol = 1e-11 if dtype == F64 else 1e-5
    assert p_err < tol, msg
    assert l_err < tol, msg
    assert c_err < tol, msg


# --------------------------------------------------------------------------------------------
# 4. Bounded energy error of symplectic Euler
# --------------------------------------------------------------------------------------------
@functools.cache
def energy_history(backend, dtype, ground, dt, duration=0.6, samples=120):
    mesh = free_box()
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(2e4, 0.3, RHO),
        dt=dt,
        gravity=(0.0, 0.0, 0.0),
        ground=None if ground == "no-ground" else 0.0,
        backend=backend,
        dtype=dtype,
    )
    x, v = squeezed_spinning_state(mesh, spin=False)
    steps = round(duration / dt)
    with torch.no_grad():
        traj = sim.rollout(steps, state=sim.initial_state(positions=x, velocities=v))
        frames = range(0, steps + 1, steps // samples)
        return torch.stack([sim.energies(traj.state(i))["total"].double() for i in frames])


@pytest.mark.parametrize("backend, dtype, ground", CORE_CASES)
def test_symplectic_euler_energy_is_bounded_without_drift(backend, dtype, ground):
    # A squeezed box vibrating freely (no gravity, no damping) for 0.6 s, several periods
    # of its slowest modes. Symplectic Euler conserves a modified energy: the true energy
    # oscillates in a band of O(h) (measured 2.7% at h = 5e-4 s, 1.5% at 2.5e-4 s) and
    # does not drift (measured 3e-4 between the first and last tenth).
    totals = energy_history(backend, dtype, ground, 5e-4)
    e0 = float(totals[0])
    band = float((totals - totals[0]).abs().max()) / e0
    n = len(totals) // 10
    drift = float(totals[-n:].mean() - totals[:n].mean()) / e0
    msg = report(f"energy {backend} {dtype} {ground}", band=band, drift=drift)
    assert band < 0.05, msg
    assert abs(drift) < 0.005, msg
    if backend == "warp":  # first order: halving h halves the band (too slow on torch)
        finer = energy_history(backend, dtype, ground, 2.5e-4)
        band_fine = float((finer - finer[0]).abs().max()) / float(finer[0])
        msg = report(
            f"energy {backend} {dtype} {ground} half h",
            band=band,
            band_half_h=band_fine,
            band_ratio=band_fine / band,
        )
        assert 0.4 < band_fine / band < 0.7, msg
    if dtype == F32 or ground != "no-ground":
        # The same trajectory in float64 without a ground: float32 rounding alone gives
        # about 1e-5 here (measured 0.8-1.1e-5); held to 5e-5.
        reference = energy_history(backend, F64, "no-ground", 5e-4)
        diff = float((totals - reference).abs().max()) / e0
        msg = report(f"energy {backend} {dtype} {ground} vs f64 no-ground", max_rel_diff=diff)
        assert diff < 5e-5, msg


# --------------------------------------------------------------------------------------------
# 5. Coulomb friction: a block sliding on the ground decelerates at mu g, in every direction
# --------------------------------------------------------------------------------------------
MU = 0.3
DHAT = 1e-3
SLIDE_DIRECTIONS = {"x": (1.0, 0.0, 0.0), "z": (0.0, 0.0, 1.0), "diagonal": (1.0, 0.0, -1.0)}
FRICTION_CASES = [case("warp", d, h) for h in (1e-4, 1e-5) for d in (F64, F32)]
FRICTION_CASES += [case("torch", d, 2.5e-4) for d in (F64, F32)]


@pytest.mark.parametrize("backend, dtype, h", FRICTION_CASES)
def test_sliding_block_decelerates_at_mu_g_in_every_direction(backend, dtype, h):
    # A 10 cm block (E = 1e5 Pa) set down inside the barrier layer and thrown at 1 m/s.
    # While it slides the normal force averages its weight, so the centre of mass
    # decelerates at mu g = 2.943 m/s^2 until it stops at t = 0.34 s. The block also
    # bounces elastically on the barrier (amplitude about its static sag, 0.5 mm), which
    # modulates the normal force; fitting x(t) over 0.02-0.25 s averages that out: measured
    # -1.1% at h = 2.5e-4 s, -0.6% at 1e-4 s, -0.15% at 1e-5 s. Held to 3%.
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2).placed_on(0.0, gap=0.5 * DHAT)
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(1e5, 0.3, RHO),
        dt=1e-3,
        substeps=round(1e-3 / h),
        gravity=(0.0, -G, 0.0),
        ground=0.0,
        ground_dhat=DHAT,
        friction=MU,
        backend=backend,
        dtype=dtype,
    )
    m = masses(mesh)
    directions = SLIDE_DIRECTIONS if backend == "warp" else {"diagonal": (1.0, 0.0, -1.0)}
    failures = []
    for name, direction in directions.items():
        d = np.asarray(direction) / np.linalg.norm(direction)
        with torch.no_grad():
            traj = sim.rollout(400, state=sim.initial_state(velocities=tuple(1.0 * d)))
        xs = traj.positions.double()
        centers = ((m[None, :, None] * xs).sum(dim=1) / m.sum()).numpy()
        t = traj.times
        window = (t >= 0.02) & (t <= 0.25)
        along = (centers - centers[0]) @ d
        decel = -2.0 * np.polyfit(t[window], along[window], 2)[0]
        err = (decel - MU * G) / (MU * G)
        lateral = centers[:, [0, 2]] - centers[0, [0, 2]] - along[:, None] * d[[0, 2]]
        lateral_max = float(np.linalg.norm(lateral[window], axis=1).max())
        lowest = xs[:, :, 1].min(dim=1).values.numpy()
        msg = report(
            f"friction {backend} {dtype} h={h:g} {name}",
            decel=decel,
            mu_g=MU * G,
            rel_err=err,
            lateral_drift_m=lateral_max,
            max_lowest_gap_over_dhat=float(lowest[window].max() / DHAT),
            min_gap_m=float(lowest.min()),
        )
        if not (lowest[window] < DHAT).all():  # touching the ground all along
            failures.append("no contact: " + msg)
        if not (lowest > 0).all():
            failures.append("below the ground: " + msg)
        if abs(err) > 0.03:
            failures.append(msg)
        if lateral_max > 2e-3:  # friction opposes the motion: no sideways drift
            failures.append("sideways: " + msg)
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------
# 6. Patch test: linear tets reproduce an affine field exactly
# --------------------------------------------------------------------------------------------
AFFINE_A = np.array([[1.10, 0.05, -0.02], [0.03, 0.95, 0.04], [-0.01, 0.02, 1.05]])
AFFINE_B = np.array([0.004, -0.003, 0.002])


def patch_setup():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3, origin=(0.0, 0.5, 0.0))
    x0 = mesh.vertices
    lo, hi = mesh.bounds
    boundary = torch.as_tensor(np.any(np.isclose(x0, lo) | np.isclose(x0, hi), axis=1))
    target = torch.as_tensor(x0 @ AFFINE_A.T + AFFINE_B, dtype=F64)
    scale = float((target - torch.as_tensor(x0)).norm(dim=1).max())  # largest displacement
    return mesh, boundary, target, scale


PATCH_CASES = [
    case(b, d, mat) for b in ("warp", "torch") for mat in ("snh", "linear") for d in (F64, F32)
]


@pytest.mark.parametrize("backend, dtype, material", PATCH_CASES)
def test_patch_test_static_equilibrium_is_the_affine_field(backend, dtype, material):
    # Boundary vertices of a 3x3x3-cell box follow x = A X + b (stretch, shear, rotation,
    # translation); the 8 interior vertices start at rest. A uniform F is an equilibrium of
    # any homogeneous material, and linear tets represent it exactly, so the static solution
    # is the affine field up to the solver tolerance: 1e-8 of the largest displacement in
    # float64 (Newton tol 1e-8), 1e-5 in float32 (measured 4e-14 for SNH and 1.8e-10 for
    # the linear material in float64, 5.4e-7 in float32).
    mesh, boundary, target, scale = patch_setup()
    cls = ds.StableNeoHookean if material == "snh" else ds.LinearElastic
    sim = ds.Simulator(
        mesh,
        cls(1e5, 0.3, RHO),
        gravity=(0.0, 0.0, 0.0),
        ground=None,
        fixed=boundary,
        backend=backend,
        dtype=dtype,
    )
    with torch.no_grad():
        x = sim.equilibrium(fixed_positions=target[boundary].to(dtype))
    err = float((x.double() - target)[~boundary].norm(dim=1).max()) / scale
    moved = float((x.double() - torch.as_tensor(mesh.vertices))[~boundary].norm(dim=1).min())
    msg = report(
        f"patch equilibrium {backend} {dtype} {material}",
        max_interior_err_over_disp=err,
        min_interior_move_m=moved,
    )
    assert moved > 1e-3, msg  # the interior really had to move
    assert err < (1e-8 if dtype == F64 else 1e-5), msg


@pytest.mark.parametrize("backend, dtype, ground", CORE_CASES)
def test_patch_test_affine_field_is_a_dynamic_rest_state(backend, dtype, ground):
    # Started on the affine field with the boundary held there, nothing may move: the
    # interior forces vanish up to rounding. 200 steps; allowed drift 1e-12 (float64) and
    # 5e-5 (float32) of the largest displacement (measured 7e-15 and 0.5-2e-6).
    mesh, boundary, target, scale = patch_setup()
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(1e5, 0.3, RHO),
        dt=2.5e-4,
        gravity=(0.0, 0.0, 0.0),
        ground=None if ground == "no-ground" else 0.0,
        fixed=boundary,
        backend=backend,
        dtype=dtype,
    )
    state = sim.initial_state(positions=target)
    with torch.no_grad():
        traj = sim.rollout(200, state=state, fixed_positions=target[boundary].to(dtype))
    drift = float((traj.positions.double() - target).norm(dim=2).max()) / scale
    speed = float(traj.velocities.double().norm(dim=2).max())
    msg = report(f"patch dynamic {backend} {dtype} {ground}", drift=drift, max_speed_m_s=speed)
    assert drift < (1e-12 if dtype == F64 else 5e-5), msg


# --------------------------------------------------------------------------------------------
# 7. Free fall: v = g t, distance g t^2 / 2, at any substep
# --------------------------------------------------------------------------------------------
FALL_STEPS = (1e-3, 1e-4, 1e-5, 1e-6)
FALL_CASES = [
    case(b, d, h, "ground") for b in ("warp", "torch") for h in FALL_STEPS for d in (F64, F32)
]
FALL_CASES += [case("warp", d, h, "no-ground") for h in FALL_STEPS for d in (F64, F32)]


@pytest.mark.parametrize("backend, dtype, h, ground", FALL_CASES)
def test_free_fall_matches_g_t_at_every_substep(backend, dtype, h, ground):
    # n = 2000 substeps of h (1000 on the slower torch backend), the body 1 m above the
    # ground plane y = 0 plus twice the fall, so the barrier is never approached (and, as a
    # diagnostic on Warp, the same without a ground). Symplectic Euler gives v_n = g n h
    # exactly and the distance g h^2 n (n + 1) / 2, 1/n = 0.05% (0.1%) above g t^2 / 2.
    # Both are held to 0.2% of g t and g t^2 / 2 in either precision; in float64 also to
    # 1e-5 of the discrete solution.
    substeps, steps = 100, (20 if backend == "warp" else 10)
    n = substeps * steps
    t = n * h
    fall = 0.5 * G * t * t
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=1, origin=(0.0, 1.0 + 2 * fall, 0.0))
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(1e4, 0.3, RHO),
        dt=h * substeps,
        substeps=substeps,
        gravity=(0.0, -G, 0.0),
        ground=0.0 if ground == "ground" else None,
        backend=backend,
        dtype=dtype,
    )
    with torch.no_grad():
        traj = sim.rollout(steps)
    m = masses(mesh)
    v = float((m * traj.velocities[-1, :, 1].double()).sum() / m.sum())
    y = (m[None] * traj.positions[:, :, 1].double()).sum(dim=1) / m.sum()
    distance = float(y[0] - y[-1])
    v_err = (-v - G * t) / (G * t)
    d_err = (distance - fall) / fall
    discrete_d_err = (distance - fall * (1 + 1 / n)) / (fall * (1 + 1 / n))
    msg = report(
        f"free fall {backend} {dtype} h={h:g} {ground}",
        t_s=t,
        v_rel_err=v_err,
        distance_rel_err=d_err,
        distance_vs_discrete=discrete_d_err,
    )
    assert abs(v_err) < 2e-3, msg
    assert abs(d_err) < 2e-3, msg
    if dtype == F64:
        assert abs(v_err) < 1e-5 and abs(discrete_d_err) < 1e-5, msg


# --------------------------------------------------------------------------------------------
# 5b. Surface friction: a block sliding on a fixed slab decelerates at mu g in every direction
# --------------------------------------------------------------------------------------------
SURFACE_FRICTION_CASES = [case("warp", d) for d in (F64, F32)]


@pytest.mark.parametrize("backend, dtype", SURFACE_FRICTION_CASES)
@pytest.mark.parametrize(
    "splits, substeps, speed",
    [
        (6, "auto", None),
        (0, 4, None),
        (0, "auto", 1.0),
        pytest.param(
            0,
            "auto",
            None,
            marks=pytest.mark.xfail(
                strict=True,
                reason="the default (no time-of-impact splits): the step limit bounds relative "
                "motion by its length, not its direction, so a block sliding 1 mm per substep "
                "within its gap is truncated (about 1,000 vertex-steps), braked and thrown off "
                "the slab (lowest gap up to 4-12 dhat); contact_time_of_impact=True or "
                "contact_speed=1 are the remedies; docs/contact.md, Known limits",
            ),
        ),
    ],
)
def test_block_sliding_on_a_slab_decelerates_at_mu_g_in_every_direction(
    backend, dtype, splits, substeps, speed
):
    # Section 5 with surface contact instead of the ground: the 10 cm block is set down
    # just above the barrier (1.05 dhat) of a fixed 0.6 m slab (one cell, so its top is two
    # triangles), no ground, contact friction mu, and thrown at 1 m/s; it settles into the
    # barrier within 3 ms and stops after 0.17 m, on the slab. The friction passes
    # (contact/friction.py) cap each pair's impulse at h mu lambda, so sliding contact is
    # Coulomb however many passes run. At substeps 'auto' (1) the block slides 1 mm per
    # substep within its gap, which the step limit cuts: time-of-impact splits take those
    # steps in parts. At 4 substeps (0.25 mm per substep, the gap 0.7-0.9 dhat) the default
    # path, no splits, cuts nothing: -0.14% in x and z, -0.05% diagonally (float64 and
    # float32). The user's remedy, the sliding speed named (contact_speed=1 with substeps
    # 'auto', which sizes the substep for approaches at twice that speed, so a surface
    # slides a tenth of dhat a substep), takes 10 substeps and cuts nothing either: -0.22%
    # in x and z, -0.08% diagonally (float64; float32 -0.21%, -0.07%).
    # Measured with splits (substeps 'auto': 1): +0.33% in x and z, +0.53% diagonally,
    # float64 (float32 +0.41%, +0.55%), no step truncated (-0.09% in x at the earlier
    # stiffness, rho = 1/4). Held to 3%. (Additive CCD bounds that follow the gap, tried,
    # let the block slide without splits, -0.2%, but gained two elastic balls at 5 m/s 2-3
    # times their energy: docs/contact.md, Known limits.)
    slab = ds.TetMesh.box(size=(0.6, 0.05, 0.6), resolution=1, origin=(-0.3, -0.05, -0.3))
    block = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(-0.05, 1.05 * DHAT, -0.05))
    mesh = ds.TetMesh.merge([slab, block])
    on_block = np.asarray(mesh.body_ids) == 1
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(1e5, 0.3, RHO),
        dt=1e-3,
        substeps=substeps,
        gravity=(0.0, -G, 0.0),
        ground=None,
        fixed=~on_block,
        contact=True,
        contact_dhat=DHAT,
        contact_speed=speed,
        contact_friction=MU,
        contact_time_of_impact=splits > 0,
        backend=backend,
        dtype=dtype,
    )
    m = masses(mesh)[on_block]
    failures = []
    for name, direction in SLIDE_DIRECTIONS.items():
        d = np.asarray(direction) / np.linalg.norm(direction)
        v = np.zeros((mesh.n_vertices, 3))
        v[on_block] = d
        timings = sim.model.contact.timings
        truncated = timings["truncated_vertex_steps"]
        with torch.no_grad():
            traj = sim.rollout(260, state=sim.initial_state(velocities=v))
        truncated = timings["truncated_vertex_steps"] - truncated
        xs = traj.positions.double()[:, on_block]
        centers = ((m[None, :, None] * xs).sum(dim=1) / m.sum()).numpy()
        t = traj.times
        window = (t >= 0.02) & (t <= 0.25)
        along = (centers - centers[0]) @ d
        decel = -2.0 * np.polyfit(t[window], along[window], 2)[0]
        err = (decel - MU * G) / (MU * G)
        lateral = centers[:, [0, 2]] - centers[0, [0, 2]] - along[:, None] * d[[0, 2]]
        lateral_max = float(np.linalg.norm(lateral[window], axis=1).max())
        lowest = xs[:, :, 1].min(dim=1).values.numpy()
        msg = report(
            f"surface friction {backend} {dtype} {name}",
            decel=decel,
            mu_g=MU * G,
            rel_err=err,
            lateral_drift_m=lateral_max,
            max_lowest_gap_over_dhat=float(lowest[window].max() / DHAT),
            min_gap_m=float(lowest.min()),
            truncated_vertex_steps=truncated,
        )
        if truncated:  # the step limit braked the block
            failures.append("truncated: " + msg)
        if not (lowest[window] < DHAT).all():
            failures.append("no contact: " + msg)
        if not (lowest > 0).all():
            failures.append("below the slab: " + msg)
        if abs(err) > 0.03:
            failures.append(msg)
        if lateral_max > 2e-3:
            failures.append("sideways: " + msg)
    assert not failures, "\n".join(failures)
