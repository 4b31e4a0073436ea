"""Stable explicit time steps of a tet mesh: the CFL estimate, auto substeps, mass scaling.

Pure numpy computations on the rest shape and the material's (E, nu, density); nothing here
is part of an autograd graph (tensor inputs are detached). The geometry (tet
altitudes) comes from :mod:`diffsim.mesh.geometry`.

Symplectic Euler on a linear(ized) tet mesh with lumped masses is stable while the substep
stays below ``2 / omega_max``, omega_max being the mesh's highest natural frequency. Two
cheap bounds on it, both provable for linear elasticity (docs/time-steps.md):

* per tet (the CFL estimate): ``h_e = SAFETY_FACTOR * a_e / c``, with ``a_e`` the tet's
  smallest altitude and ``c`` the dilatational wave speed. With a quarter of its own mass on
  each corner a lone tet's highest frequency is at most ``4 c / a_e``, so ``h_e`` with
  ``SAFETY_FACTOR = 0.5`` is below that tet's own limit.
* per vertex: a vertex's corners carry mass from all its tets, so a sliver's small altitude
  is offset by its neighbours' mass. ``h_i = 2 sqrt(M_i / sum_e m_e / h_e^2)`` over the
  vertex's tets e (``M_i`` its lumped mass, ``m_e`` the tet masses), i.e. the mass-weighted
  root-mean-square harmonic mean of its tets' steps; ``min_i h_i`` bounds ``2 / omega_max``
  for the whole mesh. :func:`stable_step` uses this one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from diffsim.mesh.geometry import mesh_arrays, tet_altitudes, tet_volumes_and_areas
from diffsim.physics.materials import PARAMETER_BOUNDS, lame_parameters

# Fraction of the CFL bound (smallest tet altitude / dilatational wave speed) in a tet's
# stable substep. 0.5 is the provable constant: a lone linear tet with a quarter of its mass
# on each corner has omega <= 4 c / a_min (its stiffness is at most V (lambda + 2 mu)
# sum_i |grad N_i|^2 and |grad N_i| = 1 / altitude_i), so 2 / omega >= a_min / (2 c). Measured
# 2 / omega over a_min / c: 0.50..0.87 on 2.4 million random shapes (nu from -0.5 to 0.499)
# and on the tets of four real meshes, so no larger constant is a bound. Measured blow-ups
# (a box and four real meshes at 0.3 m, docs/time-steps.md): 1.85..2.3 x the per-vertex
# estimate, up to 13.7 x the per-tet one. That margin is for large deformations, which the
# linear bound does not cover: a compressed tet is thinner (measured: a box squeezed to half
# its height blows up at 1.0 x the per-vertex estimate, to 0.7 at 1.2 x).
SAFETY_FACTOR = 0.5
# The stable-step report names at most this many tets (and vertices) that limit the step.
N_LIMITING = 5
# A substep within this relative rounding of a stable substep counts as at it (mass
# scaling to a target, or dt = k * stable_dt, lands on it up to an ulp either way).
ROUNDING = 1e-9

_METHODS = ("vertex", "tet")


def _numpy(value, name: str) -> np.ndarray:
    """A float64 numpy copy of a float, array or tensor (detached, on the CPU)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number, array or tensor: {exc}") from None


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def dilatational_wave_speed(youngs_modulus, poissons_ratio, density) -> float | np.ndarray:
    """Speed of compressional (P) waves ``c = sqrt((lambda + 2 mu) / rho)`` in m/s.

    Args:
        youngs_modulus: E in Pa (float, or array/tensor ``[]`` or ``[m]``).
        poissons_ratio: nu in (-1, 0.5) (same).
        density: rho in kg/m^3 (same).

    Returns:
        A float if every argument is a scalar, else an array (``[m]`` for per-tet fields).

    Raises:
        ValueError: E <= 0, density <= 0, nu outside (-1, 0.5), or NaN.
    """
    E = _numpy(youngs_modulus, "youngs_modulus")
    nu = _numpy(poissons_ratio, "poissons_ratio")
    rho = _numpy(density, "density")
    for name, value in (("youngs_modulus", E), ("poissons_ratio", nu), ("density", rho)):
        lo, hi, text = PARAMETER_BOUNDS[name]
        ok = (value > lo) & (value < hi)
        if not np.all(ok):
            bad = float(np.ravel(value[~ok] if value.ndim else value)[0])
            raise ValueError(f"{name} must be {text}, got {bad:g}")
    mu, lam = lame_parameters(E, nu)
    c = np.sqrt((lam + 2.0 * mu) / rho)
    return float(c) if c.ndim == 0 else c


