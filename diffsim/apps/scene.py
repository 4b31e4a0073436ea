"""Scene scripts: loading a Python file that builds a Simulator, and its settings.

A scene script is a Python file with a ``build() -> diffsim.Simulator`` function and,
optionally, module-level settings:

- ``STEPS`` (int): steps to run (default :data:`DEFAULT_STEPS`);
- ``FPS`` (int): frame rate of rendered videos (default :data:`DEFAULT_FPS`);
- ``CAMERA`` (dict): ``{"position": (x, y, z), "target": (x, y, z)}`` in metres;
- ``initial_state(sim) -> diffsim.State``: the start state (default: rest, at rest).

:func:`load_scene` runs the file as a module and returns a :class:`Scene`;
:func:`mesh_scene` makes one from a bare mesh file (a body dropped on the ground);
:func:`with_parameters` gives a copy of a simulator with changed material, damping, time
step or gravity (what the viewer's sliders do).

Parameters (``diffsim run SCENE --set NAME=VALUE``): :meth:`Scene.build` passes a name
that the script's ``build()`` accepts as a keyword to it; the names of
:data:`GENERIC_PARAMETERS` are applied to any scene's simulator afterwards.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from diffsim.sim.state import State
from diffsim.simulator import Simulator

DEFAULT_STEPS = 200
DEFAULT_FPS = 30
# Settings every scene takes (applied with :func:`with_parameters` after ``build()``).
GENERIC_PARAMETERS = ("youngs_modulus", "poissons_ratio", "damping", "dt", "gravity")
# Mesh files a scene can be made of (:func:`mesh_scene`): tet meshes, and closed surfaces.
TET_MESH_SUFFIXES = (".msh", ".npz")
SURFACE_SUFFIXES = (".stl", ".obj", ".ply", ".off")


class SceneError(ValueError):
    """A scene script is missing, malformed, or its ``build()`` failed; the message says why."""


@dataclasses.dataclass
class Scene:
    """A loaded scene script.

    Attributes:
        path: the script's file.
        module: the executed module.
        steps: number of steps to run.
        fps: frame rate of rendered videos (frames per second of simulated time).
        camera: ``{"position": [3], "target": [3]}`` in metres, or None to fit the view.
        parameters: the ``--set`` values the command line built it with (provenance).
    """

    path: Path
    module: ModuleType
    steps: int
    fps: int
    camera: dict[str, tuple[float, float, float]] | None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        """The script's file name without ``.py``."""
        return self.path.stem

    def build(
        self,
        backend: str | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> Simulator:
        """Calls the script's ``build()``; optionally moves it to another backend, dtype or device.

        Args:
            backend: ``"warp"`` or ``"torch"`` to override the scene's choice, or None.
            dtype: ``torch.float32``/``torch.float64`` to override the scene's, or None.
            device: a torch device (``"cpu"``, ``"cuda"``) to override the scene's, or None.
            parameters: ``{name: value}``: names ``build()`` accepts as keywords go to it;
                the others must be :data:`GENERIC_PARAMETERS` (``gravity`` is a magnitude
                in m/s^2 along the scene's direction, or three components).

        Raises:
            SceneError: an unknown parameter name (the message lists the accepted ones),
                or ``build()`` failed or did not return a Simulator.
        """
        own, generic = self.split_parameters(parameters or {})
        try:
            sim = self.module.build(**own)
        except Exception as exc:  # the user's code: report it in one line with its location
            raise SceneError(f"{describe_exception(exc, self.path)} (in build())") from exc
        if not isinstance(sim, Simulator):
            raise SceneError(
                f"{self.path}: build() must return a diffsim.Simulator, got {type(sim).__name__}"
            )
        if generic:
            sim = _apply_generic(sim, generic, self.path)
        device = None if device is None else torch.device(device)
        if (
            (backend is not None and backend != sim.backend_name)
            or (dtype is not None and dtype != sim.dtype)
            or (device is not None and device != sim.device)
        ):
            sim = with_parameters(sim, backend=backend, dtype=dtype, device=device)
        return sim

    def parameter_names(self) -> tuple[list[str], bool]:
        """``(names, any_keyword)``: the keyword parameters of the script's ``build()``,
        and whether it also takes ``**kwargs``."""
        try:
            signature = inspect.signature(self.module.build)
        except (TypeError, ValueError):
            return [], False
        names, any_keyword = [], False
        for p in signature.parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                names.append(p.name)
            elif p.kind == p.VAR_KEYWORD:
                any_keyword = True
        return names, any_keyword

    def split_parameters(self, parameters: dict[str, Any]) -> tuple[dict, dict]:
        """``(for build(), generic)`` from ``{name: value}``.

        Raises:
            SceneError: a name neither ``build()`` nor :data:`GENERIC_PARAMETERS` takes.
        """
        names, any_keyword = self.parameter_names()
        own, generic = {}, {}
        for name, value in parameters.items():
            if name in names or any_keyword:
                own[name] = value
            elif name in GENERIC_PARAMETERS:
                generic[name] = value
            else:
                accepted = ", ".join(names) if names else "none"
                raise SceneError(
                    f"{self.path}: unknown parameter {name!r}; build() accepts: {accepted}; "
                    f"every scene also takes: {', '.join(GENERIC_PARAMETERS)}"
                )
        return own, generic

    def initial_state(self, sim: Simulator) -> State:
        """The scene's ``initial_state(sim)`` if it defines one, else ``sim.initial_state()``."""
        make = getattr(self.module, "initial_state", None)
        if make is None:
            return sim.initial_state()
        try:
            state = make(sim)
        except Exception as exc:
            raise SceneError(f"{describe_exception(exc, self.path)} (in initial_state())") from exc
        if not isinstance(state, State):
            raise SceneError(
                f"{self.path}: initial_state(sim) must return a diffsim.State, "
                f"got {type(state).__name__}"
            )
        return state


def _apply_generic(sim: Simulator, values: dict[str, Any], path: Path) -> Simulator:
    """``sim`` with :data:`GENERIC_PARAMETERS` changed (:func:`with_parameters`)."""
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name == "gravity":
            kwargs["gravity"] = _gravity(sim, value, path)
            continue
        try:
            kwargs[name] = float(value)
        except (TypeError, ValueError):
            raise SceneError(f"{path}: parameter {name} must be a number, got {value!r}") from None
    try:
        return with_parameters(sim, **kwargs)
    except ValueError as exc:
        raise SceneError(f"{path}: {str(exc).splitlines()[0]}") from exc


def _gravity(sim: Simulator, value: Any, path: Path) -> tuple[float, float, float]:
    """Gravity from a magnitude (along the scene's direction, or -y) or three components."""
    try:
        if isinstance(value, (int, float)):
            g = sim.gravity.detach().double().cpu()
            norm = float(g.norm())
            direction = (g / norm).tolist() if norm > 0 else [0.0, -1.0, 0.0]
            return tuple(float(value) * d for d in direction)
        vector = tuple(float(c) for c in value)
    except (TypeError, ValueError):
        vector = ()
    if len(vector) != 3:
        raise SceneError(
            f"{path}: gravity is a magnitude in m/s^2 (9.81) or three components "
            f"(0,-9.81,0), got {value!r}"
        )
    return vector


def mesh_scene(
    path: str | Path,
    drop: float = 0.1,
    scale: float = 1.0,
    seconds: float | None = None,
) -> Scene:
    """A scene made of a bare mesh file: the body dropped onto the ground, no script needed.

    The body (soft rubber: Stable Neo-Hookean, E = 1e5 Pa, nu = 0.4, 1000 kg/m^3) is
    centred above the origin with its lowest point ``drop`` metres above the ground
    (y = 0) and falls under gravity. The time step is 1 ms with ``substeps="auto"`` (the
    simulator's stable-substep estimate for the mesh). ``build()`` takes ``youngs_modulus``,
    ``poissons_ratio``, ``density``, ``damping``, ``friction`` and ``dt`` as keywords.

    Args:
        path: a tet mesh (``.msh``, ``.npz``) or a closed surface (``.stl``, ``.obj``,
            ``.ply``, ``.off``; tetrahedralized on a grid).
        drop: height of the body's lowest point above the ground (m), >= 0.
        scale: factor on the file's coordinates (metres), > 0.
        seconds: simulated time (default: the fall plus one second to settle).

    Raises:
        FileNotFoundError: no such file.
        SceneError: an unknown format, a bad drop or scale, or a mesh that cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mesh file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in TET_MESH_SUFFIXES + SURFACE_SUFFIXES:
        raise SceneError(
            f"{path}: unknown mesh format {suffix!r}; use a tet mesh "
            f"({', '.join(TET_MESH_SUFFIXES)}) or a closed surface ({', '.join(SURFACE_SUFFIXES)})"
        )
    if not (math.isfinite(drop) and drop >= 0):
        raise SceneError(f"--drop must be a height >= 0 (m), got {drop}")
    if not (math.isfinite(scale) and scale > 0):
        raise SceneError(f"--scale must be a factor > 0, got {scale}")
    from diffsim.mesh import TetMesh
    from diffsim.physics import materials

    try:
        if suffix in TET_MESH_SUFFIXES:
            mesh = TetMesh.load(path)
        else:
            import trimesh

            mesh = TetMesh.from_surface(trimesh.load(path, force="mesh"))
    except (OSError, ValueError) as exc:
        raise SceneError(f"{path}: cannot read the mesh ({str(exc).splitlines()[0]})") from exc
    vertices = mesh.vertices * scale
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    shift = np.array([-(low[0] + high[0]) / 2, drop - low[1], -(low[2] + high[2]) / 2])
    mesh = mesh.transformed(scale=scale, translation=shift)
    fall = math.sqrt(2 * drop / 9.81)
    duration = fall + 1.0 if seconds is None else float(seconds)

    def build(
        youngs_modulus: float = 1e5,
        poissons_ratio: float = 0.4,
        density: float = 1000.0,
        damping: float = 1.0,
        friction: float = 0.5,
        dt: float = 1e-3,
    ) -> Simulator:
        material = materials.StableNeoHookean(
            youngs_modulus=youngs_modulus, poissons_ratio=poissons_ratio, density=density
        )
        return Simulator(
            mesh, material, dt=dt, substeps="auto", ground=0.0, damping=damping,
            friction=friction,
        )  # fmt: skip

    module = types.ModuleType(f"diffsim_mesh_scene_{path.stem}")
    module.__file__ = str(path)
    module.build = build
    module.STEPS = max(1, round(duration / 1e-3))
    module.FPS = DEFAULT_FPS
    return Scene(path=path, module=module, steps=module.STEPS, fps=DEFAULT_FPS, camera=None)


def load_scene(path: str | Path) -> Scene:
    """Executes a scene script and reads its settings.

    Args:
        path: a ``.py`` file defining ``build()``.

    Raises:
        FileNotFoundError: no such file.
        SceneError: not a ``.py`` file, the script raised, ``build`` is missing, or a setting
            has the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scene file not found: {path}")
    if path.suffix != ".py":
        raise SceneError(f"{path}: a scene must be a Python file (.py) defining build()")
    module_name = f"diffsim_scene_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise SceneError(f"{path}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise SceneError(describe_exception(exc, path)) from exc
    if not callable(getattr(module, "build", None)):
        raise SceneError(f"{path}: a scene script must define build() returning a Simulator")
    steps = getattr(module, "STEPS", DEFAULT_STEPS)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise SceneError(f"{path}: STEPS must be an integer >= 0, got {steps!r}")
    fps = getattr(module, "FPS", DEFAULT_FPS)
    if not isinstance(fps, int) or isinstance(fps, bool) or fps < 1:
        raise SceneError(f"{path}: FPS must be an integer >= 1, got {fps!r}")
    camera = _camera(getattr(module, "CAMERA", None), path)
    return Scene(path=path, module=module, steps=steps, fps=fps, camera=camera)


def _camera(value: Any, path: Path) -> dict[str, tuple[float, float, float]] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not {"position", "target"} <= set(value):
        raise SceneError(
            f"{path}: CAMERA must be a dict with 'position' and 'target' (x, y, z) in metres"
        )
    out = {}
    for key in ("position", "target"):
        try:
            vec = tuple(float(c) for c in value[key])
        except (TypeError, ValueError):
            vec = ()
        if len(vec) != 3 or not all(math.isfinite(c) for c in vec):
            raise SceneError(
                f"{path}: CAMERA[{key!r}] must be 3 finite numbers, got {value[key]!r}"
            )
        out[key] = vec
    if all(abs(a - b) <= 1e-9 for a, b in zip(out["position"], out["target"], strict=True)):
        raise SceneError(
            f"{path}: CAMERA position equals its target {out['target']}; move the camera "
            "away from the point it looks at"
        )
    return out


def describe_exception(exc: BaseException, path: Path) -> str:
    """One line: ``file:line: ExcType: message``, at the deepest frame inside ``path``."""
    where = str(path)
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        where = f"{path}:{exc.lineno}"
    tb = exc.__traceback__
    resolved = str(Path(path).resolve())
    while tb is not None:
        if str(Path(tb.tb_frame.f_code.co_filename).resolve()) == resolved:
            where = f"{path}:{tb.tb_lineno}"
        tb = tb.tb_next
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{where}: {type(exc).__name__}: {message}".rstrip(": ")


def with_parameters(
    sim: Simulator,
    *,
    youngs_modulus: float | None = None,
    poissons_ratio: float | None = None,
    damping: float | None = None,
    dt: float | None = None,
    gravity: Sequence[float] | None = None,
    backend: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Simulator:
    """A new Simulator equal to ``sim`` but for the given settings (None keeps a setting).

    The new simulator is built with the public constructor from ``sim``'s mesh, material
    and settings (ground, friction, surface contact), so every check runs again. A global
    Young's modulus or Poisson's ratio replaces a per-tet field. When gravity's magnitude
    changes, the ground stiffness is scaled with it (the default is proportional to g).

    Raises:
        ValueError: a value the Simulator rejects (e.g. E <= 0, nu >= 0.5, dt <= 0).
    """
    model = sim.model
    material = sim.material
    changes = {}
    if youngs_modulus is not None:
        changes["youngs_modulus"] = float(youngs_modulus)
    if poissons_ratio is not None:
        changes["poissons_ratio"] = float(poissons_ratio)
    if changes:
        material = material.replace(**changes)
    old_gravity = sim.gravity.detach().cpu().double()
    new_gravity = old_gravity if gravity is None else torch.as_tensor(gravity, dtype=torch.float64)
    kwargs: dict[str, Any] = dict(
        dt=model.dt if dt is None else float(dt),
        substeps=model.substeps,
        gravity=sim.gravity if gravity is None else tuple(float(g) for g in gravity),
        ground=None,
        contact=False,
        fixed=model.fixed_mask.cpu().numpy(),
        damping=sim.damping if damping is None else float(damping),
        max_speed=model.max_speed,
        mass_scaling=sim.settings["mass_scaling"],  # a target substep: sized for the new E
        min_volume_ratio=sim.settings["min_volume_ratio"],
        backend=sim.backend_name if backend is None else backend,
        dtype=sim.dtype if dtype is None else dtype,
        device=sim.device if device is None else device,
    )
    ground = model.ground
    if ground is not None:
        stiffness = ground.stiffness
        g_old, g_new = float(old_gravity.norm()), float(new_gravity.norm())
        if g_old > 0 and g_new > 0:
            stiffness *= g_new / g_old
        kwargs.update(
            ground=ground.height,
            ground_dhat=ground.dhat,
            ground_stiffness=stiffness,
            friction=ground.friction,
            friction_velocity=ground.friction_velocity,
        )
    contact = model.contact
    if contact is not None:
        # The default contact stiffness depends on the substep; keep it only if dt is unchanged.
        kwargs.update(
            contact=True,
            contact_dhat=contact.dhat,
            contact_stiffness=contact.stiffness if dt is None else None,
            contact_friction=contact.friction,
            contact_friction_velocity=contact.friction_velocity,
        )
    if isinstance(kwargs["gravity"], torch.Tensor):
        kwargs["gravity"] = kwargs["gravity"].detach()
    new = Simulator(sim.mesh, material, **kwargs)
    return new


def shared_asset(name: str, scene_file: str | Path) -> Path:
    """The path of a shared mesh for a scene: ``$DIFFSIM_ASSETS/name``, else
    ``../shared/assets/name`` beside the checkout that holds ``scene_file``.

    Raises:
        FileNotFoundError: not found; the message says where it looked and how to point
            DIFFSIM_ASSETS at the folder.
    """
    folders = [Path(scene_file).resolve().parents[2] / "shared" / "assets"]
    if os.environ.get("DIFFSIM_ASSETS"):
        folders.insert(0, Path(os.environ["DIFFSIM_ASSETS"]))
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"this scene needs ../shared/assets/{name} (the shared meshes beside the checkout), "
        f"not found in {', '.join(str(f) for f in folders)}; set DIFFSIM_ASSETS to the "
        "folder that holds it"
    )
