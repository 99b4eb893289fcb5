"""The fleet loop: glue between `accelerator` (torch) and `planner` (pure), run by the
bench in one process and by the service job by job (no Celery here).

`run_fleet` serves one batch of chips:

1. screening against the model library (`screen_fleet`): the base model first, then the
   fault-robust base, then the group models nearest the chip's faults, each on every
   deployment of the chip (its own map, each bypass policy) on the validation split,
   read only until the verdict is certain (`accelerator.bounded_accuracy`);
2. a fault-robust base model, where `planner.economics` predicts it pays
   (`train_robust_base`), and a measured resilience map, or the epochs ladder alone;
3. `planner.plan_fleet` over the chips no model serves, then rounds (`run_rounds`) of
   retraining every pending group and verifying every member (`retrain_and_verify`: the
   one per-group step), `planner.replan` on the validation accuracies, until every chip is
   verified or unrecoverable; verified group models join the library;
4. every chip verified on the test split, which no decision saw.

Everything it trains or evaluates is charged to a `Ledger`. `FleetSettings.fap_t()` runs
the strongest per-chip baseline (FAP+T) through the same loop. Accuracies are top-1
fractions in [0, 1]; retraining is counted in epochs.

Retraining for E epochs runs in chunks that end at the ladder's rungs
(`train_through`), exactly as a map cell is measured, so the epochs read off a map are
the procedure the group gets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

import accelerator as acc
from accelerator.data import Dataset
from accelerator.faults import ArrayConfig, FaultMap
from planner import (
    AccuracyConstraint,
    CellTask,
    FaultMix,
    Group,
    Plan,
    ResilienceMap,
    SiteSeverity,
    group_deployment,
    measure_site_severity,
    plan_fleet,
    replan,
)
from planner.constraint import meets
from planner.economics import resilience_map_pays, robust_base_pays, robust_rung_pays
from planner.plan import CLIMBS, NEEDS_NOTHING, UNRECOVERABLE, VERIFIED
from planner.replan import training_collapsed

Progress = Callable[[str], None]
EpochProgress = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainConfig:
    """Fault-aware retraining hyper-parameters (SGD, momentum 0.9 in `accelerator`), and
    the torch device retraining and evaluation run on (None: where the model is). The
    device is not a hyper-parameter: outputs on the array are the same integers on
    every device, so it stays out of `to_dict` (the cache keys)."""

    lr: float = 0.01
    batch_size: int = 64
    seed: int = 0
    device: str | None = None
    # the share of the train split one retraining epoch reads: E retraining
    # epochs (a group's, a map cell's) costs E * epoch_fraction passes, which the ledger counts
    epoch_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.epoch_fraction <= 1:
            raise ValueError(f"epoch_fraction: {self.epoch_fraction!r} must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"lr": self.lr, "batch_size": self.batch_size, "seed": self.seed}
        if self.epoch_fraction != 1.0:  # keys of whole-epoch runs stay what they were
            d["epoch_fraction"] = self.epoch_fraction
        return d

    def passes(self, epochs: float) -> float:
        """Full passes over the train split that `epochs` retraining epochs cost."""
        return epochs * self.epoch_fraction


# --- base model -----------------------------------------------------------------------


def train_base_model(
    arch: str, dataset: str | Dataset, *, epochs: int, lr: float = 0.05, batch_size: int = 64, seed: int = 0
) -> tuple[nn.Module, Dataset]:
    """A zoo model trained in float and calibrated (static activation scales) on `dataset`."""
    data = acc.load_dataset(dataset, seed=seed) if isinstance(dataset, str) else dataset
    model = acc.build_model(arch, data.input_shape, data.num_classes, seed=seed)
    acc.train(model, data, epochs, lr=lr, batch_size=batch_size, seed=seed)
    return model, data


def baseline_accuracy(model: nn.Module, array: ArrayConfig, data: Dataset, *, device: str | None = None) -> float:
    """Accuracy of the base model on a fault-free array (int8): the constraint's reference."""
    return acc.evaluate(model, array, None, data, device=device)


# --- retraining in grid-aligned chunks ---------------------------------------------------


@dataclass(frozen=True)
class OffsetSchedule:
    """A schedule seen from a later chunk: epoch e of the chunk is epoch e + offset of the whole run."""

    schedule: Callable[[int, int], FaultMap]
    offset: int

    def __call__(self, epoch: int, step: int) -> FaultMap:
        return self.schedule(epoch + self.offset, step)


def chunk_boundaries(epochs: int, grid: Sequence[int]) -> list[int]:
    """Epoch counts at which a run of `epochs` epochs is cut: the grid's epochs below it, then it."""
    return sorted({e for e in grid if 0 < e < epochs} | ({epochs} if epochs > 0 else set()))


def train_through(
    model: nn.Module,
    array: ArrayConfig,
    faults: FaultMap | Callable[[int, int], FaultMap],
    data: Dataset,
    epochs: Sequence[int],
    cfg: TrainConfig,
    *,
    protect: Sequence[str] = (),
    checkpoint_dir: Path | None = None,
    checkpoint_name: str = "chunk",
    on_progress: EpochProgress | None = None,
    start: int = 0,
) -> Iterator[tuple[int, nn.Module]]:
    """Fault-aware retraining that yields (epochs done, model) at each count in `epochs` (`start` = `model` itself).

    `start`: epochs `model` has already seen (a continued run: epoch numbers, schedule and
    seeds go on from there). `checkpoint_dir`: each chunk checkpoints every epoch to
    `<checkpoint_name>-<first epoch>.pt` there (flat: several runs may share one directory)
    and resumes from it, so a killed run restarts at its last finished epoch (finished
    chunks reload at once). `on_progress(epochs done,
    total epochs, metrics)` after every epoch.
    """
    current, done = model, start
    total = max(epochs, default=start)
    for a in sorted(set(epochs)):
        if a < start:
            continue
        if a > done:
            sched: FaultMap | Callable[[int, int], FaultMap] = (
                faults if isinstance(faults, FaultMap) else OffsetSchedule(faults, done)
            )
            offset = done

            def report(e: int, _n: int, metrics: dict[str, float], offset: int = offset) -> None:
                if on_progress is not None:
                    on_progress(offset + e, total, metrics)

            current = acc.fault_aware_train(
                current,
                array,
                sched,
                data,
                a - done,
                lr=cfg.lr,
                batch_size=cfg.batch_size,
                seed=cfg.seed + done,
                protect=tuple(protect),
                checkpoint=None if checkpoint_dir is None else checkpoint_dir / f"{checkpoint_name}-{done:04d}.pt",
                on_progress=report,
                device=cfg.device,
                epoch_fraction=cfg.epoch_fraction,
            )
            done = a
        yield a, current


