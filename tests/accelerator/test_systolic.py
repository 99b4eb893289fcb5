"""systolic_matmul (the reference) against a literal per-PE, per-cycle simulation,
and the fast path against the reference, bit for bit."""

from __future__ import annotations

import random

import pytest
import torch

from accelerator import ArrayConfig, Fault, FaultMap, fast_matmul, systolic_matmul

from .conftest import random_fault_map


def _signed(v: int, bits: int) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def _stuck(v: int, faults: list[Fault], site: str, bits: int) -> int:
    for f in faults:
        if f.site == site:
            assert f.bit is not None
            v = v | (1 << f.bit) if f.stuck else v & ~(1 << f.bit)
    return _signed(v, bits)


def cycle_sim(x: list[list[int]], w: list[list[int]], array: ArrayConfig, fmap: FaultMap) -> list[list[int]]:
    """A clocked weight-stationary array in plain Python: every cycle each PE latches the
    activation from its left neighbour's register and the psum from the register above.
    Inputs are skewed (row r gets sample b at cycle b + r); column c's result for sample
    b leaves the bottom at cycle b + R - 1 + c and is added to an int32 output buffer."""
    R, C = array.rows, array.cols
    B, K, n_out = len(x), len(x[0]), len(w)
    by_pe: dict[tuple[int, int], list[Fault]] = {}
    for f in fmap.faults:
        by_pe.setdefault((f.row, f.col), []).append(f)
    y = [[0] * n_out for _ in range(B)]
    for t in range(-(-K // R)):
        for u in range(-(-n_out // C)):
            # weight registers, loaded once per tile (stuck bits apply to what is stored)
            wreg = [[0] * C for _ in range(R)]
            for r in range(R):
                for c in range(C):
                    k, o = t * R + r, u * C + c
                    wreg[r][c] = _stuck(w[o][k] if k < K and o < n_out else 0, by_pe.get((r, c), []), "weight", 8)
            act = [[0] * C for _ in range(R)]  # act register of each PE (what it passes right)
            psum = [[0] * C for _ in range(R)]  # psum register of each PE (what it passes down)
            for cycle in range(B + R + C):
                new_act = [[0] * C for _ in range(R)]
                new_psum = [[0] * C for _ in range(R)]
                for r in range(R):
                    for c in range(C):
                        b = cycle - r - c
                        if c == 0:
                            k = t * R + r
                            a_in = x[b][k] if 0 <= b < B and k < K else 0
                        else:
                            a_in = act[r][c - 1]
                        p_in = psum[r - 1][c] if r > 0 else 0
                        fs = by_pe.get((r, c), [])
                        if any(f.site == "pe" for f in fs):
                            p_out = p_in
                        else:
                            p_out = _stuck(_signed(p_in + a_in * wreg[r][c], 32), fs, "psum", 32)
                        new_act[r][c] = _stuck(a_in, fs, "act", 8)
                        new_psum[r][c] = p_out
                        if r == R - 1 and 0 <= b < B and u * C + c < n_out:
                            y[b][u * C + c] = _signed(y[b][u * C + c] + p_out, 32)
                act, psum = new_act, new_psum
    return y


def _operands(rng: random.Random, B: int, K: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    return torch.randint(-128, 128, (B, K), generator=g), torch.randint(-128, 128, (n_out, K), generator=g)


@pytest.mark.parametrize("bypass", [True, False])
def test_reference_matches_cycle_simulation(rng: random.Random, bypass: bool) -> None:
    for _ in range(25):
        array = ArrayConfig(rng.randint(1, 4), rng.randint(1, 4), bypass=bypass)
        B, K, n_out = rng.randint(1, 3), rng.randint(1, 10), rng.randint(1, 9)  # K, O mostly not multiples
        x, w = _operands(rng, B, K, n_out)
        fmap = random_fault_map(array, rng.randint(0, 10), rng)
        expected = cycle_sim(x.tolist(), w.tolist(), array, fmap)
        assert systolic_matmul(x, w, array, fmap).tolist() == expected, fmap.to_dict()


def _site_cases() -> list[list[Fault]]:
    cases: list[list[Fault]] = []
    for site, top in (("weight", 7), ("act", 7), ("psum", 31)):
        for bit in (0, top):
            for stuck in (0, 1):
                cases.append([Fault(1, 0, site, bit, stuck)])
    cases.append([Fault(1, 1, "pe")])
    # several faults on one PE, and a chain of psum / act faults in one column / row
    cases.append([Fault(1, 1, "weight", 7, 1), Fault(1, 1, "act", 0, 1), Fault(1, 1, "psum", 30, 1)])
    cases.append([Fault(1, 1, "pe"), Fault(1, 1, "act", 7, 1), Fault(1, 1, "psum", 31, 1), Fault(1, 1, "weight", 3, 0)])
    cases.append([Fault(0, 1, "psum", 31, 1), Fault(1, 1, "psum", 31, 0), Fault(2, 1, "psum", 4, 1)])
    cases.append([Fault(2, 0, "act", 7, 1), Fault(2, 1, "act", 7, 0), Fault(2, 1, "act", 2, 1)])
    cases.append([Fault(1, 2, "psum", 3, 1), Fault(1, 2, "psum", 31, 0), Fault(0, 0, "psum", 12, 0)])
    cases.append([Fault(2, 0, "weight", 7, 1), Fault(2, 0, "act", 6, 1), Fault(2, 2, "psum", 0, 1)])  # padding rows
    return cases


@pytest.mark.parametrize("faults", _site_cases(), ids=lambda fs: "+".join(f"{f.site}{f.bit}s{f.stuck}" for f in fs))
def test_every_site_against_cycle_simulation_and_fast_path(faults: list[Fault]) -> None:
    array = ArrayConfig(3, 3)
    fmap = FaultMap(array, tuple(faults))
    rng = random.Random(7)
    for B, K, n_out in ((2, 7, 5), (3, 3, 3), (1, 8, 7)):
        x, w = _operands(rng, B, K, n_out)
        ref = systolic_matmul(x, w, array, fmap)
        assert ref.tolist() == cycle_sim(x.tolist(), w.tolist(), array, fmap)
        assert torch.equal(fast_matmul(x, w, array, fmap), ref)
    # the fault must matter somewhere: the reference differs from the clean product
    x, w = _operands(rng, 16, 7, 5)
    assert not torch.equal(systolic_matmul(x, w, array, fmap), x @ w.T) or faults[0].site == "pe"


def test_clean_array_is_plain_matmul(rng: random.Random) -> None:
    array = ArrayConfig(4, 3)
    x, w = _operands(rng, 5, 11, 7)
    assert torch.equal(systolic_matmul(x, w, array, FaultMap(array)), x @ w.T)


def test_psum_wraps_at_32_bits() -> None:
    array = ArrayConfig(2, 1)
    fmap = FaultMap(array, (Fault(0, 0, "psum", 30, 1), Fault(1, 0, "psum", 30, 1)))
    x = torch.tensor([[1, 1]])
    w = torch.tensor([[1, 1]])
    # p1 = 1 | 2^30; p2 = (p1 + 1) | 2^30 = 2^30 + 2 in one tile; buffer wraps, not saturates
    assert systolic_matmul(x, w, array, fmap).item() == (1 << 30) + 2
    x4 = torch.ones(1, 4, dtype=torch.long)
    w4 = torch.ones(1, 4, dtype=torch.long)
    # two tiles each give 2^30 + 2: the sum 2^31 + 4 wraps to -2^31 + 4
    assert systolic_matmul(x4, w4, array, fmap).item() == -(1 << 31) + 4
    assert fast_matmul(x4, w4, array, fmap).item() == -(1 << 31) + 4


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in (1, 2, 3))])
def test_fast_matches_reference_random(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        array = ArrayConfig(rng.randint(1, 6), rng.randint(1, 6), bypass=rng.random() < 0.8)
        B, K, n_out = rng.randint(1, 4), rng.randint(1, 20), rng.randint(1, 14)
        x, w = _operands(rng, B, K, n_out)
        fmap = random_fault_map(array, rng.randint(0, 12), rng)
        assert torch.equal(fast_matmul(x, w, array, fmap), systolic_matmul(x, w, array, fmap)), fmap.to_dict()


def test_operand_errors_name_the_problem() -> None:
    array = ArrayConfig(2, 2)
    fm = FaultMap(array)
    with pytest.raises(ValueError, match="K mismatch"):
        systolic_matmul(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), array, fm)
    with pytest.raises(ValueError, match="out of the int8 range"):
        systolic_matmul(torch.full((1, 2), 300), torch.zeros(1, 2, dtype=torch.long), array, fm)
    with pytest.raises(ValueError, match="must hold integers"):
        fast_matmul(torch.full((1, 2), 0.5), torch.zeros(1, 2), array, fm)
    with pytest.raises(ValueError, match="must be \\(B, K\\)"):
        systolic_matmul(torch.zeros(2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), array, fm)
    other = FaultMap(ArrayConfig(3, 2))
    with pytest.raises(ValueError, match="3x2 array"):
        systolic_matmul(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), array, other)
    no_bypass = ArrayConfig(2, 2, bypass=False)
    with pytest.raises(ValueError, match="no bypass"):
        systolic_matmul(
            torch.zeros(1, 2, dtype=torch.long),
            torch.zeros(1, 2, dtype=torch.long),
            no_bypass,
            FaultMap(no_bypass, (Fault(0, 0, "pe"),)),
        )


def test_bad_fault_maps_name_the_entry() -> None:
    array = ArrayConfig(4, 4)
    good = {"array": {"rows": 4, "cols": 4}, "faults": [{"row": 0, "col": 1, "site": "psum", "bit": 31, "stuck": 1}]}
    assert FaultMap.from_dict(good, array).faults[0].bit == 31
    bad_cases = [
        ({"row": 4, "col": 0, "site": "pe"}, "faults\\[0\\].row: 4 out of range"),
        ({"row": 0, "col": 0, "site": "weight", "bit": 8, "stuck": 1}, "faults\\[0\\].bit: 8 out of range"),
        ({"row": 0, "col": 0, "site": "psum", "bit": 3, "stuck": 2}, "faults\\[0\\].stuck"),
        ({"row": 0, "col": 0, "site": "alu"}, "faults\\[0\\].site"),
    ]
    for entry, msg in bad_cases:
        with pytest.raises(ValueError, match=msg):
            FaultMap.from_dict({"array": {"rows": 4, "cols": 4}, "faults": [entry]}, array)
    with pytest.raises(ValueError, match="does not match"):
        FaultMap.from_dict({"array": {"rows": 8, "cols": 4}, "faults": []}, array)
