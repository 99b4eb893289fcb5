"""Model files that leave the service: safetensors, JSON manifest, sparse delta (R2F style).

A retrained group model is shipped two ways: whole, as safetensors, and as a
compressed sparse delta against the base model the chip already holds, which is what a
fab sends over a slow link (R2F). Both are deterministic bytes, so their sha256 is a
stable identity (ETag) and re-running an export after a crash stores nothing new.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from accelerator.training import FAT_OPTIMIZER
from planner import Group, Plan

if TYPE_CHECKING:
    from app.db.models import Artifact
    from workers.pipeline import GroupResult, Thresholds
    from workers.store import ModelInfo, PlanInfo


def state_dict_bytes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Safetensors bytes of a state_dict (tensors made contiguous CPU copies)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(state.items())}
    return st_save(tensors, metadata=dict(metadata or {}))


def sparse_delta(base: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> bytes:
    """gzip-compressed safetensors holding, per tensor, the flat indices (int64) and new
    values of the entries that differ from `base`. Tensors absent from `base` (or whose
    shape changed) are stored whole under `<name>.full`."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sorted(new.items()):
        t = t.detach().cpu()
        b = base.get(name)
        if b is None or b.shape != t.shape or b.dtype != t.dtype:
            out[f"{name}.full"] = t.contiguous()
            continue
        changed = (t != b.detach().cpu()).flatten().nonzero().flatten()
        if changed.numel():
            out[f"{name}.idx"] = changed.to(torch.int64)
            out[f"{name}.val"] = t.flatten()[changed].contiguous()
    # mtime=0: identical deltas give identical bytes (and sha256).
    return gzip.compress(st_save(out), compresslevel=6, mtime=0)


def apply_delta(base: Mapping[str, torch.Tensor], delta: bytes) -> dict[str, torch.Tensor]:
    """Rebuild the new state_dict from `base` and a `sparse_delta` blob."""
    parts = st_load(gzip.decompress(delta))
    state = {k: v.detach().cpu().clone() for k, v in base.items()}
    for key, t in parts.items():
        name, kind = key.rsplit(".", 1)
        if kind == "full":
            state[name] = t
        elif kind == "idx":
            flat = state[name].flatten()
            flat[t] = parts[f"{name}.val"]
            state[name] = flat.view_as(state[name])
    return state


def code_version() -> str:
    """The installed faultfleet's version: part of every cache key and manifest, so nothing
    an older emulator measured is served after an upgrade."""
    return f"faultfleet-{importlib.metadata.version('faultfleet')}"


def manifest_bytes(manifest: Mapping[str, object]) -> bytes:
    """Canonical JSON (sorted keys) so equal manifests hash equal."""
    return json.dumps(manifest, sort_keys=True, indent=2).encode()


def group_manifest(
    *,
    group: Mapping[str, Any],
    members: Sequence[str],
    validation: Mapping[str, float],
    test: Mapping[str, float],
    bypass: Mapping[str, Any],
    training: Mapping[str, Any],
    base_model: Mapping[str, Any],
    accelerator: Mapping[str, Any],
    constraint: Mapping[str, Any],
    thresholds: Mapping[str, float],
    model: Mapping[str, Any],
    delta: Mapping[str, Any],
    code_version: str,
    **fields: Any,
) -> dict[str, Any]:
    """A group model's manifest. `accuracy` is each member's on the test split, which no
    decision saw (the split the constraint is verified on); `validation_accuracy` the split
    the plan decided on. `training` names the optimizer the accelerator trains with.
    `fields`: the group's own (fused_map_digest, epochs, protect, ...), kept at the top level;
    `epochs` is the group's retraining epochs (`planner.Group.epochs`), each reading
    `training.epoch_fraction` of the train split (1 where absent), `total_epochs` with those
    of the group it continued from."""
    return {
        "group": dict(group),
        **fields,
        "members": list(members),
        "accuracy": {c: float(test[c]) for c in members},
        "validation_accuracy": {c: float(validation[c]) for c in members},
        "bypass": dict(bypass),
        "training": {**training, "optimizer": dict(FAT_OPTIMIZER)},
        "base_model": dict(base_model),
        "accelerator": dict(accelerator),
        "constraint": dict(constraint),
        "thresholds": dict(thresholds),
        "threshold": thresholds["test"],
        "model": dict(model),
        "delta": dict(delta),
        "code_version": code_version,
    }


def member_bypass(doc: Plan, g: Group) -> dict[str, dict[str, Any]]:
    """Per member of `g`: the PEs it must bypass (beyond its dead ones) to compute what was
    verified, its bypass policy's and the group's (`planner.group_deployment`); members
    with none are left out."""
    out = {}
    for c in g.members:
        st = doc.chips[c]
        group_pes = g.fused.dead_pes - doc.maps[c].dead_pes
        pes = sorted({(int(r), int(col)) for r, col in st.bypassed} | group_pes)
        if st.bypass or pes:
            out[c] = {"policy": st.bypass, "pes": [list(pe) for pe in pes]}
    return out


def plan_group_manifest(
    info: ModelInfo,
    plan: PlanInfo,
    doc: Plan,
    g: Group,
    group_id: int,
    result: GroupResult,
    resumed_from: int,
    *,
    training: Mapping[str, Any],
    thresholds: Thresholds,
    model: Artifact,
    delta: Artifact,
) -> dict[str, Any]:
    """The `group_manifest` of group `g` of a plan (`doc`): its retraining `result` on base
    model `info`, with the stored model and delta artifacts it describes."""
    array = info.array
    return group_manifest(
        group={"id": group_id, "key": g.group_id, "plan_id": plan.id, "round": g.round, "reason": g.reason},
        fused_map_digest=g.fused.digest,
        fused_rate=g.fused.rate,
        schedule=g.schedule,
        epochs=g.epochs,
        total_epochs=g.total_epochs,
        warm_from=g.warm_from,
        protect=list(result.protect),
        tmr_penalty=result.tmr_penalty,
        resumed_from_epoch=resumed_from,
        members=g.members,
        validation=result.validation,
        test=result.test,
        bypass=member_bypass(doc, g),
        training=training,
        base_model={
            "id": info.id,
            "name": info.name,
            "architecture": info.architecture,
            "dataset": info.dataset,
            "weights_sha256": info.weights_sha256,
        },
        accelerator={"rows": array.rows, "cols": array.cols, "fmt": array.fmt, "bypass": array.bypass},
        constraint=plan.constraint,
        thresholds={"validation": thresholds.decision, "test": thresholds.verification},
        model={"file": "model.safetensors", "sha256": model.sha256, "size": model.size},
        delta={"file": "model.delta.safetensors.gz", "sha256": delta.sha256, "size": delta.size},
        code_version=code_version(),
    )
