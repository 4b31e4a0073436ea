"""Material-parameter fitting: recover E, nu, density or damping from observed motion.

:func:`fit` runs the simulator from a start state, compares the rollout with an
:class:`~diffsim.fitting.observation.Observation` at the observed frames and points, and descends
the gradient of that loss with Adam or L-BFGS. Each parameter is global, per tet (with an
optional smoothness penalty over face-adjacent tets) or a neural field (a torch module of
the rest tet centroids). Bounds are kept by construction: a parameter is a smooth map of an
unconstrained variable theta (log for one-sided bounds, a sigmoid for two-sided ones). See
docs/fitting.md for the maths and a guide.

Several recordings (:class:`~diffsim.fitting.targets.Target`) fit together: the loss sums
or averages theirs, parameters are shared or one per target (``per_target``), and the
targets may be split over the processes of a torch.distributed job (``distributed``; see
docs/distributed-fitting.md).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffsim.fitting import distributed as dist
from diffsim.fitting.objective import Objective, local_targets
from diffsim.fitting.observation import Observation, ObservationError
from diffsim.fitting.targets import StateSource, Target, as_targets, shares
from diffsim.fitting.worlds import check_single_world, supports_worlds
from diffsim.physics.materials import PARAMETER_BOUNDS, Material
from diffsim.simulator import SimulationError, Simulator

# Default (lower, upper) bounds, open intervals: the material's own (PARAMETER_BOUNDS), and
# damping's.
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    **{name: (lo, hi) for name, (lo, hi, _) in PARAMETER_BOUNDS.items()},
    "damping": (0.0, math.inf),
}
# Start value of damping when the scene has none (a log parameterisation cannot start at 0).
DEFAULT_DAMPING_START = 1.0
# An Adam run that fails this many times in a row (non-finite simulation) stops.
MAX_FAILURES = 3
# Normalised loss an L-BFGS line search sees where the simulation failed (start loss = 1).
FAILED_LOSS = 1e3
# Rollouts one L-BFGS line search may take.
LINE_SEARCH_EVALUATIONS = 20


@dataclass
class FitProgress:
    """What a callback sees after each iteration.

    Attributes:
        iteration: 0-based iteration just finished.
        loss: data loss (weighted mean squared distance, m^2, or the robust loss) before
            this iteration's update.
        values: current parameter values (detached tensors, ``[]`` or ``[n_tets]``).
        seconds: wall time of the iteration.
    """

    iteration: int
    loss: float
    values: dict[str, torch.Tensor]
    seconds: float


@dataclass
class FitResult:
    """The outcome of :func:`fit`.

    Attributes:
        values: recovered values (the best seen): floats for global parameters, ``[n_tets]``
            arrays for per-tet parameters and fields.
        initial: the start values, same layout.
        loss_history: data loss per iteration (m^2 for ``loss="mse"``), the first entry
            at the start values, the last one after the final update.
        best_loss: the lowest data loss seen (at ``values``).
        iterations: optimizer iterations run.
        evaluations: rollouts with gradient (L-BFGS line searches take several per iteration).
        stop_reason: why the fit stopped.
        timings: seconds: ``total``, ``per_iteration`` (mean), ``forward`` and ``backward``
            (sums over evaluations).
        iteration_seconds: wall time of each iteration.
        value_history: global parameters at which each iteration's loss was evaluated
            (per-tet ones left out).
        material: a copy of the scene's material with the recovered parameters (detached).
        damping: the recovered damping (1/s) if it was fitted, else None.
        fields: the neural fields by parameter name, holding their best weights.
        stages: per stage of a curriculum fit (``stages > 1``): frames used, iterations and
            best loss; the loss history then runs through the stages one after another.
        target_names: the targets' names, in order.
        target_losses: each target's data loss at ``values`` (m^2 for ``loss="mse"``).
        per_target: the parameters fitted with one value per target; their ``values`` are
            ``[n_targets]`` arrays and ``material``/``damping`` keep the scene's value
            (see :meth:`material_for`).
        processes: how many processes the fit ran in (torch.distributed), 1 without.
        batched: whether a process ran its targets as worlds of one rollout.
    """

    values: dict[str, float | np.ndarray]
    initial: dict[str, float | np.ndarray]
    loss_history: list[float]
    best_loss: float
    iterations: int
    evaluations: int
    stop_reason: str
    timings: dict[str, float]
    iteration_seconds: list[float]
    value_history: list[dict[str, float]]
    material: Material
    damping: float | None = None
    fields: dict[str, torch.nn.Module] = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)
    target_names: list[str] = field(default_factory=list)
    target_losses: list[float] = field(default_factory=list)
    per_target: list[str] = field(default_factory=list)
    processes: int = 1
    batched: bool = False

    @property
    def rmse(self) -> float:
        """Root of the best data loss: the weighted RMS position error in m (``loss="mse"``)."""
        return math.sqrt(max(self.best_loss, 0.0))

    def target_values(self, target: int) -> dict[str, float]:
        """The per-target parameters' values of one target (0-based index)."""
        return {n: float(self.values[n][target]) for n in self.per_target}

    def material_for(self, target: int | None = None) -> Material:
        """The recovered material, with one target's own values for per-target parameters
        (``target=None``: the scene's values for them, as :attr:`material`)."""
        own = {} if target is None else self.target_values(target)
        own.pop("damping", None)
        return self.material.replace(**own) if own else self.material

    def apply(self, simulator: Simulator, target: int | None = None) -> Simulator:
        """Sets the recovered material (and damping) on ``simulator`` and returns it.

        Args:
            simulator: the simulator to change.
            target: with per-target parameters, whose values to set (0-based index).
        """
        simulator.material = self.material_for(target)
        if self.damping is not None:
            simulator.damping = self.damping
        if target is not None and "damping" in self.per_target:
            simulator.damping = self.target_values(target)["damping"]
        return simulator

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (per-tet values as lists)."""

        def plain(v):
            return v.tolist() if isinstance(v, np.ndarray) else v

        return {
            "values": {k: plain(v) for k, v in self.values.items()},
            "initial": {k: plain(v) for k, v in self.initial.items()},
            "best_loss": self.best_loss,
            "rmse_m": self.rmse,
            "loss_history": self.loss_history,
            "iterations": self.iterations,
            "evaluations": self.evaluations,
            "stop_reason": self.stop_reason,
            "timings_s": self.timings,
            "iteration_seconds": self.iteration_seconds,
            "value_history": self.value_history,
            "stages": self.stages,
            "targets": [
                {
                    "name": name,
                    "loss": loss,
                    "rmse_m": math.sqrt(max(loss, 0.0)),
                    **self.target_values(i),
                }
                for i, (name, loss) in enumerate(
                    zip(self.target_names, self.target_losses, strict=True)
                )
            ],
            "per_target": self.per_target,
            "processes": self.processes,
            "batched": self.batched,
        }

    def save_json(self, path: str | Path) -> None:
        """Writes :meth:`to_dict` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


