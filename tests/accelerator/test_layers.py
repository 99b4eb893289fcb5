"""on_array layers: integer forward equals systolic_matmul bit for bit; gradients; errors."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import accelerator as A
from accelerator import ArrayConfig, Fault, FaultMap
from accelerator.quant import quantizer

from .conftest import random_fault_map


def _conv_reference(layer: A.ArrayConv2d, xq: torch.Tensor, wq: torch.Tensor, fmap: FaultMap) -> torch.Tensor:
    """Conv through im2col and systolic_matmul, one matmul per group (local output index)."""
    xp = F.pad(xq, layer.pads)
    cols = F.unfold(xp, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)  # (N, Cin*kh*kw, L)
    N, G = xq.shape[0], layer.groups
    Ho = (xp.shape[2] - layer.dilation[0] * (layer.kernel_size[0] - 1) - 1) // layer.stride[0] + 1
    Wo = cols.shape[2] // Ho
    kg, og = cols.shape[1] // G, layer.out_channels // G
    outs = []
    for g in range(G):
        xg = cols[:, g * kg : (g + 1) * kg].permute(0, 2, 1).reshape(-1, kg).long()
        wg = wq[g * og : (g + 1) * og].reshape(og, -1).long()
        outs.append(A.systolic_matmul(xg, wg, layer.array, fmap).reshape(N, Ho * Wo, og).permute(0, 2, 1))
    return torch.cat(outs, 1).reshape(N, layer.out_channels, Ho, Wo)


@pytest.mark.parametrize("seed", range(3))
def test_conv_fast_path_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(12):
        array = ArrayConfig(rng.randint(2, 5), rng.randint(2, 5))
        G = rng.choice([1, 1, 2, 3])
        conv = nn.Conv2d(
            G * rng.randint(1, 3),
            G * rng.randint(1, 4),
            rng.choice([1, 2, 3]),
            stride=rng.choice([1, 2]),
            padding=rng.choice([0, 1, 2]),
            dilation=rng.choice([1, 2]),
            groups=G,
            bias=rng.random() < 0.5,
        )
        x = torch.randn(2, conv.in_channels, 7, 6, generator=torch.Generator().manual_seed(seed))
        model = A.calibrate(nn.Sequential(conv), x)
        fmap = random_fault_map(array, rng.randint(1, 10), rng)
        layer = A.on_array(model, array, fmap)[0]
        q = quantizer("int8")
        xq = q.act(x, layer.scale_tensor())
        wq, _ = q.weight(layer.weight)
        got = layer.integer_output(xq, wq)
        assert torch.equal(got.round().long(), _conv_reference(layer, xq, wq, fmap)), fmap.to_dict()
        assert torch.equal(got, got.round())


def test_act_fault_hits_conv_zero_padding() -> None:
    array = ArrayConfig(4, 4)
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1.0
    model = A.calibrate(nn.Sequential(conv), x)
    # act bit 0 stuck at 1 in row 0, col 0: column 1 sees activations of 0 as 1, padding included
    fmap = FaultMap(array, (Fault(0, 0, "act", 0, 1),))
    layer = A.on_array(model, array, fmap)[0]
    q = quantizer("int8")
    xq = q.act(x, layer.scale_tensor())
    wq, _ = q.weight(layer.weight)
    got = layer.integer_output(xq, wq).round().long()
    assert torch.equal(got, _conv_reference(layer, xq, wq, fmap))
    clean = A.on_array(model, array)[0].integer_output(xq, wq).round().long()
    assert torch.equal(got[0, 0], clean[0, 0])  # column 0 sees the clean activation
    assert not torch.equal(got[0, 1, 0, 0], clean[0, 1, 0, 0])  # a corner output reads padding


@pytest.mark.parametrize("seed", range(3))
def test_linear_fast_path_matches_reference(seed: int) -> None:
    rng = random.Random(100 + seed)
    for _ in range(10):
        array = ArrayConfig(rng.randint(2, 8), rng.randint(2, 8))
        lin = nn.Linear(rng.randint(1, 30), rng.randint(1, 20))
        x = torch.randn(5, lin.in_features)
        model = A.calibrate(nn.Sequential(lin), x)
        fmap = random_fault_map(array, rng.randint(1, 12), rng)
        layer = A.on_array(model, array, fmap)[0]
        q = quantizer("int8")
        xq = q.act(x, layer.scale_tensor())
        wq, _ = q.weight(layer.weight)
        ref = A.systolic_matmul(xq.long(), wq.long(), array, fmap)
        assert torch.equal(layer.integer_output(xq, wq).round().long(), ref)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def test_gradients_flow_through_faulty_layers() -> None:
    array = ArrayConfig(4, 4)
    model = A.calibrate(_tiny_model(), torch.randn(16, 1, 6, 6))
    fmap = random_fault_map(array, 8, random.Random(0))
    am = A.on_array(model, array, fmap)
    x = torch.randn(8, 1, 6, 6, requires_grad=True)
    F.cross_entropy(am(x), torch.randint(0, 3, (8,))).backward()
    for name, p in am.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_ste_backward_is_clean_quantized_gradient() -> None:
    array = ArrayConfig(4, 4)
    lin = nn.Linear(6, 3)
    x = torch.randn(5, 6)
    model = A.calibrate(nn.Sequential(lin), x)
    fmap = FaultMap(array, (Fault(0, 0, "psum", 20, 1),))
    am = A.on_array(model, array, fmap)
    xr = x.clone().requires_grad_()
    am(xr).sum().backward()
    q = quantizer("int8")
    wq, sw = q.weight(lin.weight)
    assert torch.allclose(xr.grad, (wq * sw[:, None]).sum(0).expand(5, 6), atol=1e-6)
    # only the asked-for gradients: frozen weights get none
    am2 = A.on_array(model, array, fmap)
    for p in am2.parameters():
        p.requires_grad_(False)
    xr2 = x.clone().requires_grad_()
    am2(xr2).sum().backward()
    assert all(p.grad is None for p in am2.parameters())


def test_forward_is_deterministic_and_batch_independent() -> None:
    array = ArrayConfig(4, 4)
    model = A.calibrate(_tiny_model(), torch.randn(32, 1, 6, 6))
    am = A.on_array(model, array, random_fault_map(array, 6, random.Random(3))).eval()
    x = torch.randn(10, 1, 6, 6)
    with torch.no_grad():
        full = am(x)
        parts = torch.cat([am(x[:3]), am(x[3:])])
    assert torch.equal(full, parts)  # static scales: a sample's output does not depend on its batch


def test_uncalibrated_model_is_rejected() -> None:
    array = ArrayConfig(4, 4)
    with pytest.raises(ValueError, match="not calibrated.*calibrate"):
        A.on_array(_tiny_model(), array)


def test_protect_and_set_faults() -> None:
    array = ArrayConfig(4, 4)
    model = A.calibrate(_tiny_model(), torch.randn(16, 1, 6, 6))
    fmap = FaultMap(array, tuple(Fault(r, c, "psum", 29, 1) for r in range(4) for c in range(4)))
    x = torch.randn(4, 1, 6, 6)
    clean = A.on_array(model, array).eval()(x)
    faulty = A.on_array(model, array, fmap).eval()(x)
    assert not torch.allclose(clean, faulty)
    protected = A.on_array(model, array, fmap, protect=["0", "4"]).eval()(x)
    assert torch.equal(protected, clean)
    am = A.on_array(model, array, fmap).eval()
    A.set_faults(am, None)
    assert torch.equal(am(x), clean)
    A.set_faults(am, fmap)
    assert torch.equal(am(x), faulty)
    with pytest.raises(ValueError, match="not Linear/Conv2d layers"):
        A.on_array(model, array, fmap, protect=["nope"])
    with pytest.raises(ValueError, match="5x4 array"):
        A.set_faults(am, FaultMap(ArrayConfig(5, 4)))


def test_transient_flips_rate_and_seed() -> None:
    array = ArrayConfig(4, 4)
    model = A.calibrate(nn.Sequential(nn.Linear(8, 64)), torch.randn(64, 8))
    x = torch.randn(256, 8)
    layer = A.on_array(model, array)[0]
    q = quantizer("int8")
    xq, (wq, _) = q.act(x, layer.scale_tensor()), q.weight(layer.weight)
    clean = layer.integer_output(xq, wq).long()
    ber = 1e-3
    flipped = A.on_array(model, array, ber=ber, seed=5)[0].integer_output(xq, wq).long()
    n_flips = sum(bin(int(v) & 0xFFFFFFFF).count("1") for v in (clean ^ flipped).flatten().tolist())
    expected = clean.numel() * 32 * ber
    assert abs(n_flips - expected) < 5 * expected**0.5
    again = A.on_array(model, array, ber=ber, seed=5)[0].integer_output(xq, wq).long()
    assert torch.equal(flipped, again)
    assert torch.equal(A.on_array(model, array, ber=ber, seed=5, protect=["0"])[0].integer_output(xq, wq).long(), clean)
    with pytest.raises(ValueError, match="ber"):
        A.on_array(model, array, ber=1.5)


def test_state_dict_roundtrip_keeps_scales(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = A.build_model("lenet5", (1, 12, 12), 4)
    assert A.uncalibrated_layers(model)
    A.calibrate(model, torch.rand(8, 1, 12, 12))
    path = tmp_path / "m.safetensors"
    A.save_model(model, path)
    loaded = A.load_model("lenet5", path, (1, 12, 12), 4)
    assert not A.uncalibrated_layers(loaded)
    array = ArrayConfig(8, 8)
    fmap = random_fault_map(array, 10, random.Random(2))
    x = torch.rand(5, 1, 12, 12)
    assert torch.equal(A.on_array(model, array, fmap).eval()(x), A.on_array(loaded, array, fmap).eval()(x))
    on = A.on_array(model, array, fmap)
    assert set(on.state_dict()) == set(model.state_dict())
    assert torch.equal(A.to_float(on).eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="does not fit resnet20"):
        A.load_model("resnet20", path, (1, 12, 12), 4)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_psum_patch_wraps_like_the_int32_buffer(kind: str, bias: bool) -> None:
    """Psum-affected outputs are patched in int64 and narrowed to int32: the sum over
    tiles must wrap in two's complement exactly like the array's output buffer, and the
    dequantized forward must scale the wrapped value (not a float32-rounded one)."""
    array = ArrayConfig(4, 2)
    # K = 12 = 3 tiles; column 0: one stuck-at-1 on bit 30 (single-bit path), each tile
    # adds ~2^30, so the buffer passes 2^31 and wraps negative; column 1: a chained pair
    fmap = FaultMap(
        array,
        (Fault(3, 0, "psum", 30, 1), Fault(1, 1, "psum", 31, 1), Fault(3, 1, "psum", 29, 0)),
    )
    torch.manual_seed(0)
    layer_f: nn.Module = nn.Linear(12, 2, bias=bias) if kind == "linear" else nn.Conv2d(12, 2, 1, bias=bias)
    with torch.no_grad():
        layer_f.weight.copy_(torch.rand_like(layer_f.weight) + 0.1)  # positive: clean sums > 0
    x = torch.rand(6, 12) if kind == "linear" else torch.rand(3, 12, 2, 1)
    model = A.calibrate(nn.Sequential(layer_f), x)
    layer = A.on_array(model, array, fmap)[0]
    q = quantizer("int8")
    xq, (wq, sw) = q.act(x, layer.scale_tensor()), q.weight(layer.weight)
    if kind == "linear":
        ref = A.systolic_matmul(xq.long(), wq.long(), array, fmap)
    else:
        ref = _conv_reference(layer, xq, wq, fmap).permute(0, 2, 3, 1).reshape(-1, 2)
    assert bool((ref[:, 0] < 0).all())  # 3 * 2^30 + clean sum wrapped past 2^31
    got = layer.integer_output(xq, wq)
    got2 = got if kind == "linear" else got.permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.equal(got2.round().long(), ref)
    scale = (layer.scale_tensor() * sw).double()
    want = (ref.double() * scale + (layer.bias.double() if bias else 0.0)).float()
    with torch.no_grad():
        out = layer(x)
    out2 = out if kind == "linear" else out.permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.equal(out2, want)


def test_conv_psum_segment_sees_act_fault_of_its_rows() -> None:
    """A psum fault's segment sum includes the act-fault changes of the rows above it
    (left columns): the two corrections meet in different position layouts, so several
    samples and positions are needed to tell them apart."""
    array = ArrayConfig(4, 4)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(7))
    model = A.calibrate(nn.Sequential(conv), x)
    fmap = FaultMap(array, (Fault(0, 0, "act", 6, 1), Fault(1, 0, "act", 2, 0), Fault(2, 1, "psum", 12, 1)))
    layer = A.on_array(model, array, fmap)[0]
    q = quantizer("int8")
    xq, (wq, _) = q.act(x, layer.scale_tensor()), q.weight(layer.weight)
    got = layer.integer_output(xq, wq).round().long()
    assert torch.equal(got, _conv_reference(layer, xq, wq, fmap))
