from __future__ import annotations

import random

import numpy as np
import pytest

from accelerator.faults import ArrayConfig, FaultMap
from planner import (
    AccuracyConstraint,
    FleetSpec,
    Plan,
    PlanSettings,
    ResilienceMap,
    SiteSeverity,
    fuse_fault_maps,
    generate_fleet,
    group_deployment,
    plan_fleet,
)
from planner.plan import NEEDS_NOTHING
from tests.planner.fakes import smooth_accuracy


def fleet_and_screening(n: int, seed: int, array: ArrayConfig) -> tuple[list[FaultMap], dict[str, float]]:
    spec = FleetSpec(array=array, defects_per_die=1.5, dies_across=8)
    fleet = generate_fleet(n, seed, spec)
    rng = np.random.default_rng(seed)
    screening = {str(m.chip_id): smooth_accuracy(m.rate, 0, 0.003 * rng.random()) for m in fleet}
    return fleet, screening


SEVERITY = SiteSeverity({"pe": 0.4, "psum:3": 3.0, "psum:2": 1.5}, {})


def faulty_pes(m: FaultMap) -> set[tuple[int, int]]:
    return {(f.row, f.col) for f in m.faults}


@pytest.mark.parametrize(
    ("seed", "max_group_size", "placement"),
    [
        (0, 1, "screening"),
        pytest.param(1, 3, "screening", marks=pytest.mark.slow),
        pytest.param(2, 5, "screening", marks=pytest.mark.slow),
        pytest.param(0, 8, "screening", marks=pytest.mark.slow),
        (2, 5, "severity"),
    ],
)
def test_plan_is_safe_and_never_costs_more_than_per_chip_fat(
    seed: int,
    max_group_size: int,
    placement: str,
    rmap: ResilienceMap,
    constraint: AccuracyConstraint,
    array: ArrayConfig,
) -> None:
    fleet, screening = fleet_and_screening(150, seed, array)
    plan = plan_fleet(
        fleet,
        screening,
        rmap,
        constraint,
        max_group_size=max_group_size,
        severity=SEVERITY,
        seed=seed,
        coarse_cluster_size=24,
        placement=placement,
    )
    thr = constraint.threshold(rmap.baseline)
    # every chip is accounted for exactly once
    in_groups = [c for g in plan.groups for c in g.members]
    assert len(in_groups) == len(set(in_groups))
    assert set(in_groups) | set(plan.needs_nothing) == {m.chip_id for m in fleet}
    assert all(screening[c] >= thr for c in plan.needs_nothing)
    assert all(screening[c] < thr for c in in_groups)
    for g in plan.groups:
        assert len(g.members) <= max_group_size and g.epochs >= 1
        own = [plan.chips[c].effective_rate for c in g.members]
        if placement == "severity":
            fused_rate = SEVERITY.effective_rate(g.fused)
        else:  # additive over members' faulty PEs: the sum when they are disjoint, never below one member
            disjoint = sum(len(faulty_pes(plan.maps[c])) for c in g.members) == len(faulty_pes(g.fused))
            fused_rate = sum(own) if disjoint else max(own)
            assert g.effective_rate <= sum(own) + 1e-12
        assert g.effective_rate >= fused_rate - 1e-12
        if len(g.members) > 1:
            # never a group whose fused map the map says retraining cannot fix ...
            need = rmap.required_epochs(g.effective_rate, constraint)
            assert need is not None and max(need, rmap.epochs[1]) == g.epochs
            assert rmap.required_epochs(fused_rate, constraint) is not None
            # ... and only when it is cheaper than its members alone (reward)
            assert g.epochs < sum(plan.chips[c].epochs or 0 for c in g.members)
    assert plan.predicted_epochs <= plan.per_chip_fat_epochs
    fixable = [s.epochs for s in plan.chips.values() if s.status != NEEDS_NOTHING and s.epochs is not None]
    assert plan.per_chip_fat_epochs_each == max(fixable)


def test_grouping_happens_and_saves_epochs(
    rmap: ResilienceMap, constraint: AccuracyConstraint, array: ArrayConfig
) -> None:
    fleet, screening = fleet_and_screening(300, 5, array)
    alone = plan_fleet(fleet, screening, rmap, constraint, max_group_size=1, seed=0)
    grouped = plan_fleet(fleet, screening, rmap, constraint, max_group_size=5, seed=0, coarse_cluster_size=32)
    assert max(len(g.members) for g in grouped.groups) > 1
    assert grouped.predicted_epochs < alone.predicted_epochs <= alone.per_chip_fat_epochs


