"""The fitting examples run end to end (with few iterations) and make progress."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

torch.set_num_threads(1)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bouncing_sphere_example_moves_toward_the_truth():
    example = load_example("fit_bouncing_sphere")
    lines = []
    result = example.run(iters=6, steps=50, log=lines.append)
    assert result.best_loss < 0.5 * result.loss_history[0]
    for name, true in example.TRUE.items():
        start_error = abs(example.GUESS[name] - true)
        assert abs(result.values[name] - true) < start_error, name
    assert any("youngs_modulus: true" in line for line in lines)


def test_neural_field_example_error_falls():
    example = load_example("fit_neural_field")
    result, errors = example.run(iters=6, lr=0.05, log=lambda line: None)
    assert result.loss_history[-1] < 0.5 * result.loss_history[0]
    assert errors[-1] < errors[0]
    assert result.fields["youngs_modulus"] is not None
