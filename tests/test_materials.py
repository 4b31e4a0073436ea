import math

import pytest
import torch

import diffsim as ds
from diffsim.physics.elasticity import elastic_energy, elastic_forces
from diffsim.physics.materials import polar_rotation

from .helpers import check_gradient


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


BUILTINS = [ds.StableNeoHookean, ds.NeoHookean, ds.StVK, ds.Corotated, ds.LinearElastic]
ROTATION_INVARIANT = [ds.StableNeoHookean, ds.NeoHookean, ds.StVK, ds.Corotated]


class MooneyRivlin(ds.Material):
    """A user's own material, psi only (compressible Mooney-Rivlin)."""

    def energy_density(self, F):
        mu, lam = self.lame()
        C = F.transpose(1, 2) @ F
        J = torch.linalg.det(F)
        i1 = C.diagonal(dim1=1, dim2=2).sum(-1) * J ** (-2 / 3)
        i2 = 0.5 * (
            C.diagonal(dim1=1, dim2=2).sum(-1) ** 2 - (C @ C).diagonal(dim1=1, dim2=2).sum(-1)
        )
        i2 = i2 * J ** (-4 / 3)
        return 0.25 * mu * (i1 - 3) + 0.25 * mu * (i2 - 3) + 0.5 * lam * (J - 1) ** 2


def random_rotation(seed=0):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.linalg.det(q))


@pytest.fixture
def mesh():
    return ds.TetMesh.box(size=(0.1, 0.2, 0.1), resolution=(1, 2, 1))


def deformed(mesh, scale=0.05, seed=1):
    x = torch.tensor(mesh.vertices)
    return x + scale * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def tensors(mesh):
    return torch.tensor(mesh.tets), torch.tensor(mesh.dm_inv), torch.tensor(mesh.rest_volumes)


@pytest.mark.parametrize("cls", [*BUILTINS, MooneyRivlin])
def test_forces_are_minus_energy_gradient(cls, mesh):
    material = cls(youngs_modulus=1e5, poissons_ratio=0.35)
    tets, dm_inv, vol = tensors(mesh)
    x = deformed(mesh)
    f = elastic_forces(material, x, tets, dm_inv, vol)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    eps = 1e-6
    fd = (
        elastic_energy(material, x + eps * direction, tets, dm_inv, vol)
        - elastic_energy(material, x - eps * direction, tets, dm_inv, vol)
    ) / (2 * eps)
    assert torch.isclose(-(f * direction).sum(), fd, rtol=1e-6)


@pytest.mark.parametrize("cls", BUILTINS)
def test_zero_energy_and_force_at_rest(cls, mesh):
    material = cls(youngs_modulus=1e5, poissons_ratio=0.3)
    tets, dm_inv, vol = tensors(mesh)
    x = torch.tensor(mesh.vertices)
    assert abs(float(elastic_energy(material, x, tets, dm_inv, vol))) < 1e-9
    assert elastic_forces(material, x, tets, dm_inv, vol).abs().max() < 1e-8


@pytest.mark.parametrize("cls", ROTATION_INVARIANT)
def test_rigid_motion_gives_zero_force(cls, mesh):
    material = cls(youngs_modulus=1e5, poissons_ratio=0.3)
    tets, dm_inv, vol = tensors(mesh)
    x = torch.tensor(mesh.vertices) @ random_rotation().T + torch.tensor([0.3, -1.0, 2.0])
    assert abs(float(elastic_energy(material, x, tets, dm_inv, vol))) < 1e-8
    assert elastic_forces(material, x, tets, dm_inv, vol).abs().max() < 1e-6


@pytest.mark.parametrize("cls", ROTATION_INVARIANT)
def test_energy_is_rotation_invariant(cls):
    material = cls(youngs_modulus=1e5, poissons_ratio=0.3)
    F = torch.eye(3) + 0.2 * torch.randn(6, 3, 3, generator=torch.Generator().manual_seed(5))
    R = random_rotation(7)
    assert torch.allclose(material.energy_density(R @ F), material.energy_density(F), rtol=1e-10)


