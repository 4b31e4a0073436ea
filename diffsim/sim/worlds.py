"""Many worlds at once: W copies of one mesh laid out as one replicated mesh.

World w owns vertices ``w * n .. (w + 1) * n - 1`` and tets ``w * m .. (w + 1) * m - 1`` of
the replicated mesh (n, m: the vertices and tets of one world), so every kernel and torch op
that runs over a mesh runs over all worlds at once. Per-world values reach the replicated
mesh through differentiable torch ops (``repeat_interleave``, ``expand``), so gradients sum
back to the world axis by autograd. See docs/worlds.md.

The shapes a per-world value may take, with W worlds and m tets per world:

- a material parameter (E, nu, density): ``[]`` (every tet of every world), ``[W]`` (one
  per world), ``[m]`` (per tet, the same in every world), or per world and tet ``[W, m]``
  or flattened world-major ``[W * m]`` (a material's constructor takes tensors of at most
  one dimension: pass ``E.reshape(-1)``, or ``[W, m]`` through ``rollout(params=...)``).
  Where m == W, a ``[W]`` tensor is one value per world; give a per-tet field shared by the
  worlds as ``[W, m]``.
- gravity: ``[3]`` or ``[W, 3]``; damping: ``[]`` or ``[W]``.
"""

from __future__ import annotations

import numpy as np
import torch


def check_worlds(worlds) -> int | None:
    """``worlds`` as given: None, or an int >= 1 (else a ValueError)."""
    if worlds is None:
        return None
    if isinstance(worlds, bool) or not isinstance(worlds, (int, np.integer)) or worlds < 1:
        raise ValueError(f"worlds must be None or an integer >= 1, got {worlds!r}")
    return int(worlds)


def parameter_kind(name: str, shape: tuple, worlds: int, n_tets: int) -> str:
    """How a material parameter of this shape spreads over the worlds.

    Returns:
        ``"shared"`` (``[]``), ``"world"`` (``[W]``), ``"tet"`` (``[m]``) or ``"world_tet"``
        (``[W, m]`` or ``[W * m]``).

    Raises:
        ValueError: any other shape (the message lists them).
    """
    shape = tuple(shape)
    if shape == ():
        return "shared"
    if shape == (worlds,):
        return "world"
    if shape == (n_tets,):
        return "tet"
    if shape in ((worlds, n_tets), (worlds * n_tets,)):
        return "world_tet"
    raise ValueError(
        f"{name} must have shape [] (all worlds), [{worlds}] (one per world), [{n_tets}] "
        f"(per tet, the same in every world) or [{worlds}, {n_tets}] (per world and tet; or "
        f"flattened, [{worlds * n_tets}]) with worlds={worlds}, got {list(shape)}"
    )


def tet_values(name: str, value: torch.Tensor, worlds: int, n_tets: int) -> torch.Tensor:
    """A material parameter on the replicated mesh: ``[]`` stays ``[]`` (one value for every
    tet), anything else becomes ``[W * m]`` (differentiable)."""
    kind = parameter_kind(name, value.shape, worlds, n_tets)
    if kind == "shared":
        return value
    if kind == "world":
        return value.repeat_interleave(n_tets)
    if kind == "tet":
        return value.repeat(worlds)
    return value.reshape(worlds * n_tets)


def world_value(name: str, value, world: int, worlds: int, n_tets: int):
    """World ``world``'s share of a material parameter (tensor, numpy array or float):
    a scalar or ``[m]``, graph kept."""
    if isinstance(value, (int, float)):
        return value
    kind = parameter_kind(name, tuple(value.shape), worlds, n_tets)
    if kind == "world":
        return value[world]
    if kind == "world_tet":
        return value.reshape(worlds, n_tets)[world]
    return value


def has_world_axis(name: str, value, worlds: int, n_tets: int) -> bool:
    """True if a material parameter differs between worlds (shape ``[W]`` or ``[W, m]``)."""
    if isinstance(value, (int, float)):
        return False
    return parameter_kind(name, tuple(value.shape), worlds, n_tets) in ("world", "world_tet")


def world_vector(name: str, value: torch.Tensor, worlds: int | None, size: int) -> None:
    """Checks a per-world vector setting: ``[size]`` (or ``[]`` for size 0), or with worlds
    also ``[W, size]`` (``[W]``); raises ValueError naming the shapes allowed."""
    one = () if size == 0 else (size,)
    allowed = [one] if worlds is None else [one, (worlds, *one)]
    if tuple(value.shape) not in allowed:
        text = " or ".join(str(list(s)) for s in allowed)
        raise ValueError(f"{name} must have shape {text}, got {list(value.shape)}")


def replicate(t: torch.Tensor, worlds: int | None) -> torch.Tensor:
    """Rows of one world repeated for every world, world-major (``[W * rows, ...]``)."""
    if worlds is None:
        return t
    return t.repeat(worlds, *([1] * (t.dim() - 1)))


def replicate_indices(indices: torch.Tensor, worlds: int | None, stride: int) -> torch.Tensor:
    """Vertex indices of one world in every world (world w adds ``w * stride``)."""
    if worlds is None:
        return indices
    offsets = stride * torch.arange(worlds, dtype=indices.dtype, device=indices.device)
    shape = (worlds,) + (1,) * indices.dim()
    return (indices.unsqueeze(0) + offsets.view(shape)).reshape(-1, *indices.shape[1:])


def locate(indices, per_world: int) -> tuple[int, list[int]]:
    """The first world named by flat indices of the replicated mesh, and its local indices
    there (for messages): ``(world, [index within the world, ...])``."""
    indices = torch.as_tensor(indices).flatten()
    world = int(indices[0]) // per_world
    mine = indices[indices // per_world == world] - world * per_world
    return world, mine.tolist()
