"""The in-process fleet loop: glue between `accelerator` (torch) and `planner` (pure).

Small, id-free functions that the service's Celery tasks call as well (no Celery
here): train a base model, measure resilience-map cells and severities, screen chips,
retrain a group, verify it on each member's own map, and `run_plan` / `run_fleet`,
which loop plan -> retrain -> verify -> replan until every chip is verified or
declared unrecoverable. Accuracies are top-1 fractions in [0, 1]; amounts are epochs.

Retraining for an amount A runs in chunks that end at the resilience map's grid
amounts (`train_through`), exactly as a map cell is measured, so the amount the
planner reads off the map is the procedure the group gets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "batch_size": self.batch_size, "seed": self.seed}


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


def chunk_boundaries(amount: int, grid: Sequence[int]) -> list[int]:
    """Epoch counts at which a run of `amount` epochs is cut: the grid amounts below it, then it."""
    return sorted({e for e in grid if 0 < e < amount} | ({amount} if amount > 0 else set()))


def train_through(
    model: nn.Module,
    array: ArrayConfig,
    faults: FaultMap | Callable[[int, int], FaultMap],
    data: Dataset,
    amounts: Sequence[int],
    cfg: TrainConfig,
    *,
    protect: Sequence[str] = (),
    checkpoint_dir: Path | None = None,
    on_progress: EpochProgress | None = None,
    start: int = 0,
) -> Iterator[tuple[int, nn.Module]]:
    """Fault-aware retraining that yields (epochs done, model) at each of `amounts` (`start` = `model` itself).

    `start`: epochs `model` has already seen (a continued run: epoch numbers, schedule and
    seeds go on from there). `checkpoint_dir`: each chunk checkpoints every epoch to
    `chunk-<first epoch>.pt` there and resumes from it, so a killed run restarts at its
    last finished epoch (finished chunks reload at once). `on_progress(epochs done,
    total epochs, metrics)` after every epoch.
    """
    current, done = model, start
    total = max(amounts, default=start)
    for a in sorted(set(amounts)):
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
                checkpoint=None if checkpoint_dir is None else checkpoint_dir / f"chunk-{done:04d}.pt",
                on_progress=report,
                device=cfg.device,
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
    """Accuracy after each amount of `task.epochs` on the task's sampled fault map (one training run)."""
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


# --- screening, retraining, verification -------------------------------------------------


def screen_chips(
    model: nn.Module, array: ArrayConfig, data: Dataset, maps: Sequence[FaultMap], *, device: str | None = None
) -> dict[str, float]:
    """Base-model accuracy on each chip's own map, by chip id."""
    return {str(m.chip_id): acc.evaluate(model, array, m, data, device=device) for m in maps}


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


def screen_bypassed(
    model: nn.Module, array: ArrayConfig, data: Dataset, maps: Sequence[FaultMap], *, device: str | None = None
) -> dict[str, dict[str, float]]:
    """Base-model accuracy of each chip deployed under each bypass policy (`deployments`).

    chip id -> {policy: accuracy}, listing only the policies that change a chip's map
    (nothing on an array without bypass support): what `plan_fleet(bypass_screening=...)` takes.
    """
    out: dict[str, dict[str, float]] = {}
    for m in maps:
        for policy, deployed in deployments(m)[1:]:
            out.setdefault(str(m.chip_id), {})[str(policy)] = acc.evaluate(model, array, deployed, data, device=device)
    return out


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
    """`model` retrained `group.amount` epochs on the group's schedule over its members' maps
    (checkpointed every epoch and resumable when `checkpoint_dir` is given, see `train_through`).

    `model` is the base model, or for a group that continues another (`group.warm_from`)
    that group's retrained model, which had seen `group.start_epoch` epochs.

    Weights on the fused map's dead (or bypassed) PEs are 0 before and after training: on
    a member chip where that PE works, a zero weight computes what the bypass computes, so
    the one model behaves on every member as it did on the fused map it was trained on
    (TRE-Map's union of pruning masks), instead of bringing back a weight it learned without.
    """
    steps = math.ceil(len(data.x_train) / cfg.batch_size)
    schedule = group.injection_schedule(maps, steps_per_epoch=steps)
    amounts = [a for a in chunk_boundaries(group.total_epochs, grid) if a > group.start_epoch]
    runs = list(
        train_through(
            acc.prune_dead_pes(model, array, group.fused),
            array,
            schedule,
            data,
            amounts,
            cfg,
            protect=protect,
            checkpoint_dir=checkpoint_dir,
            on_progress=on_progress,
            start=group.start_epoch,
        )
    )
    return acc.prune_dead_pes(runs[-1][1] if runs else model, array, group.fused)


