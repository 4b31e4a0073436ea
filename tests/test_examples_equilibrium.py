"""The static modulus-field example runs end to end (quick mode) and improves the fit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "static_modulus_field.py"


def test_static_modulus_field_example_runs_quickly():
    spec = importlib.util.spec_from_file_location("static_modulus_field", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = []
    results = module.run(quick=True, log=lines.append)
    for name in ("initial", "per_element", "neural"):
        assert set(results[name]) == {"all", "inner"}
        assert 0.0 <= results[name]["all"] < 1.0
    # Three Adam steps already bring the equilibrium closer to the (noisy) measurement.
    assert results["per_element_misfit"] < 17.0 and results["neural_misfit"] < 17.0
    assert any("relative L2 error" in line for line in lines)
