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
        # no measured map, so no chip has an amount of its own: the ladder credits each the first
        # rung, and FAP+T's bound (each failing chip alone on that rung) is the honest per-chip figure
        costs.append(("each chip alone, at least", float(s.get("fap_t_epochs_at_least") or 0)))
    else:
        amounts = {ch["chip_id"]: ch.get("amount") for ch in view["chips"]}
        alone = 0
        for g in view["groups"]:
            if g["round"] != 0:
                continue
            for m in g["members"]:
                # a chip beyond the map has no amount of its own: the planner gives it per-chip FAT's, alone
                own = amounts.get(m["chip_id"])
                alone += int(own) if own is not None else int(s.get("per_chip_fat_amount") or g["epochs"])
        costs.append(("each chip alone, own amount", float(alone)))
    costs.append(
        (f"per-chip FAT ({s.get('per_chip_fat_amount', '?')} epochs)", float(s.get("per_chip_fat_epochs") or 0))
    )
    if not ladder and s.get("fap_t_epochs_at_least") is not None:
        costs.append(("FAP+T, at least", float(s["fap_t_epochs_at_least"])))
    return costs
