"""An adaptive eFAT resilience map: only the cells a fleet's retraining epochs depend on.

`build_adaptive_resilience_map` measures the same cells as `workers.pipeline.build_resilience_map`
(same grid, same sampled fault maps from the same seeds, same training in the same chunks,
so a cell measured by both has the same accuracy), but only these (`planner.adaptive`):

1. the 0-epoch column at every grid rate: inference only, no training;
2. the fleet's chips that need retraining placed on it exactly as `planner.plan_fleet`
   places them (bypass choice, placement mode);
3. rung by rung up the ladder, warm (each rung continues the last, so a sampled map
   trained to E epochs costs E), only the grid rates a still undecided chip reads
   (the one or two around its rate), and of those only the sampled maps that could still
   let such a chip meet the constraint at that rung (`planner.adaptive.MapClimb`); a chip
   is decided at the first rung where the map's conservative accuracy at its rate meets
   the constraint, or never (no epochs) past the top.

Cells not trained are NaN ("not measured") in the returned `ResilienceMap`, which
`ResilienceMap` treats as never meeting the constraint and skips in its running minimum
over rates. Hence each chip's epochs read off the adaptive map are the ones the full grid
gives, except where the full grid's running minimum at that chip's cells comes from a
rate the adaptive map did not train there (a lower rate measured worse than a higher one).
What it does not cover: rates only a fused group reaches. There the map answers "not
measured", so `plan_fleet` forms no group that would need such a rate (fewer, smaller
groups; never epochs the map did not measure).

Cost: `AdaptiveMap.cell_epochs` (also `resilience_map.training_epochs`) is what the ledger
should be charged as "resilience_map"; `cell_evaluations` passes over `data`'s test split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

import accelerator as acc
from accelerator.data import Dataset
from accelerator.faults import ArrayConfig, FaultMap
from planner import AccuracyConstraint, FaultMix, ResilienceMap, SiteSeverity
from planner.adaptive import MapClimb, placed_rates
from planner.plan import PLACEMENTS
from workers.pipeline import EpochProgress, TrainConfig, train_through


@dataclass(frozen=True)
class AdaptiveMap:
    """An adaptive map and what it cost.

    - `resilience_map`: rates x epochs, NaN where not measured; `training_epochs` is `cell_epochs`.
    - `cell_epochs`: epochs trained (sum over sampled maps of the epochs each reached).
    - `cell_evaluations`: cells evaluated, each one pass over the evaluation split.
    - `chip_epochs`: chip id -> retraining epochs the map gives each chip, before
      `plan_fleet` raises them to the map's smallest positive epochs; None: none (past the
      map, or no rung met).
    - `depth`: per grid rate, the largest epochs one of its sampled maps was trained to (0: none).
    - `trained`: per grid rate, per sampled map, the epochs it was trained (sums to `cell_epochs`).
    """

    resilience_map: ResilienceMap
    cell_epochs: int
    cell_evaluations: int
    chip_epochs: dict[str, int | None]
    depth: tuple[int, ...]
    trained: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "cell_epochs": self.cell_epochs,
            "cell_evaluations": self.cell_evaluations,
            "depth": list(self.depth),
            "trained": [list(t) for t in self.trained],
            "chip_epochs": dict(self.chip_epochs),
        }


def _check(
    model: Any,
    array: Any,
    data: Any,
    rates: Any,
    epochs: Any,
    samples: Any,
    cfg: Any,
    baseline: Any,
    seed: Any,
    constraint: Any,
    chips: Any,
    screening: Any,
    placement: Any,
    mix: Any,
) -> None:
    """Every argument checked before any work (scikit-learn style): TypeError for a wrong
    kind, ValueError for a wrong value."""
    for name, value, kind, what in (
        ("model", model, nn.Module, "a torch nn.Module"),
        ("array", array, ArrayConfig, "an ArrayConfig"),
        ("data", data, Dataset, "an accelerator Dataset"),
        ("cfg", cfg, TrainConfig, "a TrainConfig"),
        ("constraint", constraint, AccuracyConstraint, "an AccuracyConstraint"),
        ("screening", screening, Mapping, "a mapping chip id -> accuracy"),
        ("mix", mix, FaultMix | None, "a FaultMix or None"),
    ):
        if not isinstance(value, kind):
            raise TypeError(f"build_adaptive_resilience_map: {name} must be {what}, got {type(value).__name__}")
    for name, seq in (("rates", rates), ("epochs", epochs), ("chips", chips)):
        if isinstance(seq, str | bytes) or not isinstance(seq, Sequence):
            raise TypeError(f"build_adaptive_resilience_map: {name} must be a sequence, got {type(seq).__name__}")
    numbers = int | float | np.integer | np.floating
    if not rates or any(isinstance(r, bool) or not isinstance(r, numbers) for r in rates):
        raise ValueError(f"build_adaptive_resilience_map: rates must be numbers, at least one, got {rates!r}")
    if any(not math.isfinite(float(r)) or float(r) < 0 for r in rates) or len(set(map(float, rates))) != len(rates):
        raise ValueError(f"build_adaptive_resilience_map: rates must be distinct, finite and >= 0, got {rates!r}")
    if any(isinstance(e, bool) or not isinstance(e, int | np.integer) or e < 0 for e in epochs):
        raise ValueError(f"build_adaptive_resilience_map: epochs must be ints >= 0, got {epochs!r}")
    if not any(e > 0 for e in epochs):
        raise ValueError(f"build_adaptive_resilience_map: epochs needs a positive count, got {epochs!r}")
    for name, value, minimum in (("samples", samples, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
            raise ValueError(f"build_adaptive_resilience_map: {name} must be an int >= {minimum}, got {value!r}")
    if isinstance(baseline, bool) or not isinstance(baseline, numbers) or not 0.0 <= float(baseline) <= 1.0:
        raise ValueError(f"build_adaptive_resilience_map: baseline must be an accuracy in [0, 1], got {baseline!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"build_adaptive_resilience_map: placement {placement!r} is not one of {list(PLACEMENTS)}")
    for m in chips:
        if not isinstance(m, FaultMap):
            raise TypeError(f"build_adaptive_resilience_map: chips must be FaultMap objects, got {type(m).__name__}")
        if m.array != array:
            raise ValueError(f"build_adaptive_resilience_map: chip {m.chip_id!r} has array {m.array}, expected {array}")
        if m.chip_id not in screening:
            raise ValueError(f"build_adaptive_resilience_map: no screening accuracy for chip {m.chip_id!r}")


def build_adaptive_resilience_map(
    model: nn.Module,
    array: ArrayConfig,
    data: Dataset,
    rates: Sequence[float],
    epochs: Sequence[int],
    samples: int,
    cfg: TrainConfig,
    *,
    baseline: float,
    seed: int,
    constraint: AccuracyConstraint,
    chips: Sequence[FaultMap],
    screening: Mapping[str, float],
    bypass_screening: Mapping[str, Mapping[str, float]] | None = None,
    placement: str = "screening",
    severity: SiteSeverity | None = None,
    served_by: Mapping[str, str] | None = None,
    mix: FaultMix | None = None,
    max_undecided: float = 0.0,
    meta: dict[str, Any] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    checkpoint_dir: Path | None = None,
    on_epoch: EpochProgress | None = None,
) -> AdaptiveMap:
    """The resilience map of `model` on `array`, measured only where `chips`' retraining epochs depend on it.

    Grid and training as `workers.pipeline.build_resilience_map(model, array, data, rates,
    epochs, samples, cfg, baseline=, seed=, mix=)`: `rates` faulty-PE fractions (sorted
    here), `epochs` the ladder (0 added), `samples` sampled fault maps a rate,
    accuracies (fractions) on `data`'s test split (the fleet loop passes its validation split).

    The fleet: `chips` (every chip's own fault map, distinct `chip_id`s, on `array`),
    `screening` (chip id -> accuracy of `model` there), `bypass_screening`, `placement`,
    `severity`, `served_by`: exactly what will be passed to `planner.plan_fleet` with the
    same `constraint`, whose threshold is taken against `baseline`. Chips that meet it need
    no cell. `on_progress(rung index, number of rungs)` after each rung.

    `max_undecided`: share of the chips to retrain whose epochs may be left undecided, the
    ones that would need the most epochs (`planner.adaptive.MapClimb`); the map gives them
    none. 0 (default): every chip's epochs as the full grid's; 0.05 trades the fleet's tail for
    the rungs only it needs (the issue's bar: the same epochs for >= 95% of the chips).

    `checkpoint_dir`: every sampled map's run checkpoints each epoch there, in one flat
    directory (`cell-<rate index>-<sample>-<first epoch>.pt`), and resumes from it, so a
    killed build retrains nothing it had finished (the climb replays its decisions, which
    are deterministic, re-evaluating cells). `on_epoch(epochs done, epochs of the run,
    metrics)` after every epoch any run trains (`train_through`'s `on_progress`).
    """
    args = (model, array, data, rates, epochs, samples, cfg, baseline, seed, constraint, chips, screening, placement)
    _check(*args, mix)
    tasks = ResilienceMap.cell_tasks(rates, epochs, samples, seed)
    grid = sorted({t.rate for t in tasks})
    climb = MapClimb(grid, tasks[0].epochs, samples, float(baseline), constraint, max_undecided=max_undecided)
    # one lazy training run per sampled map: each next() trains to the next rung, as measure_cell does
    runs: dict[tuple[int, int], tuple[FaultMap, Iterator[tuple[int, nn.Module]]]] = {}
    for t in tasks:
        fm = t.fault_map(array, mix)
        run = train_through(
            model,
            array,
            fm,
            data,
            t.epochs,
            cfg,
            checkpoint_dir=checkpoint_dir,
            checkpoint_name=f"cell-{t.rate_index}-{t.sample}",
            on_progress=on_epoch,
        )
        runs[(t.rate_index, t.sample)] = (fm, run)

    def measure(rung: int, row: int, sample: int) -> None:
        fm, run = runs[(row, sample)]
        done, trained = next(run)
        while done < climb.epochs[rung]:  # catching up trains through the rungs skipped, unevaluated
            done, trained = next(run)
        climb.record(rung, row, sample, acc.evaluate(trained, array, fm, data, device=cfg.device))

    n_rungs = len(climb.epochs)
    for row in range(len(climb.rates)):
        for sample in range(samples):
            measure(0, row, sample)
    if on_progress is not None:
        on_progress(0, n_rungs)
    placed: dict[str, float] = {}
    if chips:
        placed = placed_rates(  # plan_fleet's own placement: it reads the 0-epoch column alone
            climb.resilience_map(),
            chips,
            screening,
            constraint,
            bypass_screening=bypass_screening,
            placement=placement,
            severity=severity,
            served_by=served_by,
        )
    climb.place(placed)
    for rung in range(1, n_rungs):
        while (nxt := climb.next_measurement(rung)) is not None:
            measure(rung, *nxt)
        if on_progress is not None:
            on_progress(rung, n_rungs)
    for _, run in runs.values():
        close = getattr(run, "close", None)
        if close is not None:
            close()  # frees the models the runs hold
    info = {"array": [array.rows, array.cols], "train": cfg.to_dict(), "seed": seed, "depth": list(climb.depth)}
    info["max_undecided"] = climb.max_undecided
    rmap = climb.resilience_map({**(meta or {}), **info})
    trained = tuple(tuple(climb.epochs[int(r)] for r in row) for row in climb.reached)
    return AdaptiveMap(rmap, climb.cell_epochs, climb.cell_evaluations, climb.chip_epochs(), climb.depth, trained)
