"""The interactive viewer: a live scene or a saved trajectory in a polyscope window.

The logic lives in :class:`ViewerController` (play, step, reset, speed, colour field,
parameter changes that rebuild the simulator, frame scrubbing, keyboard shortcuts) and
makes no polyscope call, so tests drive it headless. :class:`PolyscopeViewer` draws the
controller's state and its ImGui panel; :func:`run_viewer` opens the window.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import numpy as np
import torch

from diffsim.apps.fields import FIELDS, FieldContext, vertex_field
from diffsim.apps.render import body_palette, colour_range, surface_faces
from diffsim.apps.scene import Scene, with_parameters
from diffsim.physics.stable_step import auto_substeps
from diffsim.sim.state import State, Trajectory
from diffsim.simulator import SimulationError, Simulator, StabilityWarning

# Key -> (action, description), as listed in the panel.
SHORTCUTS: dict[str, tuple[str, str]] = {
    "space": ("toggle_play", "play / pause"),
    "n": ("step", "single step (or next frame)"),
    "r": ("reset", "reset"),
    "]": ("faster", "faster"),
    "[": ("slower", "slower"),
    "c": ("cycle_field", "next colour field"),
}
# Simulation speeds, in steps (or trajectory frames) per drawn frame.
SPEEDS = (1, 2, 5, 10, 20, 50, 100)
# Slider ranges: name -> (min, max, logarithmic, unit).
PARAMETER_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "youngs_modulus": (1e3, 1e8, True, "Pa"),
    "poissons_ratio": (0.0, 0.49, False, ""),
    "damping": (0.0, 50.0, False, "1/s"),
    "dt": (1e-5, 1e-2, True, "s"),
    "gravity": (0.0, 30.0, False, "m/s^2"),
}
# Width (pixels) at which the panel's red error text wraps.
ERROR_WRAP_PIXELS = 460


class ViewerController:
    """What the viewer shows and how buttons, sliders and keys change it; no drawing.

    Live mode (a scene): ``tick()`` advances ``speed`` steps while playing; parameter
    changes build a new simulator with :func:`diffsim.apps.scene.with_parameters` and continue
    from the current state. Trajectory mode (a saved ``.npz``): ``tick()`` advances
    ``speed`` frames while playing and :meth:`set_frame` scrubs.

    Args:
        sim: the live simulator, or for a trajectory the scene's simulator (material for the
            stress fields, fixed vertices) or None.
        scene: the scene (for its initial state), or None.
        trajectory: the trajectory to scrub, or None for live mode.
    """

    def __init__(
        self,
        sim: Simulator | None = None,
        scene: Scene | None = None,
        trajectory: Trajectory | None = None,
    ) -> None:
        if sim is None and trajectory is None:
            raise ValueError("the viewer needs a simulator (a scene) or a trajectory")
        self.scene = scene
        self.sim = sim
        self.trajectory = trajectory
        self.playing = False
        self.speed_index = 0
        self.frame = 0
        self.steps_done = 0
        self.elapsed = 0.0  # simulated time in live mode (s), over time-step changes
        self.rebuilds = 0
        self.error: str | None = None
        self.field: str | None = None
        if trajectory is not None:
            if sim is not None and sim.mesh.n_vertices != trajectory.positions.shape[1]:
                raise ValueError(
                    f"the scene has {sim.mesh.n_vertices} vertices but the trajectory has "
                    f"{trajectory.positions.shape[1]}; pass the scene that made it"
                )
            rest = sim.mesh.vertices if sim is not None else trajectory.positions[0].numpy()
            tets = sim.mesh.tets if sim is not None else trajectory.tets
            self.context = FieldContext(rest, tets, sim.material if sim is not None else None)
            self.state = trajectory.state(0)
        else:
            self.context = FieldContext.from_simulator(sim)
            self.parameters = _parameters_of(sim)
            self.state = self._initial_state()
            # The scene's own substep (s) where it fixed the count: rebuilds never go coarser.
            fixed_count = sim.settings.get("substeps") != "auto"
            self.scene_substep = sim.model.dt / sim.model.substeps if fixed_count else None

    @classmethod
    def for_scene(cls, scene: Scene, sim: Simulator | None = None) -> ViewerController:
        """Live mode on a scene (its ``build()`` is called unless ``sim`` is given)."""
        return cls(sim=sim if sim is not None else scene.build(), scene=scene)

    @classmethod
    def for_trajectory(cls, trajectory: Trajectory, sim: Simulator | None = None):
        """Trajectory mode; ``sim`` (the scene's) adds the material's fields."""
        return cls(sim=sim, trajectory=trajectory)

    # ----------------------------------------------------------------- queries
    @property
    def live(self) -> bool:
        return self.trajectory is None

    @property
    def speed(self) -> int:
        """Steps (live) or frames (trajectory) per drawn frame."""
        return SPEEDS[self.speed_index]

    @property
    def n_frames(self) -> int:
        return self.trajectory.n_frames if self.trajectory is not None else 0

    @property
    def time(self) -> float:
        """Simulated time of the shown state (s)."""
        if self.trajectory is not None:
            return self.frame * self.trajectory.dt
        return self.elapsed

    def fields(self) -> list[str]:
        """The colour fields available here."""
        return self.context.available()

    def positions(self) -> np.ndarray:
        """Shown vertex positions ``[n, 3]`` (m)."""
        return self.state.positions.detach().cpu().double().numpy()

    def field_values(self) -> np.ndarray | None:
        """The chosen field at the vertices ``[n]``, or None for plain colour."""
        if self.field is None:
            return None
        return vertex_field(self.field, self.context, self.state.positions, self.state.velocities)

    def field_range(self) -> tuple[float, float] | None:
        """The colour bar's range for the shown field: never empty (see
        :func:`diffsim.apps.render.colour_range`), or None for plain colour."""
        values = self.field_values()
        if values is None:
            return None
        values = np.asarray(values, dtype=np.float64)
        return colour_range(float(values.min()), float(values.max()))

    def field_label(self) -> str:
        """The colour bar's title, with the unit."""
        return "" if self.field is None else f"{self.field} ({FIELDS[self.field][0]})"

    def ground_height(self) -> float | None:
        """The ground's height (m): the simulator's, else a trajectory file's ``metadata``
        ``"ground"``; None where there is no ground (or it is unknown)."""
        if self.sim is not None:
            ground = self.sim.model.ground
            return None if ground is None else float(ground.height)
        metadata = getattr(self.trajectory, "metadata", None) or {}
        height = metadata.get("ground")
        return float(height) if isinstance(height, (int, float)) else None

    def fixed_indices(self) -> np.ndarray:
        if self.sim is None:
            return np.zeros(0, dtype=np.int64)
        return self.sim.model.fixed_indices.cpu().numpy()

    def contact_segments(self) -> np.ndarray:
        """Segments ``[k, 2, 3]`` joining the closest points of active contact pairs."""
        if self.sim is None:
            return np.zeros((0, 2, 3))
        return contact_segments(self.sim, self.state.positions)

    # ----------------------------------------------------------------- actions
    def play(self) -> None:
        self.playing = True

    def pause(self) -> None:
        self.playing = False

    def toggle_play(self) -> None:
        self.playing = not self.playing

    def faster(self) -> None:
        self.speed_index = min(self.speed_index + 1, len(SPEEDS) - 1)

    def slower(self) -> None:
        self.speed_index = max(self.speed_index - 1, 0)

    def set_speed(self, per_frame: int) -> None:
        """Picks the listed speed closest to ``per_frame`` steps (frames) per drawn frame."""
        self.speed_index = int(np.argmin([abs(s - per_frame) for s in SPEEDS]))

    def set_field(self, name: str | None) -> None:
        """Colours by ``name`` (one of :meth:`fields`) or plainly (None)."""
        if name is not None and name not in self.fields():
            raise ValueError(f"field {name!r} is not available here; choose from {self.fields()}")
        self.field = name

    def cycle_field(self) -> None:
        """None -> first field -> ... -> last field -> None."""
        options = [None, *self.fields()]
        self.field = options[(options.index(self.field) + 1) % len(options)]

    def step(self, count: int = 1) -> None:
        """Advances ``count`` steps (live) or frames (trajectory, stopping at the end)."""
        if self.trajectory is not None:
            self.set_frame(self.frame + count)
            return
        if self.error is not None:
            return
        try:
            with torch.no_grad():
                traj = self.sim.rollout(count, self.state)
        except (SimulationError, ValueError) as exc:  # a blow-up, or a state it refuses
            self.error = self._absolute(str(exc).splitlines()[0])
            self.playing = False
            return
        self.state = traj.state(-1)
        self.steps_done += count
        self.elapsed += count * self.sim.model.dt

    def tick(self) -> None:
        """Called once per drawn frame: advances by the speed while playing."""
        if not self.playing:
            return
        if self.trajectory is not None and self.frame >= self.n_frames - 1:
            self.frame = -1  # loop
        self.step(self.speed)

    def reset(self) -> None:
        """Back to the start (the scene's initial state, or frame 0)."""
        self.error = None
        self.steps_done = 0
        self.elapsed = 0.0
        if self.trajectory is not None:
            self.set_frame(0)
        else:
            self.state = self._initial_state()

    def set_frame(self, frame: int) -> None:
        """Shows trajectory frame ``frame`` (clamped to the recorded range)."""
        if self.trajectory is None:
            raise ValueError("set_frame needs a trajectory (diffsim view TRAJ.npz)")
        self.frame = int(min(max(frame, 0), self.n_frames - 1))
        self.state = self.trajectory.state(self.frame)

    def set_parameter(self, name: str, value: float) -> None:
        """Changes a simulation parameter and rebuilds the simulator (live mode).

        Args:
            name: ``youngs_modulus`` (Pa), ``poissons_ratio``, ``damping`` (1/s), ``dt`` (s)
                or ``gravity`` (m/s^2, the magnitude; the direction stays the scene's).
            value: the new value.

        The new simulator's substeps follow ``substeps="auto"`` (see
        :meth:`_stable_substeps`), so a stiffer or nearly incompressible material, or a
        larger ``dt``, gets more substeps instead of blowing up.

        Raises:
            ValueError: not live, an unknown name, or a value the simulator rejects (the
                simulator is then left unchanged).
        """
        if not self.live:
            raise ValueError("parameters can change only when viewing a scene, not a trajectory")
        if name not in PARAMETER_RANGES:
            raise ValueError(f"unknown parameter {name!r}; choose from {list(PARAMETER_RANGES)}")
        values = dict(self.parameters, **{name: float(value)})
        direction = _gravity_direction(self.sim)
        with warnings.catch_warnings():
            # The old substep count may be above the new values' stable substep: the
            # rebuild below chooses the count again.
            warnings.simplefilter("ignore", StabilityWarning)
            sim = with_parameters(
                self.sim,
                youngs_modulus=values["youngs_modulus"] if name == "youngs_modulus" else None,
                poissons_ratio=values["poissons_ratio"] if name == "poissons_ratio" else None,
                damping=values["damping"],
                dt=values["dt"],
                gravity=tuple((direction * values["gravity"]).tolist()),
            )
        sim = self._stable_substeps(sim)
        self.sim = sim
        self.parameters = values
        self.context = FieldContext.from_simulator(sim)
        # Positions in the dtype the simulator keeps them in (its rest positions').
        position_dtype = sim.model.rest_positions.dtype
        self.state = State(
            self.state.positions.to(position_dtype), self.state.velocities.to(sim.dtype)
        )
        self.error = None
        self.rebuilds += 1

    def _stable_substeps(self, sim: Simulator) -> Simulator:
        """``sim`` with the substep rule of ``Simulator(substeps="auto")``: the fewest
        substeps per step below the new stable substep estimate, with the scene's mass
        scaling kept, and never a longer substep than the scene's own fixed one (a scene may
        fix it for contact), so that no slider value makes the scene blow up."""
        sim = sim.replace(substeps="auto", mass_scaling=self.sim.settings.get("mass_scaling"))
        if self.scene_substep is not None:
            n = auto_substeps(sim.model.dt, self.scene_substep)
            if n > sim.model.substeps:
                sim = sim.replace(substeps=n)
        return sim

    def handle_key(self, key: str) -> bool:
        """Runs the shortcut bound to ``key`` (see :data:`SHORTCUTS`); True if there is one."""
        if key not in SHORTCUTS:
            return False
        getattr(self, SHORTCUTS[key][0])()
        return True

    def _absolute(self, message: str) -> str:
        """A simulator error with its step counted from the start (t = 0), not from the
        rollout that failed (which starts at the shown state, after any rebuild)."""
        match = re.match(r"step (\d+) (.*)", message)
        if match is None:
            return f"t = {self.time:.3f} s: {message}"
        k = int(match.group(1)) + 1  # steps into the failed rollout
        step, t = self.steps_done + k, self.elapsed + k * self.sim.model.dt
        return f"step {step} (t = {t:.3f} s) {match.group(2)}"

    def _initial_state(self) -> State:
        if self.scene is not None:
            return self.scene.initial_state(self.sim)
        return self.sim.initial_state()


