"""`faultfleet chips upload | import-csv | import-stdf` and the client's error lines, through a real
API on loopback (the session's services of tests/conftest.py) and the real `faultfleet` process."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.tools import stdf_writer as stdf
from tests.tools.conftest import faultfleet_argv, ff

pytestmark = pytest.mark.integration


def _accelerator(service: Any, rows: int = 8, cols: int = 8) -> str:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    with service.client() as c:
        r = c.post("/api/v1/accelerators", json={"name": name, "rows": rows, "cols": cols, "bypass": True})
        assert r.status_code == 201, r.text
    return name


def _chip(service: Any, chip_id: str) -> dict[str, Any]:
    with service.client() as c:
        r = c.get(f"/api/v1/chips/{chip_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())


def _map(chip_id: str, accel: str, faults: list[dict[str, Any]], **meta: Any) -> dict[str, Any]:
    return {"chip_id": chip_id, "accelerator": accel, "array": {"rows": 8, "cols": 8}, "faults": faults, **meta}


def test_upload_reupload_and_rejected_lines(service: Any, tmp_path: Path) -> None:
    accel = _accelerator(service)
    t = uuid.uuid4().hex[:6]
    good = [_map(f"U{t}-{i}", accel, [{"row": i, "col": 1, "site": "pe"}], lot="L1", wafer=1) for i in range(5)]
    folder = tmp_path / "maps"
    folder.mkdir()
    lines = [
        json.dumps(good[0]),  # 1
        json.dumps(good[1]),  # 2
        "",  # 3: blank lines are skipped, numbering is kept
        json.dumps(_map(f"U{t}-bad-row", accel, [{"row": 99, "col": 0, "site": "pe"}])),  # 4
        "{not json",  # 5
        json.dumps(good[2]),  # 6
    ]
    (folder / "a.ndjson").write_text("\n".join(lines) + "\n")
    # a JSON array: the elements start on lines 2 and 3
    (folder / "b.json").write_text("[\n" + json.dumps(good[3]) + ",\n" + json.dumps(good[4]) + "\n]\n")

    res = ff(service, "chips", "upload", str(folder), "--batch-size", "2", "--json")
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["created"], doc["unchanged"], doc["replaced"], doc["rejected"]) == (5, 0, 0, 2), doc
    where = {r["where"]: r for r in doc["rejections"]}
    assert set(where) == {f"{folder / 'a.ndjson'}:4", f"{folder / 'a.ndjson'}:5"}, where
    assert "row" in where[f"{folder / 'a.ndjson'}:4"]["reason"] and "99" in where[f"{folder / 'a.ndjson'}:4"]["reason"]
    assert "JSON" in where[f"{folder / 'a.ndjson'}:5"]["reason"]
    assert _chip(service, f"U{t}-4")["fault_map"]["faults"] == [{"row": 4, "col": 1, "site": "pe"}]

    # re-run (e.g. after an interruption): nothing new, the same rejections, in the human summary too
    res = ff(service, "chips", "upload", str(folder / "a.ndjson"), str(folder / "b.json"))
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert f"rejected {folder / 'a.ndjson'}:4 U{t}-bad-row:" in res.stdout, res.stdout
    assert f"rejected {folder / 'a.ndjson'}:5" in res.stdout
    summary_row = next(ln for ln in res.stdout.splitlines() if ln.count("│") >= 4 and any(ch.isdigit() for ch in ln))
    assert [c.strip() for c in summary_row.strip("│ ").split("│")] == ["0", "5", "0", "2"], res.stdout

    # only good lines: exit 0; a changed map is rejected without --replace and stored with it
    changed = dict(good[0], faults=[{"row": 0, "col": 2, "site": "pe"}])
    (tmp_path / "fix.ndjson").write_text(json.dumps(good[1]) + "\n" + json.dumps(changed) + "\n")
    res = ff(service, "chips", "upload", str(tmp_path / "fix.ndjson"), "--json")
    assert res.returncode == 1 and json.loads(res.stdout)["rejections"][0]["where"].endswith("fix.ndjson:2")
    res = ff(service, "chips", "upload", str(tmp_path / "fix.ndjson"), "--replace", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert (doc["unchanged"], doc["replaced"], doc["rejected"]) == (1, 1, 0)
    assert _chip(service, f"U{t}-0")["revision"] == 2


def test_import_csv(embedded_service: Any, tmp_path: Path) -> None:
    svc = embedded_service
    accel = _accelerator(svc)
    t = uuid.uuid4().hex[:6]
    csv_text = "\n".join(
        [
            "chip_id,lot,wafer,die_x,die_y,row,col,site,bit,stuck",  # 1
            f"C{t}-a,L7,3,10,4,1,2,psum,21,1",  # 2
            f"C{t}-b,L7,3,11,4,,,,,",  # 3: a chip with no faults
            f"C{t}-a,,,,,5,0,pe,,",  # 4: more of chip a (metadata may be left empty)
            f"C{t}-c,L7,3,12,4,0,0,weight,9,0",  # 5: bit 9 of an int8 weight: the server rejects it
            f"C{t}-d,L7,3,13,4,0,0,glitch,1,1",  # 6: unknown site: rejected here
            f"C{t}-a,,,,,6,6,act,3,0",  # 7
        ]
    )
    path = tmp_path / "faults.csv"
    path.write_text(csv_text + "\n")
    res = ff(svc, "chips", "import-csv", str(path), "--accelerator", accel, "--json")
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["created"], doc["rejected"]) == (2, 2), doc
    where = {r["chip_id"]: r for r in doc["rejections"]}
    assert where[f"C{t}-c"]["where"] == f"{path}:5" and "bit" in where[f"C{t}-c"]["reason"]
    assert where[f"C{t}-d"]["where"] == f"{path}:6" and "glitch" in where[f"C{t}-d"]["reason"]
    a = _chip(svc, f"C{t}-a")
    assert (a["lot"], a["wafer"], a["die_x"], a["die_y"]) == ("L7", 3, 10, 4)
    assert a["fault_map"]["faults"] == [
        {"row": 1, "col": 2, "site": "psum", "bit": 21, "stuck": 1},
        {"row": 5, "col": 0, "site": "pe"},
        {"row": 6, "col": 6, "site": "act", "bit": 3, "stuck": 0},
    ]
    b = _chip(svc, f"C{t}-b")
    assert b["n_faults"] == 0 and b["die_x"] == 11
    # a header without the fault columns is refused before anything is sent
    (tmp_path / "bad.csv").write_text("chip_id,row,col\nX,1,2\n")
    res = ff(svc, "chips", "import-csv", str(tmp_path / "bad.csv"), "--accelerator", accel)
    assert res.returncode == 1 and "bad.csv:1" in res.stdout and "site" in res.stdout


def test_import_stdf_written_per_the_spec(embedded_service: Any, tmp_path: Path) -> None:
    svc = embedded_service
    accel = _accelerator(svc)
    t = uuid.uuid4().hex[:6]
    records = [
        stdf.far(),  # 1
        stdf.mir(f"LOT{t}"),  # 2
        stdf.wir("W07"),  # 3
        stdf.pir(site=1),  # 4: two sites tested at once, records interleaved
        stdf.pir(site=2),  # 5
        stdf.ftr(1, "psum:21:1", row=3, col=7, site=1),  # 6
        stdf.ftr(2, "weight:6:0", row=2, col=2, site=2, failed=False),  # 7: passed, no fault
        stdf.ftr(3, "pe", row=4, col=5, site=1),  # 8
        stdf.prr(f"S{t}-1", 12, 3, 2, site=1, failed=True),  # 9
        stdf.prr(f"S{t}-2", 13, 3, 1, site=2),  # 10: no failing FTR: a chip with no faults
        stdf.pir(),  # 11
        stdf.ftr(1, "act:3:1", row=40, col=0),  # 12: row 40 on an 8x8 array: the server rejects it
        stdf.prr(f"S{t}-3", 14, 3, 1, failed=True),  # 13
        stdf.pir(),  # 14
        stdf.ftr(1, "stuck somewhere", row=1, col=1),  # 15: TEST_TXT outside the mapping
        stdf.prr(f"S{t}-4", 15, 3, 1, failed=True),  # 16
        stdf.wrr("W07", 4),  # 17
        stdf.mrr(),  # 18
    ]
    path = stdf.write(tmp_path / "wafer7.stdf", records)
    res = ff(svc, "chips", "import-stdf", str(path), "--accelerator", accel, "--json")
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["created"], doc["rejected"]) == (2, 2), doc
    where = {r["chip_id"]: r for r in doc["rejections"]}
    assert where[f"S{t}-3"]["where"] == f"{path} record 12" and "row" in where[f"S{t}-3"]["reason"]
    assert where[f"S{t}-4"]["where"] == f"{path} record 15" and "TEST_TXT" in where[f"S{t}-4"]["reason"]
    one = _chip(svc, f"S{t}-1")
    assert (one["lot"], one["wafer"], one["die_x"], one["die_y"]) == (f"LOT{t}", 7, 12, 3)
    assert one["fault_map"]["faults"] == [
        {"row": 3, "col": 7, "site": "psum", "bit": 21, "stuck": 1},
        {"row": 4, "col": 5, "site": "pe"},
    ]
    assert _chip(svc, f"S{t}-2")["n_faults"] == 0
    # not STDF at all
    (tmp_path / "x.stdf").write_bytes(b"hello world, not stdf")
    res = ff(svc, "chips", "import-stdf", str(tmp_path / "x.stdf"), "--accelerator", accel)
    assert res.returncode == 1 and "x.stdf record 1" in res.stdout and "STDF" in res.stdout


def test_errors_are_one_line(embedded_service: Any, tmp_path: Path) -> None:
    svc = embedded_service
    from tests.conftest import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    cases = [
        (ff(svc, "plan", "show", "1", url=closed), 1, "cannot reach the faultfleet API at"),
        (ff(svc, "plan", "show", "999999"), 1, "GET /api/v1/plans/999999: HTTP 404: no plan 999999"),
        (ff(svc, "jobs", "show", "nope", key="wrong-key"), 1, "HTTP 401"),
        (ff(svc, "chips", "upload", str(tmp_path / "missing.ndjson")), 2, "no such file or directory"),
        (ff(svc, "plan", "create", "--model", "m"), 2, "exactly one of --max-drop or --min-accuracy"),
        (ff(svc, "chips", "import-csv", str(tmp_path), "--accelerator", "x"), 2, "no such file"),
    ]
    for res, code, text in cases:
        assert res.returncode == code, (res.args, res.returncode, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], res.stderr
        assert "Traceback" not in res.stderr
    env = {k: v for k, v in svc.env.items() if k != "FAULTFLEET_API_KEY"}
    res = subprocess.run(
        faultfleet_argv("jobs", "show", "x", "--url", svc.base_url),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 2 and "no API key" in res.stderr
