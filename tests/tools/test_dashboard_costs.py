"""The plan page's cost bars and `faultfleet plan show`'s cost table
(`app.services.plan_costs.cost_alternatives`): the per-chip figure is never 0 for a
plan whose chips fail screening, whether its chips have epochs of their own (a measured map),
none (beyond the map: planned alone at per-chip FAT's epochs each), or only the ladder's credit;
and `plan show`'s per-group "alone" column follows the same rule (`alone_epochs`)."""

from __future__ import annotations

from typing import Any

import pytest

from app.services.plan_costs import alone_epochs, cost_alternatives


def _view(summary: dict[str, Any], chips: list[dict[str, Any]], groups: list[dict[str, Any]], rmap: int | None) -> dict:
    return {"summary": summary, "chips": chips, "groups": groups, "resilience_map_id": rmap}


def _group(gid: int, members: list[str], epochs: int, round_: int = 0) -> dict[str, Any]:
    return {"id": gid, "round": round_, "epochs": epochs, "members": [{"chip_id": m} for m in members]}


def test_ladder_plan_shows_fap_t_lower_bound_per_chip() -> None:
    summary = {
        "retraining_epochs": 38,
        "per_chip_fat_epochs_each": 1,
        "per_chip_fat_epochs": 8,
        "fap_t_epochs_at_least": 8,
        "decisions": {"resilience_map": "ladder"},
    }
    # a ladder's chips may carry no epochs at all (placed beyond its single rate)
    chips = [{"chip_id": f"c{i}", "epochs": None} for i in range(8)]
    groups = [_group(1, [f"c{i}" for i in range(4)], 1), _group(2, [f"c{i}" for i in range(4, 8)], 1)]
    costs = dict(cost_alternatives(_view(summary, chips, groups, None)))
    assert costs["each chip alone, at least"] == 8
    assert "FAP+T, at least" not in costs  # the same figure: shown once
    assert costs["this plan (groups, replans)"] == 38


def test_map_plan_counts_chips_beyond_the_map_at_fat_epochs() -> None:
    summary = {
        "retraining_epochs": 27,
        "per_chip_fat_epochs_each": 3,
        "per_chip_fat_epochs": 27,
        "fap_t_epochs_at_least": 9,
        "decisions": {"resilience_map": "measured"},
    }
    chips = [{"chip_id": "a", "epochs": 2}, {"chip_id": "b", "epochs": 1}, {"chip_id": "x", "epochs": None}]
    groups = [_group(1, ["x"], 3), _group(2, ["a", "b"], 2), _group(3, ["a"], 3, round_=1)]
    costs = dict(cost_alternatives(_view(summary, chips, groups, 4)))
    assert costs["each chip alone, own epochs"] == 2 + 1 + 3  # replans (round 1) are not counted
    assert costs["FAP+T, at least"] == 9
    assert costs["per-chip FAT (3 epochs)"] == 27


def test_plan_summary_from_before_decisions_were_recorded() -> None:
    """Old summaries have no `decisions`: a plan with no map id is a ladder plan."""
    summary = {"planned_epochs": 4, "per_chip_fat_epochs_each": 1, "per_chip_fat_epochs": 4, "fap_t_epochs_at_least": 4}
    costs = dict(cost_alternatives(_view(summary, [{"chip_id": "a", "epochs": 1}], [_group(1, ["a"], 1)], None)))
    assert costs["each chip alone, at least"] == 4 and costs["this plan (groups, replans)"] == 4


def _map_plan_view() -> dict[str, Any]:
    summary = {
        "retraining_epochs": 8,
        "per_chip_fat_epochs_each": 3,
        "per_chip_fat_epochs": 9,
        "fap_t_epochs_at_least": 3,
        "decisions": {"resilience_map": "measured"},
    }
    chips = [{"chip_id": "a", "epochs": 2}, {"chip_id": "b", "epochs": 1}, {"chip_id": "x", "epochs": None}]
    groups = [_group(11, ["x"], 3), _group(12, ["a", "b"], 2), _group(13, ["a"], 3, round_=1)]
    return _view(summary, chips, groups, 4)


def test_each_groups_alone_figure_counts_a_chip_beyond_the_map_at_fat_epochs() -> None:
    view = _map_plan_view()
    assert alone_epochs(view) == {11: 3, 12: 2 + 1, 13: 2}
    # cost_alternatives' "each chip alone" is the sum over round 0 of the same figures
    assert dict(cost_alternatives(view))["each chip alone, own epochs"] == 3 + 3


def test_plan_show_alone_column_follows_cost_alternatives(capsys: pytest.CaptureFixture[str]) -> None:
    """`faultfleet plan show`'s groups table: the beyond-the-map chip's group shows 3 alone, not 0."""
    from app.cli.fleet import _show_plan
    from app.cli.output import out

    view = {
        **_map_plan_view(),
        "id": 7,
        "model": "m",
        "status": "planned",
        "constraint": {"kind": "relative", "max_drop": 0.03},
    }
    for g in view["groups"]:
        g.update(fused_rate=0.01, protect_layer=None, status="pending")
        for m in g["members"]:
            m["accuracy"] = None
    for ch in view["chips"]:
        ch["status"] = "planned"
    width = out.width
    out.width = 200
    try:
        _show_plan(view, as_json=False)
    finally:
        out.width = width
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")]
        if len(cells) > 6 and cells[1].isdigit():
            rows[int(cells[1])] = cells
    # columns: group, round, members, epochs, alone, ...
    assert {gid: (cells[4], cells[5]) for gid, cells in rows.items()} == {
        11: ("3", "3"),
        12: ("2", "3"),
        13: ("3", "2"),
    }
