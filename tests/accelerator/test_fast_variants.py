"""The fast path's alternative kernels equal the reference too, forced here on small
layers: the psum kernel over blocks of a few positions (a layer's positions split
across blocks and threads, the last block partial), the compiled psum kernel as on
CPUs without AVX-512 VNNI, the plain-torch kernels used without numba (also over
chunks of a few positions), int32 GEMMs chunked over rows (very long K), the float64
fallback for CPUs whose int8 GEMM is not exact, and the paths a GPU takes (run here on
the CPU); and psum faults in bulk (chains down a column, several stuck bits on one PE,
act faults on the same rows)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
from torch import nn

import accelerator as A
import accelerator.fast as fast
import accelerator.kernels as kernels
from accelerator import ArrayConfig, Fault, FaultMap
from accelerator.quant import quantizer

from .conftest import random_fault_map
from .test_layers import _conv_reference


@pytest.fixture(
    params=[
        # the fast lane (`make test-fast`) keeps the default path, the path without numba and a GPU's
        "psum_blocks",
        pytest.param("small_psum_blocks", marks=pytest.mark.slow),
        pytest.param("psum_kernel_without_vnni", marks=pytest.mark.slow),
        "torch_kernels",
        pytest.param("torch_kernels_chunked", marks=pytest.mark.slow),
        pytest.param("chunked_rows", marks=pytest.mark.slow),
        pytest.param("float64_gemm", marks=pytest.mark.slow),
        "gpu_paths",
    ]
)
def variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "small_psum_blocks":  # 5 positions a block: rarely a divisor of P, above a Linear's B
        monkeypatch.setattr(fast, "PSUM_BLOCK", 5)
    elif request.param == "psum_kernel_without_vnni":  # the compiled kernel on CPUs without AVX-512 VNNI
        if kernels.compiled() is None:
            pytest.skip("numba is not installed")
        monkeypatch.setattr(kernels.compiled(), "USE_VNNI", False)
    elif request.param.startswith("torch_kernels"):  # as without numba installed
        monkeypatch.setattr(kernels, "compiled", lambda: None)
        if request.param == "torch_kernels_chunked":
            monkeypatch.setattr(kernels, "FALLBACK_CHUNK_BYTES", 1)
    elif request.param == "chunked_rows":
        monkeypatch.setattr(fast, "INT32_ROWS", 3)
    elif request.param == "float64_gemm":
        monkeypatch.setattr(fast, "_int_mm_is_exact", lambda: False)
    elif request.param == "gpu_paths":  # what a GPU runs (float64 GEMMs and clean layers, torch kernels), on the CPU
        monkeypatch.setattr(kernels, "on_host", lambda _t: False)
    return str(request.param)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_conv_variants_match_reference(variant: str, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(10):
        array = ArrayConfig(rng.randint(2, 5), rng.randint(2, 5))
        G = rng.choice([1, 2])
        conv = nn.Conv2d(G * rng.randint(1, 3), G * rng.randint(1, 4), rng.choice([1, 3]), padding=1, groups=G)
        x = torch.randn(2, conv.in_channels, 6, 5, generator=torch.Generator().manual_seed(seed))
        model = A.calibrate(nn.Sequential(conv), x)
        fmap = random_fault_map(array, rng.randint(1, 10), rng, sites=("act", "psum", "weight"))
        layer = A.on_array(model, array, fmap)[0]
        q = quantizer("int8")
        xq, (wq, _) = q.act(x, layer.scale_tensor()), q.weight(layer.weight)
        got = layer.integer_output(xq, wq)
        assert torch.equal(got.round().long(), _conv_reference(layer, xq, wq, fmap)), fmap.to_dict()


def test_linear_variants_match_reference(variant: str) -> None:
    rng = random.Random(5)
    for _ in range(20):
        array = ArrayConfig(rng.randint(1, 5), rng.randint(1, 5))
        B, K, n_out = rng.randint(1, 4), rng.randint(1, 20), rng.randint(1, 9)
        x = torch.randint(-127, 128, (B, K))
        w = torch.randint(-127, 128, (n_out, K))
        fmap = random_fault_map(array, rng.randint(1, 10), rng)
        assert torch.equal(A.fast_matmul(x, w, array, fmap), A.systolic_matmul(x, w, array, fmap)), fmap.to_dict()


def test_extreme_operands_are_exact() -> None:
    """-128 (stuck sign bits) and 127 everywhere: the int8 GEMMs must not saturate."""
    array = ArrayConfig(4, 3)
    fmap = FaultMap(array, (Fault(0, 0, "act", 7, 1), Fault(1, 1, "weight", 7, 1), Fault(2, 2, "psum", 3, 1)))
    for xv, wv in ((-127, -127), (127, -127), (-127, 127), (127, 127)):
        x = torch.full((5, 11), xv)
        w = torch.full((6, 11), wv)
        assert torch.equal(A.fast_matmul(x, w, array, fmap), A.systolic_matmul(x, w, array, fmap))


def test_prepared_weights_follow_weight_and_fault_changes() -> None:
    """Layers reuse their prepared weights across calls: an optimizer step, a state_dict
    load and a fault-map swap must each be seen by the next forward."""
    torch.manual_seed(0)
    array = ArrayConfig(4, 4)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.Flatten(), nn.Linear(5 * 16, 6))
    x = torch.randn(3, 2, 4, 4)
    A.calibrate(model, x)
    fmap = random_fault_map(array, 8, random.Random(3), sites=("weight", "act", "psum"))
    am = A.on_array(model, array, fmap).eval()

    def fresh() -> torch.Tensor:
        with torch.no_grad():
            return A.on_array(A.to_float(am), array, fmap).eval()(x)

    with torch.no_grad():
        am(x)
    opt = torch.optim.SGD(am.parameters(), lr=0.5)
    am.train()
    torch.nn.functional.cross_entropy(am(x), torch.arange(3)).backward()
    opt.step()
    am.eval()
    with torch.no_grad():
        assert torch.equal(am(x), fresh())
        am.load_state_dict(model.state_dict())
        assert torch.equal(am(x), fresh())
        fmap = random_fault_map(array, 8, random.Random(4), sites=("weight", "act", "psum"))
        A.set_faults(am, fmap)
        assert torch.equal(am(x), fresh())


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in (1, 2))])
def test_one_tile_psum_layers_match_reference(seed: int) -> None:
    """K <= rows (one tile) with psum faults."""
    rng = random.Random(seed)
    for _ in range(10):
        array = ArrayConfig(rng.randint(9, 20), rng.randint(2, 5))
        G = rng.choice([1, 2])
        conv = nn.Conv2d(G, G * rng.randint(1, 4), 3, padding=rng.choice([0, 1]), groups=G)
        x = torch.randn(3, G, 6, 5, generator=torch.Generator().manual_seed(seed))
        model = A.calibrate(nn.Sequential(conv), x)
        fmap = random_fault_map(array, rng.randint(1, 12), rng, sites=("psum", "weight", "pe"))
        layer = A.on_array(model, array, fmap)[0]
        assert layer.plan.T == 1
        q = quantizer("int8")
        xq, (wq, _) = q.act(x, layer.scale_tensor()), q.weight(layer.weight)
        assert torch.equal(layer.integer_output(xq, wq).round().long(), _conv_reference(layer, xq, wq, fmap))
        xm = torch.randint(-127, 128, (4, rng.randint(1, array.rows)))
        wm = torch.randint(-127, 128, (rng.randint(1, 9), xm.shape[1]))
        assert torch.equal(A.fast_matmul(xm, wm, array, fmap), A.systolic_matmul(xm, wm, array, fmap))


def _psum_heavy_map(array: ArrayConfig, rng: random.Random) -> FaultMap:
    """Psum faults chained down a few columns, some PEs with several stuck bits (both
    values, sign bit included), act faults on the same rows."""
    faults: dict[tuple[int, int, str, int | None], Fault] = {}
    for c in rng.sample(range(array.cols), min(2, array.cols)):
        for r in rng.sample(range(array.rows), rng.randint(1, min(3, array.rows))):
            for b in rng.sample([0, 5, 19, 20, 30, 31], rng.randint(1, 3)):
                f = Fault(r, c, "psum", b, rng.randrange(2))
                faults[f.key] = f
    for _ in range(rng.randint(0, 3)):
        f = Fault(rng.randrange(array.rows), rng.randrange(array.cols), "act", rng.randrange(8), rng.randrange(2))
        faults[f.key] = f
    return FaultMap(array, tuple(faults.values()))


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in (1, 2, 3))])
def test_psum_chains_and_multibit_faults_match_reference(variant: str, seed: int) -> None:
    """Outputs with 1..9 stuck bits met in a column, one tile (K <= rows) and several,
    convs with stride and padding, Linear."""
    rng = random.Random(100 + seed)
    q = quantizer("int8")
    for _ in range(6):
        array = ArrayConfig(rng.randint(3, 6), rng.randint(2, 4))
        fmap = _psum_heavy_map(array, rng)
        cin, kernel = rng.choice([1, 3]), rng.choice([1, 3])  # 1x1: one tile (K <= rows); 3x3: several
        conv = nn.Conv2d(cin, rng.randint(2, 6), kernel, stride=rng.choice([1, 2]), padding=rng.choice([0, 1]))
        x = torch.randn(2, cin, 7, 6, generator=torch.Generator().manual_seed(seed))
        layer = A.on_array(A.calibrate(nn.Sequential(conv), x), array, fmap)[0]
        xq, (wq, _) = q.act(x, layer.scale_tensor()), q.weight(layer.weight)
        got = layer.integer_output(xq, wq)
        assert torch.equal(got.round().long(), _conv_reference(layer, xq, wq, fmap)), fmap.to_dict()
        for K in (rng.randint(1, array.rows), rng.randint(array.rows + 1, 4 * array.rows)):
            xm = torch.randint(-128, 128, (rng.randint(1, 9), K))
            wm = torch.randint(-128, 128, (rng.randint(1, 9), K))
            assert torch.equal(A.fast_matmul(xm, wm, array, fmap), A.systolic_matmul(xm, wm, array, fmap))


@pytest.mark.slow  # a fresh process compiles the kernel
def test_psum_kernel_keeps_torch_thread_count() -> None:
    """The psum kernel's first call starts numba's threads; torch's own thread count
    (set by the user, e.g. 1 on a shared machine) must survive it. In a fresh process:
    only the first parallel call of a process could change it."""
    code = (
        "import torch, accelerator as A\n"
        "torch.set_num_threads(1)\n"
        "array = A.ArrayConfig(4, 4)\n"
        "fmap = A.FaultMap(array, (A.Fault(1, 1, 'psum', 3, 1),))\n"
        "x, w = torch.randint(-127, 128, (40, 9)), torch.randint(-127, 128, (5, 9))\n"
        "assert torch.equal(A.fast_matmul(x, w, array, fmap), A.systolic_matmul(x, w, array, fmap))\n"
        "print(torch.get_num_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=300)
    assert out.stdout.strip() == "1", out.stderr


@pytest.mark.parametrize("bias", [True, False])
def test_compiled_and_torch_kernels_give_the_same_floats(monkeypatch: pytest.MonkeyPatch, bias: bool) -> None:
    """A model's outputs (so its accuracy) must not depend on whether numba is there, or
    on the device: the compiled dequant and the torch one round the same way, bit for
    bit, and so do the paths a GPU takes (run here on the CPU)."""
    if kernels.compiled() is None:
        pytest.skip("numba is not installed: there is no compiled kernel to compare")
    rng = random.Random(11)
    array = ArrayConfig(6, 5)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.Conv2d(8, 7, 3, bias=bias),
        nn.Flatten(),
        nn.Linear(7 * 7 * 7, 9, bias=bias),
    )
    x = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(11))
    A.calibrate(model, x)
    fmap = random_fault_map(array, 12, rng, sites=("act", "psum", "weight", "pe"))
    am = A.on_array(model, array, fmap).eval()
    with torch.no_grad():
        compiled = am(x)
        monkeypatch.setattr(kernels, "on_host", lambda _t: False)  # weights prepared afresh, too
        assert torch.equal(A.on_array(model, array, fmap).eval()(x), compiled)
        monkeypatch.setattr(kernels, "on_host", lambda _t: True)
        monkeypatch.setattr(kernels, "compiled", lambda: None)
        assert torch.equal(am(x), compiled)


@pytest.mark.parametrize("sites", [("weight", "pe"), ("psum", "act"), ()], ids=["masks", "no_masks", "clean"])
def test_compiled_weight_preparation_equals_torch(sites: tuple[str, ...]) -> None:
    """The compiled int8 weight preparation gives the quantizer's and effective_weight's
    numbers bit for bit: all-zero rows, exact .5 ties (round half to even), clamping
    at +-127, weight masks and dead PEs over padded K-tiles, conv groups."""
    compiled = kernels.compiled()
    if compiled is None:
        pytest.skip("numba is not installed")
    rng = random.Random(len(sites))
    q = quantizer("int8")
    for i in range(20):
        array = ArrayConfig(rng.randint(1, 6), rng.randint(1, 6))
        G, og, k = rng.choice([1, 2, 3]), rng.randint(1, 7), rng.randint(1, 30)
        w = torch.randn(G * og, k, generator=torch.Generator().manual_seed(i))
        w[0] = 0.0  # scale 1, all weights 0
        if k > 1:  # ties: 127 * j / 2 of a row with max 127 round half to even
            w[-1, :] = torch.arange(k, dtype=torch.float32) * 0.5
            w[-1, 0] = 127.0
        fmap = random_fault_map(array, rng.randint(1, 10), rng, sites=sites) if sites else FaultMap(array)
        plan = fast.build_plan(array, fmap, G, og, k)
        wq, sw = q.weight(w)
        want = fast.array_weights(plan, wq)
        got_wq, got_sw, got = fast.quantized_array_weights(plan, w.clone().requires_grad_(), q)
        assert torch.equal(got_wq, wq) and torch.equal(got_sw, sw)
        for name in ("dense", "w8", "terms"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None and b is None) or torch.equal(a, b), (name, fmap.to_dict())
        assert got.shape == want.shape


@pytest.mark.slow
def test_fat_takes_the_same_steps_on_the_gpu_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward outputs equal bit for bit and the backward is the same code: fault-aware
    training on the paths a GPU takes (run here on the CPU) gives the same weights."""
    data = A.load_dataset("digits").subset(256, 64)
    model = A.train(A.build_model("lenet5", data.input_shape, 10), data, 1, lr=0.05, batch_size=64)
    array = ArrayConfig(8, 8)
    fmap = random_fault_map(array, 16, random.Random(9))
    want = A.fault_aware_train(model, array, fmap, data, 1, lr=0.02, batch_size=64, ber=1e-4)
    monkeypatch.setattr(kernels, "on_host", lambda _t: False)
    got = A.fault_aware_train(model, array, fmap, data, 1, lr=0.02, batch_size=64, ber=1e-4)
    for k, v in want.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