def test_plan_is_deterministic_and_order_independent(
    rmap: ResilienceMap, constraint: AccuracyConstraint, array: ArrayConfig
) -> None:
    fleet, screening = fleet_and_screening(200, 3, array)
    a = plan_fleet(fleet, screening, rmap, constraint, seed=4, coarse_cluster_size=16)
    shuffled = list(fleet)
    random.Random(0).shuffle(shuffled)
    b = plan_fleet(shuffled, screening, rmap, constraint, seed=4, coarse_cluster_size=16)
    assert a.to_json() == b.to_json()


def test_plan_json_round_trip(rmap: ResilienceMap, constraint: AccuracyConstraint, array: ArrayConfig) -> None:
    fleet, screening = fleet_and_screening(60, 1, array)
    plan = plan_fleet(fleet, screening, rmap, constraint, severity=SEVERITY)
    again = Plan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json()
    assert again.groups[0].fused == plan.groups[0].fused
    assert again.summary() == plan.summary()
    g = next(g for g in again.groups if len(g.members) > 1)
    sched = g.injection_schedule(again.maps, steps_per_epoch=10)
    assert sched(100, 0).digest == g.fused.digest


def test_chips_beyond_the_map_go_alone_at_the_per_chip_fat_epochs_each(
    rmap: ResilienceMap, constraint: AccuracyConstraint, array: ArrayConfig
) -> None:
    fleet, screening = fleet_and_screening(40, 2, array)
    from accelerator.faults import Fault

    hopeless = FaultMap(array, tuple(Fault(r, c, "weight", 7, 1) for r in range(16) for c in range(8)), chip_id="Z-1")
    screening = {**screening, "Z-1": 0.1}
    plan = plan_fleet([*fleet, hopeless], screening, rmap, constraint)
    g = next(g for g in plan.groups if "Z-1" in g.members)
    assert g.members == ("Z-1",) and g.reason == "beyond_map" and g.epochs == plan.per_chip_fat_epochs_each
    assert g.protect  # plain retraining is predicted to fail: its first try already protects
    assert plan.chips["Z-1"].epochs is None
    # past the map (rate inf) survives strict JSON, which PostgreSQL's json columns demand
    assert plan.chips["Z-1"].effective_rate == float("inf")
    again = Plan.from_json(plan.to_json())
    assert again.chips["Z-1"].effective_rate == float("inf") and again.to_json() == plan.to_json()


def test_bad_input_is_rejected(rmap: ResilienceMap, constraint: AccuracyConstraint, array: ArrayConfig) -> None:
    fleet, screening = fleet_and_screening(5, 0, array)
    with pytest.raises(ValueError, match="no screening"):
        plan_fleet(fleet, {}, rmap, constraint)
    with pytest.raises(ValueError, match="duplicate"):
        plan_fleet([fleet[0], fleet[0]], screening, rmap, constraint)
    with pytest.raises(ValueError, match="chip_id"):
        plan_fleet([FaultMap(array, ())], screening, rmap, constraint)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"schedule": "round_robin"}, ValueError, "schedule: 'round_robin' is not one of"),
        ({"placement": "anywhere"}, ValueError, "placement: 'anywhere' is not one of"),
        ({"max_group_size": 0}, ValueError, "max_group_size: must be an integer >= 1"),
        ({"max_group_size": 2.5}, ValueError, "max_group_size: must be an integer"),
        ({"max_group_size": True}, ValueError, "max_group_size: must be an integer"),
        ({"seed": -1}, ValueError, "seed: must be an integer >= 0"),
        ({"ramp_fraction": 1.5}, ValueError, "ramp_fraction: must be in"),
        ({"ramp_fraction": float("nan")}, ValueError, "ramp_fraction: must be in"),
        ({"coarse_cluster_size": 0}, ValueError, "coarse_cluster_size: must be an integer >= 1"),
        ({"severity": {"pe": 1.0}}, TypeError, "severity must be a SiteSeverity"),
        ({"bypass_screening": [0.9]}, TypeError, "bypass_screening must be a mapping"),
        ({"bypass_screening": {"x": {"rows": 0.9}}}, ValueError, "unknown bypass policy"),
        ({"bypass_screening": {"x": {"faulty": 1.2}}}, ValueError, r"bypass_screening\['x'\]\['faulty'\]: must be in"),
    ],
)
def test_every_argument_is_validated_on_entry(
    kwargs: dict[str, object],
    error: type[Exception],
    match: str,
    rmap: ResilienceMap,
    constraint: AccuracyConstraint,
    array: ArrayConfig,
) -> None:
    # every chip passes screening here, so nothing past entry would ever look at a bad argument
    fleet = [FaultMap(array, (), chip_id=f"c{i}") for i in range(3)]
    screening = dict.fromkeys((str(m.chip_id) for m in fleet), rmap.baseline)
    assert plan_fleet(fleet, screening, rmap, constraint).needs_nothing == ["c0", "c1", "c2"]
    with pytest.raises(error, match=match):
        plan_fleet(fleet, screening, rmap, constraint, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("chips", "not a list"), TypeError, "chips must be a sequence of FaultMap"),
        (("chips", [{"chip_id": "c0"}]), TypeError, "chips must be FaultMap objects"),
        (("screening", [0.9]), TypeError, "screening must be a mapping"),
        (("screening", {"c0": 97.0}), ValueError, r"screening\['c0'\]: must be in \[0, 1\]"),
        (("resilience_map", None), TypeError, "resilience_map must be a ResilienceMap"),
        (("constraint", 0.01), TypeError, "constraint must be an AccuracyConstraint"),
    ],
)
def test_positional_arguments_are_validated_on_entry(
    args: tuple[str, object],
    error: type[Exception],
    match: str,
    rmap: ResilienceMap,
    constraint: AccuracyConstraint,
    array: ArrayConfig,
) -> None:
    fleet = [FaultMap(array, (), chip_id="c0")]
    call: dict[str, object] = {
        "chips": fleet,
        "screening": {"c0": rmap.baseline},
        "resilience_map": rmap,
        "constraint": constraint,
    }
    call[args[0]] = args[1]
    with pytest.raises(error, match=match):
        plan_fleet(**call)  # type: ignore[arg-type]


