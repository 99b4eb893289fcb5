"""Quantizers: the number-format extension point (registry keyed by NumberFormat name).

A quantizer maps float weights/activations to the integer operands the array
multiplies (returned as integer-valued float tensors) and back. Adding a format
(e.g. fp16/bf16 with stuck bits on the IEEE encoding) means registering a
`NumberFormat` in `accelerator.faults.NUMBER_FORMATS` and a quantizer here.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Quantizer(Protocol):
    """Float <-> array-operand conversion for one number format."""

    name: str

    def weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w (O, ...) float -> (wq integer-valued like w, scale (O,) float; w ~ wq * scale)."""
        ...

    def act(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x float, static per-layer scale (0-d) -> integer-valued xq with x ~ xq * scale."""
        ...

    def act_scale(self, amax: float) -> float:
        """Static activation scale from the calibrated max |x| of a layer's input."""
        ...

    def act_limit(self) -> float:
        """Largest |xq|: inputs beyond limit * scale are clipped (STE passes no gradient)."""
        ...


class Int8Symmetric:
    """int8, symmetric, range -127..127; per-output-channel weight scales."""

    name = "int8"
    qmax = 127.0

    def weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = w.detach()
        amax = w.abs().amax(dim=tuple(range(1, w.dim())))
        scale = torch.where(amax > 0, amax / self.qmax, 1.0)
        view = (-1,) + (1,) * (w.dim() - 1)
        # few ops and one temporary: weights are prepared again after every training step
        wq = w.div(scale.view(view)).round_().clamp_(-self.qmax, self.qmax)
        return wq, scale

    def act(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.detach().div(scale).round_().clamp_(-self.qmax, self.qmax)  # one allocation

    def act_scale(self, amax: float) -> float:
        return amax / self.qmax if amax > 0 else 1.0

    def act_limit(self) -> float:
        return self.qmax


QUANTIZERS: dict[str, Quantizer] = {"int8": Int8Symmetric()}


def quantizer(fmt: str) -> Quantizer:
    """The quantizer registered for number format `fmt` (ValueError if none)."""
    try:
        return QUANTIZERS[fmt]
    except KeyError:
        raise ValueError(f"number format {fmt!r} has no quantizer; registered: {sorted(QUANTIZERS)}") from None
