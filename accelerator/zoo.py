"""Model zoo: mlp, lenet5, resnet20, resnet32 for any (C, H, W) input and class count.

Every zoo model carries `act_scale` buffers (0 until `calibrate`), so its
state_dict has the same keys before and after calibration and loads strictly.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from accelerator.layers import ensure_scale_buffers

Shape = tuple[int, int, int]


def mlp(input_shape: Shape, num_classes: int, hidden: tuple[int, ...] = (256, 128)) -> nn.Module:
    """Flatten -> [Linear -> ReLU]* -> Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = input_shape[0] * input_shape[1] * input_shape[2]
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling; 5x5 convs padded by 2, so any H, W >= 4 works."""

    def __init__(self, input_shape: Shape, num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = 16 * (h // 2 // 2) * (w // 2 // 2)
        if flat == 0:
            raise ValueError(f"lenet5: input {input_shape} too small (needs H, W >= 4)")
        self.classifier = nn.Sequential(
            nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """CIFAR ResNet block; option-A shortcut (subsample + zero channels, parameter-free)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.extra:
            sc = F.pad(sc, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(out + sc)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) of He et al. for CIFAR: 16/32/64 channels, global average pool."""

    def __init__(self, depth: int, input_shape: Shape, num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"resnet depth {depth} is not 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


ARCHS: dict[str, Callable[[Shape, int], nn.Module]] = {
    "mlp": mlp,
    "lenet5": LeNet5,
    "resnet20": lambda s, k: CifarResNet(20, s, k),
    "resnet32": lambda s, k: CifarResNet(32, s, k),
}


def build_model(arch: str, input_shape: Shape, num_classes: int, *, seed: int | None = 0) -> nn.Module:
    """A freshly initialised zoo model (deterministic under `seed`; None = global RNG).

    input_shape: (C, H, W) of one sample; the model maps (N, C, H, W) float to
    (N, num_classes) logits.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch: unknown {arch!r}; known: {sorted(ARCHS)}")
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape: must be (C, H, W) positive, got {input_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes: must be >= 2, got {num_classes}")
    shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    if seed is None:
        model = ARCHS[arch](shape, num_classes)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ARCHS[arch](shape, num_classes)
    return ensure_scale_buffers(model)


def weights_file_bytes(path: str | Path) -> int:
    """How many bytes a weights file inflates to when `read_state_dict` loads it, read without loading it.

    A .safetensors file is stored raw: its size. A torch.save'd .pt/.pth is a zip whose members
    may be deflated, so a few MiB can declare gigabytes: the sum of its members' uncompressed
    sizes, from the zip directory alone (the size each member is allocated at when loaded).
    Raises ValueError for a .pt that is no zip: the legacy pre-1.6 format allocates every storage
    at the size its pickle declares, which nothing but loading it can check.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return path.stat().st_size
    if not zipfile.is_zipfile(path):
        raise ValueError(
            "not a zip-format torch.save file (the default since PyTorch 1.6); "
            "the legacy format is refused: save with torch.save(state_dict, path), or as .safetensors"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            return sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"not a readable torch.save zip ({e})") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .safetensors file or a torch.save'd dict (weights_only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: does not hold a state_dict")
    return dict(state)


def load_model(
    arch: str, state: Mapping[str, torch.Tensor] | str | Path, input_shape: Shape, num_classes: int
) -> nn.Module:
    """A zoo model with a user's weights (a state_dict, or a .safetensors/.pt path).

    Missing `act_scale` entries leave the model uncalibrated; any other missing or
    unexpected key, or a shape mismatch, raises ValueError naming it.
    """
    sd = read_state_dict(state) if isinstance(state, (str, Path)) else dict(state)
    model = build_model(arch, input_shape, num_classes)
    own = model.state_dict()
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(k for k in set(own) - set(sd) if not k.endswith(".act_scale"))
    if unexpected or missing:
        raise ValueError(f"state_dict does not fit {arch}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"state_dict[{k!r}]: shape {tuple(v.shape)} != {tuple(own[k].shape)} for {arch}")
    model.load_state_dict(sd, strict=False)
    return model


def save_model(model: nn.Module, path: str | Path) -> None:
    """Write the model's state_dict (act scales included) as safetensors."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
