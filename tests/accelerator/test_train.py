"""Training: FAT recovers accuracy, schedules, determinism, checkpoint resume."""

from __future__ import annotations

import copy
import functools
import random
from pathlib import Path
from typing import Any

import pytest
import torch

import accelerator as A
from accelerator import ArrayConfig, Fault, FaultMap

from .conftest import random_fault_map


def _high_weight_faults(array: ArrayConfig, rate: float, seed: int) -> FaultMap:
    """`rate` of the PEs with a weight bit 6 or 7 stuck at 1: large, learnable damage."""
    rng = random.Random(seed)
    pes = rng.sample([(r, c) for r in range(array.rows) for c in range(array.cols)], int(rate * array.n_pes))
    return FaultMap(array, tuple(Fault(r, c, "weight", rng.choice([6, 7]), 1) for r, c in pes))


@pytest.mark.slow
def test_fat_recovers_lenet5_on_mnist5k() -> None:
    data = A.load_dataset("mnist5k")
    test = (data.x_test[:600], data.y_test[:600])
    model = A.train(A.build_model("lenet5", data.input_shape, 10), data.subset(2400), 3, lr=0.1, batch_size=64)
    array = ArrayConfig(32, 32)
    fmap = _high_weight_faults(array, 0.3, seed=3)
    clean = A.evaluate(model, array, None, test)
    faulty = A.evaluate(model, array, fmap, test)
    assert clean >= 0.8
    assert faulty <= clean - 0.10, (clean, faulty)
    progress: list[tuple[int, int, dict[str, float]]] = []
    fat = A.fault_aware_train(
        model,
        array,
        fmap,
        data.subset(1200),
        3,
        # 0.01 over-shoots on this map (recovered 0.49 of 0.83 on one machine, 0.77 at 0.003); 2 epochs
        # recovered 0.705 of the 0.713 needed on an AVX2 machine (its float kernels round otherwise)
        lr=0.003,
        batch_size=64,
        on_progress=lambda e, n, m: progress.append((e, n, m)),
    )
    recovered = A.evaluate(fat, array, fmap, test)
    # recovers most of the loss: at least 60% of the lost points, with a real margin
    assert recovered >= faulty + 0.6 * (clean - faulty), (clean, faulty, recovered)
    assert [p[0] for p in progress] == [1, 2, 3] and all(p[1] == 3 for p in progress)
    assert {"loss", "train_acc", "fault_rate"} <= set(progress[-1][2])


@functools.cache
def _trained_mlp() -> tuple[torch.nn.Module, A.Dataset]:
    data = A.load_dataset("digits").subset(300, 200)
    return A.train(A.build_model("mlp", data.input_shape, 10), data, 6, lr=0.1, batch_size=32), data


def _small_setup() -> tuple[torch.nn.Module, A.Dataset, ArrayConfig]:
    """A small trained MLP (trained once per session; each test gets its own copy), digits, 8x8."""
    model, data = _trained_mlp()
    return copy.deepcopy(model), data, ArrayConfig(8, 8)


@pytest.mark.slow
def test_fat_is_deterministic_and_checkpoint_resumes(tmp_path: Path) -> None:
    model, data, array = _small_setup()
    maps = [random_fault_map(array, 6, random.Random(i)) for i in range(3)]

    def schedule(epoch: int, step: int) -> FaultMap:
        return maps[(epoch + step) % 3]

    kw = dict(lr=0.02, batch_size=64, seed=11, ber=1e-4)
    full = A.fault_aware_train(model, array, schedule, data, 3, **kw)  # type: ignore[arg-type]
    again = A.fault_aware_train(model, array, schedule, data, 3, **kw)  # type: ignore[arg-type]
    for k, v in full.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k

    ckpt = tmp_path / "fat.ckpt"

    def crash(epoch: int, _n: int, _m: dict[str, float]) -> None:
        if epoch == 2:
            raise KeyboardInterrupt  # a worker killed after epoch 2's checkpoint

    with pytest.raises(KeyboardInterrupt):
        A.fault_aware_train(model, array, schedule, data, 3, checkpoint=ckpt, on_progress=crash, **kw)  # type: ignore[arg-type]
    assert ckpt.exists() and not (tmp_path / "fat.ckpt.tmp").exists()
    seen: list[int] = []
    resumed = A.fault_aware_train(
        model,
        array,
        schedule,
        data,
        3,
        checkpoint=ckpt,
        on_progress=lambda e, n, m: seen.append(e),
        **kw,  # type: ignore[arg-type]
    )
    assert seen == [3]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    with pytest.raises(ValueError, match="another run"):
        A.fault_aware_train(model, array, schedule, data, 3, checkpoint=ckpt, lr=0.5, batch_size=64, seed=11)


