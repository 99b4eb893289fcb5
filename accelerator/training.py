"""Training and evaluation: float base training, fault-aware training (FAT) on the
emulated array, on-chip accuracy, per-layer sensitivity.

Data arguments take a `Dataset` (train split for training, test split for
evaluation) or an (x, y) tuple of tensors: x float (N, C, H, W), y int64 (N,).

`device` (None: where the model is): where a function runs its model and batches,
e.g. "cuda". The data may live anywhere; models come back where they were given.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from accelerator.data import Dataset
from accelerator.faults import ArrayConfig, FaultMap
from accelerator.layers import array_layers, calibrate, lowered_layers, model_device, on_array, set_faults, to_float

# fault-aware training's optimizer, as manifests state it (`fault_aware_train`'s defaults)
FAT_MOMENTUM, FAT_WEIGHT_DECAY = 0.9, 0.0
FAT_OPTIMIZER = {"name": "SGD", "momentum": FAT_MOMENTUM, "weight_decay": FAT_WEIGHT_DECAY}

Data = Dataset | tuple[torch.Tensor, torch.Tensor]
Device = str | torch.device | None
Schedule = Callable[[int, int], FaultMap]
Progress = Callable[[int, int, dict[str, float]], None]


def _target(device: Device, model: nn.Module) -> torch.device:
    """Where to run: `device`, or the model's own; a GPU torch cannot see is an error
    that names it (not torch's assertion deep inside a copy)."""
    dev = torch.device(device) if device is not None else model_device(model)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(dev)!r}: torch sees no CUDA device on this machine")
    return dev