def _parameters_of(sim: Simulator) -> dict[str, float]:
    """Slider values: means of the material parameters, damping, dt and |gravity|."""

    def scalar(value) -> float:
        if isinstance(value, torch.Tensor):
            return float(value.detach().double().mean())
        return float(value)

    material = sim.material
    return {
        "youngs_modulus": scalar(getattr(material, "youngs_modulus", 1e5)),
        "poissons_ratio": scalar(getattr(material, "poissons_ratio", 0.3)),
        "damping": scalar(sim.damping),
        "dt": sim.model.dt,
        "gravity": float(sim.gravity.detach().double().norm()),
    }


def _gravity_direction(sim: Simulator) -> np.ndarray:
    g = sim.gravity.detach().double().cpu().numpy()
    norm = float(np.linalg.norm(g))
    return g / norm if norm > 0 else np.array([0.0, -1.0, 0.0])


def contact_segments(sim: Simulator, positions: torch.Tensor) -> np.ndarray:
    """Active contacts as segments ``[k, 2, 3]`` (m): vertex-to-ground and surface pairs.

    A pair is active when its distance is below the barrier's dhat. Drawing only: if the
    contact model does not offer candidates and distances, only ground contacts are shown.
    """
    x = positions.detach().double().cpu()
    segments = []
    ground = sim.model.ground
    if ground is not None:
        near = torch.nonzero(x[:, 1] - ground.height < ground.dhat).flatten()
        if len(near):
            foot = x[near].clone()
            foot[:, 1] = ground.height
            segments.append(torch.stack([x[near], foot], dim=1))
    contact = sim.model.contact
    if contact is not None and hasattr(contact, "candidates"):
        try:
            segments.extend(_surface_pair_segments(contact, x))
        except Exception:  # drawing aid only; an incompatible contact model shows no pairs
            pass
    if not segments:
        return np.zeros((0, 2, 3))
    return torch.cat(segments).numpy()


