"""Base model registration: train (or load) the weights, calibrate, measure the baseline."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

import accelerator as acc
from app.db.models import (
    ModelRecord,
)
from app.services.artifacts import open_artifact_file, store_bytes
from workers import pipeline
from workers.checkpoints import JobCheckpoints
from workers.export import state_dict_bytes
from workers.jobs import JobContext, handler
from workers.store import SAFETENSORS, load_data, model_failed, model_info, worker_device


@handler("register_model", on_failure=model_failed)
def register_model(ctx: JobContext) -> dict[str, Any]:
    """Train (or load) the base model, calibrate its activation scales, measure its baseline."""
    model_id = int(ctx.params["model_id"])
    info = model_info(ctx.engine, model_id)
    cfg, arch = info.config, info.architecture
    ctx.report(0.02, f"loading dataset {info.dataset}")
    data = load_data(info)
    device = worker_device(ctx.settings)
    ckpts: JobCheckpoints | None = None
    if cfg.uploaded_weights_sha256:
        with open_artifact_file(cfg.uploaded_weights_sha256, cfg.weights_suffix) as path:
            model = acc.load_model(arch, path, data.input_shape, data.num_classes)
    else:
        model = acc.build_model(arch, data.input_shape, data.num_classes, seed=cfg.seed)
        epochs = cfg.epochs
        ctx.report(0.05, f"training {arch} on {data.name} for {epochs} epochs")

        ckpts = own = JobCheckpoints(ctx.engine, ctx.settings, f"model-{model_id}")
        own.restore()  # another machine's epochs, with the database artifact backend

        def on_epoch(e: int, n: int, m: dict[str, float]) -> None:
            ctx.check()
            own.save()
            ctx.report(0.05 + 0.8 * e / n, f"training epoch {e}/{n}: loss {m.get('loss', float('nan')):.4f}")

        model = acc.train(
            model,
            data,
            epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            on_progress=on_epoch,
            checkpoint=own.path("train.pt"),
            device=device,
        )
    if acc.uncalibrated_layers(model):
        ctx.report(0.87, "calibrating activation scales on training data")
        acc.calibrate(model, data.x_train)
    ctx.report(0.9, "measuring baseline accuracy on the fault-free array")
    baseline = pipeline.baseline_accuracy(model, info.array, data, device=device)
    with Session(ctx.engine, expire_on_commit=False) as s:
        art = store_bytes(s, state_dict_bytes(model.state_dict(), {"architecture": arch}), "model", SAFETENSORS)
        bm = s.get(ModelRecord, model_id)
        assert bm is not None
        bm.weights_artifact_id, bm.baseline_accuracy, bm.status = art.id, baseline, "ready"
        s.commit()
    if ckpts is not None:
        ckpts.discard()  # the weights are stored
    return {"model_id": model_id, "baseline_accuracy": baseline, "weights_sha256": art.sha256}