def checkpointed_epochs(checkpoint_dir: Path) -> int:
    """Epochs a `train_through(..., checkpoint_dir=...)` run had finished when it stopped (0: none)."""
    import torch

    chunks = sorted(checkpoint_dir.glob("chunk-*.pt"))
    if not chunks:
        return 0
    last = chunks[-1]
    state = torch.load(last, map_location="cpu", weights_only=False)
    return int(last.stem.split("-")[1]) + int(state["epoch"])


# --- resilience map and severity ---------------------------------------------------------


def measure_cell(
    model: nn.Module, array: ArrayConfig, data: Dataset, task: CellTask, cfg: TrainConfig, mix: FaultMix | None = None
) -> list[float]:
    """Accuracy after each count of `task.epochs` on the task's sampled fault map (one training run)."""
    fm = task.fault_map(array, mix)
    runs = train_through(model, array, fm, data, task.epochs, cfg)
    return [acc.evaluate(m, array, fm, data, device=cfg.device) for _, m in runs]


def build_resilience_map(
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
    mix: FaultMix | None = None,
    meta: dict[str, Any] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ResilienceMap:
    """The map measured in this process (the service fans the same `measure_cell` out instead)."""
    return ResilienceMap.build(
        rates,
        epochs,
        samples,
        lambda t: measure_cell(model, array, data, t, cfg, mix),
        baseline=baseline,
        seed=seed,
        meta={**(meta or {}), "array": [array.rows, array.cols], "train": cfg.to_dict()},
        on_progress=on_progress,
    )


def measure_severity(
    model: nn.Module,
    array: ArrayConfig,
    data: Dataset,
    baseline: float,
    *,
    rate: float,
    samples: int,
    seed: int,
    mix: FaultMix | None = None,
    device: str | None = None,
) -> SiteSeverity:
    """Per fault-class severity of the base model (inference only), see `planner.severity`."""

    def accuracy(fm: FaultMap) -> float:
        return acc.evaluate(model, array, fm, data, device=device)

    return measure_site_severity(array, accuracy, baseline, rate=rate, samples=samples, seed=seed, mix=mix)


# --- cost ------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Everything a fleet run consumes, by kind of work.

    Training is counted in epochs over the train split (a resilience-map cell of E epochs
    costs E, a group retrained E epochs costs E); evaluation in samples, reported as
    passes over the test split (`test_size` samples), so a screening that stopped early
    counts the fraction it read.
    """

    test_size: int
    epochs: dict[str, float] = field(default_factory=dict)  # full passes over the train split
    samples: dict[str, int] = field(default_factory=dict)

    def train(self, kind: str, epochs: float) -> None:
        self.epochs[kind] = self.epochs.get(kind, 0) + float(epochs)

    def evaluate(self, kind: str, samples: int) -> None:
        self.samples[kind] = self.samples.get(kind, 0) + int(samples)

    def add(self, other: Ledger) -> None:
        """Charge `other`'s costs here too (work shared by two strategies counts for each)."""
        for k, v in other.epochs.items():
            self.train(k, v)
        for k, n in other.samples.items():
            self.evaluate(k, n)

    @property
    def training_epochs_total(self) -> float:
        return sum(self.epochs.values())

    @property
    def evaluation_passes(self) -> float:
        return sum(self.samples.values()) / max(self.test_size, 1)

    def state(self) -> dict[str, Any]:
        """The raw counts (`from_state` reads them back): what a service job stores."""
        return {"test_size": self.test_size, "epochs": dict(self.epochs), "samples": dict(self.samples)}

    @classmethod
    def from_state(cls, d: Mapping[str, Any]) -> Ledger:
        return cls(int(d["test_size"]), dict(d.get("epochs", {})), dict(d.get("samples", {})))

    def to_dict(self) -> dict[str, Any]:
        return {
            "training_epochs_total": round(self.training_epochs_total, 3),
            "evaluation_passes": round(self.evaluation_passes, 2),
            "training_epochs": {k: round(v, 3) for k, v in sorted(self.epochs.items())},
            "evaluation_passes_by_kind": {
                k: round(n / max(self.test_size, 1), 2) for k, n in sorted(self.samples.items())
            },
        }


@dataclass
class Emulation:
    """The emulated accelerator a fleet runs on: its array, the data cut into a validation
    split (every decision) and a test split (verification only, `Dataset.validation_test`),
    the retraining settings, and the ledger every evaluation and epoch is charged to."""

    array: ArrayConfig
    validation: Dataset
    test: Dataset
    cfg: TrainConfig
    ledger: Ledger

    @classmethod
    def of(cls, array: ArrayConfig, data: Dataset, cfg: TrainConfig, validation_fraction: float = 0.5) -> Emulation:
        validation, test = data.validation_test(validation_fraction)
        return cls(array, validation, test, cfg, Ledger(len(test.x_test)))

    def fork(self, cfg: TrainConfig | None = None) -> Emulation:
        """The same emulation with a ledger of its own (a strategy run beside another), and
        `cfg` instead of this one's retraining settings where given."""
        return Emulation(self.array, self.validation, self.test, cfg or self.cfg, Ledger(self.ledger.test_size))

    @property
    def train_data(self) -> Dataset:
        return self.validation  # both splits carry the same train split

    def verify(self, model: nn.Module, fm: FaultMap | None, *, protect: Sequence[str] = (), kind: str) -> float:
        """Accuracy on the test split (verification: no decision may use it)."""
        self.ledger.evaluate(kind, len(self.test.x_test))
        return float(acc.evaluate(model, self.array, fm, self.test, protect=tuple(protect), device=self.cfg.device))

    def validate(self, model: nn.Module, fm: FaultMap | None, *, protect: Sequence[str] = (), kind: str) -> float:
        """Accuracy on the validation split (what decisions use)."""
        self.ledger.evaluate(kind, len(self.validation.x_test))
        return float(
            acc.evaluate(model, self.array, fm, self.validation, protect=tuple(protect), device=self.cfg.device)
        )

    def screen(
        self, model: nn.Module, fm: FaultMap | None, floor: float, *, protect: Sequence[str] = (), kind: str
    ) -> float:
        """Validation accuracy, read only until it is certain to end below `floor`
        (`accelerator.bounded_accuracy`): exact at or above `floor`, an estimate below it."""
        accuracy, seen = acc.bounded_accuracy(
            model, self.array, fm, self.validation, floor, protect=tuple(protect), device=self.cfg.device
        )
        self.ledger.evaluate(kind, seen)
        return float(accuracy)

    def thresholds(self, base: nn.Module, constraint: AccuracyConstraint) -> Thresholds:
        """The constraint on each split, from the base model's fault-free accuracy there."""
        val = self.validate(base, None, kind="baseline")
        test = self.verify(base, None, kind="baseline")
        return Thresholds(val, test, constraint.threshold(val), constraint.threshold(test))


@dataclass(frozen=True)
class Thresholds:
    """Fault-free accuracies of the base model and the constraint's floor, per split."""

    baseline_validation: float
    baseline_test: float
    decision: float  # on the validation split
    verification: float  # on the test split

    def met(self, test_accuracy: float | None) -> bool:
        return test_accuracy is not None and meets(test_accuracy, self.verification)


# --- the model library -----------------------------------------------------------------


@dataclass
class LibraryModel:
    """A verified model of one base model on one accelerator that later chips may run:
    the base (`key` "base"), the fault-robust base ("robust"), or a group's model (its
    group id, with the group's `fused` map, whose dead PEs every chip running it bypasses,
    and its `protect`ed layers)."""

    key: str
    model: nn.Module
    fused: FaultMap | None = None
    protect: tuple[str, ...] = ()

    def deployed(self, fm: FaultMap) -> FaultMap:
        """The deployment of `fm` for this model, the map a chip runs it with: `fm` (a chip's
        map, its bypass policy already applied, see `deployments`) with a group model's fused
        dead PEs bypassed too (`group_deployment`); `fm` itself for a base model."""
        return fm if self.fused is None else group_deployment(fm, self.fused)


@dataclass(frozen=True)
class Fit:
    """How a library model serves a chip: the model, the bypass policy (None: its own map),
    and the validation accuracy there (which meets the decision threshold)."""

    key: str
    policy: str | None
    accuracy: float


@dataclass
class Screen:
    """One chip screened against the library: the first model that serves it (None: none
    does) with that model's validation accuracy on each deployment of the chip (`fit_scores`,
    policy None: its own map), and the group base model's (`base`, when it was tried).
    Accuracies are exact where they meet the threshold, estimates below it."""

    fit: Fit | None
    fit_scores: dict[str | None, float]
    base: dict[str | None, float]


def deployments(fm: FaultMap, bypass: bool = True) -> list[tuple[str | None, FaultMap]]:
    """The ways a chip can be deployed, mildest first: its own map (policy None), then each
    bypass policy that yields a map not listed yet (none without `bypass` or array support)."""
    options: list[tuple[str | None, FaultMap]] = [(None, fm)]
    if bypass and fm.array.bypass:
        for policy in acc.BYPASS_POLICIES:
            m = acc.bypass_faulty_pes(fm, policy)
            if all(m != seen for _, seen in options):
                options.append((policy, m))
    return options


def best_deployment(
    em: Emulation, lm: LibraryModel, fm: FaultMap, floor: float, *, bypass: bool, kind: str
) -> tuple[Fit | None, dict[str | None, float]]:
    """The deployment of `fm` on which `lm` scores best on validation, if it meets `floor`.

    Ties go to the chip's own map, then to the policy that bypasses fewer PEs (as
    `planner.plan_fleet` decides). Each deployment is read only until it is certain to
    end below the best so far (and below `floor`), so the choice is exact where it
    matters: (fit or None, accuracy per policy).
    """
    scores: dict[str | None, float] = {}
    best: tuple[float, int, int, str | None] | None = None
    for i, (policy, m) in enumerate(deployments(fm, bypass)):
        bar = floor if best is None else max(floor, best[0])
        a = em.screen(lm.model, lm.deployed(m), bar, protect=lm.protect, kind=kind)
        scores[policy] = a
        if meets(a, floor):
            rank = (a, -(len(acc.bypassed_pes(fm, policy)) if policy else 0), -i, policy)
            if best is None or rank[:3] > best[:3]:
                best = rank
    return (None if best is None else Fit(lm.key, best[3], best[0])), scores


def pe_set(fm: FaultMap) -> set[tuple[int, int]]:
    return {(f.row, f.col) for f in fm.faults}


def library_order(library: Sequence[LibraryModel], fm: FaultMap, max_groups: int) -> list[LibraryModel]:
    """The library models to try on a chip, most likely fit first: the base models, then
    the `max_groups` group models whose fused maps share most of the chip's faulty PEs
    (none that shares none: a group model was never trained against any of its faults)."""
    bases = [lm for lm in library if lm.fused is None]
    pes = pe_set(fm)
    scored = [(len(pes & pe_set(lm.fused)), i, lm) for i, lm in enumerate(library) if lm.fused is not None]
    near = sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], s[1]))[:max_groups]
    return bases + [lm for _, _, lm in near]


