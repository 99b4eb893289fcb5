from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from accelerator.faults import ArrayConfig
from planner import FaultMix, FleetSpec, generate_fleet, read_ndjson, write_ndjson


def test_generator_is_seeded_and_has_chip_coordinates() -> None:
    spec = FleetSpec(array=ArrayConfig(16, 16), dies_across=6)
    a, b, c = generate_fleet(80, 1, spec), generate_fleet(80, 1, spec), generate_fleet(80, 2, spec)
    assert a == b and a != c
    ids = [m.chip_id for m in a]
    assert len(set(ids)) == 80
    m = a[0]
    assert m.lot == "L001" and m.wafer == 1 and m.die_x is not None and m.accelerator == "sa16-int8"
    assert m.chip_id == f"{m.lot}-W{m.wafer:02d}-X{m.die_x:02d}Y{m.die_y:02d}"
    assert len({x.wafer for x in a}) > 1


def test_defects_cluster_per_wafer() -> None:
    spec = FleetSpec(array=ArrayConfig(32, 32), defects_per_die=3.0, wafer_dispersion=1.0, p_line=0.0)
    fleet = generate_fleet(3000, 0, spec)
    counts = np.array([len(m.faulty_pes) for m in fleet], dtype=float)
    assert counts.var() > 2 * counts.mean()  # over-dispersed: not Poisson
    by_wafer: dict[tuple[str | None, int | None], list[float]] = {}
    for m, n in zip(fleet, counts, strict=True):
        by_wafer.setdefault((m.lot, m.wafer), []).append(n)
    means = np.array([np.mean(v) for v in by_wafer.values()])
    assert means.std() > 0.3 * means.mean()  # wafers differ
    assert (counts == 0).sum() > 0  # some good dies


def test_spatial_clusters_lines_and_mix() -> None:
    arr = ArrayConfig(16, 16)
    lines = generate_fleet(30, 0, FleetSpec(array=arr, p_line=1.0, defects_per_die=1.0))
    full = [
        m
        for m in lines
        if any(len({c for r, c in m.faulty_pes if r == row}) == 16 for row in range(16))
        or any(len({r for r, c in m.faulty_pes if c == col}) == 16 for col in range(16))
    ]
    assert full
    only_psum = FaultMix(sites={"psum": 1.0}, psum_high_bias=1.0, p_stuck1=1.0)
    fleet = generate_fleet(30, 0, FleetSpec(array=arr, mix=only_psum, defects_per_die=3.0))
    faults = [f for m in fleet for f in m.faults]
    assert faults and all(f.site == "psum" and f.bit is not None and f.bit >= 16 and f.stuck == 1 for f in faults)
    # clusters: most faulty PEs have a faulty neighbour
    clustered = generate_fleet(200, 0, FleetSpec(array=ArrayConfig(32, 32), cluster_mean_pes=4.0, p_line=0.0))
    pes = [(m, p) for m in clustered for p in m.faulty_pes]
    near = sum(
        any((p[0] + dr, p[1] + dc) in m.faulty_pes for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0))) for m, p in pes
    )
    assert near > 0.5 * len(pes)


def test_ndjson_round_trip(tmp_path: Path) -> None:
    fleet = generate_fleet(50, 3, FleetSpec(array=ArrayConfig(8, 12), dies_across=5))
    path = tmp_path / "fleet.ndjson"
    assert write_ndjson(fleet, path) == 50
    back = read_ndjson(path)
    assert back == fleet
    assert [m.to_dict() for m in back] == [m.to_dict() for m in fleet]
    with open(path, "a") as fh:
        fh.write('{"array": {"rows": 8, "cols": 12}, "faults": [{"row": 9, "col": 0, "site": "pe"}]}\n')
    with pytest.raises(ValueError, match=r"fleet.ndjson:51: faults\[0\].row"):
        read_ndjson(path)


def test_site_weights_parse_and_name_a_bad_entry() -> None:
    from planner.synthetic_fleet import parse_site_weights

    assert parse_site_weights("pe=0.1, weight=0.3,act=0.3,psum=0.3") == {
        "pe": 0.1,
        "weight": 0.3,
        "act": 0.3,
        "psum": 0.3,
    }
    for bad in ("pe=x", "foo=1", "psum", "act=-1"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            parse_site_weights(bad)
