"""Fault-aware pruning zeroes exactly the weights on dead PEs."""

from __future__ import annotations

import torch
from torch import nn

import accelerator as acc
from accelerator import ArrayConfig, Fault, FaultMap

DEAD = ((1, 2), (3, 0))


def _on_dead(rows: int, cols: int, out_per_group: int) -> torch.Tensor:
    o, k = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = k % 4, (o % out_per_group) % 3
    return torch.stack([(r == dr) & (c == dc) for dr, dc in DEAD]).any(0)


def test_pruned_weights_are_those_on_dead_pes_and_the_chip_computes_what_they_say() -> None:
    torch.manual_seed(0)
    array = ArrayConfig(4, 3)
    others = (Fault(0, 1, "weight", 6, 1), Fault(2, 2, "psum", 20, 1), Fault(1, 0, "act", 7, 0))
    faults = FaultMap(array, (*(Fault(r, c, "pe") for r, c in DEAD), *others))
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 7))
    acc.calibrate(model, torch.randn(64, 4, 5, 5))
    pruned = acc.prune_dead_pes(model, array, faults)
    for before, after, og in ((model[0], pruned[0], 4), (model[3], pruned[3], 7)):
        w0, w1 = before.weight.reshape(before.weight.shape[0], -1), after.weight.reshape(after.weight.shape[0], -1)
        on_dead = _on_dead(*w1.shape, og)
        assert int(on_dead.sum()) > 0
        assert bool((w1[on_dead] == 0).all())
        assert torch.equal(w0[~on_dead], w1[~on_dead])
    x = torch.randn(16, 4, 5, 5)
    alive = FaultMap(array, others)
    with torch.no_grad():
        # its dead-PE weights are already 0, so bypassing those PEs or not gives the same result
        assert torch.equal(acc.on_array(pruned, array, faults)(x), acc.on_array(pruned, array, alive)(x))
        assert not torch.equal(acc.on_array(model, array, faults)(x), acc.on_array(model, array, alive)(x))


def test_no_dead_pes_is_an_unchanged_copy() -> None:
    model = nn.Linear(5, 3)
    pruned = acc.prune_dead_pes(model, ArrayConfig(2, 2), FaultMap(ArrayConfig(2, 2), (Fault(0, 0, "psum", 3, 1),)))
    assert pruned is not model and torch.equal(pruned.weight, model.weight)