def screen_fleet(
    em: Emulation,
    library: Sequence[LibraryModel],
    maps: Sequence[FaultMap],
    floor: float,
    *,
    bypass: bool,
    group_base: str,
    max_groups: int = 3,
    on_progress: Progress | None = None,
) -> dict[str, Screen]:
    """Every chip against the library (`library_order`), until a model serves it.

    Cost goes to the ledger as "screening" (the first library model, the base) and
    "library" (every later one)."""
    out: dict[str, Screen] = {}
    for n, fm in enumerate(maps, start=1):
        screen = Screen(None, {}, {})
        for i, lm in enumerate(library_order(library, fm, max_groups)):
            kind = "screening" if i == 0 else "library"
            fit, scores = best_deployment(em, lm, fm, floor, bypass=bypass, kind=kind)
            if lm.key == group_base:
                screen.base = scores
            if fit is not None:
                screen.fit, screen.fit_scores = fit, scores
                break
        out[str(fm.chip_id)] = screen
        if on_progress is not None and (n % 100 == 0 or n == len(maps)):
            on_progress(f"screened {n}/{len(maps)} chips, {sum(1 for s in out.values() if s.fit)} served")
    return out


def plan_inputs(screens: Mapping[str, Screen]) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, str]]:
    """`planner.plan_fleet`'s screening, bypass screening and served-by from screens.

    A served chip is given the scores of the model that serves it (so the plan deploys it
    as the fit does and it needs nothing); a chip no model serves, the group base's scores.
    """
    screening: dict[str, float] = {}
    bypass: dict[str, dict[str, float]] = {}
    served: dict[str, str] = {}
    for cid, sc in screens.items():
        scores = sc.fit_scores if sc.fit is not None else sc.base
        if sc.fit is not None:
            served[cid] = sc.fit.key
        screening[cid] = scores.get(None, 0.0)
        bypass[cid] = {str(p): a for p, a in scores.items() if p is not None}
    return screening, bypass, served


# --- the fault-robust base model -------------------------------------------------------