def test_fat_changes_weights_and_keeps_scales() -> None:
    model, data, array = _small_setup()
    fmap = random_fault_map(array, 10, random.Random(5))
    out = A.fault_aware_train(model, array, fmap, data, 1, lr=0.05, batch_size=64)
    sd0, sd1 = model.state_dict(), out.state_dict()
    assert set(sd0) == set(sd1)
    assert any(not torch.equal(sd0[k], sd1[k]) for k in sd0 if k.endswith("weight"))
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0 if k.endswith("act_scale"))
    with pytest.raises(ValueError, match="not a FaultMap"):
        A.fault_aware_train(model, array, lambda e, s: None, data, 1, lr=0.05, batch_size=64)  # type: ignore[arg-type, return-value]


def test_layer_sensitivity_and_cycles() -> None:
    model, data, array = _small_setup()
    fmap = FaultMap(array, tuple(Fault(r, c, "psum", 28, 1) for r in range(8) for c in range(8)))
    sens = A.layer_sensitivity(model, array, fmap, data)
    assert list(sens) == ["1", "3", "5"]
    base = A.evaluate(model, array, None, data)
    assert base > 0.6
    assert all(v > 0.3 for v in sens.values()), (base, sens)  # a psum bit 28 stuck everywhere wrecks any layer
    cyc = A.cycles(model, array, data.input_shape, batch=16)
    # mlp 64-256-128-10 on 8x8: tiles x (batch + R + C - 1)
    assert cyc == {"1": 8 * 32 * (16 + 15), "3": 32 * 16 * (16 + 15), "5": 16 * 2 * (16 + 15)}
    assert A.protected_cycles(cyc, ["5"]) == sum(cyc.values()) + 2 * cyc["5"]
    assert A.tmr_penalty(cyc, ["5"]) == pytest.approx(2 * cyc["5"] / sum(cyc.values()))
    lenet = A.build_model("lenet5", (1, 8, 8), 10)
    conv_cycles = A.cycles(lenet, ArrayConfig(4, 4), (1, 8, 8), batch=2)
    # first conv: K = 25 -> 7 tiles, O = 6 -> 2 tiles, 64 output positions per sample
    assert conv_cycles["features.0"] == 7 * 2 * (2 * 64 + 4 + 4 - 1)
    with pytest.raises(ValueError, match="unknown layers"):
        A.tmr_penalty(cyc, ["nope"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_missing_gpu_is_named() -> None:
    model, data, array = _small_setup()
    for call in (
        lambda: A.evaluate(model, array, None, data, device="cuda"),
        lambda: A.fault_aware_train(model, array, FaultMap(array), data, 1, lr=0.01, batch_size=64, device="cuda:0"),
        lambda: A.train(model, data, 1, device="cuda"),
    ):
        with pytest.raises(ValueError, match="no CUDA device"):
            call()
    assert next(model.parameters()).device.type == "cpu"  # train() moved nothing before it failed


def test_an_epoch_fraction_reads_that_share_of_the_train_split_each_epoch() -> None:
    model, data, array = _small_setup()
    fmap = random_fault_map(array, 10, random.Random(5))
    steps: list[tuple[int, int]] = []

    def schedule(epoch: int, step: int) -> Any:
        steps.append((epoch, step))
        return fmap

    batches = -(-len(data.x_train) // 64)
    A.fault_aware_train(model, array, schedule, data, 2, lr=0.05, batch_size=64, epoch_fraction=0.25)
    per_epoch = -(-batches // 4)  # ceil: a quarter of the batches, at least one
    assert steps == [(e, s) for e in range(2) for s in range(per_epoch)]
    quarter = A.fault_aware_train(model, array, fmap, data, 1, lr=0.05, batch_size=64, epoch_fraction=0.25)
    whole = A.fault_aware_train(model, array, fmap, data, 1, lr=0.05, batch_size=64)
    assert any(not torch.equal(quarter.state_dict()[k], whole.state_dict()[k]) for k in whole.state_dict())
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="epoch_fraction"):
            A.fault_aware_train(model, array, fmap, data, 1, lr=0.05, batch_size=64, epoch_fraction=bad)
