from __future__ import annotations

import hashlib
import math

import pytest

from accelerator.faults import ArrayConfig
from planner import AccuracyConstraint, Group, Plan, ResilienceMap, plan_fleet, replan
from planner.plan import NEEDS_NOTHING, UNRECOVERABLE, VERIFIED
from planner.replan import climb_cannot_reach, training_collapsed
from tests.planner.test_plan import fleet_and_screening


def hardness(chip_id: str) -> float:
    """A chip's fixed difficulty in [0, 1.25): above 1.0 no retraining on the map suffices."""
    return int(hashlib.sha256(chip_id.encode()).hexdigest()[:8], 16) / 2**32 * 1.25


def fake_verify(plan: Plan, group: Group, chip_id: str) -> float:
    """Accuracy of `group`'s model on `chip_id`: better with more epochs, protection, smaller groups."""
    capacity = group.total_epochs / plan.resilience_map.largest_epochs * (1.0 if group.protect else 0.8)
    capacity /= len(group.members) ** 0.25
    thr = plan.threshold
    return thr + 0.01 if capacity >= hardness(chip_id) else thr - 0.02 * (1 + hardness(chip_id) - capacity)


def run_to_end(plan: Plan, max_rounds: int = 50) -> tuple[Plan, int]:
    rounds = 0
    while not plan.done:
        verification = {c: fake_verify(plan, g, c) for g in plan.pending_groups for c in g.members}
        plan = replan(plan, verification)
        rounds += 1
        assert rounds <= max_rounds, "replanning did not terminate"
    return plan, rounds


@pytest.mark.parametrize("seed", [0, 1])
def test_replan_terminates_and_declares_unrecoverable_only_at_the_top_of_the_ladder(
    seed: int, rmap: ResilienceMap, constraint: AccuracyConstraint, array: ArrayConfig
) -> None:
    fleet, screening = fleet_and_screening(120, seed, array)
    plan = plan_fleet(fleet, screening, rmap, constraint, max_group_size=5, seed=seed)
    final, rounds = run_to_end(plan)
    bound = 1 + 3 + 1 + len(rmap.epochs) + 1  # together, halvings of 5, alone, more epochs, protection
    assert rounds <= bound
    statuses = {s.status for s in final.chips.values()}
    assert statuses <= {NEEDS_NOTHING, VERIFIED, UNRECOVERABLE}
    thr = final.threshold
    unrecoverable = final.chips_with(UNRECOVERABLE)
    for st in final.chips.values():
        if st.status == VERIFIED:
            assert st.accuracy is not None and st.accuracy >= thr
            assert st.group_id is not None and final.groups[[g.group_id for g in final.groups].index(st.group_id)]
        if st.status == UNRECOVERABLE:
            last = st.history[-1]
            assert last["size"] == 1 and last["protect"] and last["epochs"] == rmap.largest_epochs
            assert all(h["accuracy"] < thr for h in st.history)
            assert st.reason and f"{st.best_accuracy:.4f}" in st.reason
            assert st.best_accuracy == max([st.screening] + [h["accuracy"] for h in st.history])
    # a chip that some rung of the ladder can fix is never given up
    ladder_top_capacity = 1.0  # alone, the map's largest epochs, protected
    for c in unrecoverable:
        assert hardness(c) > ladder_top_capacity
    fixable_failing = [c for c, s in final.chips.items() if s.status != NEEDS_NOTHING and hardness(c) <= 1.0]
    assert all(final.chips[c].status == VERIFIED for c in fixable_failing)
    assert len(unrecoverable) > 0 and len(fixable_failing) > 0  # the test exercised both outcomes
    assert final.planned_epochs > final.predicted_epochs