def tet_stable_steps(
    vertices,
    tets,
    youngs_modulus,
    poissons_ratio,
    density,
    *,
    safety: float = SAFETY_FACTOR,
) -> np.ndarray:
    """Per-tet stable substep (the CFL estimate) ``safety * a_min / c`` in s.

    Args:
        vertices: ``[n, 3]`` rest positions in m.
        tets: ``[m, 4]`` vertex indices.
        youngs_modulus: E in Pa: a float or a ``[]`` / ``[m]`` array or tensor.
        poissons_ratio: nu, likewise.
        density: rho in kg/m^3, likewise.
        safety: fraction of the CFL bound (> 0); default :data:`SAFETY_FACTOR`.

    Returns:
        ``[m]`` stable substeps in s.
    """
    if not safety > 0:
        raise ValueError(f"safety must be > 0, got {safety}")
    altitudes = tet_altitudes(vertices, tets)
    c = dilatational_wave_speed(youngs_modulus, poissons_ratio, density)
    if np.ndim(c) and np.shape(c) != altitudes.shape:
        raise ValueError(
            f"per-tet material fields must have shape [{len(altitudes)}], got {list(np.shape(c))}"
        )
    return safety * altitudes / c


def _tet_masses(v, t, density) -> np.ndarray:
    volumes, _ = tet_volumes_and_areas(v, t)
    return np.broadcast_to(_numpy(density, "density"), volumes.shape) * volumes


def _vertex_sums(t: np.ndarray, per_tet: np.ndarray, n: int) -> np.ndarray:
    """``[n]`` sums over each vertex's tets of a per-tet quantity."""
    return np.bincount(t.ravel(), weights=np.repeat(per_tet, 4), minlength=n)


def vertex_stable_steps(
    vertices,
    tets,
    youngs_modulus,
    poissons_ratio,
    density,
    *,
    safety: float = SAFETY_FACTOR,
    added_mass=None,
) -> np.ndarray:
    """Per-vertex stable substep ``2 sqrt(M_i / sum_e m_e / h_e^2)`` in s.

    The sum runs over the vertex's tets e, with ``m_e`` their masses and ``h_e`` their
    :func:`tet_stable_steps`; ``M_i`` is the vertex's lumped mass (plus ``added_mass``). The
    mesh is linearly stable below ``min_i h_i``.

    Args:
        vertices: ``[n, 3]`` rest positions in m.
        tets: ``[m, 4]`` vertex indices.
        youngs_modulus: E in Pa: a float or a ``[]`` / ``[m]`` array or tensor.
        poissons_ratio: nu, likewise.
        density: rho in kg/m^3, likewise.
        safety: as in :func:`tet_stable_steps`.
        added_mass: ``[n]`` extra vertex masses in kg (mass scaling), or None.

    Returns:
        ``[n]`` stable substeps in s (inf for a vertex no tet uses).
    """
    v, t = mesh_arrays(vertices, tets)
    steps = tet_stable_steps(v, t, youngs_modulus, poissons_ratio, density, safety=safety)
    m_e = _tet_masses(v, t, density)
    mass = _vertex_sums(t, m_e / 4.0, len(v))
    if added_mass is not None:
        mass = mass + _numpy(added_mass, "added_mass")
    stiffness = _vertex_sums(t, m_e / steps**2, len(v))
    with np.errstate(divide="ignore"):
        return 2.0 * np.sqrt(mass / stiffness)


