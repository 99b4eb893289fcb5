"""A dozen chips through the whole in-process loop (workers/pipeline + accelerator): slow."""

from __future__ import annotations

import pytest

from accelerator.faults import ArrayConfig
from planner import AccuracyConstraint, FleetSpec, generate_fleet
from planner.plan import NEEDS_NOTHING, UNRECOVERABLE, VERIFIED

pytestmark = pytest.mark.slow


def test_small_fleet_every_chip_verified_or_justly_unrecoverable() -> None:
    torch = pytest.importorskip("torch")
    from workers import pipeline as pl

    torch.set_num_threads(2)
    array = ArrayConfig(8, 8)
    cfg = pl.TrainConfig(lr=0.01, batch_size=64, seed=0)
    model, full = pl.train_base_model("lenet5", "digits", epochs=8, seed=0)
    data = full.subset(n_train=384, n_test=360)  # retraining on a subset keeps the test quick
    baseline = pl.baseline_accuracy(model, array, data)
    assert baseline > 0.85
    constraint = AccuracyConstraint.relative(0.02)
    thr = constraint.threshold(baseline)
    severity = pl.measure_severity(model, array, data, baseline, rate=0.05, samples=1, seed=0)
    rmap = pl.build_resilience_map(model, array, data, [0.03, 0.12], [0, 1, 2], 1, cfg, baseline=baseline, seed=0)
    fleet = generate_fleet(12, 3, FleetSpec(array=array, defects_per_die=1.0, dies_across=4))
    screening = pl.screen_chips(model, array, data, fleet)
    run = pl.run_fleet(model, array, data, fleet, screening, rmap, constraint, cfg, severity=severity, max_group_size=4)
    plan = run.plan

    assert plan.done and len(plan.chips) == 12
    assert plan.predicted_epochs <= plan.per_chip_fat_epochs
    assert run.retraining_epochs == plan.planned_epochs
    assert plan.chips_failing_screening > 0
    by_id = {g.group_id: g for g in plan.groups}
    for cid, st in plan.chips.items():
        assert st.status in (NEEDS_NOTHING, VERIFIED, UNRECOVERABLE)
        if st.status == NEEDS_NOTHING:
            assert screening[cid] >= thr
        elif st.status == VERIFIED:
            assert st.accuracy is not None and st.accuracy >= thr
            assert st.history[-1]["accuracy"] == st.accuracy and st.group_id in by_id
        else:  # only after alone + largest amount + most sensitive layer protected, and still missing
            last = st.history[-1]
            assert last["size"] == 1 and last["protect"] and last["amount"] == rmap.largest_amount
            assert all(h["accuracy"] < thr for h in st.history)
            assert st.reason and cid in run.protection

    # verification is reproducible: retrain a first-round group that verified a chip (the largest such,
    # trained from the base model) and verify it again as the loop did, on the fused map's deployment
    first_round_verified = {
        st.group_id for st in plan.chips.values() if st.status == VERIFIED and by_id[str(st.group_id)].warm_from is None
    }
    assert first_round_verified, "no chip verified in a first-round group: the check below would check nothing"
    g = max((by_id[str(k)] for k in first_round_verified), key=lambda grp: (len(grp.members), grp.group_id))
    protect = (run.protection[g.members[0]]["layer"],) if g.protect else ()
    again = pl.retrain_group(model, array, data, g, plan.maps, rmap.epochs, cfg, protect=protect)
    accs = pl.verify_group(again, array, data, g.members, plan.maps, protect=protect, fused=g.fused)
    recorded = {c: next(h["accuracy"] for h in plan.chips[c].history if h["group_id"] == g.group_id) for c in g.members}
    assert accs == pytest.approx(recorded)
    assert any(plan.chips[c].status == VERIFIED and accs[c] >= thr for c in g.members)

    # the same fleet, chips deployed with PEs bypassed where that screens better
    from accelerator.faults import bypass_faulty_pes

    failing = [m for m in fleet if screening[str(m.chip_id)] < thr]
    by_bypass = pl.screen_bypassed(model, array, data, failing)
    run_b = pl.run_fleet(
        model, array, data, fleet, screening, rmap, constraint, cfg, severity=severity, bypass_screening=by_bypass
    )
    plan_b = run_b.plan
    assert plan_b.done and plan_b.chips_failing_screening <= plan.chips_failing_screening
    own = {str(m.chip_id): m for m in fleet}
    for cid, st in plan_b.chips.items():
        assert st.status in (NEEDS_NOTHING, VERIFIED, UNRECOVERABLE)
        if st.bypass is None:
            assert plan_b.maps[cid] == own[cid] and st.screening == screening[cid]
        else:  # deployed on the best-screening policy's map, which beat its own map
            assert plan_b.maps[cid] == bypass_faulty_pes(own[cid], st.bypass)
            assert st.screening == max(by_bypass[cid].values()) > screening[cid]
        if st.status == VERIFIED:
            assert st.accuracy is not None and st.accuracy >= thr
