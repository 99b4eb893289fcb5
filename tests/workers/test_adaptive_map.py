"""The adaptive resilience map (workers.adaptive_map) against the full grid on a small harsh
fleet: the same retraining epochs for the chips that need retraining, for a third of the cell epochs,
and every epoch it trains charged."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import accelerator as acc  # noqa: E402
from accelerator.faults import ArrayConfig, FaultMap  # noqa: E402
from planner import AccuracyConstraint, FleetSpec, ResilienceMap, SiteSeverity, generate_fleet, plan_fleet  # noqa: E402
from planner.plan import PLANNED  # noqa: E402
from planner.synthetic_fleet import FaultMix  # noqa: E402
from workers import pipeline as pl  # noqa: E402
from workers.adaptive_map import build_adaptive_resilience_map  # noqa: E402

ARRAY = ArrayConfig(8, 8)
CONSTRAINT = AccuracyConstraint.relative(0.02)
HARSH = FaultMix(sites={"pe": 0.15, "weight": 0.3, "act": 0.25, "psum": 0.3}, psum_high_bias=0.5)
RATES = (0.02, 0.04, 0.08, 0.16, 0.32)  # faulty-PE fractions of an 8x8 array: 1 to 20 PEs
LADDER = (0, 1, 2, 4, 8)  # FleetSettings' default ladder
SAMPLES = 2  # FleetSettings' default map_samples


@pytest.fixture(scope="module")
def setup() -> tuple[Any, Any]:
    torch.set_num_threads(1)
    model, full = pl.train_base_model("lenet5", "digits", epochs=8, seed=0)
    return model, full.subset(n_train=256, n_test=360)  # as tests/workers/test_fleet_loop.py


def fleet(n: int, seed: int) -> list[FaultMap]:
    return generate_fleet(n, seed, FleetSpec(array=ARRAY, defects_per_die=1.5, dies_across=4, mix=HARSH))


@dataclasses.dataclass(frozen=True)
class Screened:
    """A harsh 40-chip fleet screened with the base model and every bypass policy, as the fleet
    loop screens it before planning (shared by the tests: each forks `em` for its own ledger)."""

    model: Any
    em: pl.Emulation
    thr: pl.Thresholds
    maps: list[FaultMap]
    screens: dict[str, pl.Screen]


@pytest.fixture(scope="module")
def screened(setup: tuple[Any, Any]) -> Screened:
    model, data = setup
    em = pl.Emulation.of(ARRAY, data, pl.TrainConfig(lr=0.01, batch_size=64, seed=0))
    thr = em.thresholds(model, CONSTRAINT)
    maps = fleet(40, 3)
    screens = pl.screen_fleet(em, [pl.LibraryModel("base", model)], maps, thr.decision, bypass=True, group_base="base")
    return Screened(model, em, thr, maps, screens)


@pytest.mark.slow
def test_the_adaptive_map_agrees_with_the_full_grid_on_epochs(
    screened: Screened, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model, em, thr, maps = screened.model, screened.em.fork(), screened.thr, screened.maps
    # the fleet loop's inputs to plan_fleet: screened with the base model, every bypass policy
    screening, bypass_screening, served_by = pl.plan_inputs(screened.screens)

    # every epoch either map trains and every evaluation, counted where the work happens
    trained: list[int] = []
    evaluated: list[int] = []
    train, evaluate = acc.fault_aware_train, acc.evaluate

    def counting_train(*args: Any, **kwargs: Any) -> Any:
        trained.append(int(args[4]))
        return train(*args, **kwargs)

    def counting_evaluate(*args: Any, **kwargs: Any) -> Any:
        evaluated.append(1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(acc, "fault_aware_train", counting_train)
    monkeypatch.setattr(acc, "evaluate", counting_evaluate)
    base = thr.baseline_validation
    full = pl.build_resilience_map(model, ARRAY, em.validation, RATES, LADDER, SAMPLES, em.cfg, baseline=base, seed=0)
    assert sum(trained) == full.training_epochs == len(RATES) * SAMPLES * max(LADDER)
    kwargs: dict[str, Any] = dict(bypass_screening=bypass_screening, served_by=served_by, max_group_size=4)
    by_full = plan_fleet(maps, screening, full, CONSTRAINT, **kwargs)
    need = [c for c, st in by_full.chips.items() if st.status == PLANNED]
    full_epochs = {c: by_full.chips[c].epochs for c in need}
    assert len(need) >= 10 and len(set(full_epochs.values())) >= 3, full_epochs  # several rungs, and none

    figures = []
    for max_undecided in (0.0, 0.05):
        trained[:], evaluated[:] = [], []
        adaptive = build_adaptive_resilience_map(
            model,
            ARRAY,
            em.validation,
            RATES,
            LADDER,
            SAMPLES,
            em.cfg,
            baseline=base,
            seed=0,
            constraint=CONSTRAINT,
            chips=maps,
            screening=screening,
            bypass_screening=bypass_screening,
            served_by=served_by,
            max_undecided=max_undecided,
        )
        rmap = adaptive.resilience_map

        # (c) the cost is exact: what was trained, and what the ledger will be charged
        assert sum(trained) == adaptive.cell_epochs == rmap.training_epochs == sum(map(sum, adaptive.trained))
        assert len(evaluated) == adaptive.cell_evaluations >= int(rmap.measured.sum()) * SAMPLES
        # (a) at least 3x fewer cell epochs than the full grid
        assert adaptive.cell_epochs * 3 <= full.training_epochs

        # the cells it measured are the full grid's (same sampled maps, same training chunks)
        seen = rmap.measured
        assert seen[:, 0].all() and not seen.all()
        np.testing.assert_allclose(rmap.worst[seen], full.worst[seen], atol=1e-12)
        np.testing.assert_allclose(rmap.mean[seen], full.mean[seen], atol=1e-12)
        assert ResilienceMap.from_json(rmap.to_json()) == rmap  # the service stores it as JSON

        # (b) plan_fleet gives the same epochs to >= 95% of the chips that need retraining
        by_adaptive = plan_fleet(maps, screening, rmap, CONSTRAINT, **kwargs)
        assert need == [c for c, st in by_adaptive.chips.items() if st.status == PLANNED]
        same = [c for c in need if by_adaptive.chips[c].epochs == full_epochs[c]]
        share = len(same) / len(need)
        assert share >= 0.95 and (max_undecided > 0 or share == 1.0)
        # the epochs the builder reports are the ones plan_fleet reads off its map
        low = rmap.smallest_positive_epochs
        assert {c: None if a is None else max(a, low) for c, a in adaptive.chip_epochs.items()} == {
            c: by_adaptive.chips[c].epochs for c in need
        }
        figures.append(
            f"max_undecided {max_undecided}: {adaptive.cell_epochs} cell epochs "
            f"({full.training_epochs / max(1, adaptive.cell_epochs):.2f}x fewer), trained {adaptive.trained}, "
            f"same epochs for {len(same)}/{len(need)} chips needing retraining ({share:.0%}), "
            f"plan epochs {by_adaptive.planned_epochs} (full grid's plan: {by_full.planned_epochs})"
        )
    with capsys.disabled():
        print(f"\nadaptive map against the full grid's {full.training_epochs} cell epochs:\n  " + "\n  ".join(figures))


def test_arguments_are_checked_before_any_work() -> None:
    data = acc.load_dataset("digits", seed=0).subset(n_train=8, n_test=8)
    model = acc.build_model("lenet5", data.input_shape, data.num_classes, seed=0)
    maps = fleet(3, 1)
    good: dict[str, Any] = dict(
        baseline=0.9, seed=0, constraint=CONSTRAINT, chips=maps, screening={str(m.chip_id): 0.5 for m in maps}
    )
    names = ("model", "array", "data", "rates", "epochs", "samples", "cfg")
    for bad, kind in [
        (dict(samples=0), ValueError),
        (dict(rates=()), ValueError),
        (dict(rates=(0.02, 0.02)), ValueError),
        (dict(rates=(-0.1, 0.2)), ValueError),
        (dict(epochs=(0,)), ValueError),
        (dict(epochs=(0, 1.5)), ValueError),
        (dict(baseline=1.5), ValueError),
        (dict(placement="nowhere"), ValueError),
        (dict(screening={}), ValueError),
        (dict(constraint=0.02), TypeError),
        (dict(chips=["not a map"]), TypeError),
        (dict(chips=[dataclasses.replace(maps[0], array=ArrayConfig(4, 4))]), ValueError),
        (dict(model="lenet5"), TypeError),
        (dict(cfg={"lr": 0.01}), TypeError),
    ]:
        args: list[Any] = [model, ARRAY, data, RATES, LADDER, SAMPLES, pl.TrainConfig()]
        for k in [k for k in bad if k in names]:
            args[names.index(k)] = bad.pop(k)
        with pytest.raises(kind):
            build_adaptive_resilience_map(*args, **{**good, **bad})


@pytest.mark.slow
def test_plan_batch_measures_the_adaptive_map_for_fewer_cell_epochs_and_the_same_chip_epochs(
    screened: Screened, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fleet loop's map step: `plan_batch` with a measured map, adaptive cells against the
    full grid, on the same screening (one fork of the emulation each, so each ledger holds
    only its own map)."""
    model, em, thr, maps, screens = screened.model, screened.em, screened.thr, screened.maps, screened.screens
    batches, ledgers = {}, {}
    for cells in ("full", "adaptive"):
        settings = pl.FleetSettings(
            max_group_size=4,
            robust_base="off",
            resilience_map="on",
            map_cells=cells,
            ladder=LADDER,
            map_rates=RATES,
            map_samples=SAMPLES,
            severity_samples=1,
        )
        fork = em.fork()
        batches[cells] = pl.plan_batch(fork, model, maps, CONSTRAINT, settings, thresholds=thr, screens=screens)
        ledgers[cells] = fork.ledger
    full, adaptive = batches["full"].plan, batches["adaptive"].plan
    assert full.resilience_map.measured.all() and not adaptive.resilience_map.measured.all()
    decided = batches["adaptive"].decisions["map_cells"]
    assert decided["asked"] == "adaptive" and decided["measured_cells"] < decided["cells"]

    # charged exactly what each map trained, in passes, and what it evaluated
    full_epochs = len(RATES) * SAMPLES * max(LADDER)
    assert ledgers["full"].epochs["resilience_map"] == full.resilience_map.training_epochs == full_epochs
    cell_epochs = adaptive.resilience_map.training_epochs
    assert ledgers["adaptive"].epochs["resilience_map"] == cell_epochs
    assert 0 < cell_epochs * 3 <= full_epochs  # the bar: at least 3x fewer cell epochs
    measured_cells = int(adaptive.resilience_map.measured.sum()) * SAMPLES
    assert ledgers["adaptive"].samples["resilience_map"] >= measured_cells * len(em.validation.x_test)
    assert ledgers["adaptive"].samples["resilience_map"] < ledgers["full"].samples["resilience_map"]

    # the same chips to retrain, and the same epochs for >= 95% of them (all well-defined)
    need = [c for c, st in full.chips.items() if st.status == PLANNED]
    assert len(need) >= 10
    assert need == [c for c, st in adaptive.chips.items() if st.status == PLANNED]
    same = [c for c in need if adaptive.chips[c].epochs == full.chips[c].epochs]
    assert len(same) >= 0.95 * len(need), {c: (full.chips[c].epochs, adaptive.chips[c].epochs) for c in need}
    for st in adaptive.chips.values():
        assert st.epochs is None or (isinstance(st.epochs, int) and st.epochs in LADDER)
    for g in adaptive.groups:  # every group's epochs are a rung the ladder has (none read off an unmeasured cell)
        assert g.epochs in LADDER
    with capsys.disabled():
        print(
            f"\nplan_batch, map cells adaptive against full: {cell_epochs} / {full_epochs} cell epochs, "
            f"same epochs for {len(same)}/{len(need)} chips needing retraining, "
            f"plan epochs {adaptive.planned_epochs} / {full.planned_epochs}, "
            f"groups {len(adaptive.groups)} / {len(full.groups)}"
        )