class _Parameter:
    """One fitted parameter: value = transform(theta), theta global, per tet or a field."""

    def __init__(self, name, kind, init, lo, hi, module=None) -> None:
        self.name, self.kind, self.lo, self.hi, self.module = name, kind, lo, hi, module
        bad = ~((init > lo) & (init < hi))
        if bad.any():
            raise ValueError(
                f"the start value of {name} ({init[bad].flatten()[0].item():g}) is not inside "
                f"its bounds ({lo:g}, {hi:g}); pass initial={{'{name}': ...}} or other bounds"
            )
        self.scale = torch.clamp(init.detach().abs().mean(), min=1e-12)
        theta = self._inverse(init.detach())
        if kind == "field":
            self.theta0 = theta.mean()
            self.theta = None
        else:
            self.theta = theta.clone().requires_grad_(True)

    def _inverse(self, v: torch.Tensor) -> torch.Tensor:
        lo, hi = self.lo, self.hi
        if math.isfinite(lo) and math.isfinite(hi):
            u = (v - lo) / (hi - lo)
            return torch.log(u) - torch.log1p(-u)
        if math.isfinite(lo):
            return torch.log(v - lo)
        if math.isfinite(hi):
            return torch.log(hi - v)
        return v / self.scale

    def transform(self, theta: torch.Tensor) -> torch.Tensor:
        lo, hi = self.lo, self.hi
        if math.isfinite(lo) and math.isfinite(hi):
            return lo + (hi - lo) * torch.sigmoid(theta)
        if math.isfinite(lo):
            return lo + torch.exp(theta)
        if math.isfinite(hi):
            return hi - torch.exp(theta)
        return theta * self.scale

    def unconstrained(self, centroids: torch.Tensor) -> torch.Tensor:
        if self.kind != "field":
            return self.theta
        out = self.module(centroids)
        m = centroids.shape[0]
        if out.shape not in ((m,), (m, 1)):
            raise ValueError(
                f"the field for {self.name} must map centroids [{m}, 3] to [{m}] or [{m}, 1], "
                f"got {list(out.shape)}"
            )
        return self.theta0 + out.reshape(m).to(centroids.dtype)

    def trainables(self) -> list[torch.Tensor]:
        return list(self.module.parameters()) if self.kind == "field" else [self.theta]

    def snapshot(self):
        if self.kind == "field":
            return copy.deepcopy(self.module.state_dict())
        return self.theta.detach().clone()

    def restore(self, snap) -> None:
        if self.kind == "field":
            self.module.load_state_dict(snap)
        else:
            with torch.no_grad():
                self.theta.copy_(snap)