def _surface_pair_segments(contact, x: torch.Tensor) -> list[torch.Tensor]:
    from diffsim.contact import distances, potential

    with torch.no_grad():
        candidates = contact.candidates(x.to(contact.surface.rest_positions.device))
        d_pt, d_ee = potential.pair_distances(x, candidates)
        out = []
        pt = candidates.point_triangle[d_pt < contact.dhat**2]
        if len(pt):
            p, a, b, c = x[pt].unbind(1)
            beta, _ = distances.point_triangle_weights(p, a, b, c)
            q = beta[:, 0:1] * a + beta[:, 1:2] * b + beta[:, 2:3] * c
            out.append(torch.stack([p, q], dim=1))
        ee = candidates.edge_edge[d_ee < contact.dhat**2]
        if len(ee):
            p0, p1, q0, q1 = x[ee].unbind(1)
            s, t, _ = distances.edge_edge_parameters(p0, p1, q0, q1)
            a = p0 + s[:, None] * (p1 - p0)
            b = q0 + t[:, None] * (q1 - q0)
            out.append(torch.stack([a, b], dim=1))
    return out


# --------------------------------------------------------------------------- polyscope side
class PolyscopeViewer:
    """Draws a :class:`ViewerController` in polyscope, with its control panel.

    Polyscope must be initialised before (a window, or the headless EGL backend in tests).

    Args:
        controller: what to show.
        camera: ``{"position", "target"}`` in metres, or None for polyscope's home view.
    """

    def __init__(self, controller: ViewerController, camera: dict | None = None) -> None:
        import polyscope as ps

        self.ps = ps
        self.controller = controller
        c = controller
        ps.remove_all_structures()
        # Undo what a headless FrameRenderer in this process may have set.
        ps.set_build_default_gui_panels(True)
        # A headless render may have left a thumbnail-sized window, in which polyscope stops
        # calling the user callback.
        ps.set_window_size(1280, 800)
        ps.set_automatically_compute_scene_extents(True)
        ps.set_up_dir("y_up")
        ps.set_front_dir("z_front")
        height = c.ground_height()
        if height is not None:  # a floor only where the scene has a ground
            ps.set_ground_plane_mode("tile")
            ps.set_ground_plane_height_mode("manual")
            ps.set_ground_plane_height(height)
        else:
            ps.set_ground_plane_mode("none")
        faces = c.sim.mesh.surface_faces if c.sim is not None else surface_faces(c.trajectory)
        x = c.positions()
        self.mesh = ps.register_surface_mesh(
            "body", x, faces, color=(0.35, 0.55, 0.85), edge_width=0.5
        )
        self._body_colors = None
        if c.sim is not None and c.sim.mesh.n_bodies > 1:
            palette = np.asarray(body_palette(c.sim.mesh.n_bodies))
            self._body_colors = palette[c.sim.mesh.body_ids]
            self.mesh.add_color_quantity("body", self._body_colors, enabled=True)
        fixed = c.fixed_indices()
        self.fixed = None
        if len(fixed):
            self.fixed = ps.register_point_cloud(
                "fixed vertices", x[fixed], color=(0.85, 0.2, 0.15), radius=0.01
            )
        self.contacts = None
        self._shown_field: str | None = None
        self.pending = dict(c.parameters) if c.live else {}
        if camera is not None:
            ps.look_at(tuple(camera["position"]), tuple(camera["target"]))
        self.update()

    def update(self) -> None:
        """Pushes the controller's positions, field, fixed vertices and contacts to polyscope."""
        ps, c = self.ps, self.controller
        x = c.positions()
        self.mesh.update_vertex_positions(x)
        if self.fixed is not None:
            self.fixed.update_point_positions(x[c.fixed_indices()])
        values = c.field_values()
        if values is not None:
            self.mesh.add_scalar_quantity(
                c.field_label(),
                values,
                enabled=True,
                cmap="viridis",
                vminmax=c.field_range(),
                onscreen_colorbar_enabled=True,
            )
            self._shown_field = c.field_label()
        elif self._shown_field is not None:
            self.mesh.remove_quantity(self._shown_field)
            self._shown_field = None
            if self._body_colors is not None:
                self.mesh.add_color_quantity("body", self._body_colors, enabled=True)
        segments = c.contact_segments()
        if len(segments):
            nodes = segments.reshape(-1, 3)
            edges = np.arange(len(nodes)).reshape(-1, 2)
            if self.contacts is not None:
                ps.remove_curve_network("contacts")
            self.contacts = ps.register_curve_network(
                "contacts", nodes, edges, color=(0.95, 0.6, 0.1), radius=0.002
            )
        elif self.contacts is not None:
            ps.remove_curve_network("contacts")
            self.contacts = None

    def callback(self) -> None:
        """Polyscope's per-frame user callback: keys, panel, then one tick."""
        c = self.controller
        self._keys()
        self._panel()
        c.tick()
        self.update()

    def _keys(self) -> None:
        psim = self.ps.imgui
        if psim.GetIO().WantCaptureKeyboard:
            return
        names = {
            "space": "Space",
            "n": "N",
            "r": "R",
            "]": "RightBracket",
            "[": "LeftBracket",
            "c": "C",
        }
        for key, imgui_name in names.items():
            if psim.IsKeyPressed(getattr(psim, f"ImGuiKey_{imgui_name}"), False):
                self.controller.handle_key(key)

    def _panel(self) -> None:
        psim = self.ps.imgui
        c = self.controller
        if psim.Button("Pause" if c.playing else "Play"):
            c.toggle_play()
        psim.SameLine()
        if psim.Button("Step"):
            c.step()
        psim.SameLine()
        if psim.Button("Reset"):
            c.reset()
        psim.SameLine()
        if psim.Button("-"):
            c.slower()
        psim.SameLine()
        if psim.Button("+"):
            c.faster()
        psim.SameLine()
        psim.TextUnformatted(f"{c.speed} {'steps' if c.live else 'frames'}/draw")
        psim.TextUnformatted(f"t = {c.time:.3f} s")
        if c.error:
            # Wrapped: a long message stays inside the panel.
            psim.PushStyleColor(psim.ImGuiCol_Text, (1.0, 0.3, 0.2, 1.0))
            psim.PushTextWrapPos(psim.GetCursorPosX() + ERROR_WRAP_PIXELS)
            psim.TextUnformatted(c.error)
            psim.PopTextWrapPos()
            psim.PopStyleColor()
        if not c.live:
            changed, frame = psim.SliderInt("frame", c.frame, 0, c.n_frames - 1)
            if changed:
                c.set_frame(frame)
        options = ["none", *c.fields()]
        current = options.index(c.field or "none")
        changed, index = psim.Combo("colour by", current, options)
        if changed:
            c.set_field(None if index == 0 else options[index])
        values = c.field_values()
        if values is not None:
            psim.TextUnformatted(f"{c.field_label()}: {values.min():.4g} .. {values.max():.4g}")
        if c.live:
            self._sliders()
        psim.Separator()
        psim.TextUnformatted("keyboard shortcuts")
        for key, (_, description) in SHORTCUTS.items():
            psim.BulletText(f"{key}: {description}")

    def _sliders(self) -> None:
        psim = self.ps.imgui
        psim.Separator()
        psim.TextUnformatted("parameters (applied on release; rebuild the simulation)")
        for name, (lo, hi, log, unit) in PARAMETER_RANGES.items():
            flags = psim.ImGuiSliderFlags_Logarithmic if log else 0
            label = f"{name} ({unit})" if unit else name
            _, value = psim.SliderFloat(label, self.pending[name], lo, hi, "%.4g", flags)
            self.pending[name] = value
            if psim.IsItemDeactivatedAfterEdit():
                self._apply(name, value)

    def _apply(self, name: str, value: float) -> None:
        try:
            self.controller.set_parameter(name, value)
        except ValueError as exc:
            self.controller.error = str(exc).splitlines()[0]
            self.pending[name] = self.controller.parameters[name]


def run_viewer(
    controller: ViewerController,
    camera: dict | None = None,
    init: Callable[[], None] | None = None,
) -> None:
    """Opens the polyscope window and runs until it is closed.

    Args:
        controller: what to show.
        camera: initial camera ``{"position", "target"}`` (m), or None.
        init: how to start polyscope (default: ``polyscope.init()`` with a window).
    """
    import polyscope as ps

    if init is not None:
        init()
    elif not ps.is_initialized():
        ps.set_program_name("diffsim")
        ps.init()
    viewer = PolyscopeViewer(controller, camera)
    ps.set_user_callback(viewer.callback)
    ps.show()
    ps.clear_user_callback()


__all__ = [
    "PARAMETER_RANGES",
    "SHORTCUTS",
    "SPEEDS",
    "PolyscopeViewer",
    "ViewerController",
    "contact_segments",
    "run_viewer",
]
