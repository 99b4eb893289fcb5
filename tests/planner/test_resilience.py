from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from accelerator.faults import ArrayConfig
from planner import AccuracyConstraint, CellTask, ResilienceMap
from planner.constraint import TOLERANCE, meets, meets_each
from tests.planner.fakes import fake_measure_cell

ROOT = Path(__file__).resolve().parents[2]


def test_import_planner_does_not_import_torch() -> None:
    code = "import sys, planner, planner.synthetic_fleet, planner.plan, planner.replan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def hand_map() -> ResilienceMap:
    worst = np.array([[0.95, 0.985, 0.99], [0.90, 0.975, 0.985], [0.80, 0.95, 0.97]])
    return ResilienceMap((0.01, 0.02, 0.04), (0, 1, 2), worst + 0.002, worst, baseline=0.99, samples=3)


def test_constraint_thresholds() -> None:
    assert AccuracyConstraint.relative(0.01).threshold(0.99) == pytest.approx(0.98)
    assert AccuracyConstraint.absolute(0.97).threshold(0.5) == 0.97
    assert AccuracyConstraint.parse("0.01") == AccuracyConstraint.relative(0.01)
    assert AccuracyConstraint.parse("0.97") == AccuracyConstraint.absolute(0.97)
    assert AccuracyConstraint.parse("min:0.3") == AccuracyConstraint.absolute(0.3)
    assert AccuracyConstraint.relative(0.01).met(0.98, 0.99)
    assert not AccuracyConstraint.relative(0.01).met(0.979, 0.99)
    with pytest.raises(ValueError):
        AccuracyConstraint(min_accuracy=0.9, max_drop=0.1)
    with pytest.raises(ValueError):
        AccuracyConstraint(max_drop=1.5)


def test_meets_is_the_one_definition_and_absorbs_only_rounding() -> None:
    n = 1000  # a test split: accuracies are multiples of 1 / n
    baseline, drop = 519 / n, 0.05
    c = AccuracyConstraint.relative(drop)
    thr = c.threshold(baseline)
    assert thr > 469 / n  # baseline - drop rounds above the sample count it means...
    assert meets(469 / n, thr) and c.met(469 / n, baseline)  # ...which still meets
    assert not meets(468 / n, thr) and not c.met(468 / n, baseline)  # one sample short never does
    assert meets_each([468 / n, 469 / n, 1.0], thr).tolist() == [False, True, True]
    assert meets(thr - TOLERANCE / 2, thr) and not meets(thr - 2 * TOLERANCE, thr)


def test_required_epochs_interpolates_worst_case() -> None:
    m, c = hand_map(), AccuracyConstraint.relative(0.01)  # threshold 0.98
    assert m.required_epochs(0.01, c) == 1
    assert m.required_epochs(0.015, c) == 1  # e1 interpolates to exactly 0.98
    assert m.required_epochs(0.016, c) == 2
    assert m.required_epochs(0.02, c) == 2
    assert m.required_epochs(0.025, c) == 2  # e2: 0.98125
    assert m.required_epochs(0.03, c) is None  # e2: 0.9775 < 0.98
    # the mean is not used: a map whose mean alone would pass still says None
    assert m.mean[2, 2] < 0.98 or m.required_epochs(0.04, c) is None


def test_required_epochs_edges() -> None:
    m, c = hand_map(), AccuracyConstraint.relative(0.01)
    # below the first grid rate the first rate's value applies: no optimistic 0 epochs
    assert m.required_epochs(0.0, c) == 1
    assert m.required_epochs(0.005, c) == 1
    # past the last grid rate the map knows nothing, even for a lax constraint
    assert m.required_epochs(0.05, AccuracyConstraint.absolute(0.1)) is None
    assert m.required_epochs(0.04, AccuracyConstraint.absolute(0.1)) == 0
    # a constraint no cell meets
    assert all(m.required_epochs(r, AccuracyConstraint.absolute(0.995)) is None for r in (0.0, 0.01, 0.03))


def test_worst_case_is_made_monotone_in_rate() -> None:
    worst = np.array([[0.90, 0.97], [0.95, 0.99]])  # a noisy map: better at the higher rate
    m = ResilienceMap((0.01, 0.02), (0, 1), worst, worst, baseline=0.99)
    assert m.required_epochs(0.02, AccuracyConstraint.absolute(0.98)) is None
    assert m.worst_at(0.02, 0) == pytest.approx(0.90)


def test_vectorised_and_scalar_epochs_agree(rmap: ResilienceMap, constraint: AccuracyConstraint) -> None:
    rates = np.linspace(0, 0.4, 81)
    many = rmap.required_epochs_array(rates, constraint)
    for r, e in zip(rates, many, strict=True):
        one = rmap.required_epochs(float(r), constraint)
        assert (-1 if one is None else one) == e


def test_max_fixable_rate_matches_required_epochs() -> None:
    m, c = hand_map(), AccuracyConstraint.relative(0.01)
    r = m.max_fixable_rate(c)
    assert r is not None
    assert r == pytest.approx(0.02 + (0.005 / 0.015) * 0.02)
    assert m.required_epochs(r - 1e-6, c) is not None
    assert m.required_epochs(r + 1e-4, c) is None
    assert m.max_fixable_rate(AccuracyConstraint.absolute(0.999)) is None


def test_build_assemble_and_json_round_trip(rmap: ResilienceMap, tmp_path: Path) -> None:
    tasks = ResilienceMap.cell_tasks(rmap.rates, rmap.epochs, 3, seed=0)
    assert len(tasks) == len(rmap.rates) * 3 and all(t.epochs == rmap.epochs for t in tasks)
    # externally measured (e.g. by Celery workers), in any order, from JSON task descriptions
    results = [(CellTask.from_dict(json.loads(json.dumps(t.to_dict()))), fake_measure_cell(t)) for t in reversed(tasks)]
    again = ResilienceMap.assemble(results, rmap.baseline, meta={"seed": 0})
    assert again == rmap
    assert ResilienceMap.from_json(rmap.to_json()) == rmap
    assert np.all(rmap.worst <= rmap.mean)
    assert rmap.training_epochs == len(rmap.rates) * 3 * 8


def test_cell_task_fault_map_is_seeded_and_at_rate() -> None:
    a = ArrayConfig(16, 16)
    t = ResilienceMap.cell_tasks([0.05], [0, 2], 2, seed=7)
    m0, m0b, m1 = t[0].fault_map(a), t[0].fault_map(a), t[1].fault_map(a)
    assert m0 == m0b and m0 != m1
    assert m0.rate == pytest.approx(round(0.05 * 256) / 256)
    other_seed = ResilienceMap.cell_tasks([0.05], [0, 2], 2, seed=8)[0].fault_map(a)
    assert other_seed != m0


def test_assemble_rejects_inconsistent_results() -> None:
    tasks = ResilienceMap.cell_tasks([0.01], [0, 1], 1, seed=0)
    with pytest.raises(ValueError, match="returned 1 accuracies"):
        ResilienceMap.assemble([(tasks[0], [0.9])], 0.99)
    with pytest.raises(ValueError):
        ResilienceMap((0.02, 0.01), (0, 1), np.zeros((2, 2)), np.zeros((2, 2)), 0.9)
    with pytest.raises(ValueError):
        ResilienceMap((0.01,), (1, 2), np.zeros((1, 2)), np.zeros((1, 2)), 0.9)


def test_plot_writes_png(rmap: ResilienceMap, constraint: AccuracyConstraint, tmp_path: Path) -> None:
    out = rmap.plot(tmp_path / "map.png", constraint)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