@dataclass(frozen=True)
class FitOptions:
    """How one fit runs: the keyword arguments of :func:`fit`, checked, as one value."""

    per_tet: Sequence[str] = ()
    per_target: Sequence[str] = ()
    fields: Mapping[str, torch.nn.Module] | None = None
    bounds: Mapping[str, tuple[float, float]] | None = None
    optimizer: str = "auto"
    iters: int = 50
    lr: float | None = None
    smoothness: float = 0.0
    loss: str = "mse"
    huber_delta: float | None = None
    reduction: str = "mean"
    checkpoint_every: int | None = None
    tol: float = 1e-12
    patience: int = 10
    min_improvement: float = 1e-4
    callback: Callable | None = None
    log: Callable[[str], None] | None = None
    mode: str = "dynamic"
    reducer: Any = None
    batch: bool | None = None


def fit(
    simulator: Simulator | Callable[[], Simulator],
    observation: Observation | str | Path | Target | Sequence[Observation | str | Path | Target],
    params: Sequence[str] = ("youngs_modulus", "poissons_ratio"),
    *,
    per_tet: Sequence[str] = (),
    per_target: Sequence[str] = (),
    fields: Mapping[str, torch.nn.Module] | None = None,
    initial: Mapping[str, float | torch.Tensor | np.ndarray] | None = None,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    state: StateSource | Sequence[StateSource] = None,
    steps: int | None = None,
    optimizer: str = "auto",
    iters: int = 50,
    lr: float | None = None,
    smoothness: float = 0.0,
    loss: str = "mse",
    huber_delta: float | None = None,
    reduction: str = "mean",
    checkpoint_every: int | None = None,
    mode: str = "dynamic",
    stages: int = 1,
    tol: float = 1e-12,
    patience: int = 10,
    min_improvement: float = 1e-4,
    callback: Callable[[FitProgress], bool | None] | None = None,
    log: Callable[[str], None] | None = None,
    distributed: bool | None = None,
    batch: bool | None = None,
) -> FitResult:
    """Fits material parameters (and damping) so rollouts match one or several observations.

    Args:
        simulator: the scene's simulator, or a zero-argument factory returning one. Its
            material's current values are the start values unless ``initial`` says otherwise.
        observation: the target (an :class:`Observation` or the path of its ``.npz``), or
            several: a list of them or of :class:`~diffsim.fitting.targets.Target` (each
            with its own start state, frames and markers). The loss is then the weighted
            mean (or sum, see ``reduction``) of the targets' losses.
        params: names to fit: material parameters (``youngs_modulus``, ``poissons_ratio``,
            ``density``, a custom material's own) and ``damping`` (1/s).
        per_tet: names fitted with one value per tet (a field ``[n_tets]``).
        per_target: names fitted with one value per target (e.g. each specimen's own
            ``density``); the others are shared by every target.
        fields: name -> torch module mapping rest tet centroids ``[n_tets, 3]`` (m) to
            ``[n_tets]`` unconstrained values; its output 0 means the start value.
        initial: start values by name (floats, ``[n_tets]`` for per-tet parameters,
            ``[n_targets]`` for per-target ones).
        bounds: ``(lower, upper)`` by name (open interval; ``math.inf`` for none). Defaults:
            E, density, damping > 0; nu in (-1, 0.5).
        state: the start state, or a function of the simulator returning it (``state(sim)``
            or ``state(sim, index)``), or a list with one per target; targets that name
            their own state keep it. Default: the observation's own start state
            (``initial_positions``) where it has one, else rest.
        steps: rollout length; default: up to each observation's last frame.
        optimizer: ``"adam"``, ``"lbfgs"`` or ``"auto"`` (Adam with a neural field, else L-BFGS).
        iters: maximum optimizer iterations.
        lr: step size (default 0.05 for Adam, 1 for L-BFGS); Adam's decays by a cosine to
            1% of it over ``iters``.
        smoothness: weight of the mean squared difference of theta between face-adjacent
            tets, for per-tet parameters and fields (relative to the normalised data loss).
        loss: ``"mse"`` (weighted mean squared distance) or ``"huber"`` (pseudo-Huber with
            ``huber_delta`` in m; robust to outliers).
        huber_delta: the Huber transition distance in m (default 1% of the mesh's size).
        reduction: how the targets' losses combine: ``"mean"`` (weighted by the targets'
            weights) or ``"sum"``. One target: its loss either way.
        checkpoint_every: segment length for gradient checkpointing (saves memory on long
            rollouts), or None.
        mode: ``"dynamic"`` (compare a rollout with the frames) or ``"equilibrium"``
            (the observation is one frame of a body at rest, compared with the static
            equilibrium :meth:`Simulator.equilibrium`, differentiated by one adjoint solve).
        stages: S > 1 fits the frames up to 1/2^(S-1), ..., 1/2 and then all of the observed
            time in turn, each stage starting from the last one's values (up to ``iters``
            iterations each): a curriculum that avoids the local minima of long oscillating
            motions when the start values are far off.
        tol: stop when the data loss falls below ``tol`` times the initial loss.
        patience: stop after this many iterations without a relative improvement of the best
            loss by ``min_improvement``.
        min_improvement: see ``patience``.
        callback: called with a :class:`FitProgress` after each iteration; return True to
            stop (in a distributed fit, any process returning True stops them all).
        log: called with one progress line per iteration (e.g. ``print``), or None; in a
            distributed fit only process 0 logs.
        distributed: True splits the targets over the processes of a torch.distributed job
            (started by ``torchrun``; the process group is made from its environment if
            none exists): each runs its share, the gradients are all-reduced and every
            process takes the same step and returns the same result. False: this process
            alone. None: distributed when started by torchrun with more than one process
            (``WORLD_SIZE`` > 1) or inside an initialised group of more than one.
        batch: run a process's targets as worlds of one batched rollout: None (where the
            simulator has batched worlds and a process has several targets), True or False.

    Returns:
        A :class:`FitResult` holding the best values seen (the same in every process).

    Raises:
        ObservationError: an observation does not match the scene.
        ValueError: an unknown parameter name, a start value outside its bounds, or a bad
            option.
    """
    sim = simulator if isinstance(simulator, Simulator) else simulator()
    if not isinstance(sim, Simulator):
        raise TypeError(f"simulator must be a Simulator or return one, got {type(sim).__name__}")
    check_single_world(sim)
    targets = as_targets(observation, state, steps)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
    reducer = dist.reducer(distributed, sim.device)
    options = FitOptions(
        per_tet=per_tet,
        per_target=per_target,
        fields=fields,
        bounds=bounds,
        optimizer=optimizer,
        iters=iters,
        lr=lr,
        smoothness=smoothness,
        loss=loss,
        huber_delta=huber_delta,
        reduction=reduction,
        checkpoint_every=checkpoint_every,
        tol=tol,
        patience=patience,
        min_improvement=min_improvement,
        callback=callback,
        log=log if reducer.rank == 0 else None,
        mode=mode,
        reducer=reducer,
        batch=batch,
    )
    log = options.log
    if stages == 1 or mode == "equilibrium":
        return _fit_stage(sim, targets, params, initial=initial, options=options)
    dt = sim.model.dt
    frame_steps = [t.observation.steps(dt) for t in targets]
    results, start_values = [], dict(initial or {})
    for stage in range(stages):
        last = stage == stages - 1
        counts = []
        for s in frame_steps:
            limit = s[-1] / 2 ** (stages - 1 - stage)
            counts.append(max(1, int((s <= limit * (1 + 1e-9)).sum())))
        if max(counts) < 2 and not last:
            continue  # too short to say anything
        if log is not None:
            if len(targets) == 1:
                n = counts[0]
                log(
                    f"stage {stage + 1}/{stages}: the first {n} frames "
                    f"(to step {frame_steps[0][n - 1]:g})"
                )
            else:
                log(
                    f"stage {stage + 1}/{stages}: the first {min(counts)}..{max(counts)} frames "
                    f"of {len(targets)} targets (1/{2 ** (stages - 1 - stage)} of each one's time)"
                )
        stage_targets = (
            targets if last else [t.first_frames(n) for t, n in zip(targets, counts, strict=True)]
        )
        result = _fit_stage(sim, stage_targets, params, initial=start_values, options=options)
        frames = counts[0] if len(targets) == 1 else counts
        result.stages = [
            {"frames": frames, "iterations": result.iterations, "loss": result.best_loss}
        ]
        results.append(result)
        # Fields keep training in place; their start value (theta_0) must not move.
        start_values = {k: v for k, v in result.values.items() if k not in (fields or {})}
    return _merge(results)


