"""Running a float PyTorch model on the emulated faulty array.

`on_array` returns a copy of a model whose nn.Linear / nn.Conv2d run int8 on the
array (`ArrayLinear`, `ArrayConv2d`: same parameters and state_dict keys); all other
layers stay float on the host. Forward = exact faulty integer result (fast path,
equal to `systolic_matmul`), dequantized; backward = straight-through estimator
through the clean quantized layer.

Activation scales are static per layer and live in the model's state_dict as a
0-d buffer ``<layer>.act_scale`` (0 = not calibrated); `calibrate` sets them from
training data, so a saved model reproduces its on-chip accuracy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from accelerator.fast import (
    ArrayProduct,
    ArrayWeight,
    LayerPlan,
    array_weights,
    build_plan,
    conv_parts,
    linear_parts,
    quantized_array_weights,
)
from accelerator.faults import ArrayConfig, FaultMap
from accelerator.quant import quantizer
from accelerator.systolic import check_fault_map, wrap_signed

SCALE_BUFFER = "act_scale"


# --- calibration -------------------------------------------------------------------
def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def lowered_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers that run on the array (nn.Linear, nn.Conv2d), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def ensure_scale_buffers(model: nn.Module) -> nn.Module:
    """Give every Linear/Conv2d an `act_scale` buffer (0 = uncalibrated) if it lacks one,
    so state_dicts of calibrated and uncalibrated models have the same keys."""
    for m in lowered_layers(model).values():
        if SCALE_BUFFER not in m._buffers:
            m.register_buffer(SCALE_BUFFER, torch.zeros(()))
    return model


def uncalibrated_layers(model: nn.Module) -> list[str]:
    """Names of array layers without a positive stored activation scale."""
    out = []
    for name, m in lowered_layers(model).items():
        s = m._buffers.get(SCALE_BUFFER)
        if s is None or not float(s) > 0:
            out.append(name)
    return out


@torch.no_grad()
def calibrate(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = 256, fmt: str = "int8", max_samples: int = 4096
) -> nn.Module:
    """Set the static activation scale of every Linear/Conv2d, in place, from data.

    x: (N, ...) float inputs (training data; the first `max_samples` are used, in
    order, so the result is deterministic). Scale = format's act_scale(max |input|)
    observed in the float model in eval mode (on the model's device). Returns `model`.
    """
    q = quantizer(fmt)
    ensure_scale_buffers(model)
    layers = lowered_layers(model)
    amax = dict.fromkeys(layers, 0.0)

    def hook(name: str) -> Any:
        def record(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            amax[name] = max(amax[name], float(inputs[0].detach().abs().max()))

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        xs, dev = x[:max_samples], model_device(model)
        for i in range(0, len(xs), batch_size):
            model(xs[i : i + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, m in layers.items():
        m._buffers[SCALE_BUFFER] = torch.tensor(q.act_scale(amax[name]))
    return model


# --- transient errors ----------------------------------------------------------------
def transient_flips(y: torch.Tensor, ber: float, bits: int, generator: torch.Generator) -> torch.Tensor:
    """Flip each bit of the `bits`-wide two's-complement integers in y with probability ber.

    y: integer-valued float tensor (any device); returns float64 (exact). The number of flips is
    drawn Binomial(numel*bits, ber) and their positions uniformly (coinciding draws
    flip once: a negligible bias at realistic rates).
    """
    n_bits = y.numel() * bits
    n = int(torch.binomial(torch.tensor(float(n_bits)), torch.tensor(float(ber)), generator=generator))
    yi = y.to(torch.int64).reshape(-1)
    if n:  # drawn on the generator's device (the CPU): the same flips wherever y lives
        pos = torch.unique(torch.randint(n_bits, (n,), generator=generator)).to(y.device)
        mask = torch.zeros_like(yi).index_add_(0, pos // bits, torch.ones_like(pos) << (pos % bits))
        yi = wrap_signed(yi ^ mask, bits)
    return yi.reshape(y.shape).to(torch.float64)


# --- the array layers --------------------------------------------------------------------
class _OnArray:
    """Array state shared by ArrayLinear and ArrayConv2d (set by `on_array`)."""

    array: ArrayConfig
    faults: FaultMap
    ber: float
    protected: bool
    rng: _Rng
    plan: LayerPlan

    def _geometry(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def scale_tensor(self) -> torch.Tensor:
        """The stored static activation scale (0-d float tensor)."""
        s = self._buffers[SCALE_BUFFER]  # type: ignore[attr-defined]
        assert s is not None
        return s

    def set_faults(self, faults: FaultMap) -> None:
        """Swap the permanent fault map (cheap: a plan of O(R*C) work, cached per map
        so schedules that cycle through member maps rebuild nothing)."""
        check_fault_map(self.array, faults)
        cache: dict[str, LayerPlan] = self.__dict__.setdefault("_plans", {})
        key = faults.digest
        plan = cache.get(key)
        if plan is None:
            if len(cache) >= 16:  # bounded: drop the oldest
                cache.pop(next(iter(cache)))
            plan = cache[key] = build_plan(self.array, faults, *self._geometry())
        self.faults = faults
        self.plan = plan

    def array_weights(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ArrayWeight]:
        """(wq, scale, prepared weights) of the float `weight` for the current plan.

        Cached for the next call while the plan, the weight tensor and its in-place
        version (optimizer steps and state_dict loads bump it) stay the same: evaluation
        batches reuse them, training steps recompute them.
        """
        plan = self.plan.to(weight.device)
        version = (weight.data_ptr(), weight._version)
        cached = self.__dict__.get("_weights")
        if cached is not None and cached[0] is plan and cached[1] is weight and cached[2] == version:
            return cached[3]
        prepared = quantized_array_weights(plan, weight, quantizer(self.array.fmt))
        self.__dict__["_weights"] = (plan, weight, version, prepared)
        return prepared

    def output_parts(self, prod: ArrayProduct) -> ArrayProduct:
        """The layer output as seen after transient errors (exact integers only when flips apply)."""
        return ArrayProduct(self._finish(prod.exact())) if self.ber > 0 else prod

    def _finish(self, y_int: torch.Tensor) -> torch.Tensor:
        if self.ber > 0:
            y_int = transient_flips(y_int, self.ber, self.array.number_format.psum_bits, self.rng.gen)
        return y_int


class _Rng:
    """Holder of the transient-error generator, shared by the layers of one model."""

    def __init__(self, seed: int | None) -> None:
        self.gen = torch.Generator()
        if seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(seed)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Rng:
        new = _Rng(0)
        new.gen.set_state(self.gen.get_state())
        return new


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: ArrayLinear) -> Any:
        q = quantizer(layer.array.fmt)
        s = layer.scale_tensor()
        x2 = x.reshape(-1, x.shape[-1])
        xq = q.act(x2, s)
        wq, sw, aw = layer.array_weights(weight)
        out = layer.output_parts(linear_parts(layer.plan.to(x.device), xq, aw)).dequant(s * sw, bias, x.dtype)
        ctx.save_for_backward(x2, xq, wq, sw, s)
        ctx.limit = q.act_limit()
        ctx.has_bias = bias is not None
        return out.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> Any:
        x2, xq, wq, sw, s = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # STE: clean dequantized weights; no grad where x was clipped
            gx = (gy2 @ (wq * sw[:, None])).masked_fill_(x2.abs() > ctx.limit * s, 0.0)
            gx = gx.reshape(*gy.shape[:-1], -1)
        if ctx.needs_input_grad[1]:
            gw = gy2.t() @ (xq * s)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)
        return gx, gw, gb, None


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: ArrayConv2d) -> Any:
        q = quantizer(layer.array.fmt)
        s = layer.scale_tensor()
        xq = q.act(x, s)
        wq, sw, aw = layer.array_weights(weight)
        st: Any = layer.stride
        dl: Any = layer.dilation
        parts = conv_parts(layer.plan.to(x.device), xq, aw, layer.pads, st, dl)
        out = layer.output_parts(parts).dequant(s * sw, bias, x.dtype)
        ctx.save_for_backward(x, xq, wq, sw, s)
        ctx.limit = q.act_limit()
        ctx.has_bias = bias is not None
        ctx.conv = (layer.stride, layer.dilation, layer.groups, layer.pads)
        return out

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> Any:
        x, xq, wq, sw, s = ctx.saved_tensors
        stride, dilation, groups, pads = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        left, right, top, bottom = pads
        symmetric = left == right and top == bottom
        xd = xq * s  # STE: the clean dequantized input and weights
        gxp, gw, gb = torch.ops.aten.convolution_backward(
            gy.contiguous(),
            xd if symmetric else F.pad(xd, pads),
            wq * sw.view(-1, 1, 1, 1),
            [wq.shape[0]] if ctx.has_bias else None,
            list(stride),
            [top, left] if symmetric else [0, 0],
            list(dilation),
            False,
            [0, 0],
            groups,
            [need_x, need_w, need_b and ctx.has_bias],
        )
        gx = None
        if need_x:
            if not symmetric:
                hp, wp = gxp.shape[2], gxp.shape[3]
                gxp = gxp[:, :, top : hp - bottom, left : wp - right]
            gx = gxp.masked_fill(x.abs() > ctx.limit * s, 0.0)  # no grad where x was clipped
        return gx, gw, gb if ctx.has_bias else None, None


class ArrayLinear(nn.Linear, _OnArray):
    """nn.Linear running on the faulty array (see module docstring)."""

    def _geometry(self) -> tuple[int, int, int]:
        return 1, self.out_features, self.in_features

    def integer_output(self, xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        """Integer layer output (B, O) (exact, float dtype) for integer-valued xq (B, K), wq (O, K)."""
        plan = self.plan.to(xq.device)
        return self._finish(linear_parts(plan, xq, array_weights(plan, wq)).exact())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearFn.apply(x, self.weight, self.bias, self)


class ArrayConv2d(nn.Conv2d, _OnArray):
    """nn.Conv2d running on the faulty array; padding applied explicitly to the
    quantized input, so act faults hit the zero padding as on the chip."""

    pads: tuple[int, int, int, int]

    def _geometry(self) -> tuple[int, int, int]:
        kh, kw = self.kernel_size
        return self.groups, self.out_channels // self.groups, self.in_channels // self.groups * kh * kw

    def integer_output(self, xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        """Integer output (N, O, Ho, Wo) for an unpadded integer-valued input (N, Cin, H, W)."""
        s: Any = self.stride
        d: Any = self.dilation
        plan = self.plan.to(xq.device)
        return self._finish(conv_parts(plan, xq, array_weights(plan, wq), self.pads, s, d).exact())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ConvFn.apply(x, self.weight, self.bias, self)


def _adopt(mod: nn.Module, cls: type[nn.Module]) -> Any:
    """An instance of `cls` that takes over `mod`'s state (a private deep copy), with no
    re-initialisation: parameters, buffers and hooks stay as they are."""
    new = cls.__new__(cls)
    new.__dict__.update(mod.__dict__)
    return new


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, child)


def array_layers(model: nn.Module) -> dict[str, ArrayLinear | ArrayConv2d]:
    """The layers of an `on_array` model that run on the array, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (ArrayLinear, ArrayConv2d))}