@pytest.mark.parametrize("cls", BUILTINS)
def test_small_strain_matches_linear_elasticity(cls):
    E, nu = 1e5, 0.4
    H = 1e-5 * torch.randn(8, 3, 3, generator=torch.Generator().manual_seed(2))
    F = torch.eye(3) + H
    eps = 0.5 * (H + H.transpose(1, 2))
    mu, lam = ds.lame_parameters(E, nu)
    linear = mu * eps.square().sum((1, 2)) + 0.5 * lam * eps.diagonal(dim1=1, dim2=2).sum(-1) ** 2
    psi = cls(E, nu).energy_density(F)
    assert torch.allclose(psi, linear, rtol=1e-3)


def test_lame_parameters():
    mu, lam = ds.lame_parameters(1e5, 0.25)
    assert math.isclose(mu, 4e4) and math.isclose(lam, 4e4)


def test_polar_rotation_is_rotation_and_twice_differentiable():
    F = torch.eye(3) + 0.3 * torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(0))
    R = polar_rotation(F)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(4, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(4))
    F.requires_grad_(True)
    assert torch.autograd.gradcheck(polar_rotation, (F,))
    assert torch.autograd.gradgradcheck(polar_rotation, (F,))
    at_rest = torch.eye(3).expand(2, 3, 3).clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(polar_rotation, (at_rest,))


@pytest.mark.parametrize("cls", BUILTINS)
def test_energy_gradient_wrt_per_tet_modulus(cls, mesh):
    tets, dm_inv, vol = tensors(mesh)
    x = deformed(mesh)

    def energy(E):
        return elastic_energy(cls(E, 0.3), x, tets, dm_inv, vol)

    check_gradient(energy, torch.full((mesh.n_tets,), 1e5), eps=1.0, rtol=1e-6)


def test_tensor_parameters_keep_their_graph(mesh):
    log_e = torch.tensor(11.0, requires_grad=True)
    material = ds.StableNeoHookean(youngs_modulus=log_e.exp(), poissons_ratio=0.3)
    tets, dm_inv, vol = tensors(mesh)
    elastic_energy(material, deformed(mesh), tets, dm_inv, vol).backward()
    assert log_e.grad is not None and log_e.grad != 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"youngs_modulus": -1.0}, "youngs_modulus must be > 0"),
        ({"youngs_modulus": 0.0}, "youngs_modulus must be > 0"),
        ({"poissons_ratio": 0.5}, "poissons_ratio must be in"),
        ({"poissons_ratio": -1.0}, "poissons_ratio must be in"),
        ({"density": 0.0}, "density must be > 0"),
        ({"youngs_modulus": float("nan")}, "NaN"),
        ({"youngs_modulus": torch.tensor([1e5, -2.0])}, "at tets \\[1\\]"),
        ({"youngs_modulus": torch.ones(2, 2, 2)}, "shape"),  # [W, m] is allowed (worlds)
        ({"youngs_modulus": torch.tensor(3)}, "floating-point"),
        ({"youngs_modulus": "soft"}, "float or a tensor"),
    ],
)
def test_bad_parameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ds.StableNeoHookean(**kwargs)


def test_per_tet_parameter_length_checked_by_simulator(mesh):
    material = ds.StableNeoHookean(youngs_modulus=torch.full((mesh.n_tets + 1,), 1e5))
    with pytest.raises(ValueError, match=f"\\[{mesh.n_tets}\\]"):
        ds.Simulator(mesh, material, ground=None, backend="torch")


def test_replace_rejects_unknown_parameter():
    with pytest.raises(ValueError, match="unknown material parameters"):
        ds.StableNeoHookean().replace(stiffness=3.0)


def test_kernel_ids():
    assert ds.StableNeoHookean().kernel_id == 0
    assert ds.LinearElastic().kernel_id == 4
    assert MooneyRivlin().kernel_id is None

    class Tweaked(ds.StVK):
        def energy_density(self, F):
            return 2 * super().energy_density(F)

    assert Tweaked().kernel_id is None
