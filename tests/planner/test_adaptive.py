"""The adaptive map's pure half (planner.adaptive) and cells not measured (NaN) in a ResilienceMap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from planner import AccuracyConstraint, ResilienceMap
from planner.adaptive import MapClimb, rows_read
from tests.planner.fakes import BASELINE, fake_measure_cell

RATES = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
LADDER = (0, 1, 2, 4, 8)


def test_rows_read_are_the_ones_worst_at_interpolates() -> None:
    assert rows_read(RATES, 0.001) == (0,)
    assert rows_read(RATES, 0.01) == (0,)
    assert rows_read(RATES, 0.03) == (1, 2)
    assert rows_read(RATES, 0.04) == (2,)
    assert rows_read(RATES, 0.32) == (5,)
    assert rows_read(RATES, 0.32 + 1e-13) == (5,)
    assert rows_read(RATES, 0.33) == ()
    assert rows_read(RATES, float("inf")) == ()


def partial_map() -> ResilienceMap:
    nan = np.nan
    worst = np.array([[0.95, 0.985, nan], [0.90, nan, nan], [0.80, 0.97, 0.985]])
    return ResilienceMap((0.01, 0.02, 0.04), (0, 1, 2), worst + 0.002, worst, baseline=0.99, samples=2)


def test_a_cell_not_measured_never_meets_and_bounds_nothing() -> None:
    rmap, c = partial_map(), AccuracyConstraint.relative(0.01)  # threshold 0.98
    assert rmap.worst_at(0.02, 1) is None  # not measured
    assert rmap.worst_at(0.015, 1) is None  # interpolates a cell not measured
    assert rmap.worst_at(0.04, 1) == pytest.approx(0.97)  # the running minimum skips the NaN below
    assert rmap.required_epochs(0.01, c) == 1
    assert rmap.required_epochs(0.02, c) is None  # nothing measured past the 0-epoch cell meets
    assert rmap.required_epochs(0.04, c) == 2
    assert rmap.required_epochs_array(np.array([0.01, 0.02, 0.04]), c).tolist() == [1, -1, 2]
    assert rmap.max_fixable_rate(c) == pytest.approx(0.04)
    assert rmap.measured.tolist() == [[True, True, False], [True, False, False], [True, True, True]]


def test_a_partial_map_round_trips_through_strict_json() -> None:
    rmap = partial_map()
    text = json.dumps(rmap.to_dict(), allow_nan=False)  # None, not NaN: valid JSON
    back = ResilienceMap.from_json(text)
    assert back == rmap and np.isnan(back.worst[1, 1])


def test_a_partial_map_is_checked_and_charges_its_own_cost() -> None:
    w = partial_map().worst
    with pytest.raises(ValueError, match="same cells"):
        ResilienceMap((0.01, 0.02, 0.04), (0, 1, 2), np.nan_to_num(w) + 0.002, w, baseline=0.99)
    w0 = w.copy()
    w0[1, 0] = np.nan
    with pytest.raises(ValueError, match="0-epoch column"):
        ResilienceMap((0.01, 0.02, 0.04), (0, 1, 2), w0, w0, baseline=0.99)
    assert partial_map().training_epochs == 3 * 2 * 2
    m = partial_map()
    m.meta["cell_epochs"] = 5
    assert m.training_epochs == 5


def climb_with_fake(
    chip_rates: dict[str, float], samples: int, c: AccuracyConstraint, max_undecided: float = 0.0
) -> MapClimb:
    """The climb `workers.adaptive_map` runs, with the planner tests' fake measurements."""
    tasks = ResilienceMap.cell_tasks(RATES, LADDER, samples, seed=0)
    values = {(t.rate_index, t.sample): fake_measure_cell(t) for t in tasks}
    climb = MapClimb(RATES, LADDER, samples, BASELINE, c, max_undecided=max_undecided)
    for i in range(len(RATES)):
        for s in range(samples):
            climb.record(0, i, s, values[(i, s)][0])
    climb.place(chip_rates)
    for rung in range(1, len(LADDER)):
        while (nxt := climb.next_measurement(rung)) is not None:
            climb.record(rung, *nxt, values[nxt][rung])
    return climb


def test_the_climb_gives_the_full_grids_epochs_for_less() -> None:
    c = AccuracyConstraint.relative(0.01)
    full = ResilienceMap.build(RATES, LADDER, 3, fake_measure_cell, baseline=BASELINE, seed=0)
    chip_rates = {f"c{k}": r for k, r in enumerate([0.003, 0.012, 0.02, 0.025, 0.03, 0.05, 1.0, float("inf")])}
    climb = climb_with_fake(chip_rates, 3, c)
    chip_epochs = climb.chip_epochs()
    assert chip_epochs == {cid: full.required_epochs(r, c) for cid, r in chip_rates.items()}
    assert set(chip_epochs.values()) >= {1, 2, None}  # the fleet spans several rungs
    adaptive = climb.resilience_map()
    assert adaptive.training_epochs == climb.cell_epochs == sum(LADDER[r] for r in climb.reached.ravel())
    assert climb.cell_epochs * 3 <= full.training_epochs
    seen = adaptive.measured
    assert seen[:, 0].all() and not seen.all()
    np.testing.assert_array_equal(adaptive.worst[seen], full.worst[seen])  # same cells, same values
    np.testing.assert_array_equal(adaptive.mean[seen], full.mean[seen])
    # a sample is evaluated only at rungs it was trained to, in order
    for i in range(len(RATES)):
        for s in range(3):
            done = np.nonzero(~np.isnan(climb.acc[i, s]))[0]
            assert done.max() == climb.reached[i, s]