def test_replan_ladder_steps(rmap: ResilienceMap, constraint: AccuracyConstraint, array: ArrayConfig) -> None:
    fleet, screening = fleet_and_screening(400, 0, array)
    plan = plan_fleet(fleet, screening, rmap, constraint, max_group_size=5)
    big = next(g for g in plan.groups if len(g.members) >= 3 and rmap.next_epochs(g.epochs) is not None)
    single = next(g for g in plan.groups if len(g.members) == 1)
    thr = plan.threshold
    verification = {c: thr + 0.01 for g in plan.pending_groups for c in g.members}
    verification[big.members[0]] = thr - 0.05
    verification[single.members[0]] = thr - 0.05
    nxt = replan(plan, verification)
    assert plan.round == 0 and all(g.status == "pending" for g in plan.groups)  # input untouched
    new = {g.members: g for g in nxt.pending_groups}
    # a group's miss continues from the group's model, training only up to the next epochs on the map
    g1 = new[(big.members[0],)]
    assert g1.reason == "more_epochs_together" and g1.round == 1 and g1.warm_from == big.group_id
    assert g1.start_epoch == big.total_epochs and g1.total_epochs == rmap.next_epochs(big.epochs)
    g2 = new[(single.members[0],)]
    assert g2.reason in ("more_epochs", "protect") and (g2.total_epochs > single.total_epochs or g2.protect)
    if g2.reason == "more_epochs":  # its own model, continued
        assert g2.warm_from == single.group_id and g2.epochs == g2.total_epochs - single.total_epochs
    assert nxt.chips[big.members[1]].status == VERIFIED
    # missing again after the warm continuation: cold, alone, at no less than it has seen
    again = replan(nxt, {c: thr - 0.05 for g in nxt.pending_groups for c in g.members})
    g3 = next(g for g in again.pending_groups if g.members == (big.members[0],))
    assert g3.reason in ("more_epochs", "protect") and g3.total_epochs > g1.total_epochs or g3.protect
    with pytest.raises(ValueError, match="no verification"):
        replan(nxt, {})


def test_a_member_that_misses_alone_after_its_group_continues_the_groups_model(
    rmap: ResilienceMap, constraint: AccuracyConstraint, array: ArrayConfig
) -> None:
    fleet, screening = fleet_and_screening(400, 0, array)
    plan = plan_fleet(fleet, screening, rmap, constraint, max_group_size=5)
    pair = next(
        g for g in plan.groups if len(g.members) >= 2 and (rmap.next_epochs(g.epochs) or 1e9) < rmap.largest_epochs
    )
    thr = plan.threshold
    ok = {c: thr + 0.01 for g in plan.pending_groups for c in g.members}
    # round 0 misses: the group goes on together; then one member misses again
    together = replan(plan, {**ok, **{c: thr - 0.01 for c in pair.members}})
    (cont,) = (g for g in together.pending_groups if set(g.members) == set(pair.members))
    assert cont.reason == "more_epochs_together" and cont.warm_from == pair.group_id
    lone = pair.members[0]
    nxt = replan(together, {**{c: thr + 0.01 for c in cont.members}, lone: thr - 0.002})
    (g,) = nxt.pending_groups
    # alone, from the continued group's model, for the map's smallest positive epochs
    assert g.members == (lone,) and g.reason == "alone" and not g.protect
    assert g.warm_from == cont.group_id and g.start_epoch == cont.total_epochs and g.epochs == rmap.epochs[1]
    assert all(nxt.chips[c].status == VERIFIED for c in pair.members[1:])
    # missing again: its own model goes on to the next epochs on the map
    again = replan(nxt, {lone: thr - 0.002})
    (g2,) = again.pending_groups
    assert g2.reason == "more_epochs" and g2.warm_from == g.group_id
    assert g2.total_epochs == rmap.next_epochs(g.total_epochs)


def test_climb_cannot_reach_forecasts_optimistically_from_three_tries() -> None:
    thr = 0.96
    assert not climb_cannot_reach([(1, 0.80), (2, 0.80)], 32, thr)  # two tries never stop a climb
    # flat and far: 0.90 + 2 doublings left x 0.005 + noise 0.01 = 0.92 < 0.96
    assert climb_cannot_reach([(2, 0.895), (4, 0.90), (8, 0.90)], 32, thr)
    # ... but not from further down the ladder: gains do not always diminish
    assert not climb_cannot_reach([(1, 0.895), (2, 0.90), (4, 0.90)], 32, thr)
    # the best accuracy (0.9117) + the best gain a doubling (0.02, the first) x 2 doublings left
    # = 0.9517: short of 0.96 by less than the noise allowance
    assert not climb_cannot_reach([(4, 0.90), (6, 0.9117), (8, 0.91)], 32, thr)
    assert climb_cannot_reach([(4, 0.90), (6, 0.9117), (8, 0.91)], 32, thr, noise=0.0)
    # at the top of the ladder nothing is left to climb: only the noise allowance counts
    assert climb_cannot_reach([(8, 0.94), (16, 0.945), (32, 0.948)], 32, thr)
    assert not climb_cannot_reach([(8, 0.94), (16, 0.945), (32, 0.951)], 32, thr)
    # a fall between tries is no gain; the best accuracy seen counts, not the last
    assert not climb_cannot_reach([(8, 0.945), (12, 0.93), (16, 0.93)], 32, thr, noise=0.02)
    with pytest.raises(ValueError, match="increasing"):
        climb_cannot_reach([(2, 0.9), (2, 0.9), (4, 0.9)], 32, thr)
    with pytest.raises(ValueError, match="increasing"):
        climb_cannot_reach([(0, 0.9), (2, 0.9), (4, 0.9)], 32, thr)


