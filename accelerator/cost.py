"""Analytic weight-stationary cycle model and the TMR (critical-layer protection) penalty.

A layer lowered to G matmuls of (Og, K) streams V activation vectors (batch x output
positions for a conv, batch for a Linear) through every weight tile; one tile costs
V + R + C - 1 cycles (stream plus pipeline fill and drain), so
cycles = G * ceil(K/R) * ceil(Og/C) * (V + R + C - 1). A protected layer runs three
times (TMR): 3x its cycles.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from accelerator.faults import ArrayConfig
from accelerator.layers import lowered_layers

TMR_FACTOR = 3


def _vectors_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Activation vectors each Linear/Conv2d streams per input sample (dummy forward)."""
    layers = lowered_layers(model)
    counts: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            per = out.shape[2] * out.shape[3] if isinstance(m, nn.Conv2d) else out[0].numel() // out.shape[-1]
            counts[name] = int(per)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return counts


def cycles(model: nn.Module, array: ArrayConfig, input_shape: tuple[int, ...], batch: int) -> dict[str, int]:
    """Cycles per Linear/Conv2d layer (by module name) for one batch of `batch` inputs
    of shape input_shape (C, H, W), without protection."""
    if batch < 1:
        raise ValueError(f"batch: must be >= 1, got {batch}")
    R, C = array.rows, array.cols
    per = _vectors_per_sample(model, input_shape)
    out = {}
    for name, m in lowered_layers(model).items():
        if isinstance(m, nn.Conv2d):
            g = m.groups
            k = m.in_channels // g * m.kernel_size[0] * m.kernel_size[1]
            og = m.out_channels // g
        else:
            assert isinstance(m, nn.Linear)
            g, k, og = 1, m.in_features, m.out_features
        tiles = g * -(-k // R) * -(-og // C)
        out[name] = tiles * (batch * per.get(name, 0) + R + C - 1)
    return out


def protected_cycles(layer_cycles: dict[str, int], protect: Iterable[str] = ()) -> int:
    """Total cycles with the layers in `protect` under TMR (each costs 3x)."""
    protect = set(protect)
    unknown = protect - set(layer_cycles)
    if unknown:
        raise ValueError(f"protect: unknown layers {sorted(unknown)}")
    return sum(c * (TMR_FACTOR if n in protect else 1) for n, c in layer_cycles.items())


def tmr_penalty(layer_cycles: dict[str, int], protect: Iterable[str] = ()) -> float:
    """Relative latency increase of protecting `protect`: protected / unprotected - 1
    (0.0 for no protection; protecting a layer with share s of the cycles costs 2s)."""
    total = sum(layer_cycles.values())
    return protected_cycles(layer_cycles, protect) / total - 1.0 if total else 0.0
