"""Deploying a chip with its faulty PEs bypassed (fault-aware pruning)."""

from __future__ import annotations

from collections.abc import Set as AbstractSet

import pytest
import torch

from accelerator import ArrayConfig, Fault, FaultMap, bypass_faulty_pes, bypass_pes, systolic_matmul
from accelerator.faults import bypassed_pes


def int8_operands(seed: int, *, batch: int, out: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random int8-range x (batch, k) and w (out, k)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, (batch, k), generator=g), torch.randint(-128, 128, (out, k), generator=g)


def zero_weights_on(w: torch.Tensor, pes: AbstractSet[tuple[int, int]], array: ArrayConfig) -> torch.Tensor:
    """`w` (O, K) with the weights PEs `pes` hold set to 0: PE (r, c) holds W[o, t*R + r] for o = c mod C."""
    pruned = w.clone()
    for r, c in pes:
        for o in range(c, w.shape[0], array.cols):
            pruned[o, r :: array.rows] = 0
    return pruned


def test_bypass_marks_weight_and_psum_pes_dead_and_keeps_act_faults() -> None:
    array = ArrayConfig(4, 4)
    fm = FaultMap(
        array,
        (
            Fault(0, 1, "weight", 7, 1),
            Fault(1, 2, "psum", 30, 1),
            Fault(1, 2, "weight", 0, 0),
            Fault(2, 0, "act", 7, 1),
            Fault(3, 3, "pe"),
            Fault(3, 3, "psum", 31, 0),
        ),
        chip_id="c1",
    )
    out = bypass_faulty_pes(fm)
    dead = out.dead_pes
    assert dead == {(0, 1), (1, 2), (3, 3)}  # the act-only PE stays: its register is still on the path
    assert set(fm.faults) <= set(out.faults) and out.chip_id == "c1"
    clean = FaultMap(array, (Fault(2, 0, "act", 3, 0),))
    assert bypass_faulty_pes(clean) is clean  # nothing to bypass


def test_bypassed_pes_compute_as_if_their_weights_were_zero() -> None:
    array = ArrayConfig(4, 3)
    x, w = int8_operands(0, batch=5, out=7, k=10)
    fm = FaultMap(array, (Fault(1, 2, "psum", 29, 1), Fault(3, 0, "weight", 6, 1), Fault(0, 1, "psum", 31, 1)))
    got = systolic_matmul(x, w, array, bypass_faulty_pes(fm))
    pruned = zero_weights_on(w, {(f.row, f.col) for f in fm.faults}, array)
    assert torch.equal(got, x @ pruned.T)
    assert not torch.equal(systolic_matmul(x, w, array, fm), got)  # the faults mattered before


def test_shadowed_policy_also_bypasses_the_pes_that_see_a_stuck_activation() -> None:
    array = ArrayConfig(4, 5)
    x, w = int8_operands(1, batch=6, out=9, k=11)
    fm = FaultMap(array, (Fault(1, 2, "act", 7, 1), Fault(3, 0, "act", 6, 0), Fault(2, 4, "psum", 20, 1)))
    out = bypass_faulty_pes(fm, "shadowed")
    dead = out.dead_pes
    assert dead == {(1, 3), (1, 4), (3, 1), (3, 2), (3, 3), (3, 4), (2, 4)}
    assert bypass_faulty_pes(fm) != out  # "faulty" leaves the act faults' rows alone
    pruned = zero_weights_on(w, dead, array)
    # the stuck activations now meet only bypassed PEs: the chip computes the pruned product exactly
    assert torch.equal(systolic_matmul(x, w, array, out), x @ pruned.T)


def test_bypass_needs_array_support() -> None:
    fm = FaultMap(ArrayConfig(4, 4, bypass=False), (Fault(0, 0, "weight", 1, 1),))
    with pytest.raises(ValueError, match="no bypass support"):
        bypass_faulty_pes(fm)
    with pytest.raises(ValueError, match="unknown policy"):
        bypass_faulty_pes(FaultMap(ArrayConfig(4, 4), ()), "all")


def test_upper_bit_policies_bypass_only_faults_on_high_order_bits() -> None:
    array = ArrayConfig(4, 5)
    low = (Fault(0, 1, "weight", 1, 1), Fault(1, 0, "act", 3, 1), Fault(2, 2, "psum", 15, 0))
    high = (Fault(3, 1, "weight", 6, 0), Fault(2, 3, "act", 4, 1), Fault(0, 4, "psum", 16, 1))
    fm = FaultMap(array, low + high)
    dead = bypass_faulty_pes(fm, "upper_half").dead_pes
    # weight bit 6 of 8, act bit 4 of 8 (its row right of it), psum bit 16 of 32: the upper half
    assert dead == {(3, 1), (2, 4), (0, 4)}
    assert bypassed_pes(fm, "upper_3q") == sorted(dead | {(2, 2)} | {(1, c) for c in range(1, 5)})  # bits >= 2, 8
    assert bypassed_pes(fm, "upper_quarter") == [(3, 1)]  # only weight bit 6 is in the top quarter (>= 6, 24)
    assert bypassed_pes(fm, "shadowed") == sorted(set(bypassed_pes(fm, "upper_3q")) | {(0, 1)})
    only_high = FaultMap(array, high)
    assert bypass_faulty_pes(only_high, "upper_half") == bypass_faulty_pes(only_high, "shadowed")
    only_low = FaultMap(array, low[:1])
    assert bypass_faulty_pes(only_low, "upper_half") is only_low
    # what stays is exactly the low-order faults: the chip computes the pruned product on them
    x, w = int8_operands(2, batch=6, out=9, k=11)
    pruned = zero_weights_on(w, dead, array)
    rest = FaultMap(array, low)
    assert torch.equal(
        systolic_matmul(x, w, array, bypass_faulty_pes(fm, "upper_half")), systolic_matmul(x, pruned, array, rest)
    )


def test_bypass_pes_adds_dead_pes_once_and_needs_bypass_support() -> None:
    array = ArrayConfig(4, 4)
    fm = FaultMap(array, (Fault(0, 0, "pe"), Fault(1, 2, "weight", 6, 1)), chip_id="c1")
    out = bypass_pes(fm, [(0, 0), (1, 2), (3, 3)])
    assert out.dead_pes == {(0, 0), (1, 2), (3, 3)} and out.chip_id == "c1"
    assert len(out.faults) == len(fm.faults) + 2  # (0, 0) was dead already
    assert bypass_pes(fm, [(0, 0)]) is fm
    x, w = int8_operands(3, batch=5, out=6, k=9)
    pruned = zero_weights_on(w, {(0, 0), (1, 2), (3, 3)}, array)
    assert torch.equal(systolic_matmul(x, w, array, out), x @ pruned.T)  # the stuck weight bit is gone too
    with pytest.raises(ValueError, match="no bypass support"):
        bypass_pes(FaultMap(ArrayConfig(4, 4, bypass=False), ()), [(1, 1)])