def train_robust_base(
    em: Emulation,
    base: nn.Module,
    maps: Sequence[FaultMap],
    *,
    epochs: int,
    lr: float,
    policy: str = "shadowed",
    seed: int = 0,
    start: int = 0,
    checkpoint: Path | None = None,
    on_progress: EpochProgress | None = None,
) -> nn.Module:
    """`base` fault-aware trained `epochs` epochs on fault maps drawn per step from `maps`
    (the fleet's own), each deployed with `policy`'s bypass where the array supports it, so
    that what it learns is the prunings chips run with (random fault injection, Zahid et al.
    2020; random bit errors, Stutz et al. 2021). Charged to the ledger as "robust_base".

    `start`: epochs `base` has already had of this training (a continued run: the draws and
    seeds go on from there, so 3 epochs then 3 more draw what 6 at once would)."""
    if not maps:
        raise ValueError("train_robust_base: no fault maps to draw from")
    if start < 0 or epochs < 1:
        raise ValueError(f"train_robust_base: need start >= 0 and epochs >= 1 (got {start}, {epochs})")
    # in chip-id order, so that the draws do not depend on the order the chips were posted in
    ordered = sorted(maps, key=lambda m: str(m.chip_id))
    pool = [acc.bypass_faulty_pes(m, policy) if m.array.bypass else m for m in ordered]

    def draw(epoch: int, step: int) -> FaultMap:
        return pool[int(np.random.default_rng([seed, start + epoch, step]).integers(len(pool)))]

    model = acc.fault_aware_train(
        base,
        em.array,
        draw,
        em.train_data,
        epochs,
        lr=lr,
        batch_size=em.cfg.batch_size,
        seed=seed + start,
        checkpoint=checkpoint,
        on_progress=on_progress,
        device=em.cfg.device,
    )
    em.ledger.train("robust_base", epochs)
    return model


# --- retraining, verification, rounds --------------------------------------------------


def most_sensitive_layer(
    model: nn.Module, array: ArrayConfig, fault_map: FaultMap, data: Dataset, *, device: str | None = None
) -> str:
    """The layer whose faulty execution alone costs the most accuracy on `fault_map` (ties: first by name)."""
    sens: dict[str, float] = acc.layer_sensitivity(model, array, fault_map, data, device=device)
    return max(sorted(sens), key=lambda name: sens[name])


def retrain_group(
    model: nn.Module,
    array: ArrayConfig,
    data: Dataset,
    group: Group,
    maps: Mapping[str, FaultMap],
    grid: Sequence[int],
    cfg: TrainConfig,
    *,
    protect: Sequence[str] = (),
    checkpoint_dir: Path | None = None,
    on_progress: EpochProgress | None = None,
) -> nn.Module:
    """`model` retrained `group.epochs` epochs on the group's schedule over its members' maps
    (checkpointed every epoch and resumable when `checkpoint_dir` is given, see `train_through`).

    `model` is the group base model, or for a group that continues another (`group.warm_from`)
    that group's retrained model, which had seen `group.start_epoch` epochs.

    Weights on the fused map's dead (or bypassed) PEs are 0 before and after training: on
    a member chip where that PE works, a zero weight computes what the bypass computes, so
    the one model behaves on every member as it did on the fused map it was trained on
    (TRE-Map's union of pruning masks), instead of bringing back a weight it learned without.
    """
    steps = math.ceil(len(data.x_train) / cfg.batch_size)
    schedule = group.injection_schedule(maps, steps_per_epoch=steps)
    stops = [e for e in chunk_boundaries(group.total_epochs, grid) if e > group.start_epoch]
    runs = list(
        train_through(
            acc.prune_dead_pes(model, array, group.fused),
            array,
            schedule,
            data,
            stops,
            cfg,
            protect=protect,
            checkpoint_dir=checkpoint_dir,
            on_progress=on_progress,
            start=group.start_epoch,
        )
    )
    return acc.prune_dead_pes(runs[-1][1] if runs else model, array, group.fused)