def test_fleet_settings_check_map_cells_on_entry() -> None:
    assert pl.FleetSettings().map_cells == "adaptive"  # the default
    assert pl.FleetSettings(map_cells="full").map_cells == "full"
    with pytest.raises(ValueError, match="map_cells: 'sparse' is not one of adaptive, full"):
        pl.FleetSettings(map_cells="sparse")
    for bad in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match="map_max_undecided"):
            pl.FleetSettings(map_max_undecided=bad)


@pytest.mark.slow
def test_a_checkpointed_adaptive_map_resumes_without_training_again(screened: Screened, tmp_path: Any) -> None:
    """What the service's map job relies on when a worker dies: every sampled map's run
    checkpoints each epoch in one directory, and a build started again over it trains
    nothing it had finished and climbs to the same map."""
    model, em, thr, maps, screens = screened.model, screened.em, screened.thr, screened.maps, screened.screens
    screening, bypass_screening, served_by = pl.plan_inputs(screens)
    failing = [m for m in maps if screens[str(m.chip_id)].fit is None]
    settings = pl.FleetSettings(ladder=(0, 1, 2), map_rates=RATES, map_samples=1, map_max_undecided=0.0)
    map_fleet = pl.MapFleet(CONSTRAINT, failing, screening, bypass_screening, served_by, "screening")
    built = []
    for _ in range(2):
        epochs: list[int] = []
        fork = em.fork()
        rmap = pl.measure_adaptive_map(
            fork,
            model,
            thr,
            settings,
            map_fleet,
            SiteSeverity.uniform(),
            checkpoint_dir=tmp_path,
            on_epoch=lambda done, total, metrics, epochs=epochs: epochs.append(done),
        )
        built.append((rmap, len(epochs), fork.ledger.epochs["resilience_map"]))
    (first, trained_first, charged_first), (again, trained_again, charged_again) = built
    assert 0 < trained_first == first.training_epochs == charged_first
    assert trained_again == 0  # every run reloaded its finished chunks
    assert charged_again == again.training_epochs == first.training_epochs  # the map's cost, as measured
    np.testing.assert_array_equal(again.worst, first.worst)  # NaN where the first left cells unmeasured
    assert sorted(p.name for p in tmp_path.iterdir())[0].startswith("cell-")