def test_plan_settings_are_validated_when_a_stored_plan_is_loaded() -> None:
    with pytest.raises(ValueError, match="schedule"):
        PlanSettings.from_dict({"schedule": "nope"})


def test_failing_chips_get_at_least_the_smallest_positive_epochs(rmap: ResilienceMap, array: ArrayConfig) -> None:
    fleet, _ = fleet_and_screening(120, 0, array)
    lax = AccuracyConstraint.relative(0.2)  # the map says 0 epochs almost everywhere
    screening = {str(m.chip_id): 0.5 for m in fleet}  # yet every chip failed screening
    plan = plan_fleet(fleet, screening, rmap, lax, max_group_size=5, placement="severity")
    assert plan.groups and all(g.epochs >= rmap.epochs[1] for g in plan.groups)
    assert max(len(g.members) for g in plan.groups) > 1


def test_beyond_map_chip_goes_straight_to_the_top_rung(
    rmap: ResilienceMap, constraint: AccuracyConstraint, array: ArrayConfig
) -> None:
    from accelerator.faults import Fault
    from planner import replan

    hopeless = FaultMap(array, tuple(Fault(r, c, "weight", 7, 1) for r in range(16) for c in range(8)), chip_id="Z-1")
    mild = FaultMap(array, (Fault(0, 0, "pe"),), chip_id="A-1")
    plan = plan_fleet([hopeless, mild], {"Z-1": 0.1, "A-1": 0.97}, rmap, constraint)
    (g0,) = (g for g in plan.groups if "Z-1" in g.members)
    assert g0.protect and g0.epochs == plan.per_chip_fat_epochs_each < rmap.largest_epochs
    nxt = replan(plan, {"Z-1": 0.2, "A-1": 0.99})
    (g,) = nxt.pending_groups
    assert g.protect and g.epochs == rmap.largest_epochs and g.reason == "protect"  # skips the larger epochs
    last = replan(nxt, {"Z-1": 0.3})
    assert last.done and last.chips["Z-1"].status == "unrecoverable" and last.chips["Z-1"].best_accuracy == 0.3