@dataclass
class GroupResult:
    """A group retrained and verified: each member's validation accuracy (what `replan`
    decides on) and test accuracy (what it ships with), the protected layers and their
    latency penalty (`accelerator.tmr_penalty`), and the model."""

    validation: dict[str, float]
    test: dict[str, float]
    protect: tuple[str, ...]
    tmr_penalty: float
    model: nn.Module | None = None  # None where a service job stored it instead

    def to_dict(self) -> dict[str, Any]:
        """What a service job stores (all but the model)."""
        return {
            "validation": self.validation,
            "test": self.test,
            "protect": list(self.protect),
            "tmr_penalty": self.tmr_penalty,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GroupResult:
        return cls(
            {c: float(a) for c, a in d["validation"].items()},
            {c: float(a) for c, a in d["test"].items()},
            tuple(d.get("protect", ())),
            float(d.get("tmr_penalty", 0.0)),
        )


def protection(em: Emulation, group: Group, group_base: nn.Module) -> tuple[tuple[str, ...], float]:
    """The layers a group protects (the group base's most sensitive one on the fused map, when
    the plan asks) and their latency penalty (`accelerator.tmr_penalty`)."""
    if not group.protect:
        return (), 0.0
    layer = most_sensitive_layer(group_base, em.array, group.fused, em.validation, device=em.cfg.device)
    em.ledger.evaluate("sensitivity", len(em.validation.x_test) * len(acc.lowered_layers(group_base)))
    layer_cycles = acc.cycles(group_base, em.array, em.train_data.input_shape, batch=1)
    return (layer,), float(acc.tmr_penalty(layer_cycles, (layer,)))


def verify_members(
    em: Emulation,
    model: nn.Module,
    group: Group,
    maps: Mapping[str, FaultMap],
    protect: tuple[str, ...] = (),
    tmr_penalty: float = 0.0,
) -> GroupResult:
    """A group's retrained `model` on every member as deployed with the group's bypass and
    `protect`ed layers, on both splits (charged as "verification")."""
    validation, test = {}, {}
    for c in group.members:
        deployed = group_deployment(maps[c], group.fused)
        validation[c] = em.validate(model, deployed, protect=protect, kind="verification")
        test[c] = em.verify(model, deployed, protect=protect, kind="verification")
    return GroupResult(validation, test, protect, tmr_penalty, model)


def retrain_and_verify(
    em: Emulation,
    start: nn.Module,
    group: Group,
    maps: Mapping[str, FaultMap],
    grid: Sequence[int],
    *,
    group_base: nn.Module,
    checkpoint_dir: Path | None = None,
    on_progress: EpochProgress | None = None,
) -> GroupResult:
    """The per-group step of a round: `protection`, retrain from `start` (the group base, or
    the model of the group it continues), `verify_members`. Charged to the ledger: the
    group's epochs as "groups", its evaluations as "verification"."""
    protect, tmr = protection(em, group, group_base)
    model = retrain_group(
        start,
        em.array,
        em.train_data,
        group,
        maps,
        grid,
        em.cfg,
        protect=protect,
        checkpoint_dir=checkpoint_dir,
        on_progress=on_progress,
    )
    em.ledger.train("groups", em.cfg.passes(group.epochs))
    return verify_members(em, model, group, maps, protect, tmr)


def apply_round(plan: Plan, validation: Mapping[str, float], test: Mapping[str, float]) -> Plan:
    """`planner.replan` on the round's validation accuracies, and each member's test
    accuracy recorded beside them (reported, never decided on)."""
    new = replan(plan, validation)
    for c, a in test.items():
        new.chips[c].test_accuracy = float(a)
    return new


def run_rounds(
    plan: Plan,
    run_round: Callable[[Plan, list[Group]], dict[str, GroupResult]],
    *,
    max_rounds: int = 40,
    on_round: Callable[[Plan, dict[str, GroupResult]], None] | None = None,
) -> Plan:
    """The round loop: retrain and verify every pending group (`run_round`: group id ->
    result), then `apply_round`, until every chip is verified or unrecoverable."""
    rounds = 0
    while not plan.done and rounds < max_rounds:
        results = run_round(plan, plan.pending_groups)
        validation = {c: a for r in results.values() for c, a in r.validation.items()}
        test = {c: a for r in results.values() for c, a in r.test.items()}
        plan = apply_round(plan, validation, test)
        rounds += 1
        if on_round is not None:
            on_round(plan, results)
    return plan


# --- the fleet loop ---------------------------------------------------------------------


MAP_CELLS = ("adaptive", "full")  # FleetSettings.map_cells


def fine_ladder(top: int) -> tuple[int, ...]:
    """An epochs ladder 0, 1, 2, 3, 4, 6, 8, 12, ...: each power of two and 1.5 times it, up to
    `top` (included when it is a rung). Climbed warm, a rung costs only its extra epochs, so a
    finer ladder overshoots what a chip needs less (1.5x at most against 2x) for one more
    verification a doubling."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"fine_ladder: top {top!r} must be an integer >= 1")
    rungs, power = {0}, 1
    while power <= top:
        rungs.update(r for r in (power, power * 3 // 2) if 0 < r <= top)
        power *= 2
    return tuple(sorted(rungs))


@dataclass(frozen=True)
class FleetSettings:
    """How a fleet is served. faultfleet's defaults; `FleetSettings.fap_t()` the baseline.

    - `max_group_size`: chips sharing one retraining (TRE-Map's fused maps; 1: every chip
      alone). Alone by default: at a one-point constraint groups of failing chips rarely
      verify, and on a 200-chip harsh tuning fleet (seed 777, no robust base) groups of up to
      5 cost 42.25 passes in 42 groups over 10 rounds where alone with the robust base cost
      14.75 and FAP+T 29, every strategy leaving 188 chips meeting the constraint on test.
    - `bypass`: chips may run with faulty PEs bypassed (on arrays that support it).
    - `robust_base`: "auto" (trained when `planner.economics.robust_base_pays`), "on", "off":
      a fault-robust base model trained at `robust_lr` on the fleet's maps, screened at each
      rung of `robust_ladder` (epochs in all) and continued while `robust_rung_pays`. One
      rung of 3 epochs by default: a second rung (6 in all) served fewer chips than the first
      on every harsh fleet measured (71 -> 68 of 143 on tuning fleet 778, 55 -> 51 on 1501)
      and 7 more of 81 on a default fleet (1503), about what its 3 epochs cost.
    - `climb`: how a chip retrained alone climbs `ladder` after a miss (`planner.replan`):
      "bounded" (default) stops a climb its own accuracies predict cannot reach the
      constraint and climbs protection from the first rung; "full" is FAP+T's.
    - `resilience_map`: "auto" (`planner.economics.resilience_map_pays`), "on", "off": a
      measured eFAT map over `map_rates` x `ladder` with `map_samples` maps a rate, or
      (off) the ladder alone, which verification climbs (`ResilienceMap.ladder`).
    - `map_cells`: which cells of a measured map are trained: "adaptive" (default) only those
      the failing chips' retraining epochs depend on (`workers.adaptive_map`, NaN elsewhere), "full"
      every cell of the grid. `map_max_undecided`: the share of the chips to retrain the
      adaptive map may leave without epochs (the ones needing the most epochs; they are
      planned alone and `replan` climbs the ladder for them), see `planner.adaptive.MapClimb`.
    - `library`: later chips are served from the library before anything is planned.
    - `group_after_robust`: whether the chips that even the robust base fails are grouped
      (up to `max_group_size`) or retrained alone. Alone by default: these are the chips
      whose faults hurt most, and fused into groups they rarely verify (on a harsh tuning
      fleet of 300 chips, 0 of 6 groups of 4-5 such chips verified at 1 or 2 epochs, and
      the groups cost 58 epochs for 13 chips where alone costs about one epoch a chip).
    """

    max_group_size: int = 1
    bypass: bool = True
    robust_base: str = "auto"
    robust_ladder: tuple[int, ...] = (3,)
    robust_lr: float = 0.002
    resilience_map: str = "auto"
    ladder: tuple[int, ...] = (0, 1, 2, 4, 8)
    map_rates: tuple[float, ...] = (0.005, 0.01, 0.02, 0.04, 0.08)
    map_samples: int = 2
    map_cells: str = "adaptive"
    map_max_undecided: float = 0.05
    severity_samples: int = 3
    schedule: str = "progressive_union"
    placement: str = "screening"
    library: bool = True
    library_groups: int = 3
    group_after_robust: bool = False
    seed: int = 0
    climb: str = "bounded"
    max_rounds: int = 40  # a safety net: replan's ladder ends every chip in fewer (planner.replan)

    def __post_init__(self) -> None:
        for name in ("robust_base", "resilience_map"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ValueError(f"{name}: {getattr(self, name)!r} is not one of auto, on, off")
        if self.map_cells not in MAP_CELLS:
            raise ValueError(f"map_cells: {self.map_cells!r} is not one of {', '.join(MAP_CELLS)}")
        if isinstance(self.map_max_undecided, bool) or not 0.0 <= self.map_max_undecided < 1.0:
            raise ValueError(f"map_max_undecided: {self.map_max_undecided!r} must be a share in [0, 1)")
        if self.climb not in CLIMBS:
            raise ValueError(f"climb: {self.climb!r} is not one of {', '.join(CLIMBS)}")
        if self.max_group_size < 1:
            raise ValueError(f"max_group_size: {self.max_group_size} must be >= 1")
        rungs = self.robust_ladder
        if not rungs or rungs[0] < 1 or list(rungs) != sorted(set(rungs)) or not self.robust_lr > 0:
            raise ValueError(
                f"robust_ladder {rungs!r} must be increasing epochs >= 1, and robust_lr {self.robust_lr!r} > 0"
            )

    @classmethod
    def fap_t(cls, **overrides: Any) -> FleetSettings:
        """FAP+T (Zhang et al. 2018): each chip with its best bypass, each chip still failing
        retrained alone on the ladder (1, 2, 4, 8 epochs, warm), then with its most
        sensitive layer protected; no map, no robust base, no library."""
        return cls(
            **{
                "max_group_size": 1,
                "robust_base": "off",
                "resilience_map": "off",
                "library": False,
                "ladder": (0, 1, 2, 4, 8),
                "climb": "full",
                **overrides,
            }
        )


@dataclass
class FleetOutcome:
    """A fleet served: the final plan (each chip's state, test accuracy and serving model),
    what it cost, the thresholds, the library it leaves for later chips, the protection
    per chip, the decisions taken on the way and why, and its wall time (s)."""

    plan: Plan
    ledger: Ledger
    thresholds: Thresholds
    library: list[LibraryModel]
    protection: dict[str, dict[str, Any]]
    decisions: dict[str, Any]
    wall_s: float
    rounds: int

    def record(self) -> dict[str, Any]:
        """The JSON figures of this run (accuracies on the test split; `verified_accuracy_margin`:
        the verified chips' mean validation accuracy over the decision threshold, and their mean
        test minus validation accuracy, as fractions; None when no chip was verified)."""
        chips = self.plan.chips
        test = [st.test_accuracy for st in chips.values()]
        meeting = sum(1 for a in test if self.thresholds.met(a))
        served: dict[str, int] = {}
        # how each kind of chip fares on the test split: {kind: [meeting, chips]}
        by_kind: dict[str, list[int]] = {}
        for st in chips.values():
            kind = "retrained"
            if st.status == NEEDS_NOTHING:
                kind = str(st.served_by) if st.served_by in ("base", "robust") else "group_model"
                served[kind] = served.get(kind, 0) + 1
            row = by_kind.setdefault(kind, [0, 0])
            row[0] += int(self.thresholds.met(st.test_accuracy))
            row[1] += 1
        known = [a for a in test if a is not None]
        # how far above the decision threshold retrained chips were verified, and what the test
        # split made of it: short rungs stop just above it (bench/README.md, fleet economics)
        verified = [
            (st.accuracy, st.test_accuracy)
            for st in chips.values()
            if st.status == VERIFIED and st.accuracy is not None and st.test_accuracy is not None
        ]
        margin = None
        if verified:
            mean_validation = sum(v for v, _ in verified) / len(verified)
            margin = {
                "validation_over_threshold": round(mean_validation - self.thresholds.decision, 4),
                "test_over_validation": round(sum(t - v for v, t in verified) / len(verified), 4),
            }
        return {
            **self.ledger.to_dict(),
            "wall_s": round(self.wall_s, 1),
            "chips": len(chips),
            "chips_meeting_constraint": meeting,
            "chips_meeting_constraint_by_kind": dict(sorted(by_kind.items())),
            "chips_unrecoverable": len(self.plan.chips_with(UNRECOVERABLE)),
            "chips_verified": len(self.plan.chips_with(VERIFIED)),
            "chips_served_without_retraining": dict(sorted(served.items())),
            "chips_retrained": sum(1 for st in chips.values() if st.status != NEEDS_NOTHING),
            "verified_accuracy_margin": margin,
            # retraining that diverged (a climb fell more than 20 points): what a guard would retry
            "chips_training_collapsed": sum(1 for st in chips.values() if training_collapsed(st)),
            "groups": len(self.plan.groups),
            "rounds": self.rounds,
            "protected_chips": len(self.protection),
            "worst_test_accuracy": round(min(known), 4) if known else None,
            "mean_test_accuracy": round(sum(known) / len(known), 4) if known else None,
            "decisions": self.decisions,
        }


@dataclass
class PlannedBatch:
    """A batch of chips planned (`plan_batch`): the plan, the library as it stands (the
    robust base added if one was trained), the key of the model groups start from, the
    thresholds, and the decisions taken on the way and why."""

    plan: Plan
    library: list[LibraryModel]
    group_base: str
    thresholds: Thresholds
    decisions: dict[str, Any]

    def model(self, key: str) -> LibraryModel:
        return next(lm for lm in self.library if lm.key == key)


# (model so far, the fleet's maps, epochs it has had, epochs to add) -> the model continued
RobustTrainer = Callable[[nn.Module, Sequence[FaultMap], int, int], nn.Module]


@dataclass(frozen=True)
class MapFleet:
    """What an adaptive map is measured for: the chips to plan and `plan_fleet`'s inputs
    about them (`plan_inputs`), exactly as `plan_batch` passes them to `plan_fleet`.

    - `constraint`: the user's accuracy constraint;
    - `chips`: the fault maps of the chips no library model serves;
    - `screening`: chip id -> validation accuracy of its best fit; `bypass_screening`:
      chip id -> policy -> accuracy (None: no bypass); `served_by`: chip id -> library key;
    - `placement`: `plan_fleet`'s placement mode."""

    constraint: AccuracyConstraint
    chips: Sequence[FaultMap]
    screening: Mapping[str, float]
    bypass_screening: Mapping[str, Mapping[str, float]] | None
    served_by: Mapping[str, str]
    placement: str


# (group base, thresholds, the chips to plan) -> the map and the per-class severity
MapBuilder = Callable[[nn.Module, Thresholds, MapFleet], tuple[ResilienceMap, SiteSeverity]]


@dataclass
class RobustRung:
    """The robust base after `epochs` epochs in all, and its screening of the chips the
    base model failed (`screens`, by chip id)."""

    epochs: int
    model: nn.Module
    screens: dict[str, Screen]

    @property
    def served(self) -> int:
        return sum(1 for sc in self.screens.values() if sc.fit is not None)


def _robust_trainer(em: Emulation, settings: FleetSettings) -> RobustTrainer:
    def train(model: nn.Module, maps: Sequence[FaultMap], start: int, epochs: int) -> nn.Module:
        return train_robust_base(em, model, maps, epochs=epochs, lr=settings.robust_lr, seed=settings.seed, start=start)

    return train


def grow_robust_base(
    em: Emulation,
    base: nn.Module,
    maps: Sequence[FaultMap],
    failing: Sequence[FaultMap],
    thr: Thresholds,
    settings: FleetSettings,
    train: RobustTrainer,
    say: Progress,
) -> tuple[RobustRung | None, dict[str, Any]]:
    """The robust base trained up `settings.robust_ladder`: after each rung, the chips of
    `failing` (those no library model served) are screened against it, and training goes on
    to the next rung only while `planner.economics.robust_rung_pays` on what this rung added
    (each chip served saving the retraining ladder's first rung, in full passes).

    A rung whose model misses the constraint on a fault-free chip serves nothing. Returns
    the rung that served the most chips (None: none served any) and the decision record;
    every rung trained is charged (by `train`) whether or not it is kept."""
    rungs: list[dict[str, Any]] = []
    # a chip the robust base serves saves at least the retraining ladder's first rung
    saved_per_chip = em.cfg.passes(min(a for a in settings.ladder if a > 0))
    best: RobustRung | None = None
    model, done, last = base, 0, 0
    ladder = settings.robust_ladder
    for k, total in enumerate(ladder):
        say(f"training the fault-robust base to {total} epochs on the fleet's maps")
        model = train(model, maps, done, total - done)
        done = total
        fault_free = em.validate(model, None, kind="robust_screening")
        screens: dict[str, Screen] = {}
        if meets(fault_free, thr.decision):  # never a model that misses on a fault-free chip
            screens = screen_fleet(
                em, [LibraryModel("robust", model)], failing, thr.decision, bypass=settings.bypass, group_base="robust"
            )
        rung = RobustRung(total, model, screens)
        rungs.append({"epochs": total, "served": rung.served, "fault_free_validation_accuracy": round(fault_free, 4)})
        say(f"the robust base at {total} epochs serves {rung.served} of the {len(failing)} chips")
        if rung.served > (best.served if best else 0):
            best = rung
        gained, last = max(0, rung.served - last), rung.served
        if k + 1 == len(ladder) or not robust_rung_pays(
            gained, len(failing) - rung.served, ladder[k + 1] - total, saved_per_chip=saved_per_chip
        ):
            break
    record = {
        "trained": True,
        "epochs": done,
        "kept_epochs": best.epochs if best else None,
        "served": best.served if best else 0,
        "rungs": rungs,
    }
    return best, record


def plan_batch(
    em: Emulation,
    base: nn.Module,
    maps: Sequence[FaultMap],
    constraint: AccuracyConstraint,
    settings: FleetSettings,
    *,
    library: Sequence[LibraryModel] | None = None,
    thresholds: Thresholds | None = None,
    screens: Mapping[str, Screen] | None = None,
    train_robust: RobustTrainer | None = None,
    build_map: MapBuilder | None = None,
    on_progress: Progress | None = None,
) -> PlannedBatch:
    """Steps 1-3 of `run_fleet`: screen against the library, a robust base where it pays,
    a map or the ladder, and `planner.plan_fleet`.

    `train_robust(base, maps)` and `build_map(group base, thresholds, MapFleet)` do the
    training (default: here, in this process; the service passes checkpointed and
    fanned-out ones); both must charge their epochs to `em.ledger`.
    """
    say = on_progress or (lambda _msg: None)
    thr = thresholds or em.thresholds(base, constraint)
    lib = list(library) if library else [LibraryModel("base", base)]
    if not settings.library:
        lib = [lm for lm in lib if lm.key == "base"]
    group_base = "robust" if any(lm.key == "robust" for lm in lib) else "base"
    if screens is None:
        screens = screen_fleet(
            em,
            lib,
            maps,
            thr.decision,
            bypass=settings.bypass,
            group_base=group_base,
            max_groups=settings.library_groups if settings.library else 0,
            on_progress=say,
        )
    screens = dict(screens)
    by_id = {str(m.chip_id): m for m in maps}
    failing = [c for c, s in screens.items() if s.fit is None]
    say(f"{len(maps) - len(failing)} of {len(maps)} chips served by the library; {len(failing)} to plan")
    decisions: dict[str, Any] = {"failing_after_library": len(failing)}

    # the fault-robust base: trained once, only where it is predicted to pay, and continued
    # rung by rung while what the last rung served says the next one pays
    wants_robust = settings.robust_base == "on" or (
        settings.robust_base == "auto"
        and robust_base_pays(
            len(failing), max_group_size=settings.max_group_size, robust_epochs=settings.robust_ladder[0]
        )
    )
    decisions["robust_base"] = {"trained": False, "in_library": group_base == "robust"}
    if group_base == "base" and failing and wants_robust and settings.library:
        train = train_robust or _robust_trainer(em, settings)
        rung, decisions["robust_base"] = grow_robust_base(
            em, base, maps, [by_id[c] for c in failing], thr, settings, train, say
        )
        if rung is not None:
            lib.insert(1, LibraryModel("robust", rung.model))
            group_base = "robust"
            screens.update(rung.screens)  # chips the base serves keep it: the robust base only sees the others
            failing = [c for c in failing if screens[c].fit is None]
    gb = next(lm for lm in lib if lm.key == group_base)
    group_size = settings.max_group_size
    if group_base == "robust" and not settings.group_after_robust:
        group_size = 1
    decisions["group_size"] = group_size

    # a measured resilience map where it pays, else the ladder that verification climbs;
    # "auto" prices the full grid, the most an adaptive map can cost
    map_epochs = len(settings.map_rates) * settings.map_samples * max(settings.ladder)
    wants_map = settings.resilience_map == "on" or (
        settings.resilience_map == "auto"
        and bool(failing)
        and resilience_map_pays(len(failing), max_group_size=group_size, map_epochs=map_epochs)
    )
    screening, bypass_screening, served_by = plan_inputs(screens)
    if wants_map:
        most = "at most " if settings.map_cells == "adaptive" else ""
        say(f"measuring the resilience map ({settings.map_cells} cells, {most}{map_epochs} cell epochs)")
        fleet = MapFleet(
            constraint,
            [by_id[c] for c in failing],
            screening,
            bypass_screening if settings.bypass else None,
            served_by,
            settings.placement,
        )
        rmap, severity = (build_map or _map_builder(em, settings))(gb.model, thr, fleet)
    else:
        rmap, severity = ResilienceMap.ladder(settings.ladder, thr.baseline_validation), SiteSeverity.uniform()
    decisions["resilience_map"] = "measured" if wants_map else "ladder"
    if wants_map:
        # what was asked, and what the map has (a cached full map may serve an adaptive request)
        decisions["map_cells"] = {
            "asked": settings.map_cells,
            "measured_cells": int(rmap.measured.sum()),
            "cells": int(rmap.measured.size),
            "map_cell_epochs": rmap.training_epochs,
            "full_grid_cell_epochs": map_epochs,
        }

    plan = plan_fleet(
        list(maps),
        screening,
        rmap,
        constraint,
        max_group_size=group_size,
        severity=severity,
        seed=settings.seed,
        schedule=settings.schedule,
        placement=settings.placement,
        climb=settings.climb,
        bypass_screening=bypass_screening if settings.bypass else None,
        served_by=served_by,
    )
    say(f"plan: {plan.summary()}")
    return PlannedBatch(plan, lib, group_base, thr, decisions)


def measure_map(em: Emulation, model: nn.Module, thr: Thresholds, settings: FleetSettings) -> ResilienceMap:
    """`settings`' resilience map of `model`, measured here on the validation split and
    charged to `em.ledger` (its cells' epochs and evaluations)."""
    rmap = build_resilience_map(
        model,
        em.array,
        em.validation,
        settings.map_rates,
        settings.ladder,
        settings.map_samples,
        em.cfg,
        baseline=thr.baseline_validation,
        seed=settings.seed,
    )
    em.ledger.train("resilience_map", em.cfg.passes(rmap.training_epochs))
    cells = len(rmap.rates) * rmap.samples * len(rmap.epochs)
    em.ledger.evaluate("resilience_map", cells * len(em.validation.x_test))
    return rmap


def measure_adaptive_map(
    em: Emulation,
    model: nn.Module,
    thr: Thresholds,
    settings: FleetSettings,
    fleet: MapFleet,
    severity: SiteSeverity,
    *,
    checkpoint_dir: Path | None = None,
    on_epoch: EpochProgress | None = None,
) -> ResilienceMap:
    """`settings`' resilience map of `model`, measured here on the validation split only where
    `fleet`'s retraining epochs depend on it (`workers.adaptive_map`; NaN elsewhere), and charged to
    `em.ledger`: the epochs its sampled maps were trained (`cell_epochs`, in passes) and
    its evaluations (passes over the validation split). `severity`: what `plan_fleet`
    will place the chips with. `checkpoint_dir`, `on_epoch`: as `train_through`'s, for every
    sampled map's run (one file name per run)."""
    from workers.adaptive_map import build_adaptive_resilience_map  # it builds on this module

    adaptive = build_adaptive_resilience_map(
        model,
        em.array,
        em.validation,
        settings.map_rates,
        settings.ladder,
        settings.map_samples,
        em.cfg,
        baseline=thr.baseline_validation,
        seed=settings.seed,
        constraint=fleet.constraint,
        chips=fleet.chips,
        screening=fleet.screening,
        bypass_screening=fleet.bypass_screening,
        placement=fleet.placement,
        severity=severity,
        served_by=fleet.served_by,
        max_undecided=settings.map_max_undecided,
        checkpoint_dir=checkpoint_dir,
        on_epoch=on_epoch,
    )
    em.ledger.train("resilience_map", em.cfg.passes(adaptive.cell_epochs))
    em.ledger.evaluate("resilience_map", adaptive.cell_evaluations * len(em.validation.x_test))
    return adaptive.resilience_map


def _map_builder(em: Emulation, settings: FleetSettings) -> MapBuilder:
    """A measured map (`settings.map_cells`: adaptive or the full grid) and per-class
    severity in this process, charged to `em.ledger`."""

    def build(model: nn.Module, thr: Thresholds, fleet: MapFleet) -> tuple[ResilienceMap, SiteSeverity]:
        severity = measure_site_severity(
            em.array,
            lambda fm: em.validate(model, fm, kind="severity"),
            thr.baseline_validation,
            rate=settings.map_rates[min(1, len(settings.map_rates) - 1)],
            samples=settings.severity_samples,
            seed=settings.seed,
        )
        if settings.map_cells == "adaptive":
            return measure_adaptive_map(em, model, thr, settings, fleet, severity), severity
        rmap = measure_map(em, model, thr, settings)
        return rmap, severity

    return build


def verify_served(em: Emulation, plan: Plan, library: Sequence[LibraryModel]) -> None:
    """Every chip that needs no retraining verified on the test split with the library
    model that serves it (sets its `test_accuracy`)."""
    by_key = {lm.key: lm for lm in library}
    for cid, st in plan.chips.items():
        if st.status == NEEDS_NOTHING:
            lm = by_key[str(st.served_by)]
            st.test_accuracy = em.verify(lm.model, lm.deployed(plan.maps[cid]), protect=lm.protect, kind="verification")


def run_fleet(
    em: Emulation,
    base: nn.Module,
    maps: Sequence[FaultMap],
    constraint: AccuracyConstraint,
    settings: FleetSettings | None = None,
    *,
    library: Sequence[LibraryModel] | None = None,
    thresholds: Thresholds | None = None,
    screens: Mapping[str, Screen] | None = None,
    on_progress: Progress | None = None,
) -> FleetOutcome:
    """Serve a batch of chips in this process: `plan_batch`, rounds of `retrain_and_verify`
    and `apply_round` (`run_rounds`), verified group models into the library, and every chip
    verified on the test split (`verify_served`). The service runs the same steps job by job.

    `library`: the models earlier batches left (None: the base alone). `thresholds`,
    `screens`: measured already (by another strategy on the same fleet); their cost is
    then the caller's to charge. Everything else is charged to `em.ledger`.
    """
    settings = settings or FleetSettings()
    say = on_progress or (lambda _msg: None)
    t0 = time.perf_counter()
    batch = plan_batch(
        em, base, maps, constraint, settings, library=library, thresholds=thresholds, screens=screens, on_progress=say
    )
    lib, gb = batch.library, batch.model(batch.group_base)
    # this batch's group models join the library under a tag of their own ("batch2:r0-g000001")
    tag = f"batch{1 + len({lm.key.split(':')[0] for lm in lib if ':' in lm.key})}"
    models: dict[str, nn.Module] = {}
    protection: dict[str, dict[str, Any]] = {}
    rounds = 0

    def run_round(p: Plan, pending: list[Group]) -> dict[str, GroupResult]:
        out = {}
        for g in pending:
            start = models[g.warm_from] if g.warm_from else gb.model
            r = retrain_and_verify(em, start, g, p.maps, p.resilience_map.epochs, group_base=gb.model)
            assert r.model is not None
            models[g.group_id] = r.model
            out[g.group_id] = r
            if r.protect:
                protection.update({c: {"layer": r.protect[0], "tmr_penalty": r.tmr_penalty} for c in g.members})
        return out

    def on_round(p: Plan, results: dict[str, GroupResult]) -> None:
        nonlocal rounds
        rounds += 1
        if settings.library:
            lib.extend(library_additions(p, results, tag))
        summary = p.summary()
        say(
            f"round {rounds}: {len(results)} groups, {summary['verified']} verified, "
            f"{summary['unrecoverable']} unrecoverable, {em.ledger.training_epochs_total} epochs so far"
        )

    plan = run_rounds(batch.plan, run_round, max_rounds=settings.max_rounds, on_round=on_round)
    verify_served(em, plan, lib)
    return FleetOutcome(
        plan, em.ledger, batch.thresholds, lib, protection, batch.decisions, time.perf_counter() - t0, rounds
    )


def library_additions(plan: Plan, results: Mapping[str, GroupResult], tag: str) -> list[LibraryModel]:
    """The round's group models that serve a verified member: what later chips may run, keyed
    `<tag>:<group id>` (every batch's plan numbers its groups from r0-g000000 again)."""
    by_gid = {g.group_id: g for g in plan.groups}
    out = []
    for gid, r in results.items():
        g = by_gid[gid]
        if r.model is not None and any(
            plan.chips[c].status == VERIFIED and plan.chips[c].group_id == gid for c in g.members
        ):
            out.append(LibraryModel(f"{tag}:{gid}", r.model, g.fused, r.protect))
    return out