def _merge(results: list[FitResult]) -> FitResult:
    """One result from the stages of a curriculum fit (the last stage's values)."""
    first, last = results[0], results[-1]
    total = sum(r.timings["total"] for r in results)
    iterations = sum(r.iterations for r in results)
    timings = {k: sum(r.timings[k] for r in results) for k in ("total", "forward", "backward")}
    timings["per_iteration"] = total / max(iterations, 1)
    return dataclasses.replace(
        last,
        initial=first.initial,
        loss_history=[x for r in results for x in r.loss_history],
        iterations=iterations,
        evaluations=sum(r.evaluations for r in results),
        timings=timings,
        iteration_seconds=[x for r in results for x in r.iteration_seconds],
        value_history=[x for r in results for x in r.value_history],
        stages=[x for r in results for x in r.stages],
    )


def _fit_stage(
    sim: Simulator, targets: list[Target], params: Sequence[str], *, initial, options: FitOptions
) -> FitResult:
    """One fit of ``targets`` from the start values; see :func:`fit` for the arguments."""
    o = options
    per_tet, per_target, fields, bounds = o.per_tet, o.per_target, o.fields, o.bounds
    optimizer, iters, lr, smoothness = o.optimizer, o.iters, o.lr, o.smoothness
    loss, huber_delta, reduction = o.loss, o.huber_delta, o.reduction
    checkpoint_every, tol, patience = o.checkpoint_every, o.tol, o.patience
    min_improvement, callback, log = o.min_improvement, o.callback, o.log
    mode, reducer, batch = o.mode, o.reducer, o.batch
    fields = dict(fields or {})
    per_target = list(dict.fromkeys(per_target))
    names = list(dict.fromkeys([*params, *per_tet, *per_target, *fields]))
    _check_names(sim, names, per_tet, fields, per_target)
    optimizer = _choose_optimizer(optimizer, fields)
    if mode not in ("dynamic", "equilibrium"):
        raise ValueError(f"mode must be 'dynamic' or 'equilibrium', got {mode!r}")
    for t in targets:
        if mode == "equilibrium" and t.observation.n_frames != 1:
            raise ObservationError(
                f"an equilibrium target is one frame of the body at rest, got "
                f"{t.observation.n_frames} frames"
            )
    if loss not in ("mse", "huber"):
        raise ValueError(f"loss must be 'mse' or 'huber', got {loss!r}")
    if iters < 0 or patience < 1:
        raise ValueError("iters must be >= 0 and patience >= 1")

    # Every process checks every target, so that a bad one stops them all alike.
    dt = sim.model.dt
    lengths = []
    for t in targets:
        if mode == "equilibrium":
            t.observation.check(sim.model.n_vertices, dt)
            lengths.append(0)
        else:
            n_steps = t.observation.steps_needed(dt) if t.steps is None else t.steps
            t.observation.check(sim.model.n_vertices, dt, n_steps)
            lengths.append(n_steps)
    mine = shares(len(targets), reducer.size)[reducer.rank]
    local = local_targets(sim, targets, mine, mode, lengths)
    batched = _use_worlds(batch, sim, mode, len(local))
    weights = torch.tensor([t.weight for t in targets], dtype=torch.float64)
    coefficients = weights / weights.sum() if reduction == "mean" else weights
    tets = sim.model.tets
    centroids = sim.model.rest_positions[tets].mean(dim=1)
    pairs = torch.as_tensor(tet_adjacency(sim.mesh.tets), device=sim.device)
    if huber_delta is None:
        huber_delta = 0.01 * float(np.linalg.norm(np.ptp(sim.mesh.vertices, axis=0)))

    base_material = sim.material
    fitted = _make_parameters(
        sim, names, per_tet, fields, per_target, len(targets), initial or {}, bounds or {}
    )
    trainables = [t for p in fitted for t in p.trainables()]
    material_names = [n for n in names if n != "damping" and n not in per_target]
    objective = Objective(
        sim,
        local,
        coefficients,
        per_target,
        loss,
        huber_delta,
        checkpoint_every,
        mode,
        batched,
        reducer,
    )

    def values() -> dict[str, torch.Tensor]:
        return {p.name: p.transform(p.unconstrained(centroids)) for p in fitted}

    def regulariser() -> torch.Tensor | None:
        """The smoothness term (the same in every process), or None."""
        if smoothness <= 0 or not len(pairs):
            return None
        reg = None
        for p in fitted:
            if p.kind in ("per_tet", "field"):
                th = p.unconstrained(centroids)
                term = (th[pairs[:, 0]] - th[pairs[:, 1]]).square().mean()
                reg = term if reg is None else reg + term
        return None if reg is None else smoothness * reg

    with torch.no_grad():
        start_values = values()
    losses0 = objective.losses(values)
    loss0 = float((coefficients * losses0).sum())
    scale = loss0 if loss0 > 0 else 1.0
    run = _Run(fitted, trainables, values, objective, regulariser, coefficients, scale, reducer)
    run.best_targets = losses0
    t_start = time.perf_counter()
    if optimizer == "adam":
        history, it_times, value_hist, reason = run.adam(
            iters, 0.05 if lr is None else lr, tol, patience, min_improvement, callback, log
        )
    else:
        history, it_times, value_hist, reason = run.lbfgs(
            iters, 1.0 if lr is None else lr, tol, patience, min_improvement, callback, log
        )
    total = time.perf_counter() - t_start
    run.restore_best()
    with torch.no_grad():
        best = values()

    def export(v: torch.Tensor):
        v = v.detach().cpu()
        return float(v) if v.dim() == 0 else v.numpy().astype(np.float64)

    material = base_material.replace(
        **{n: best[n].detach() if best[n].dim() else float(best[n]) for n in material_names}
    )
    return FitResult(
        values={k: export(v) for k, v in best.items()},
        initial={k: export(v) for k, v in start_values.items()},
        loss_history=[loss0, *history[1:]] if history else [loss0],
        best_loss=run.best_loss if run.best_loss < math.inf else loss0,
        iterations=len(it_times),
        evaluations=run.evaluations,
        stop_reason=reason,
        timings={
            "total": total,
            "per_iteration": total / max(len(it_times), 1),
            "forward": objective.timing["forward"],
            "backward": objective.timing["backward"],
        },
        iteration_seconds=it_times,
        value_history=value_hist,
        material=material,
        damping=(
            float(best["damping"]) if "damping" in best and "damping" not in per_target else None
        ),
        fields=fields,
        target_names=[t.name for t in targets],
        target_losses=[float(x) for x in run.best_targets],
        per_target=per_target,
        processes=reducer.size,
        batched=batched,
    )