def verify_group(
    retrained: nn.Module,
    array: ArrayConfig,
    data: Dataset,
    members: Sequence[str],
    maps: Mapping[str, FaultMap],
    *,
    protect: Sequence[str] = (),
    fused: FaultMap | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """The retrained model's accuracy on each member chip's own map, by chip id.

    `fused`: the group's fused map; each member is then verified as deployed with the
    group's model, the fused map's dead PEs bypassed too (`planner.group_deployment`)."""
    out = {}
    for c in members:
        deployed = maps[c] if fused is None else group_deployment(maps[c], fused)
        out[c] = acc.evaluate(retrained, array, deployed, data, protect=tuple(protect), device=device)
    return out


# --- the loop ---------------------------------------------------------------------------


@dataclass
class FleetRun:
    """Outcome of `run_plan`: the final plan, epochs trained, wall time (s), protection per chip."""

    plan: Plan
    retraining_epochs: int = 0
    wall_s: float = 0.0
    rounds: int = 0
    protection: dict[str, dict[str, Any]] = field(default_factory=dict)

    def accuracies(self) -> dict[str, float]:
        """Final accuracy per chip: verified / screening accuracy, best reached for unrecoverable chips."""
        out = {}
        for c, st in self.plan.chips.items():
            acc = st.accuracy if st.status in ("verified", "needs_nothing") else st.best_accuracy
            out[c] = float(acc if acc is not None else 0.0)
        return out


def run_plan(
    model: nn.Module,
    array: ArrayConfig,
    data: Dataset,
    plan: Plan,
    cfg: TrainConfig,
    *,
    max_rounds: int = 20,
    on_progress: Progress | None = None,
) -> FleetRun:
    """Retrain and verify every pending group, replan, until the plan is done (or `max_rounds`)."""
    t0 = time.perf_counter()
    run = FleetRun(plan)
    grid = plan.resilience_map.epochs
    layer_cycles = acc.cycles(model, array, data.input_shape, batch=1)
    trained: dict[str, nn.Module] = {}  # the last round's models, which the next round may continue
    while not run.plan.done and run.rounds < max_rounds:
        verification: dict[str, float] = {}
        pending = run.plan.pending_groups
        this_round: dict[str, nn.Module] = {}
        for i, g in enumerate(pending, start=1):
            protect: tuple[str, ...] = ()
            if g.protect:
                protect = (most_sensitive_layer(model, array, g.fused, data, device=cfg.device),)
                for c in g.members:
                    run.protection[c] = {"layer": protect[0], "tmr_penalty": acc.tmr_penalty(layer_cycles, protect)}
            start = trained[g.warm_from] if g.warm_from else model
            retrained = retrain_group(start, array, data, g, run.plan.maps, grid, cfg, protect=protect)
            this_round[g.group_id] = retrained
            run.retraining_epochs += g.amount
            verification.update(
                verify_group(
                    retrained, array, data, g.members, run.plan.maps, protect=protect, fused=g.fused, device=cfg.device
                )
            )
            if on_progress is not None:
                on_progress(
                    f"round {run.rounds} group {i}/{len(pending)} {g.group_id} size={len(g.members)} "
                    f"amount={g.amount} after={g.start_epoch} protect={list(protect)} "
                    f"min_acc={min(verification[c] for c in g.members):.4f} "
                    f"accs={[round(verification[c], 4) for c in g.members]}"
                )
        run.plan = replan(run.plan, verification)
        trained = this_round
        run.rounds += 1
    run.wall_s = time.perf_counter() - t0
    return run


def run_fleet(
    model: nn.Module,
    array: ArrayConfig,
    data: Dataset,
    maps: Sequence[FaultMap],
    screening: Mapping[str, float],
    rmap: ResilienceMap,
    constraint: AccuracyConstraint,
    cfg: TrainConfig,
    *,
    severity: SiteSeverity | None = None,
    max_group_size: int = 5,
    seed: int = 0,
    schedule: str = "progressive_union",
    placement: str = "screening",
    bypass_screening: Mapping[str, Mapping[str, float]] | None = None,
    on_progress: Progress | None = None,
) -> FleetRun:
    """Plan a screened fleet and run the plan to the end (faultfleet's strategy).

    `bypass_screening` (from `screen_bypassed`) lets the plan deploy chips with their faulty
    PEs bypassed where that helps, see `planner.plan_fleet`."""
    plan = plan_fleet(
        maps,
        screening,
        rmap,
        constraint,
        max_group_size=max_group_size,
        severity=severity,
        seed=seed,
        schedule=schedule,
        placement=placement,
        bypass_screening=bypass_screening,
    )
    if on_progress is not None:
        on_progress(f"plan: {plan.summary()}")
    return run_plan(model, array, data, plan, cfg, on_progress=on_progress)
