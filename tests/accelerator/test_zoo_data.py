"""Model zoo and datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import accelerator as A


@pytest.mark.parametrize("arch", ["mlp", "lenet5", "resnet20", "resnet32"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (2, 28, 20)])
def test_zoo_shapes(arch: str, shape: tuple[int, int, int]) -> None:
    model = A.build_model(arch, shape, 7)
    assert model(torch.rand(2, *shape)).shape == (2, 7)
    assert all(k in model.state_dict() for k in (f"{n}.act_scale" for n in A.lowered_layers(model)))


def test_zoo_is_seeded_and_resnet_depth() -> None:
    a, b = A.build_model("resnet20", (3, 16, 16), 10), A.build_model("resnet20", (3, 16, 16), 10)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert len([n for n in A.lowered_layers(a)]) == 20
    assert len([n for n in A.lowered_layers(A.build_model("resnet32", (3, 16, 16), 10))]) == 32
    with pytest.raises(ValueError, match="unknown 'vgg'"):
        A.build_model("vgg", (3, 16, 16), 10)


@pytest.mark.slow  # builds mnist5k three times
def test_builtin_datasets() -> None:
    d = A.load_dataset("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.x_train) + len(d.x_test) == 1797 and d.x_train.dtype == torch.float32
    assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0
    m = A.load_dataset("mnist5k")
    assert m.x_train.shape == (4000, 1, 28, 28) and m.x_test.shape == (1000, 1, 28, 28)
    assert m.y_train.dtype == torch.int64
    again = A.load_dataset("mnist5k")
    assert torch.equal(m.y_test, again.y_test)
    other = A.load_dataset("mnist5k", seed=1)
    assert not torch.equal(m.y_test, other.y_test)
    with pytest.raises(ValueError, match="unknown 'cifar'"):
        A.load_dataset("cifar")


def test_npz_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (20, 6, 6), dtype=np.uint8),
        y_train=rng.integers(0, 3, 20),
        x_test=rng.integers(0, 256, (8, 6, 6), dtype=np.uint8),
        y_test=rng.integers(0, 3, 8),
    )
    d = A.load_dataset("npz", path)
    assert d.x_train.shape == (20, 1, 6, 6) and float(d.x_train.max()) <= 1.0 and d.num_classes >= 2
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((3, 4, 4)), y_train=np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="missing arrays"):
        A.load_dataset("npz", bad)
    np.savez(
        bad,
        x_train=np.zeros((3, 4, 4)),
        y_train=np.zeros(2, dtype=np.int64),
        x_test=np.zeros((1, 4, 4)),
        y_test=np.zeros(1, dtype=np.int64),
    )
    with pytest.raises(ValueError, match="lengths differ"):
        A.load_dataset("npz", bad)