def _use_worlds(batch: bool | None, sim: Simulator, mode: str, n_local: int) -> bool:
    """Whether a process runs its targets as worlds of one rollout."""
    if batch is False:
        return False
    available = supports_worlds(sim) and mode == "dynamic"
    if batch is True and not available:
        raise ValueError(
            "batch=True needs a simulator with batched worlds (a 'worlds' argument) and "
            f"mode='dynamic'; {type(sim).__name__} has none here, use batch=None or False"
        )
    return available and (batch is True or n_local > 1)


class _Run:
    """The optimisation loop state: best values, evaluation counting, stopping rules.

    Every process of a distributed fit holds the same state: the losses and gradients come
    summed over processes from the objective, and stop decisions are shared.
    """

    def __init__(
        self, fitted, trainables, values, objective, regulariser, coefficients, scale, reducer
    ) -> None:
        self.fitted, self.trainables, self.values = fitted, trainables, values
        self.objective, self.regulariser = objective, regulariser
        self.coefficients, self.scale, self.reducer = coefficients, scale, reducer
        self.best_loss, self.best = math.inf, [p.snapshot() for p in fitted]
        self.best_targets: torch.Tensor | None = None
        self.evaluations = 0
        self.failures = 0
        self._cache: tuple[torch.Tensor, float, float, list[torch.Tensor]] | None = None

    def _data(self, losses: torch.Tensor) -> float:
        """The data loss from the targets' losses, added up in one fixed order."""
        return float((self.coefficients * losses).sum())

    def _note(self, data: float, losses: torch.Tensor) -> None:
        if data < self.best_loss:
            self.best_loss, self.best = data, [p.snapshot() for p in self.fitted]
            self.best_targets = losses.clone()

    def evaluate(self) -> tuple[float, float]:
        """Loss and gradient at the current theta; returns (normalised total, data loss)."""
        flat = torch.cat([t.detach().reshape(-1) for t in self.trainables])
        if self._cache is not None and torch.equal(self._cache[0], flat):
            _, total, data, grads = self._cache
            for t, g in zip(self.trainables, grads, strict=True):
                t.grad = g.clone()
            return total, data
        losses, grad = self.objective.gradients(self.values, self.trainables, self.scale)
        self.evaluations += 1
        data = self._data(losses)
        total = data / self.scale
        reg = self.regulariser()
        if reg is not None:  # the same in every process: added after the sum over them
            reg.backward()
            total += float(reg.detach())
        offset = 0
        for t in self.trainables:
            g = grad[offset : offset + t.numel()].reshape(t.shape).to(t.dtype)
            offset += t.numel()
            t.grad = g if t.grad is None else t.grad + g
            if not torch.isfinite(t.grad).all():
                raise SimulationError("the loss gradient is not finite")
        self._note(data, losses)
        self._cache = (flat, total, data, [t.grad.clone() for t in self.trainables])
        return total, data

    def restore_best(self) -> None:
        for p, snap in zip(self.fitted, self.best, strict=True):
            p.restore(snap)

    def _final_loss(self) -> float:
        try:
            losses = self.objective.losses(self.values)
        except SimulationError:
            self.restore_best()
            return self.best_loss
        d = self._data(losses)
        self._note(d, losses)
        return d

    def current(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {k: v.detach().clone() for k, v in self.values().items()}

    def _record(self, it, data, current, t0, callback, log, history, it_times, value_hist) -> bool:
        seconds = time.perf_counter() - t0
        history.append(data)
        it_times.append(seconds)
        value_hist.append({k: float(v) for k, v in current.items() if v.dim() == 0})
        if log is not None:
            shown = "  ".join(_describe(k, v) for k, v in current.items())
            log(f"iter {it:4d}  loss {data:.4e}  {shown}  ({seconds:.2f} s)")
        stop = callback is not None and bool(callback(FitProgress(it, data, current, seconds)))
        return self.reducer.any(stop) if self.reducer.distributed else stop

    def _stalled(self, bests: list[float], tol, patience, min_improvement) -> str | None:
        if self.best_loss <= tol * self.scale:
            return f"converged: loss below {tol:g} x the initial loss"
        if len(bests) > patience:
            old = bests[-patience - 1]
            if old - bests[-1] <= min_improvement * old:
                return (
                    f"stopped early: the best loss improved by less than {min_improvement:g} "
                    f"(relative) in {patience} iterations"
                )
        return None

    def adam(self, iters, lr, tol, patience, min_improvement, callback, log):
        opt = torch.optim.Adam(self.trainables, lr=lr)
        history, it_times, value_hist, bests = [], [], [], []
        failures, reason = 0, f"reached {iters} iterations"
        for it in range(iters):
            t0 = time.perf_counter()
            frac = it / max(iters - 1, 1)
            for group in opt.param_groups:
                group["lr"] = lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * frac)))
            try:
                _, data = self.evaluate()
                failures = 0
            except SimulationError as exc:
                failures += 1
                if failures >= MAX_FAILURES:
                    reason = f"stopped: the simulation failed {failures} times in a row ({exc})"
                    break
                self.restore_best()
                lr *= 0.5
                opt = torch.optim.Adam(self.trainables, lr=lr)
                if log is not None:
                    log(f"iter {it:4d}  simulation failed; back to the best values, lr {lr:g}")
                continue
            current = self.current()
            opt.step()
            bests.append(self.best_loss)
            if self._record(it, data, current, t0, callback, log, history, it_times, value_hist):
                reason = "stopped by the callback"
                break
            stop = self._stalled(bests, tol, patience, min_improvement)
            if stop:
                reason = stop
                break
        if it_times:
            history.append(self._final_loss())
        return history, it_times, value_hist, reason

    def lbfgs(self, iters, lr, tol, patience, min_improvement, callback, log):
        opt = torch.optim.LBFGS(
            self.trainables,
            lr=lr,
            max_iter=1,
            max_eval=LINE_SEARCH_EVALUATIONS + 1,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )
        history, it_times, value_hist, bests = [], [], [], []
        reason = f"reached {iters} iterations"
        last: list[float] = []

        def closure():
            try:
                total, data = self.evaluate()
            except SimulationError:
                # A trial step too far (an unstable E or nu): a high loss with no slope
                # makes the line search step back instead of stopping the fit.
                self.failures += 1
                for t in self.trainables:
                    t.grad = torch.zeros_like(t)
                total, data = FAILED_LOSS, math.inf
            last.append(data)
            return total

        for it in range(iters):
            t0 = time.perf_counter()
            last.clear()
            before = [t.detach().clone() for t in self.trainables]
            current = self.current()
            try:
                opt.step(closure)
            except SimulationError as exc:
                self.restore_best()
                reason = f"stopped: the simulation failed ({exc})"
                break
            moved = any(not torch.equal(a, t) for a, t in zip(before, self.trainables, strict=True))
            bests.append(self.best_loss)
            if self._record(it, last[0], current, t0, callback, log, history, it_times, value_hist):
                reason = "stopped by the callback"
                break
            stop = self._stalled(bests, tol, patience, min_improvement)
            if not moved:
                stop = "converged: the line search found no lower loss"
            if stop:
                reason = stop
                break
        if it_times:
            history.append(self._final_loss())
        return history, it_times, value_hist, reason


