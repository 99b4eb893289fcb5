"""What a plan cost against the per-chip alternatives: one list for the dashboard's bars and
the CLI's table, from the plan as the API answers it (no HTTP, no database)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def cost_alternatives(view: Mapping[str, Any]) -> list[tuple[str, float]]:
    """A plan's training epochs beside the per-chip alternatives, as (label, epochs) rows.

    `view`: a plan as `GET /api/v1/plans/{id}` answers it (summary, chips, groups,
    resilience_map_id), every group of round 0 and every chip of those groups present."""
    s = view.get("summary") or {}
    decided = (s.get("decisions") or {}).get("resilience_map")
    ladder = decided == "ladder" or (decided is None and view.get("resilience_map_id") is None)
    costs = [("this plan (groups, replans)", float(s.get("retraining_epochs", s.get("planned_epochs")) or 0))]
    if ladder:
        # no measured map, so no chip has epochs of its own: the ladder credits each the first
        # rung, and FAP+T's bound (each failing chip alone on that rung) is the honest per-chip figure
        costs.append(("each chip alone, at least", float(s.get("fap_t_epochs_at_least") or 0)))
    else:
        alone = alone_epochs(view)
        costs.append(
            ("each chip alone, own epochs", float(sum(alone[g["id"]] for g in view["groups"] if g["round"] == 0)))
        )
    costs.append(
        (f"per-chip FAT ({s.get('per_chip_fat_epochs_each', '?')} epochs)", float(s.get("per_chip_fat_epochs") or 0))
    )
    if not ladder and s.get("fap_t_epochs_at_least") is not None:
        costs.append(("FAP+T, at least", float(s["fap_t_epochs_at_least"])))
    return costs


def alone_epochs(view: Mapping[str, Any]) -> dict[Any, int]:
    """Per group id, the epochs its members would train retrained each alone: each member's
    own epochs, and for a chip with none (beyond the map) per-chip FAT's epochs each
    (`per_chip_fat_epochs_each`), which the planner gives it alone (the group's own epochs
    where the summary has no such figure).

    `view`: a plan as `GET /api/v1/plans/{id}` answers it, every chip of its groups present."""
    s = view.get("summary") or {}
    own_epochs = {ch["chip_id"]: ch.get("epochs") for ch in view["chips"]}
    alone: dict[Any, int] = {}
    for g in view["groups"]:
        own = (own_epochs.get(m["chip_id"]) for m in g["members"])
        fat = s.get("per_chip_fat_epochs_each") or g["epochs"]
        alone[g["id"]] = sum(int(e) if e is not None else int(fat) for e in own)
    return alone