def on_array(
    model: nn.Module,
    array: ArrayConfig,
    faults: FaultMap | None = None,
    *,
    ber: float = 0.0,
    protect: Iterable[str] = (),
    seed: int | None = None,
) -> nn.Module:
    """A copy of `model` whose Linear/Conv2d layers run int8 on the faulty array.

    `faults` None means a fault-free array. `ber`: per-bit transient flip probability
    on every int32 output of unprotected array layers, drawn from a generator seeded
    with `seed` (random if None). `protect`: layer names (as in named_modules) that
    run fault-free under TMR (no permanent faults, no flips). The model must be
    calibrated (`calibrate`); raises ValueError naming uncalibrated layers, unknown
    protected layers, a fault map for another array, or a bad ber.
    """
    if faults is None:
        faults = FaultMap(array)
    check_fault_map(array, faults)
    if not 0.0 <= ber <= 1.0:
        raise ValueError(f"ber: {ber} is not a probability in [0, 1]")
    quantizer(array.fmt)
    layers = lowered_layers(model)
    protect = set(protect)
    unknown = sorted(protect - set(layers))
    if unknown:
        raise ValueError(f"protect: {unknown} are not Linear/Conv2d layers of the model; layers: {sorted(layers)}")
    missing = uncalibrated_layers(model)
    if missing:
        raise ValueError(
            f"model is not calibrated: layers {missing} have no activation scale; "
            "call accelerator.calibrate(model, x_train) first"
        )
    new = copy.deepcopy(model)
    rng = _Rng(seed)
    clean = FaultMap(array)
    for name, mod in lowered_layers(new).items():
        if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
            raise ValueError(f"layer {name!r}: padding_mode {mod.padding_mode!r} unsupported (zeros only)")
        layer = _adopt(mod, ArrayConv2d if isinstance(mod, nn.Conv2d) else ArrayLinear)
        if isinstance(layer, ArrayConv2d):
            pads: Any = mod._reversed_padding_repeated_twice
            layer.pads = (int(pads[0]), int(pads[1]), int(pads[2]), int(pads[3]))  # (left, right, top, bottom)
        layer.array = array
        layer.protected = name in protect
        layer.ber = 0.0 if layer.protected else ber
        layer.rng = rng
        layer.set_faults(clean if layer.protected else faults)
        _set_child(new, name, layer)
    return new


def set_faults(model: nn.Module, faults: FaultMap | None) -> nn.Module:
    """Swap the permanent fault map of every unprotected layer of an `on_array` model
    in place (between training steps); None = fault-free. Returns the model."""
    layers = array_layers(model)
    if not layers:
        raise ValueError("set_faults: model has no array layers; build it with on_array")
    for layer in layers.values():
        if not layer.protected:
            layer.set_faults(faults if faults is not None else FaultMap(layer.array))
    return model


def to_float(model: nn.Module) -> nn.Module:
    """A plain float copy of an `on_array` model (same state_dict, incl. act scales)."""
    new = copy.deepcopy(model)
    for name, mod in array_layers(new).items():
        plain = _adopt(mod, nn.Conv2d if isinstance(mod, ArrayConv2d) else nn.Linear)
        for attr in ("array", "faults", "ber", "protected", "rng", "plan", "_plans", "pads", "_weights"):
            plain.__dict__.pop(attr, None)
        _set_child(new, name, plain)
    return new