def tet_adjacency(tets: np.ndarray) -> np.ndarray:
    """Pairs of tets sharing a face, ``[p, 2]`` int64 (each pair once)."""
    tets = np.asarray(tets, dtype=np.int64)
    faces = np.sort(tets[:, [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]]], axis=2).reshape(-1, 3)
    owner = np.repeat(np.arange(len(tets)), 4)
    _, inverse, counts = np.unique(faces, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    shared = counts[inverse] == 2
    order = np.argsort(inverse[shared], kind="stable")
    owners = owner[shared][order].reshape(-1, 2)
    return owners


def _check_names(sim: Simulator, names, per_tet, fields, per_target=()) -> None:
    known = [*sim.material.parameter_names, "damping"]
    for name in names:
        if name not in known:
            raise ValueError(f"cannot fit {name!r}; this scene's parameters are {known}")
    for name in [*per_tet, *fields]:
        if name == "damping":
            raise ValueError("damping is a single rate; it cannot be per tet or a field")
    both = set(per_tet) & set(fields)
    if both:
        raise ValueError(f"{sorted(both)} given both per_tet and as a field; choose one")
    both = set(per_target) & (set(per_tet) | set(fields))
    if both:
        raise ValueError(
            f"{sorted(both)} given per_target and per_tet or as a field; a per-target "
            "parameter is one number per target"
        )
    if not names:
        raise ValueError("nothing to fit: give at least one parameter name")


def _choose_optimizer(optimizer: str, fields) -> str:
    if optimizer == "auto":
        return "adam" if fields else "lbfgs"
    if optimizer not in ("adam", "lbfgs"):
        raise ValueError(f"optimizer must be 'adam', 'lbfgs' or 'auto', got {optimizer!r}")
    return optimizer


def _make_parameters(
    sim, names, per_tet, fields, per_target, n_targets, initial, bounds
) -> list[_Parameter]:
    as_t = dict(dtype=sim.dtype, device=sim.device)
    m = sim.model.n_tets
    out = []
    for name in names:
        if name in initial:
            init = torch.as_tensor(initial[name], **as_t)
        elif name == "damping":
            init = torch.as_tensor(sim.damping, **as_t).detach()
            if float(init) <= 0:
                init = torch.tensor(DEFAULT_DAMPING_START, **as_t)
        else:
            init = torch.as_tensor(getattr(sim.material, name), **as_t).detach()
        kind = (
            "per_tet"
            if name in per_tet
            else "field"
            if name in fields
            else "per_target"
            if name in per_target
            else "global"
        )
        if kind == "per_tet":
            init = init.expand(m).clone()
        elif kind == "per_target":
            if name in initial and init.dim() == 1 and init.shape == (n_targets,):
                init = init.clone()
            elif init.dim() == 0 or (name not in initial and init.shape == (m,)):
                init = init.mean().expand(n_targets).clone()
            else:
                raise ValueError(
                    f"initial {name} must be a number or one per target ([{n_targets}]), "
                    f"got shape {list(init.shape)}"
                )
        elif kind == "global" and init.dim() != 0:
            if init.shape != (m,):
                raise ValueError(f"initial {name} must be a number, got shape {list(init.shape)}")
            init = init.mean()
        elif kind == "field" and init.dim() != 0:
            init = init.mean()
        lo, hi = bounds.get(name, DEFAULT_BOUNDS.get(name, _default_bounds(init)))
        if not lo < hi:
            raise ValueError(f"bounds of {name} must satisfy lower < upper, got ({lo}, {hi})")
        out.append(_Parameter(name, kind, init, float(lo), float(hi), fields.get(name)))
    return out


def _default_bounds(init: torch.Tensor) -> tuple[float, float]:
    return (0.0, math.inf) if bool((init > 0).all()) else (-math.inf, math.inf)


def _describe(name: str, v: torch.Tensor) -> str:
    short = {"youngs_modulus": "E", "poissons_ratio": "nu", "density": "rho"}.get(name, name)
    if v.dim() == 0:
        return f"{short}={float(v):.5g}"
    return f"{short}=[{float(v.min()):.4g}..{float(v.max()):.4g}]"