@dataclass(frozen=True)
class StableStep:
    """The estimated stable substep of a mesh and what sets it.

    Attributes:
        dt: the stable substep in s.
        limiting_tets: up to :data:`N_LIMITING` tets that set ``dt``, smallest step first
            (for ``method="vertex"``: the smallest-step tets around the limiting vertices).
        tet_steps: ``[m]`` per-tet stable substeps in s (:func:`tet_stable_steps`).
        method: ``"vertex"`` or ``"tet"``, the bound ``dt`` comes from.
        vertex_steps: ``[n]`` per-vertex stable substeps in s (``method="vertex"``), or None.
        limiting_vertices: up to :data:`N_LIMITING` vertices with the smallest steps, smallest
            first (``method="vertex"``; empty for ``"tet"``).
        safety: the fraction of the CFL bound used.
    """

    dt: float
    limiting_tets: np.ndarray
    tet_steps: np.ndarray = field(repr=False)
    method: str = "vertex"
    vertex_steps: np.ndarray | None = field(default=None, repr=False)
    limiting_vertices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    safety: float = SAFETY_FACTOR

    @property
    def tet_dt(self) -> float:
        """The smallest per-tet step in s (the plain CFL estimate; <= ``dt``)."""
        return float(self.tet_steps.min())

    def substeps(self, dt: float) -> int:
        """Substeps per step of ``dt`` seconds that keep each substep below :attr:`dt`."""
        return auto_substeps(dt, self.dt)

    def describe(self, dt: float | None = None) -> str:
        """A short text for warnings and errors: the estimate, the limiting tets, the options.

        Args:
            dt: the step (s) the user asked for, if any; the text then says how many
                substeps it needs.
        """
        tets = ", ".join(str(int(i)) for i in self.limiting_tets)
        how = f"{self.safety:g} x tet altitude / dilatational wave speed" + (
            ", mass-weighted per vertex" if self.method == "vertex" else ""
        )
        text = f"estimated stable substep {self.dt:.3g} s ({how}), set by tets [{tets}]"
        if dt is None:
            return text + (
                '; options: substeps="auto", mass_scaling=<target substep in s> (adds mass '
                "around the small tets), or a smaller dt; see docs/time-steps.md"
            )
        n = auto_substeps(dt, self.dt)
        return text + (
            f"; a step of {dt:.3g} s needs {n} substep{'s' if n > 1 else ''}: "
            f'use substeps="auto" (or {n}), '
            "mass_scaling=<target substep in s> to add mass around the small tets instead, "
            "or a smaller dt; see docs/time-steps.md"
        )

    def __str__(self) -> str:
        return self.describe()


def _smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest values, smallest first."""
    k = min(k, len(values))
    few = np.argpartition(values, k - 1)[:k] if k < len(values) else np.arange(len(values))
    return few[np.argsort(values[few], kind="stable")].astype(np.int64)


def stable_step(
    vertices,
    tets,
    youngs_modulus,
    poissons_ratio,
    density,
    *,
    safety: float = SAFETY_FACTOR,
    method: str = "vertex",
    added_mass=None,
) -> StableStep:
    """The estimated stable substep of a mesh.

    Args:
        vertices: ``[n, 3]`` rest positions in m.
        tets: ``[m, 4]`` vertex indices.
        youngs_modulus: E in Pa: a float or a ``[]`` / ``[m]`` array or tensor.
        poissons_ratio: nu, likewise.
        density: rho in kg/m^3, likewise.
        safety: as in :func:`tet_stable_steps`.
        method: ``"vertex"`` (default; :func:`vertex_stable_steps`, 1.2 to 6.8 x larger on
            real meshes and still a bound) or ``"tet"`` (the smallest :func:`tet_stable_steps`).
        added_mass: ``[n]`` extra vertex masses in kg (``method="vertex"`` only), or None.

    Returns:
        A :class:`StableStep`.
    """
    _check_method(method)
    v, t = mesh_arrays(vertices, tets)
    steps = tet_stable_steps(v, t, youngs_modulus, poissons_ratio, density, safety=safety)
    if method == "tet":
        if added_mass is not None:
            raise ValueError('added_mass needs method="vertex"')
        few = _smallest(steps, N_LIMITING)
        return StableStep(float(steps[few[0]]), few, steps, "tet", safety=float(safety))
    vsteps = vertex_stable_steps(
        v, t, youngs_modulus, poissons_ratio, density, safety=safety, added_mass=added_mass
    )
    verts = _smallest(vsteps, N_LIMITING)
    around = np.flatnonzero(np.isin(t, verts[:1]).any(axis=1))
    few = around[_smallest(steps[around], N_LIMITING)]
    return StableStep(
        float(vsteps[verts[0]]), few, steps, "vertex", vsteps, verts, safety=float(safety)
    )


def auto_substeps(dt: float, stable_dt: float) -> int:
    """Substeps per step: ``ceil(dt / stable_dt)``, at least 1.

    Args:
        dt: the step in s.
        stable_dt: the stable substep in s (> 0).
    """
    if not (dt > 0 and stable_dt > 0 and math.isfinite(dt) and math.isfinite(stable_dt)):
        raise ValueError(f"dt and stable_dt must be finite and > 0, got {dt}, {stable_dt}")
    # dt = k * stable_dt (up to rounding) stays at k substeps.
    return max(1, math.ceil(dt / stable_dt * (1.0 - ROUNDING)))


def exceeds(h: float, stable_dt: float) -> bool:
    """Whether a substep h (s) is above a stable substep (s) by more than rounding."""
    return h > stable_dt * (1.0 + ROUNDING)


@dataclass(frozen=True)
class MassScaling:
    """Mass added so that the stable substep reaches a target.

    Unpacks as ``added_mass, scaled_tets = mass_scaling(...)``.

    Attributes:
        added_mass: ``[n]`` mass added to each vertex in kg.
        scaled_tets: the tets whose own step (:func:`tet_stable_steps`) is below the target,
            ascending; for ``method="tet"`` exactly the tets made heavier.
        scaled_vertices: the vertices that receive mass, ascending.
        mass: the mesh's mass before scaling in kg.
        target_dt: the target substep in s.
        method: ``"vertex"`` or ``"tet"``.
        density_factor: ``[m]`` factor on each tet's density for ``method="tet"`` (1 where
            untouched; ``density * density_factor`` as a per-tet density gives the same
            lumped masses), None for ``"vertex"``.
    """

    added_mass: np.ndarray
    scaled_tets: np.ndarray
    scaled_vertices: np.ndarray
    mass: float
    target_dt: float
    method: str = "vertex"
    density_factor: np.ndarray | None = field(default=None, repr=False)

    def __iter__(self):
        return iter((self.added_mass, self.scaled_tets))

    @property
    def total_added(self) -> float:
        """Total added mass in kg."""
        return float(self.added_mass.sum())

    @property
    def fraction(self) -> float:
        """Added mass as a fraction of the mesh's mass."""
        return self.total_added / self.mass

    def describe(self) -> str:
        """One line: the target, what was made heavier, the mass added."""
        n = len(self.added_mass)
        return (
            f"mass scaling ({self.method}) to a {self.target_dt:.3g} s substep: "
            f"{len(self.scaled_vertices)} of {n} vertices made heavier "
            f"({len(self.scaled_tets)} tets below the target), {self.total_added:.3g} kg added "
            f"({100.0 * self.fraction:.2g}% of {self.mass:.3g} kg)"
        )

    def __str__(self) -> str:
        return self.describe()


