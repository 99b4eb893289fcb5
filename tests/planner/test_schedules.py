from __future__ import annotations

import json
import pickle
from typing import Any

import numpy as np
import pytest

from accelerator.faults import ArrayConfig, Fault, FaultMap
from planner import (
    AllAtOnce,
    InjectionSchedule,
    all_at_once,
    fuse_fault_maps,
    progressive_union,
    sample_fault_map,
    sample_members,
    schedule_from_spec,
)


@pytest.fixture
def members(array: ArrayConfig) -> list[FaultMap]:
    return [sample_fault_map(array, 0.03, np.random.default_rng(i)) for i in range(4)]


def test_fusion_is_the_union(array: ArrayConfig, members: list[FaultMap]) -> None:
    fused = fuse_fault_maps(members, chip_id="g1")
    keys = {f.key for m in members for f in m.faults}
    assert {f.key for f in fused.faults} == keys
    assert fused.faulty_pes == frozenset().union(*(m.faulty_pes for m in members))
    assert fused.chip_id == "g1" and fused.array == array
    assert fuse_fault_maps(members[:1]).faults == members[0].faults
    # a bit stuck at different values: the first member wins
    a = FaultMap(array, (Fault(0, 0, "weight", 3, 1),))
    b = FaultMap(array, (Fault(0, 0, "weight", 3, 0), Fault(1, 1, "pe")))
    assert fuse_fault_maps([a, b]).faults == (Fault(0, 0, "weight", 3, 1), Fault(1, 1, "pe"))
    with pytest.raises(ValueError):
        fuse_fault_maps([])
    with pytest.raises(ValueError):
        fuse_fault_maps([a, FaultMap(ArrayConfig(8, 8), ())])


def test_all_at_once(members: list[FaultMap]) -> None:
    s = all_at_once(members)
    fused = fuse_fault_maps(members)
    assert s(0, 0) == fused and s(3, 17) == fused
    assert isinstance(s, InjectionSchedule) and isinstance(s, AllAtOnce)


def test_progressive_union_grows_from_one_member(members: list[FaultMap]) -> None:
    s = progressive_union(members, ramp_epochs=3)
    assert s(0, 0).faults == members[0].faults
    sizes = [len(s(e, 0)) for e in range(5)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert s(3, 0) == fuse_fault_maps(members) == s(10, 5)
    assert [s.active_members(e, 0) for e in range(4)] == [1, 2, 3, 4]
    # within an epoch when the steps per epoch are known
    t = progressive_union(members, ramp_epochs=1, steps_per_epoch=100)
    assert [t.active_members(0, k) for k in (0, 40, 70, 99)] == [1, 2, 3, 3]
    assert t.active_members(1, 0) == 4
    # ramp 0 is all at once
    assert progressive_union(members, ramp_epochs=0)(0, 0) == fuse_fault_maps(members)


def test_sample_members_draws_each_member(members: list[FaultMap]) -> None:
    s = sample_members(members, seed=3)
    picks = [s.member_index(e, k) for e in range(3) for k in range(40)]
    assert set(picks) == set(range(len(members)))
    assert s(1, 7) in members and s(1, 7) == members[s.member_index(1, 7)]
    assert picks == [sample_members(members, seed=3).member_index(e, k) for e in range(3) for k in range(40)]
    assert picks != [sample_members(members, seed=4).member_index(e, k) for e in range(3) for k in range(40)]


@pytest.mark.parametrize("make", [all_at_once, progressive_union, sample_members])
def test_schedules_pickle_and_round_trip_through_json_spec(make: Any, members: list[FaultMap]) -> None:
    s = make(members)
    s(0, 0)  # fill caches before pickling
    s2 = pickle.loads(pickle.dumps(s))
    spec = json.loads(json.dumps(s.spec()))
    s3 = schedule_from_spec(spec, members)
    for e, k in [(0, 0), (0, 5), (1, 3), (4, 0)]:
        assert s2(e, k) == s(e, k) == s3(e, k)
    with pytest.raises(ValueError, match="unknown"):
        schedule_from_spec({"name": "nope"}, members)
