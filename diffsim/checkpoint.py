"""Segment-level gradient checkpointing for rollouts.

A segment of K steps runs forward without recording a graph and saves only its start state
and inputs. In the backward pass it re-runs those K steps with the graph recorded and
backpropagates through them. Peak tape memory is one segment's graph plus the saved start
states: O(T/K + K) steps instead of O(T). ``torch.utils.checkpoint`` is not used because the
nested ``torch.autograd.grad`` of the torch backend's forces makes it recompute during the
forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# runner(x0, v0, targets, params) -> (positions [K, n, 3], velocities [K, n, 3])
SegmentRunner = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, Sequence[torch.Tensor]],
    tuple[torch.Tensor, torch.Tensor],
]


class _Segment(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner, x0, v0, targets, *params):
        ctx.runner = runner
        ctx.save_for_backward(x0, v0, targets, *params)
        with torch.no_grad():
            return runner(x0, v0, targets, params)

    @staticmethod
    def backward(ctx, grad_positions, grad_velocities):
        saved = ctx.saved_tensors
        inputs = [
            t.detach().requires_grad_(need)
            for t, need in zip(saved, ctx.needs_input_grad[1:], strict=True)
        ]
        x0, v0, targets, *params = inputs
        with torch.enable_grad():
            positions, velocities = ctx.runner(x0, v0, targets, params)
            # The VJP as the gradient of a scalar (exact: d(p . g)/dp = g). Passing the output
            # gradients to autograd.grad instead makes torch import sympy (~1 s) on first use.
            pairing = (positions * grad_positions).sum() + (velocities * grad_velocities).sum()
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(pairing, wanted, allow_unused=True))
        return (None, *[next(grads) if t.requires_grad else None for t in inputs])


def run_segment(
    runner: SegmentRunner,
    x0: torch.Tensor,
    v0: torch.Tensor,
    targets: torch.Tensor,
    params: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs one checkpointed segment; same values and gradients as ``runner`` itself."""
    return _Segment.apply(runner, x0, v0, targets, *params)