def _smooth_verify(plan: Plan, group: Group, chip_id: str) -> float:
    """Accuracy that gains the same each doubling of epochs (a chip's own gain, 1.5x protected):
    the returns the bounded climb's forecast assumes at most."""
    h = hashlib.sha256(chip_id.encode()).digest()
    gap, gain = 0.02 + 0.1 * h[0] / 255, 0.025 * h[1] / 255
    gain *= 1.5 if group.protect else 1.0
    return plan.threshold - gap + gain * math.log2(group.total_epochs)


def _climb_to_the_end(plan: Plan) -> Plan:
    for _ in range(60):
        if plan.done:
            return plan
        plan = replan(plan, {c: _smooth_verify(plan, g, c) for g in plan.pending_groups for c in g.members})
    raise AssertionError("replanning did not terminate")


def test_a_bounded_climb_gives_up_only_chips_the_full_climb_gives_up_and_costs_less(
    constraint: AccuracyConstraint, array: ArrayConfig
) -> None:
    fleet, screening = fleet_and_screening(300, 3, array)
    screening = {c: 0.5 for c in screening}  # every chip retrains
    ladder = ResilienceMap.ladder((0, 1, 2, 3, 4, 6, 8, 12, 16), baseline=0.98)
    full, bounded = (
        _climb_to_the_end(plan_fleet(fleet, screening, ladder, constraint, max_group_size=1, climb=climb))
        for climb in ("full", "bounded")
    )
    assert full.settings.climb == "full" and bounded.settings.climb == "bounded"
    verified = {c for c, st in full.chips.items() if st.status == VERIFIED}
    given_up = {c for c, st in full.chips.items() if st.status == UNRECOVERABLE}
    assert len(verified) > 30 and len(given_up) > 30  # both outcomes exercised
    assert {c for c, st in bounded.chips.items() if st.status == VERIFIED} == verified
    assert {c for c, st in bounded.chips.items() if st.status == UNRECOVERABLE} == given_up
    assert bounded.planned_epochs < 0.7 * full.planned_epochs
    for c in given_up:
        st = bounded.chips[c]
        assert st.history[-1]["protect"] and st.reason
        if st.history[-1]["total_epochs"] < 16:
            assert "predicted to miss" in st.reason
        # protection climbs from the first rung, warm, instead of starting at the top
        first_protected = next(h for h in st.history if h["protect"])
        assert first_protected["total_epochs"] == 1
    with pytest.raises(ValueError, match="climb"):
        plan_fleet(fleet, screening, ladder, constraint, climb="sometimes")


def test_training_collapsed_sees_a_climb_that_fell_not_a_new_one() -> None:
    from planner.plan import ChipState

    def chip(*tries: tuple[int, bool, float]) -> ChipState:
        st = ChipState("c", "verified", 0.5, 0.01)
        st.history = [{"total_epochs": t, "protect": p, "accuracy": a, "size": 1} for t, p, a in tries]
        return st

    # 1704's L001-W04-X00Y05: 0.852 at 2 quarter passes, 0.466 at 6
    assert training_collapsed(chip((1, False, 0.804), (2, False, 0.852), (3, False, 0.778), (6, False, 0.466)))
    assert not training_collapsed(chip((1, False, 0.804), (2, False, 0.852), (3, False, 0.778)))  # noise
    # a protected climb starting lower is a new climb, not a collapse
    assert not training_collapsed(chip((32, False, 0.95), (1, True, 0.5), (2, True, 0.7)))
    # FAP+T's 1704 L001-W04-X09Y06 stayed low from its first try: never converged, never fell
    assert not training_collapsed(chip((1, False, 0.124), (2, False, 0.118), (4, False, 0.112)))
    assert training_collapsed(chip((1, False, 0.9), (2, False, 0.75)), drop=0.1)
    with pytest.raises(ValueError, match="drop"):
        training_collapsed(chip(), drop=0)
