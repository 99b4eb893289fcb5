from __future__ import annotations

import math

import numpy as np
import pytest

from accelerator.faults import ArrayConfig, Fault, FaultMap
from planner import (
    ResilienceMap,
    SiteSeverity,
    measure_site_severity,
    sample_fault_map,
    screening_equivalent_rate,
    severity_tasks,
)
from planner.severity import fault_class


def test_uniform_severity_is_the_faulty_pe_fraction(array: ArrayConfig) -> None:
    m = sample_fault_map(array, 0.05, np.random.default_rng(0))
    # two faults on one PE count once
    extra = FaultMap(array, (*m.faults, Fault(m.faults[0].row, m.faults[0].col, "psum", 31, 1)))
    sev = SiteSeverity.uniform()
    assert sev.effective_rate(m) == pytest.approx(m.rate)
    assert sev.effective_rate(extra) == pytest.approx(m.rate)
    assert sev.effective_rate(FaultMap(array, ())) == 0.0


def test_fault_classes_by_site_and_bit_band(array: ArrayConfig) -> None:
    assert fault_class(Fault(0, 0, "pe"), array) == "pe"
    assert fault_class(Fault(0, 0, "psum", 31, 1), array) == "psum:3"
    assert fault_class(Fault(0, 0, "psum", 0, 1), array) == "psum:0"
    assert fault_class(Fault(0, 0, "weight", 7, 0), array) == "weight:3"
    assert fault_class(Fault(0, 0, "act", 2, 0), array) == "act:1"


def fake_evaluate(m: FaultMap) -> float:
    """Base-model accuracy: a high psum bit costs 10x a dead PE; other faults 1x."""
    cost = 0.0
    for f in m.faults:
        if f.site == "psum" and f.bit is not None and f.bit >= 24:
            cost += 10.0
        elif f.site == "pe":
            cost += 0.3
        else:
            cost += 1.0
    return 0.99 - min(0.8, 0.004 * cost)


def test_measured_severity_ranks_sites_and_is_normalised(array: ArrayConfig) -> None:
    sev = measure_site_severity(array, fake_evaluate, 0.99, rate=0.03, samples=4, seed=1)
    assert sev.meta["kind"] == "measured"
    w = sev.weights
    assert w["psum:3"] > 5 * w["psum:0"]
    assert w["pe"] < w["weight:1"]
    # normalisation: reference-mix maps keep their nominal rate on average
    ref = [t.fault_map for t in severity_tasks(array, rate=0.03, samples=4, seed=1) if t.fault_class == "reference"]
    assert np.mean([sev.effective_rate(m) for m in ref]) == pytest.approx(np.mean([m.rate for m in ref]), rel=1e-6)
    # same faulty-PE count, different severity
    severe = FaultMap(array, tuple(Fault(i, 0, "psum", 30, 1) for i in range(4)))
    mild = FaultMap(array, tuple(Fault(i, 0, "pe") for i in range(4)))
    assert severe.rate == mild.rate
    assert sev.effective_rate(severe) > 5 * sev.effective_rate(mild)
    # JSON
    assert SiteSeverity.from_dict(sev.to_dict()) == sev


def test_robust_model_gives_uniform_severity(array: ArrayConfig) -> None:
    sev = measure_site_severity(array, lambda m: 0.99, 0.99, rate=0.03, samples=2, seed=0)
    assert sev.weights == {}


def test_screening_equivalent_rate(rmap: ResilienceMap) -> None:
    assert screening_equivalent_rate(rmap.baseline, rmap) == 0.0
    a, b = screening_equivalent_rate(0.97, rmap), screening_equivalent_rate(0.9, rmap)
    assert 0 < a < b < rmap.rates[-1]
    assert math.isinf(screening_equivalent_rate(0.0, rmap))
    # consistent with the 0-epoch worst-case curve at a grid point
    g = float(np.minimum.accumulate(rmap.worst[:, 0])[2])
    assert screening_equivalent_rate(g, rmap) == pytest.approx(rmap.rates[2], abs=1e-9)
