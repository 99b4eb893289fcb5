"""Fault-aware pruning: the weights a chip's dead PEs would hold, set to zero.

With bypass support a dead PE passes the partial sum down unchanged, so every weight
mapped onto it acts as 0 on the chip. A model shipped to a chip that needs no
retraining is pruned the same way, so its float weights say what the chip computes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from accelerator.faults import ArrayConfig, FaultMap
from accelerator.layers import lowered_layers


def dead_weight_mask(weight_shape: tuple[int, ...], groups: int, array: ArrayConfig, faults: FaultMap) -> torch.Tensor:
    """Bool mask, shape `weight_shape`, True where the weight sits on a dead PE.

    The layer is lowered per group to W_g of shape (Og, K) (Conv2d: K = in/groups*kh*kw in
    `weight.reshape(O, -1)` order); W_g[o, k] sits on PE (k mod R, o mod C).
    """
    out = weight_shape[0]
    k = int(torch.tensor(weight_shape[1:]).prod()) if len(weight_shape) > 1 else 1
    og = out // groups
    dead = torch.from_numpy(faults.dense().dead)
    o_local = torch.arange(out) % og
    mask = dead[(torch.arange(k) % array.rows)[None, :], (o_local % array.cols)[:, None]]
    return mask.reshape(weight_shape)


@torch.no_grad()
def prune_dead_pes(model: nn.Module, array: ArrayConfig, faults: FaultMap) -> nn.Module:
    """A copy of `model` whose Linear/Conv2d weights on dead PEs of `faults` are 0 (others untouched)."""
    pruned = copy.deepcopy(model)
    if not any(f.site == "pe" for f in faults.faults):
        return pruned
    for layer in lowered_layers(pruned).values():
        groups = int(getattr(layer, "groups", 1))
        weight: torch.Tensor = layer.weight  # type: ignore[assignment]
        mask = dead_weight_mask(tuple(weight.shape), groups, array, faults)
        weight[mask] = 0.0
    return pruned