def test_the_climb_may_leave_the_fleets_tail_undecided() -> None:
    c = AccuracyConstraint.relative(0.01)
    full = ResilienceMap.build(RATES, LADDER, 3, fake_measure_cell, baseline=BASELINE, seed=0)
    rates = [0.003, 0.005, 0.008, 0.012, 0.015, 0.02, 0.025, 0.03, 0.05, 0.07]
    chip_rates = {f"c{k}": r for k, r in enumerate(rates)}
    want = {cid: full.required_epochs(r, c) for cid, r in chip_rates.items()}
    exact = climb_with_fake(chip_rates, 3, c)
    tail = climb_with_fake(chip_rates, 3, c, max_undecided=0.2)  # 2 of 10 chips
    got = tail.chip_epochs()
    differ = [cid for cid in want if got[cid] != want[cid]]
    assert 0 < len(differ) <= 2 and all(got[cid] is None for cid in differ)
    # the chips left out are the ones needing the most epochs
    assert min(want[cid] or 99 for cid in differ) >= max(a for cid, a in got.items() if a is not None)
    assert tail.cell_epochs < exact.cell_epochs
    with pytest.raises(ValueError, match="max_undecided"):
        MapClimb(RATES, LADDER, 2, BASELINE, c, max_undecided=1.0)


def test_the_climb_refuses_out_of_order_work() -> None:
    climb = MapClimb(RATES, LADDER, 2, BASELINE, AccuracyConstraint.relative(0.01))
    with pytest.raises(ValueError, match="place the chips"):
        climb.next_measurement(1)
    with pytest.raises(ValueError, match="0-epoch column"):
        climb.place({"a": 0.02})
    with pytest.raises(ValueError, match="place the chips"):
        climb.record(2, 0, 0, 0.9)
    with pytest.raises(ValueError, match="fraction"):
        climb.record(0, 0, 0, 1.5)
    for i in range(len(RATES)):
        for s in range(2):
            climb.record(0, i, s, 0.5)
    climb.place({"a": 0.02})
    climb.record(2, 1, 0, 0.9)
    with pytest.raises(ValueError, match="past"):
        climb.record(1, 1, 1, 0.9)  # rung 1 is over once rung 2 was measured
    with pytest.raises(ValueError, match="samples"):
        MapClimb(RATES, LADDER, 0, BASELINE, AccuracyConstraint.relative(0.01))


def test_a_sample_that_rules_a_rung_out_spares_the_others() -> None:
    """A chip between two rates: one sample far below the threshold at the upper rate rules
    the rung out, so neither the other sample nor the lower rate is trained to it."""
    c = AccuracyConstraint.relative(0.01)  # threshold 0.9801
    climb = MapClimb((0.01, 0.02), (0, 1, 2), 2, BASELINE, c)
    for i, s, a in [(0, 0, 0.95), (0, 1, 0.96), (1, 0, 0.5), (1, 1, 0.9)]:
        climb.record(0, i, s, a)
    climb.place({"x": 0.015})
    assert climb.next_measurement(1) == (1, 0)  # the lowest accuracy last seen first
    climb.record(1, 1, 0, 0.6)  # bound (0.6 + 1.0) / 2 < threshold: rung 1 ruled out
    assert climb.next_measurement(1) is None
    assert climb.chip_epochs() == {"x": None}
    climb.record(2, 1, 0, 0.99)
    climb.record(2, 1, 1, 0.99)
    assert climb.next_measurement(2) == (0, 0)  # now the lower rate decides
    climb.record(2, 0, 0, 0.99)
    climb.record(2, 0, 1, 0.985)
    assert climb.next_measurement(2) is None and climb.chip_epochs() == {"x": 2}
    assert climb.cell_epochs == 2 * 4 and climb.cell_evaluations == 4 + 1 + 4
    assert climb.resilience_map().measured.tolist() == [[True, False, True], [True, False, True]]


def test_a_partial_map_plots(tmp_path: Path) -> None:
    from app.dashboard import plots

    rmap = partial_map()
    assert rmap.plot(tmp_path / "m.png", AccuracyConstraint.relative(0.01)).read_bytes()[:4] == b"\x89PNG"
    chips = [{"effective_rate": 0.015, "epochs": 2, "status": "planned"}]
    assert plots.resilience_map(rmap, 0.98, chips, "adaptive").startswith(b"\x89PNG")