def test_a_chip_the_bypass_helps_is_planned_on_its_bypassed_map(
    rmap: ResilienceMap, constraint: AccuracyConstraint, array: ArrayConfig
) -> None:
    from accelerator.faults import Fault, bypass_faulty_pes

    fleet, screening = fleet_and_screening(30, 3, array)
    bad = FaultMap(array, (Fault(2, 3, "psum", 30, 1), Fault(5, 5, "act", 7, 1)), chip_id="B-1")
    fixed = FaultMap(array, (Fault(1, 1, "psum", 31, 1),), chip_id="B-2")
    worse = FaultMap(array, (Fault(4, 4, "weight", 0, 1),), chip_id="B-3")
    thr = constraint.threshold(rmap.baseline)
    screening = {**screening, "B-1": 0.2, "B-2": 0.3, "B-3": thr - 0.05}
    by_bypass = {
        "B-1": {"faulty": thr - 0.02, "shadowed": thr - 0.02},  # a tie goes to the milder policy
        "B-2": {"faulty": thr + 0.001},
        "B-3": {"faulty": thr - 0.2},
    }
    plan = plan_fleet([*fleet, bad, fixed, worse], screening, rmap, constraint, bypass_screening=by_bypass)

    b1 = plan.chips["B-1"]
    assert plan.maps["B-1"] == bypass_faulty_pes(bad) and b1.bypassed == [[2, 3]] and b1.bypass == "faulty"
    assert b1.screening == thr - 0.02 and b1.epochs is not None  # placed by its bypassed screening
    g = next(g for g in plan.groups if "B-1" in g.members)
    assert (2, 3, "pe", None, None) in {(f.row, f.col, f.site, f.bit, f.stuck) for f in g.fused.faults}
    # the bypass alone lifts B-2 over the constraint: nothing to retrain, but it ships bypassed
    assert plan.chips["B-2"].status == NEEDS_NOTHING and plan.chips["B-2"].bypassed == [[1, 1]]
    # a bypass that lowers accuracy is not taken
    assert plan.maps["B-3"] == worse and plan.chips["B-3"].bypassed == []
    assert plan.maps["B-3"] == worse and plan.chips["B-3"].bypass is None
    assert plan.summary()["bypassed_chips"] == 2
    again = Plan.from_json(plan.to_json())
    assert again.chips["B-1"].bypassed == [[2, 3]] and again.maps["B-1"] == plan.maps["B-1"]
    assert again.chips["B-1"].bypass == "faulty"

    # the shadowed policy wins where it screens better, and its PEs right of the act fault are bypassed
    by_bypass["B-1"] = {"faulty": thr - 0.02, "shadowed": thr - 0.01}
    plan = plan_fleet([*fleet, bad, fixed, worse], screening, rmap, constraint, bypass_screening=by_bypass)
    assert plan.chips["B-1"].bypass == "shadowed" and plan.maps["B-1"] == bypass_faulty_pes(bad, "shadowed")
    assert plan.chips["B-1"].bypassed == [[2, 3], *([5, c] for c in range(6, 16))]
    with pytest.raises(ValueError, match="unknown bypass policy"):
        plan_fleet(fleet, screening, rmap, constraint, bypass_screening={"B-1": {"all": 0.9}})

    # a tie goes to the policy that bypasses fewer PEs: upper_half leaves the low act bit alone
    mixed = FaultMap(array, (Fault(2, 3, "psum", 30, 1), Fault(5, 5, "act", 1, 1)), chip_id="B-4")
    tie = {"B-4": {"shadowed": thr - 0.01, "upper_half": thr - 0.01, "faulty": thr - 0.03}}
    plan = plan_fleet([*fleet, mixed], {**screening, "B-4": 0.2}, rmap, constraint, bypass_screening=tie)
    assert plan.chips["B-4"].bypass == "upper_half" and plan.chips["B-4"].bypassed == [[2, 3]]


def test_group_members_deploy_with_the_fused_maps_dead_pes_bypassed(array: ArrayConfig) -> None:
    from accelerator.faults import Fault

    dead_here = FaultMap(array, (Fault(2, 3, "pe"), Fault(7, 1, "pe")), chip_id="A-1")
    stuck_there = FaultMap(array, (Fault(2, 3, "weight", 6, 1), Fault(4, 4, "act", 2, 0)), chip_id="B-1")
    fused = fuse_fault_maps([dead_here, stuck_there], chip_id="g")
    b = group_deployment(stuck_there, fused)
    # B's stuck weight register sits on a PE the fused map has dead: the group model never
    # trained against it, so B runs with that PE (and every other fused dead PE) bypassed
    assert b.dead_pes == {(2, 3), (7, 1)} and set(stuck_there.faults) <= set(b.faults)
    assert group_deployment(dead_here, fused) is dead_here
    no_bypass = ArrayConfig(array.rows, array.cols, bypass=False)
    plain = FaultMap(no_bypass, (Fault(1, 1, "weight", 0, 1),))
    assert group_deployment(plain, fuse_fault_maps([plain])) is plain
