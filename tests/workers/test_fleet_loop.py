"""The fleet loop (workers/pipeline.run_fleet) on a small fleet: FAP+T's ladder, faultfleet's
groups, the robust base, the library for a later batch, and the cost ledger. Slow: it trains."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import accelerator as acc  # noqa: E402
from accelerator.faults import ArrayConfig, FaultMap  # noqa: E402
from planner import AccuracyConstraint, FleetSpec, generate_fleet  # noqa: E402
from planner.plan import NEEDS_NOTHING, UNRECOVERABLE, VERIFIED  # noqa: E402
from planner.replan import training_collapsed  # noqa: E402
from planner.synthetic_fleet import FaultMix  # noqa: E402
from workers import pipeline as pl  # noqa: E402

pytestmark = pytest.mark.slow

ARRAY = ArrayConfig(8, 8)
CONSTRAINT = AccuracyConstraint.relative(0.02)
LADDER = (0, 1, 2)  # a short ladder keeps the retraining small
SETTINGS = pl.FleetSettings(max_group_size=4, robust_base="off", ladder=LADDER)
HARSH = FaultMix(sites={"pe": 0.15, "weight": 0.3, "act": 0.25, "psum": 0.3}, psum_high_bias=0.5)


@pytest.fixture(scope="module")
def setup() -> tuple[Any, Any]:
    torch.set_num_threads(2)
    model, full = pl.train_base_model("lenet5", "digits", epochs=8, seed=0)
    return model, full.subset(n_train=256, n_test=360)  # retraining on a subset keeps the test quick


def fleet(n: int, seed: int, prefix: str = "") -> list[FaultMap]:
    maps = generate_fleet(n, seed, FleetSpec(array=ARRAY, defects_per_die=1.5, dies_across=4, mix=HARSH))
    return [dataclasses.replace(m, chip_id=f"{prefix}{m.chip_id}") for m in maps]


def emulation(data: Any) -> pl.Emulation:
    return pl.Emulation.of(ARRAY, data, pl.TrainConfig(lr=0.01, batch_size=64, seed=0))


def test_fap_t_climbs_the_ladder_alone_then_protects_then_gives_up(setup: tuple[Any, Any]) -> None:
    model, data = setup
    em = emulation(data)
    out = pl.run_fleet(em, model, fleet(12, 3), CONSTRAINT, pl.FleetSettings.fap_t(ladder=(0, 1, 2, 4)))
    plan, thr = out.plan, out.thresholds
    assert plan.done and len(plan.chips) == 12
    assert any(st.status != NEEDS_NOTHING for st in plan.chips.values()), "the fleet must need retraining"
    by_id = {g.group_id: g for g in plan.groups}
    assert all(len(g.members) == 1 for g in plan.groups)
    for cid, st in plan.chips.items():
        assert st.status in (NEEDS_NOTHING, VERIFIED, UNRECOVERABLE)
        assert st.test_accuracy is not None  # every chip verified on the test split
        if st.status == NEEDS_NOTHING:
            assert st.served_by == "base" and not st.history
            continue
        rungs = [(h["total_epochs"], h["protect"]) for h in st.history]
        # 1, then 2, then 4 epochs (warm: each continues the last), then the top rung protected
        expected = [(1, False), (2, False), (4, False), (4, True)][: len(rungs)]
        assert rungs == expected, (cid, rungs)
        assert all(h["accuracy"] < thr.decision for h in st.history[:-1])  # it stops at the first rung that meets
        warm = [by_id[g].warm_from for g in by_id if cid in by_id[g].members]
        assert warm[0] is None and all(w is not None for w in warm[1:3])  # the ladder continues its own model
        if st.status == VERIFIED:
            assert st.history[-1]["accuracy"] >= thr.decision
        else:
            assert rungs[-1] == (4, True) and st.history[-1]["accuracy"] < thr.decision and st.reason
    # every epoch trained is charged, and no map or robust base was
    assert out.ledger.epochs == {"groups": sum(g.epochs for g in plan.groups)}
    assert out.decisions["resilience_map"] == "ladder" and not out.decisions["robust_base"]["trained"]
    assert out.ledger.samples["screening"] > 0 and out.ledger.samples["verification"] > 0
    rec = out.record()
    assert rec["chips_meeting_constraint"] == sum(1 for st in plan.chips.values() if thr.met(st.test_accuracy))
    # the same count per kind of chip: served by the base model, or retrained (FAP+T has no robust base)
    by_kind = rec["chips_meeting_constraint_by_kind"]
    assert set(by_kind) <= {"base", "retrained"} and sum(n for _, n in by_kind.values()) == len(plan.chips)
    assert sum(m for m, _ in by_kind.values()) == rec["chips_meeting_constraint"]
    retrained = [st for st in plan.chips.values() if st.status != "needs_nothing"]
    assert by_kind.get("retrained", [0, 0]) == [sum(thr.met(st.test_accuracy) for st in retrained), len(retrained)]
    verified = [st for st in retrained if st.status == "verified"]
    assert verified  # the fleet exercises the margin
    margin = rec["verified_accuracy_margin"]
    expected = sum(st.accuracy for st in verified) / len(verified) - thr.decision
    assert margin["validation_over_threshold"] == pytest.approx(expected, abs=1e-4) and expected >= 0
    shift = sum(st.test_accuracy - st.accuracy for st in verified) / len(verified)
    assert margin["test_over_validation"] == pytest.approx(shift, abs=1e-4)
    assert rec["chips_training_collapsed"] == sum(training_collapsed(st) for st in plan.chips.values())


def test_faultfleet_groups_verify_on_the_group_deployment_and_reproduce(setup: tuple[Any, Any]) -> None:
    model, data = setup
    em = emulation(data)
    out = pl.run_fleet(
        em, model, fleet(12, 3), CONSTRAINT, pl.FleetSettings(max_group_size=4, robust_base="off", ladder=LADDER)
    )
    plan = out.plan
    verified = [c for c, st in plan.chips.items() if st.status == VERIFIED]
    assert verified, "the fleet must have a verified chip to check"
    assert any(len(g.members) > 1 for g in plan.groups), "faultfleet must group"
    by_id = {g.group_id: g for g in plan.groups}
    # the library holds the base and every group model that serves a verified member
    keys = {lm.key for lm in out.library}
    assert "base" in keys and {f"batch1:{plan.chips[c].group_id}" for c in verified} <= keys
    # a verified chip's accuracies reproduce: its group's model from the library, on the group's deployment
    cid = verified[0]
    g = by_id[str(plan.chips[cid].group_id)]
    lm = next(m for m in out.library if m.key == f"batch1:{g.group_id}")
    deployed = pl.group_deployment(plan.maps[cid], g.fused)
    assert acc.evaluate(lm.model, ARRAY, deployed, em.validation, protect=lm.protect) == pytest.approx(
        plan.chips[cid].accuracy
    )
    assert acc.evaluate(lm.model, ARRAY, deployed, em.test, protect=lm.protect) == pytest.approx(
        plan.chips[cid].test_accuracy
    )
    assert out.ledger.epochs["groups"] == plan.planned_epochs


def test_the_robust_base_never_takes_a_chip_the_base_served(setup: tuple[Any, Any]) -> None:
    model, data = setup
    maps = fleet(8, 5)
    em = emulation(data)
    thr = em.thresholds(model, CONSTRAINT)
    base_only = pl.screen_fleet(
        em, [pl.LibraryModel("base", model)], maps, thr.decision, bypass=True, group_base="base"
    )
    out = pl.run_fleet(
        emulation(data), model, maps, CONSTRAINT, pl.FleetSettings(robust_base="on", max_group_size=4, ladder=LADDER)
    )
    rb = out.decisions["robust_base"]
    assert rb["trained"] and out.ledger.epochs["robust_base"] == rb["epochs"]
    assert rb["epochs"] in pl.FleetSettings().robust_ladder
    if rb["served"]:  # the chips even the robust base fails are retrained alone
        assert out.decisions["group_size"] == 1 and all(len(g.members) == 1 for g in out.plan.groups)
    for cid, sc in base_only.items():
        st = out.plan.chips[cid]
        if sc.fit is not None:  # the base served it: it keeps the base, on the same deployment
            assert st.status == NEEDS_NOTHING and st.served_by == "base" and st.bypass == sc.fit.policy
        else:
            assert st.served_by != "base"


def test_the_library_serves_a_later_batch_only_with_models_that_meet_the_constraint(setup: tuple[Any, Any]) -> None:
    model, data = setup
    first = pl.run_fleet(emulation(data), model, fleet(8, 3), CONSTRAINT, SETTINGS)
    em = emulation(data)
    later = fleet(8, 4, prefix="late-")
    out = pl.run_fleet(em, model, later, CONSTRAINT, SETTINGS, library=first.library)
    thr = out.thresholds
    by_key = {lm.key: lm for lm in out.library}
    assert len(by_key) == len(out.library), "library keys must be unique across batches"
    assert any(k.startswith("batch1:") for k in by_key) and any(k.startswith("batch2:") for k in by_key)
    served = [c for c, st in out.plan.chips.items() if st.status == NEEDS_NOTHING]
    assert served
    own = {str(m.chip_id): m for m in later}
    for cid in served:
        st = out.plan.chips[cid]
        lm = by_key[str(st.served_by)]
        on_chip = acc.bypass_faulty_pes(own[cid], st.bypass) if st.bypass else own[cid]
        assert out.plan.maps[cid] == on_chip
        # measured again here, on the chip's own map with its bypass (and a group model's bypass)
        accuracy = acc.evaluate(lm.model, ARRAY, lm.deployed(on_chip), em.validation, protect=lm.protect)
        assert accuracy >= thr.decision - 1e-12
    # nothing of the first batch is charged again: no robust base, no map unless this batch decided one
    assert "robust_base" not in out.ledger.epochs or not first.decisions["robust_base"]["trained"]


def test_library_order_tries_bases_first_then_groups_that_share_faulty_pes() -> None:
    base = pl.LibraryModel("base", torch.nn.Identity())
    chip = FaultMap(ARRAY, (acc.Fault(1, 1, "pe"), acc.Fault(2, 3, "weight", 6, 1)), chip_id="c")
    near = pl.LibraryModel("g-near", torch.nn.Identity(), FaultMap(ARRAY, (acc.Fault(2, 3, "pe"),)))
    far = pl.LibraryModel("g-far", torch.nn.Identity(), FaultMap(ARRAY, (acc.Fault(7, 7, "pe"),)))
    both = pl.LibraryModel(
        "g-both", torch.nn.Identity(), FaultMap(ARRAY, (acc.Fault(1, 1, "pe"), acc.Fault(2, 3, "pe")))
    )
    order = [lm.key for lm in pl.library_order([base, near, far, both], chip, max_groups=2)]
    assert order == ["base", "g-both", "g-near"]
    assert [lm.key for lm in pl.library_order([base, near], chip, max_groups=0)] == ["base"]


def test_a_measured_map_is_charged_and_planned_on(setup: tuple[Any, Any]) -> None:
    model, data = setup
    settings = pl.FleetSettings(
        max_group_size=4,
        robust_base="off",
        resilience_map="on",
        map_cells="full",  # every cell: the full grid's charge
        ladder=(0, 1),
        map_rates=(0.05,),
        map_samples=1,
        severity_samples=1,
    )
    out = pl.run_fleet(emulation(data), model, fleet(6, 7), CONSTRAINT, settings)
    rmap = out.plan.resilience_map
    assert out.decisions["resilience_map"] == "measured" and not rmap.is_ladder
    assert rmap.rates == (0.05,) and rmap.epochs == (0, 1)
    # one sampled map retrained 1 epoch, evaluated after 0 and 1 epochs; severity evaluations too
    assert out.ledger.epochs["resilience_map"] == rmap.training_epochs == 1
    assert out.ledger.samples["resilience_map"] == 2 * len(emulation(data).validation.x_test)
    assert out.ledger.samples["severity"] > 0


def test_the_robust_base_climbs_its_ladder_only_while_a_rung_pays(setup: tuple[Any, Any]) -> None:
    from planner.economics import robust_rung_pays

    model, data = setup
    maps = fleet(16, 7)
    em = emulation(data)
    thr = em.thresholds(model, CONSTRAINT)
    screens = pl.screen_fleet(em, [pl.LibraryModel("base", model)], maps, thr.decision, bypass=True, group_base="base")
    failing = [m for m in maps if screens[str(m.chip_id)].fit is None]
    assert failing, "the fleet must have chips the base model fails"
    settings = pl.FleetSettings(robust_ladder=(1, 2, 3), robust_lr=0.01)
    before = em.ledger.epochs.get("robust_base", 0)
    rung, record = pl.grow_robust_base(
        em, model, maps, failing, thr, settings, pl._robust_trainer(em, settings), lambda _m: None
    )
    rungs = record["rungs"]
    # every rung trained is charged, and training stopped at the first rung that did not pay
    assert em.ledger.epochs["robust_base"] - before == record["epochs"] == rungs[-1]["epochs"]
    served = [r["served"] for r in rungs]
    for k in range(len(rungs) - 1):
        gained = max(0, served[k] - (served[k - 1] if k else 0))
        assert robust_rung_pays(gained, len(failing) - served[k], 1, saved_per_chip=1)
    if len(rungs) < 3:
        k = len(rungs) - 1
        gained = max(0, served[k] - (served[k - 1] if k else 0))
        assert not robust_rung_pays(gained, len(failing) - served[k], 1, saved_per_chip=1)
    # the rung kept serves the most chips, and what it serves it serves on the validation split
    if rung is None:
        assert max(served) == 0
    else:
        assert rung.served == max(served) and rung.epochs == record["kept_epochs"]
        for cid, sc in rung.screens.items():
            if sc.fit is not None:
                fm = next(m for m in failing if str(m.chip_id) == cid)
                deployed = dict(pl.deployments(fm))[sc.fit.policy]
                assert sc.fit.accuracy == pytest.approx(em.validate(rung.model, deployed, kind="check"))
                assert sc.fit.accuracy >= thr.decision - 1e-9