def _split(data: Data, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, Dataset):
        return (data.x_train, data.y_train) if train else (data.x_test, data.y_test)
    x, y = data
    if len(x) != len(y):
        raise ValueError(f"data: x has {len(x)} samples but y has {len(y)}")
    return x, y


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of `model` (eval mode, batched, on the model's device)
    on x (N, ...), y (N,)."""
    was = model.training
    model.eval()
    dev = model_device(model)
    correct = 0
    try:
        for i in range(0, len(x), batch_size):
            out = model(x[i : i + batch_size].to(dev))
            correct += int((out.argmax(1) == y[i : i + batch_size].to(dev)).sum())
    finally:
        model.train(was)
    return correct / max(len(x), 1)


def evaluate(
    model: nn.Module,
    array: ArrayConfig,
    faults: FaultMap | None,
    data: Data,
    *,
    batch_size: int = 512,
    ber: float = 0.0,
    protect: Iterable[str] = (),
    seed: int | None = 0,
    device: Device = None,
) -> float:
    """Top-1 accuracy in [0, 1] of a calibrated float model run on the faulty array
    (faults None = fault-free array) on the test split of `data`."""
    x, y = _split(data, train=False)
    arr_model = on_array(model, array, faults, ber=ber, protect=protect, seed=seed)
    return accuracy(arr_model.to(_target(device, model)), x, y, batch_size=batch_size)


@torch.no_grad()
def bounded_accuracy(
    model: nn.Module,
    array: ArrayConfig,
    faults: FaultMap | None,
    data: Data,
    floor: float,
    *,
    chunk: int = 128,
    protect: Iterable[str] = (),
    device: Device = None,
) -> tuple[float, int]:
    """`evaluate`, stopped as soon as the accuracy over the whole test split is certain to
    end below `floor` (a fraction): (accuracy, samples evaluated).

    The test split is read in chunks of `chunk` samples; once the errors so far exceed what
    the whole split allows at `floor`, no outcome of the remaining samples can reach it, so
    the verdict "below `floor`" is exact, not statistical. The accuracy returned is then that
    of the samples evaluated (below `floor` too); otherwise it is `evaluate`'s, exactly.
    """
    if chunk < 1:
        raise ValueError(f"chunk: {chunk!r} must be >= 1")
    x, y = _split(data, train=False)
    n = len(x)
    need = math.ceil(floor * n - 1e-9)  # correct answers the whole split needs to reach floor
    arr_model = on_array(model, array, faults, protect=protect, seed=0).to(_target(device, model))
    arr_model.eval()
    dev = model_device(arr_model)
    correct = seen = 0
    while seen < n:
        out = arr_model(x[seen : seen + chunk].to(dev))
        correct += int((out.argmax(1) == y[seen : seen + chunk].to(dev)).sum())
        seen = min(n, seen + chunk)
        if correct + (n - seen) < need:
            break
    return correct / max(seen, 1), seen


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def _train_loop(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    *,
    lr: float,
    batch_size: int,
    seed: int,
    momentum: float,
    weight_decay: float,
    on_progress: Progress | None,
    checkpoint: str | Path | None,
    before_step: Callable[[int, int], dict[str, float]] | None,
    extra_state: Callable[[], dict[str, Any]],
    load_extra: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    epoch_fraction: float = 1.0,
) -> None:
    """SGD with cosine-free constant lr; deterministic under `seed`; resumable. Runs
    on the model's device (the data is moved there once). `epoch_fraction`: the share of
    the train split one epoch reads (the first batches of that epoch's shuffle, so a
    different random subset each epoch)."""
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"training: need epochs >= 0, batch_size >= 1, lr > 0 (got {epochs}, {batch_size}, {lr})")
    if not 0 < epoch_fraction <= 1:
        raise ValueError(f"training: epoch_fraction {epoch_fraction!r} must be in (0, 1]")
    dev = model_device(model)
    x, y = x.to(dev), y.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state.get("config") != config:
            raise ValueError(f"checkpoint {checkpoint}: written by another run ({state.get('config')} != {config})")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"])
        load_extra(state["extra"])
        start = int(state["epoch"])
    model.train()
    for epoch in range(start, epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        metrics: dict[str, float] = {}
        batches = _batches(len(x), batch_size, gen)
        for step, idx in enumerate(batches[: math.ceil(epoch_fraction * len(batches))]):
            idx = idx.to(dev)  # drawn on the CPU: the same batches on every device
            if before_step is not None:
                metrics.update(before_step(epoch, step))
            out = model(x[idx])
            loss = F.cross_entropy(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == y[idx]).sum())
            seen += len(idx)
        metrics.update({"loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1)})
        if checkpoint is not None:
            _save_atomic(
                {
                    "config": config,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": gen.get_state(),
                    "extra": extra_state(),
                    "epoch": epoch + 1,
                },
                Path(checkpoint),
            )
        if on_progress is not None:
            on_progress(epoch + 1, epochs, metrics)


def _save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then os.replace: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    model: nn.Module,
    data: Data,
    epochs: int,
    *,
    lr: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    on_progress: Progress | None = None,
    checkpoint: str | Path | None = None,
    calibrate_after: bool = True,
    device: Device = None,
) -> nn.Module:
    """Plain float training of a base model in place (SGD, cross-entropy) on the train
    split; then (by default) `calibrate` on the training inputs. Returns `model`."""
    x, y = _split(data, train=True)
    home = model_device(model)
    model.to(_target(device, model))
    config = {"kind": "train", "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed}
    _train_loop(
        model,
        x,
        y,
        epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        momentum=momentum,
        weight_decay=weight_decay,
        on_progress=on_progress,
        checkpoint=checkpoint,
        before_step=None,
        extra_state=dict,
        load_extra=lambda _s: None,
        config=config,
    )
    if calibrate_after:
        calibrate(model, x)
    return model.to(home)


def fault_aware_train(
    model: nn.Module,
    array: ArrayConfig,
    faults_or_schedule: FaultMap | Schedule,
    data: Data,
    epochs: int,
    *,
    lr: float,
    batch_size: int,
    on_progress: Progress | None = None,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    ber: float = 0.0,
    protect: Iterable[str] = (),
    momentum: float = FAT_MOMENTUM,
    weight_decay: float = FAT_WEIGHT_DECAY,
    device: Device = None,
    epoch_fraction: float = 1.0,
) -> nn.Module:
    """Fault-aware retraining of a calibrated float model; returns a trained float copy
    (on the model's device; trained on `device`).

    Forward through the faulty array (`on_array`), backward through the clean
    quantized path (STE). `faults_or_schedule`: a FaultMap, or a callable
    (epoch, step) -> FaultMap (epoch 0-based, step 0-based within the epoch) asked
    before every step. Activation scales stay those of `model`. Deterministic under
    `seed` (shuffling, transient flips). `checkpoint`: file path written atomically
    after every epoch (model, optimizer, epoch, RNG states) and resumed from when it
    exists. on_progress(epochs_done, epochs, {"loss", "train_acc", "fault_rate"}).
    `epoch_fraction` in (0, 1]: each epoch reads only that share of the train split (a
    different random subset each epoch), so an epoch costs `epoch_fraction` of a full pass.
    """
    x, y = _split(data, train=True)
    protect = tuple(sorted(protect))
    fixed = faults_or_schedule if isinstance(faults_or_schedule, FaultMap) else None
    home, target = model_device(model), _target(device, model)
    arr_model = on_array(model, array, fixed, ber=ber, protect=protect, seed=seed).to(target)
    rng = next(iter(array_layers(arr_model).values())).rng if array_layers(arr_model) else None

    def before_step(epoch: int, step: int) -> dict[str, float]:
        if fixed is not None:
            return {"fault_rate": fixed.rate}
        fm = faults_or_schedule(epoch, step)  # type: ignore[operator]
        if not isinstance(fm, FaultMap):
            raise ValueError(f"schedule({epoch}, {step}) returned {type(fm).__name__}, not a FaultMap")
        set_faults(arr_model, fm)
        return {"fault_rate": fm.rate}

    def load_extra(state: dict[str, Any]) -> None:
        if rng is not None and "ber_rng" in state:
            rng.gen.set_state(state["ber_rng"])

    config = {
        "kind": "fat",
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "ber": ber,
        "protect": list(protect),
        "faults": fixed.digest if fixed is not None else "schedule",
        **({"epoch_fraction": epoch_fraction} if epoch_fraction != 1.0 else {}),  # old checkpoints stay valid
    }
    _train_loop(
        arr_model,
        x,
        y,
        epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        momentum=momentum,
        weight_decay=weight_decay,
        on_progress=on_progress,
        checkpoint=checkpoint,
        before_step=before_step,
        extra_state=lambda: {"ber_rng": rng.gen.get_state()} if rng is not None else {},
        load_extra=load_extra,
        config=config,
        epoch_fraction=epoch_fraction,
    )
    return to_float(arr_model).to(home)


def layer_sensitivity(
    model: nn.Module,
    array: ArrayConfig,
    faults: FaultMap,
    data: Data,
    *,
    batch_size: int = 512,
    ber: float = 0.0,
    seed: int = 0,
    device: Device = None,
) -> dict[str, float]:
    """Per Linear/Conv2d layer: accuracy lost (fault-free array minus this-layer-faulty,
    in accuracy points of [0, 1]) when only that layer runs on the faulty array."""
    names = list(lowered_layers(model))
    base = evaluate(model, array, None, data, batch_size=batch_size, device=device)
    out = {}
    for name in names:
        others = [n for n in names if n != name]
        acc = evaluate(
            model, array, faults, data, batch_size=batch_size, ber=ber, protect=others, seed=seed, device=device
        )
        out[name] = base - acc
    return out


def clone(model: nn.Module) -> nn.Module:
    """A deep copy (handy before in-place training)."""
    return copy.deepcopy(model)
