"""Fusion of fault maps and fault-injection schedules for (group) fault-aware retraining.

A schedule is a callable ``(epoch, step) -> FaultMap`` (epoch counted from 0, step the
batch index inside the epoch, from 0) that `accelerator.fault_aware_train` accepts in
place of a fixed map. Schedules are frozen dataclasses over the member maps: they
pickle (Celery) and serialise to JSON as a name plus parameters (`spec()`), which the
service stores next to the group's member maps and turns back into a schedule with
`schedule_from_spec`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from accelerator.faults import FaultMap


def fuse_fault_maps(maps: Sequence[FaultMap], *, chip_id: str | None = None) -> FaultMap:
    """The fused map of a group: every fault of every member (TRE-Map), on their common array.

    Two members sticking one bit at different values cannot both hold on one emulated
    chip; the first member in order wins (deterministic, see `FaultMap.union`).
    """
    if not maps:
        raise ValueError("fuse_fault_maps: needs at least one fault map")
    return FaultMap.union(*maps, chip_id=chip_id)


@runtime_checkable
class InjectionSchedule(Protocol):
    name: str

    def __call__(self, epoch: int, step: int) -> FaultMap: ...

    def spec(self) -> dict[str, Any]: ...


def _members(members: Sequence[FaultMap]) -> tuple[FaultMap, ...]:
    ms = tuple(members)
    if not ms:
        raise ValueError("schedule: needs at least one member map")
    return ms


@dataclass(frozen=True)
class AllAtOnce:
    """Every member's faults from the first step on (plain fused-map FAT)."""

    members: tuple[FaultMap, ...]
    name: str = field(default="all_at_once", init=False)
    _cache: dict[int, FaultMap] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __call__(self, epoch: int, step: int) -> FaultMap:
        if 0 not in self._cache:
            self._cache[0] = fuse_fault_maps(self.members)
        return self._cache[0]

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "params": {}}


@dataclass(frozen=True)
class ProgressiveUnion:
    """TRE-Map: start from the first member's faults and add the others over `ramp_epochs`.

    At training progress p = epoch + step / steps_per_epoch (epochs; without
    `steps_per_epoch` the ramp moves once per epoch) the first
    k = min(n, 1 + floor((n - 1) * p / ramp_epochs)) members are fused, so all n are
    active from p = ramp_epochs on. Member order is the order given (the planner puts
    the mildest map first).
    """

    members: tuple[FaultMap, ...]
    ramp_epochs: float = 1.0
    steps_per_epoch: int | None = None
    name: str = field(default="progressive_union", init=False)
    _cache: dict[int, FaultMap] = field(default_factory=dict, init=False, repr=False, compare=False)

    def active_members(self, epoch: int, step: int) -> int:
        n = len(self.members)
        if self.ramp_epochs <= 0 or n == 1:
            return n
        progress = epoch + (step / self.steps_per_epoch if self.steps_per_epoch else 0.0)
        return min(n, 1 + math.floor((n - 1) * progress / self.ramp_epochs))

    def __call__(self, epoch: int, step: int) -> FaultMap:
        k = self.active_members(epoch, step)
        if k not in self._cache:
            self._cache[k] = fuse_fault_maps(self.members[:k])
        return self._cache[k]

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "params": {"ramp_epochs": self.ramp_epochs, "steps_per_epoch": self.steps_per_epoch}}


@dataclass(frozen=True)
class SampleMembers:
    """Each step trains on one member's own map, drawn uniformly (stateless: seeded by (seed, epoch, step))."""

    members: tuple[FaultMap, ...]
    seed: int = 0
    name: str = field(default="sample_members", init=False)

    def member_index(self, epoch: int, step: int) -> int:
        return int(np.random.default_rng([self.seed, epoch, step]).integers(len(self.members)))

    def __call__(self, epoch: int, step: int) -> FaultMap:
        return self.members[self.member_index(epoch, step)]

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "params": {"seed": self.seed}}


def all_at_once(members: Sequence[FaultMap]) -> AllAtOnce:
    return AllAtOnce(_members(members))


def progressive_union(
    members: Sequence[FaultMap], ramp_epochs: float = 1.0, steps_per_epoch: int | None = None
) -> ProgressiveUnion:
    return ProgressiveUnion(_members(members), float(ramp_epochs), steps_per_epoch)


def sample_members(members: Sequence[FaultMap], seed: int = 0) -> SampleMembers:
    return SampleMembers(_members(members), int(seed))


SCHEDULES = {"all_at_once": all_at_once, "progressive_union": progressive_union, "sample_members": sample_members}


def schedule_from_spec(spec: Mapping[str, Any], members: Sequence[FaultMap]) -> InjectionSchedule:
    """The schedule named by `spec` (``{"name": ..., "params": {...}}``) over `members`."""
    name = spec.get("name")
    if name not in SCHEDULES:
        raise ValueError(f"schedule: unknown name {name!r}; known: {sorted(SCHEDULES)}")
    sched: InjectionSchedule = SCHEDULES[name](members, **dict(spec.get("params", {})))  # type: ignore[operator]
    return sched