def mass_scaling(
    vertices,
    tets,
    youngs_modulus,
    poissons_ratio,
    density,
    target_dt: float,
    *,
    safety: float = SAFETY_FACTOR,
    method: str = "vertex",
) -> MassScaling:
    """Vertex mass to add so that the stable substep is at least ``target_dt``.

    ``method="tet"``: every tet whose step ``h_e`` is below the target gets density
    ``rho (target / h_e)^2`` (the step scales as ``sqrt(rho)``), i.e. added tet mass
    ``rho V ((target / h_e)^2 - 1)``, a quarter to each corner; every tet then meets the
    target on its own. ``method="vertex"`` (default) adds to each vertex only what its
    :func:`vertex_stable_steps` needs: ``max(0, target^2 / 4 sum_e m_e / h_e^2 - M_i)``, a
    fraction of the ``"tet"`` amount on real meshes.

    Args:
        vertices: ``[n, 3]`` rest positions in m.
        tets: ``[m, 4]`` vertex indices.
        youngs_modulus: E in Pa: a float or a ``[]`` / ``[m]`` array or tensor.
        poissons_ratio: nu, likewise.
        density: rho in kg/m^3, likewise.
        target_dt: the substep (s) to reach.
        safety: as in :func:`tet_stable_steps`.
        method: ``"vertex"`` or ``"tet"``.

    Returns:
        A :class:`MassScaling` (unpacks as ``(added_mass [n] kg, scaled_tets)``).
    """
    _check_method(method)
    if not (target_dt > 0 and math.isfinite(target_dt)):
        raise ValueError(f"target_dt must be finite and > 0, got {target_dt}")
    v, t = mesh_arrays(vertices, tets)
    steps = tet_stable_steps(v, t, youngs_modulus, poissons_ratio, density, safety=safety)
    m_e = _tet_masses(v, t, density)
    scaled_tets = np.flatnonzero(steps < target_dt)
    factor = None
    if method == "tet":
        factor = np.maximum((target_dt / steps) ** 2, 1.0)
        added = _vertex_sums(t, m_e * (factor - 1.0) / 4.0, len(v))
    else:
        mass = _vertex_sums(t, m_e / 4.0, len(v))
        need = 0.25 * target_dt**2 * _vertex_sums(t, m_e / steps**2, len(v))
        added = np.maximum(need - mass, 0.0)
    return MassScaling(
        added,
        scaled_tets,
        np.flatnonzero(added > 0),
        float(m_e.sum()),
        float(target_dt),
        method,
        factor,
    )
