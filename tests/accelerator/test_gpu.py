"""The accelerator on a CUDA GPU: the same exact integers as the reference, the same
floats as on the CPU, training and evaluation with `device="cuda"`. Skipped on
machines without one (CI has none): run on a GPU machine with `pytest -m gpu`."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import nn

import accelerator as A
from accelerator import ArrayConfig, Fault, FaultMap
from accelerator.quant import quantizer

from .conftest import random_fault_map
from .test_layers import _conv_reference
from .test_train import _high_weight_faults

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]
CUDA = torch.device("cuda")
# psum- and act-heavy (the int8 path, psum kernel), weight and dead PEs only (the dense
# float64 GEMM or convolution), none
MAP_SITES = [("act", "psum", "weight", "pe"), ("psum",), ("act",), ("weight", "pe"), ()]


@pytest.mark.parametrize("sites", MAP_SITES, ids=lambda s: "+".join(s) or "clean")
def test_conv_layers_on_gpu_match_reference(sites: tuple[str, ...]) -> None:
    rng = random.Random(len(sites))
    q = quantizer("int8")
    for i in range(8):
        array = ArrayConfig(rng.randint(2, 6), rng.randint(2, 6))
        G = rng.choice([1, 2])
        conv = nn.Conv2d(
            G * rng.randint(1, 3),
            G * rng.randint(1, 4),
            rng.choice([1, 3]),
            stride=rng.choice([1, 2]),
            padding=rng.choice([0, 1]),
            groups=G,
        )
        x = torch.randn(3, conv.in_channels, 7, 6, generator=torch.Generator().manual_seed(i))
        fmap = random_fault_map(array, rng.randint(1, 12), rng, sites=sites) if sites else FaultMap(array)
        layer = A.on_array(A.calibrate(nn.Sequential(conv), x), array, fmap)[0]
        xq, (wq, _) = q.act(x, layer.scale_tensor()), q.weight(layer.weight)
        want = _conv_reference(layer, xq, wq, fmap)
        got = layer.to(CUDA).integer_output(xq.to(CUDA), wq.to(CUDA))
        assert got.is_cuda
        assert torch.equal(got.cpu().round().long(), want), fmap.to_dict()


@pytest.mark.parametrize("sites", MAP_SITES, ids=lambda s: "+".join(s) or "clean")
def test_linear_layers_on_gpu_match_reference(sites: tuple[str, ...]) -> None:
    rng = random.Random(10 + len(sites))
    q = quantizer("int8")
    for _ in range(10):
        array = ArrayConfig(rng.randint(1, 6), rng.randint(1, 6))
        lin = nn.Linear(rng.randint(1, 20), rng.randint(1, 9))
        x = torch.randn(rng.randint(1, 40), lin.in_features)
        fmap = random_fault_map(array, rng.randint(1, 12), rng, sites=sites) if sites else FaultMap(array)
        layer = A.on_array(A.calibrate(nn.Sequential(lin), x), array, fmap)[0]
        xq, (wq, _) = q.act(x, layer.scale_tensor()), q.weight(layer.weight)
        want = A.systolic_matmul(xq.long(), wq.long(), array, fmap)
        got = layer.to(CUDA).integer_output(xq.to(CUDA), wq.to(CUDA))
        assert torch.equal(got.cpu().round().long(), want), fmap.to_dict()


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 20, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(20 * 2 * 2, 10),
    )


@pytest.mark.parametrize("ber", [0.0, 1e-3])
def test_model_gives_the_same_floats_on_gpu_and_cpu(ber: float) -> None:
    """Array layers dequantize with the same rounding on both devices, and transient
    flips are drawn on the CPU: the logits are equal bit for bit, so is an accuracy."""
    torch.manual_seed(0)
    data = A.load_dataset("digits").subset(64, 200)
    model = A.calibrate(_model(), data.x_train)
    array = ArrayConfig(8, 8)
    fmap = random_fault_map(array, 20, random.Random(3))
    cpu = A.on_array(model, array, fmap, ber=ber, seed=5).eval()
    gpu = A.on_array(model, array, fmap, ber=ber, seed=5).to(CUDA).eval()
    with torch.no_grad():
        assert torch.equal(gpu(data.x_test.to(CUDA)).cpu(), cpu(data.x_test))
    test = (data.x_test, data.y_test)
    assert A.evaluate(model, array, fmap, test, device="cuda") == A.evaluate(model, array, fmap, test)


def test_gradients_on_gpu_match_cpu() -> None:
    torch.manual_seed(1)
    data = A.load_dataset("digits").subset(64, 10)
    model = A.calibrate(_model(), data.x_train)
    array = ArrayConfig(8, 8)
    fmap = random_fault_map(array, 20, random.Random(4))
    grads = []
    for dev in ("cpu", "cuda"):
        am = A.on_array(model, array, fmap).to(dev)
        nn.functional.cross_entropy(am(data.x_train.to(dev)), data.y_train.to(dev)).backward()
        grads.append({n: p.grad.cpu() for n, p in am.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 6
    for n, g in grads[0].items():  # float (STE) backward; cuDNN convolutions use TF32 by default
        torch.testing.assert_close(grads[1][n], g, rtol=1e-2, atol=1e-3 * float(g.abs().max()), msg=n)


def test_fat_on_gpu_recovers_and_resumes_on_cpu(tmp_path: Path) -> None:
    """FAT with device="cuda" wins back most of what a heavy weight-fault map costs and
    returns a CPU model; a run whose GPU worker dies resumes from its checkpoint on
    the CPU (a worker without a GPU)."""
    data = A.load_dataset("digits")
    model = A.train(A.build_model("lenet5", data.input_shape, 10), data, 8, lr=0.05, batch_size=64, device="cuda")
    assert next(model.parameters()).device.type == "cpu"
    array = ArrayConfig(16, 16)
    fmap = _high_weight_faults(array, 0.3, seed=3)
    clean = A.evaluate(model, array, None, data, device="cuda")
    faulty = A.evaluate(model, array, fmap, data, device="cuda")
    assert faulty <= clean - 0.10, (clean, faulty)
    kw = dict(lr=0.003, batch_size=64)
    fat = A.fault_aware_train(model, array, fmap, data, 3, device="cuda", **kw)  # type: ignore[arg-type]
    assert next(fat.parameters()).device.type == "cpu"
    recovered = A.evaluate(fat, array, fmap, data)
    assert recovered >= faulty + 0.6 * (clean - faulty), (clean, faulty, recovered)

    ckpt = tmp_path / "fat.ckpt"

    def crash(epoch: int, _n: int, _m: dict[str, float]) -> None:
        if epoch == 2:
            raise KeyboardInterrupt  # the GPU worker is killed after epoch 2's checkpoint

    with pytest.raises(KeyboardInterrupt):
        A.fault_aware_train(model, array, fmap, data, 3, device="cuda", checkpoint=ckpt, on_progress=crash, **kw)  # type: ignore[arg-type]
    seen: list[int] = []
    resumed = A.fault_aware_train(
        model, array, fmap, data, 3, checkpoint=ckpt, on_progress=lambda e, _n, _m: seen.append(e), **kw
    )  # type: ignore[arg-type]
    assert seen == [3]
    assert A.evaluate(resumed, array, fmap, data) >= faulty + 0.6 * (clean - faulty)


def test_psum_fault_on_gpu_meets_every_bit() -> None:
    """One column's psum chain with stuck sign bits, a Linear long enough for many
    tiles: the GPU's torch kernel against the reference."""
    array = ArrayConfig(4, 2)
    fmap = FaultMap(array, tuple(Fault(r, 1, "psum", b, 1) for r in range(4) for b in (0, 31)))
    lin = nn.Linear(37, 4)
    x = torch.randn(50, 37)
    layer = A.on_array(A.calibrate(nn.Sequential(lin), x), array, fmap)[0]
    q = quantizer("int8")
    xq, (wq, _) = q.act(x, layer.scale_tensor()), q.weight(layer.weight)
    got = layer.to(CUDA).integer_output(xq.to(CUDA), wq.to(CUDA))
    assert torch.equal(got.cpu().round().long(), A.systolic_matmul(xq.long(), wq.long(), array, fmap))
