"""``benchmarks/vidit_mp_conditions.py``: its noise measures and the sensitivity it hands to the ViDiT-Q program."""

import importlib.util
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "vidit_mp_conditions.py")


def _bench():
    spec = importlib.util.spec_from_file_location("vidit_mp_conditions", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_noise_measures_are_zero_on_equal_inputs_and_one_at_the_reference_scale():
    bench = _bench()
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 6, 6, 1))
    assert bench.relative_noise(ref, ref) == 0.0
    assert bench.relative_noise(2 * ref, ref) == pytest.approx(1.0)
    f = rng.normal(size=(8, 5))
    assert bench.feature_noise(f, f) == 0.0
    # every sample collapsed onto the mean: the error equals the features' own spread
    assert bench.feature_noise(np.broadcast_to(f.mean(0), f.shape), f) == pytest.approx(1.0)


def test_a_conditions_measurements_drive_the_noise_program():
    from jdq.recipes import vidit_q

    bench = _bench()
    units = {n: {"group": g, "metric": "sqnr", "sites": [f"{n}.a"], "weight_size": 100, "weight": {"4": {"sqnr": 30.0}}}
             for n, g in (("u0", "attention"), ("u1", "ffn"))}
    # under this condition u0 is the sensitive one: it must get the wider weights at a 4.0 average
    measured = {"row": {"u0": {str(b): {"sqnr": 5.0 * b} for b in bench.WIDTHS},
                        "u1": {str(b): {"sqnr": 5.0 * b + 20.0} for b in bench.WIDTHS}}}
    sens = bench.as_sensitivity(units, measured, "row")
    assert sens["units"]["u0"]["weight"]["3"]["sqnr"] == 15.0 and sens["units"]["u0"]["sites"] == ["u0.a"]
    wb = vidit_q.mp_assignment(sens, 4.0, bench.WIDTHS, search="noise")
    assert wb["u0.a"] > wb["u1.a"] and (wb["u0.a"] + wb["u1.a"]) / 2 <= 4.0
