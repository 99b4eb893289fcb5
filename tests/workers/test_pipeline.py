"""The in-process retraining glue: continuing a run is the run (workers/pipeline)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import accelerator as acc  # noqa: E402
from accelerator.faults import ArrayConfig, Fault, FaultMap  # noqa: E402
from planner.plan import Group  # noqa: E402
from workers import pipeline as pl  # noqa: E402

Setup = tuple[Any, ArrayConfig, Any, FaultMap]  # base model, array, dataset, a chip's map


@pytest.fixture(scope="module")
def setup() -> Setup:
    torch.set_num_threads(1)
    model, full = pl.train_base_model("mlp", "digits", epochs=2, seed=0)
    data = full.subset(n_train=256, n_test=120)
    array = ArrayConfig(8, 8)
    fm = FaultMap(array, (Fault(1, 2, "psum", 20, 1), Fault(3, 3, "pe"), Fault(5, 0, "act", 6, 1)), chip_id="c")
    return model, array, data, fm


def _same(a: Any, b: Any) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_run_continued_from_its_checkpoint_equals_the_whole_run(setup: Setup) -> None:
    model, array, data, fm = setup
    cfg = pl.TrainConfig(lr=0.01, batch_size=64, seed=3)
    whole = dict(pl.train_through(model, array, fm, data, [1, 3], cfg))
    first = dict(pl.train_through(model, array, fm, data, [1], cfg))[1]
    assert _same(first, whole[1])
    continued = dict(pl.train_through(first, array, fm, data, [3], cfg, start=1))
    assert set(continued) == {3} and _same(continued[3], whole[3])
    assert not _same(whole[3], whole[1])  # it trained
    # a device named (as a worker's FAULTFLEET_DEVICE does) gives the same run, models back on the CPU
    on_cpu = dict(pl.train_through(model, array, fm, data, [1, 3], replace(cfg, device="cpu")))
    assert _same(on_cpu[3], whole[3]) and next(on_cpu[3].parameters()).device.type == "cpu"


def test_retrain_group_continues_a_warm_group_and_zeroes_weights_on_bypassed_pes(setup: Setup) -> None:
    model, array, data, fm = setup
    cfg = pl.TrainConfig(lr=0.01, batch_size=64, seed=0)
    grid = [0, 1, 2, 4]
    spec = {"name": "all_at_once", "params": {}}
    cold = Group("g0", ("c",), fm, 2, 0.1, spec)
    warm = Group("g1", ("c",), fm, 2, 0.1, spec, warm_from="g0", start_epoch=2)
    m2 = pl.retrain_group(model, array, data, cold, {"c": fm}, grid, cfg)
    m4 = pl.retrain_group(m2, array, data, warm, {"c": fm}, grid, cfg)
    assert warm.total_epochs == 4 and not _same(m2, m4)
    for m in (m2, m4):  # the weights PE (3, 3) holds act as 0 on every chip, bypassed or not
        pruned = acc.prune_dead_pes(m, array, fm)
        assert _same(m, pruned)
    first = next(iter(acc.lowered_layers(m4).values()))
    assert bool((first.weight[3 :: array.cols, 3 :: array.rows] == 0).all())


def test_a_group_retrained_on_shorter_epochs_is_charged_its_passes(setup: Setup) -> None:
    model, array, data, fm = setup
    spec = {"name": "all_at_once", "params": {}}
    group = Group("g0", ("c",), fm, 2, 0.1, spec)
    em = pl.Emulation.of(array, data, pl.TrainConfig(lr=0.01, batch_size=64, seed=0, epoch_fraction=0.25))
    result = pl.retrain_and_verify(em, model, group, {"c": fm}, [0, 1, 2], group_base=model)
    assert em.ledger.epochs["groups"] == pytest.approx(0.5)  # 2 epochs of a quarter pass each
    assert em.cfg.to_dict()["epoch_fraction"] == 0.25 and "epoch_fraction" not in pl.TrainConfig().to_dict()
    whole = pl.retrain_group(model, array, data, group, {"c": fm}, [0, 1, 2], pl.TrainConfig(lr=0.01, seed=0))
    assert result.model is not None and not _same(result.model, whole)
    with pytest.raises(ValueError, match="epoch_fraction"):
        pl.TrainConfig(epoch_fraction=0)
