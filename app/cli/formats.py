"""Fault maps from the files a test floor has: JSON / NDJSON, CSV (one row per fault) and STDF V4.

Each reader yields `Entry`s: one fault map (as the JSON line `POST /chips/bulk` takes) with the
place it came from, or the reason it could not be read. The server validates every map; the
readers only turn rows and records into maps, and keep enough of the origin (`fault_lines`) to
name the CSV line or STDF record of a fault the server rejects.

STDF V4 mapping (see README, "Importing test-floor files"):

- MIR.LOT_ID -> `lot`; WIR/WRR.WAFER_ID -> `wafer` (an integer, or text ending in digits: "W07" -> 7).
- A part is the records between a PIR and the PRR of the same (HEAD_NUM, SITE_NUM).
  PRR.PART_ID -> `chip_id` (empty: "<lot>-W<wafer>-X<x>Y<y>"); PRR.X_COORD/Y_COORD -> `die_x`/`die_y`.
- Each *failing* FTR of the part (TEST_FLG bit 7 set) is one fault: YFAIL_AD -> `row`,
  XFAIL_AD -> `col`, and TEST_TXT -> `site[:bit:stuck]`, e.g. "pe", "weight:6:0", "psum:21:1".
  Passing FTRs are ignored; a part with no failing FTR is a chip with no faults.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SITES = ("pe", "weight", "act", "psum")
NDJSON_SUFFIXES = (".ndjson", ".jsonl")
FAULT_FILE_SUFFIXES = (".json", *NDJSON_SUFFIXES)


@dataclass
class Entry:
    """One fault map to send (`body`), or one that could not be read (`error`), and where it came from."""

    source: str
    line: int
    body: bytes | None = None
    chip_id: str | None = None
    error: str | None = None
    unit: str = "line"  # what `line` counts: a "line" of a file, or an STDF "record"
    fault_lines: list[int] = field(default_factory=list)  # the line/record of each fault, in order

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.unit == "line" else f"{self.source} record {self.line}"

    def where_fault(self, index: int) -> str:
        if 0 <= index < len(self.fault_lines):
            n = self.fault_lines[index]
            return f"{self.source}:{n}" if self.unit == "line" else f"{self.source} record {n}"
        return self.where


def _chip_id_of(doc: Any) -> str | None:
    return doc.get("chip_id") if isinstance(doc, dict) and isinstance(doc.get("chip_id"), str) else None


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


# --- JSON and NDJSON -------------------------------------------------------------------------


def fault_files(paths: Iterable[Path]) -> list[Path]:
    """The files to read: each file as given, each directory's *.json/*.ndjson/*.jsonl (recursive, sorted)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FAULT_FILE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    return out


def read_ndjson(path: Path, label: str | None = None) -> Iterator[Entry]:
    """Every non-blank line as it is (the server parses and validates it), with its line number."""
    src = label or str(path)
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                cid = _chip_id_of(json.loads(line))
            except (ValueError, RecursionError):
                cid = None  # sent anyway: the server's rejection names the JSON error
            yield Entry(src, n, body=line, chip_id=cid)


def read_json(path: Path, label: str | None = None) -> Iterator[Entry]:
    """A file holding one fault map, or a JSON array of them (each reported at the line it starts on)."""
    src = label or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        yield Entry(src, 1, error=f"not UTF-8: {exc}")
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        yield Entry(src, exc.lineno, error=f"malformed JSON: {exc.msg} (column {exc.colno})")
        return
    if isinstance(doc, dict):
        start = len(text) - len(text.lstrip())
        yield Entry(src, text.count("\n", 0, start) + 1, body=_encode(doc), chip_id=_chip_id_of(doc))
        return
    if not isinstance(doc, list):
        yield Entry(src, 1, error=f"expected a fault map object or an array of them, got {type(doc).__name__}")
        return
    # Walk the array again with raw_decode to learn the line each element starts on.
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    for item in doc:
        while text[pos] in " \t\r\n,":
            pos += 1
        _, end = dec.raw_decode(text, pos)
        line = text.count("\n", 0, pos) + 1
        pos = end
        if isinstance(item, dict):
            yield Entry(src, line, body=_encode(item), chip_id=_chip_id_of(item))
        else:
            yield Entry(src, line, error=f"expected a fault map object, got {type(item).__name__}")


def read_fault_files(paths: Iterable[Path]) -> Iterator[Entry]:
    for f in fault_files(paths):
        yield from (read_ndjson(f) if f.suffix.lower() in NDJSON_SUFFIXES else read_json(f))


# --- CSV -------------------------------------------------------------------------------------

CSV_COLUMNS = ("chip_id", "lot", "wafer", "die_x", "die_y", "row", "col", "site", "bit", "stuck")
CSV_REQUIRED = ("chip_id", "row", "col", "site", "bit", "stuck")
_FAULT_COLUMNS = ("row", "col", "site", "bit", "stuck")
_META = ("lot", "wafer", "die_x", "die_y")


class _RowError(ValueError):
    pass


def _int(value: str, column: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise _RowError(f"{column} {value!r} is not an integer") from None


def _csv_fault(row: dict[str, str]) -> dict[str, Any] | None:
    """A fault from a row's fault columns; None for a row with all of them empty (a chip with no faults)."""
    vals = {k: (row.get(k) or "").strip() for k in _FAULT_COLUMNS}
    if not any(vals.values()):
        return None
    missing = [k for k in ("row", "col", "site") if not vals[k]]
    if missing:
        raise _RowError(f"a fault row needs {', '.join(missing)} (leave every fault column empty for no fault)")
    site = vals["site"].lower()
    if site not in SITES:
        raise _RowError(f"site {vals['site']!r} is not one of {', '.join(SITES)}")
    fault: dict[str, Any] = {"row": _int(vals["row"], "row"), "col": _int(vals["col"], "col"), "site": site}
    if site == "pe":
        if vals["bit"] or vals["stuck"]:
            raise _RowError("a 'pe' fault (dead PE) takes no bit or stuck value")
    else:
        missing = [k for k in ("bit", "stuck") if not vals[k]]
        if missing:
            raise _RowError(f"a {site!r} fault needs {' and '.join(missing)}")
        fault["bit"] = _int(vals["bit"], "bit")
        fault["stuck"] = _int(vals["stuck"], "stuck")
    return fault


def read_csv(path: Path, accelerator: str, rows: int, cols: int, label: str | None = None) -> list[Entry]:
    """One fault map per chip_id (rows of a chip need not be adjacent); an error names its CSV line."""
    src = label or str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        return [Entry(src, 1, error=f"not UTF-8: {exc}")]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in CSV_REQUIRED if c not in header]
    if missing:
        return [Entry(src, 1, error=f"header lacks column(s) {', '.join(missing)}; expected {','.join(CSV_COLUMNS)}")]
    chips: dict[str, dict[str, Any]] = {}
    first_line: dict[str, int] = {}
    fault_lines: dict[str, list[int]] = {}
    bad: dict[str, Entry] = {}
    errors: list[Entry] = []
    for row in reader:
        n = reader.line_num  # the physical line this row ended on
        cid = (row.get("chip_id") or "").strip()
        if not cid:
            if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                errors.append(Entry(src, n, error="chip_id is empty"))
            continue
        if cid in bad:
            continue
        doc = chips.get(cid)
        if doc is None:
            doc = chips[cid] = {"chip_id": cid, "accelerator": accelerator, "array": {"rows": rows, "cols": cols}}
            doc["faults"] = []
            first_line[cid], fault_lines[cid] = n, []
        try:
            if None in row:
                raise _RowError(f"{len(header) + len(row[None])} fields, the header has {len(header)}")
            for k in _META:
                v = (row.get(k) or "").strip()
                if not v:
                    continue
                value: str | int = v if k == "lot" else _int(v, k)
                if doc.get(k, value) != value:
                    raise _RowError(f"{k} {v!r} differs from {doc[k]!r} on an earlier row of chip {cid!r}")
                doc[k] = value
            fault = _csv_fault(row)
        except _RowError as exc:
            bad[cid] = Entry(src, n, chip_id=cid, error=str(exc))
            continue
        if fault is not None:
            doc["faults"].append(fault)
            fault_lines[cid].append(n)
    out = errors
    for cid, doc in chips.items():
        if cid in bad:
            out.append(bad[cid])
        else:
            out.append(Entry(src, first_line[cid], body=_encode(doc), chip_id=cid, fault_lines=fault_lines[cid]))
    out.sort(key=lambda e: e.line)
    return out


# --- STDF V4 ---------------------------------------------------------------------------------

_FAIL = 0x80  # FTR.TEST_FLG bit 7: the test failed
_WAFER_DIGITS = re.compile(r"(\d+)\s*$")


def _wafer_number(wafer_id: str | None) -> int | None:
    if not wafer_id:
        return None
    m = _WAFER_DIGITS.search(wafer_id)
    return int(m.group(1)) if m else None


def _stdf_fault(ftr: dict[str, Any]) -> dict[str, Any]:
    text = (ftr.get("TEST_TXT") or "").strip()
    parts = [p.strip() for p in text.split(":")]
    site = parts[0].lower()
    if site not in SITES:
        raise ValueError(f"FTR TEST_TXT {text!r}: expected 'pe' or '<site>:<bit>:<stuck>' with site in {SITES}")
    opt = ftr.get("OPT_FLAG")
    if opt is None or int(opt) & 0x10 or ftr.get("XFAIL_AD") is None or ftr.get("YFAIL_AD") is None:
        raise ValueError("failing FTR without a valid fail address (XFAIL_AD/YFAIL_AD; OPT_FLAG bit 4 must be 0)")
    fault: dict[str, Any] = {"row": ftr.get("YFAIL_AD"), "col": ftr.get("XFAIL_AD"), "site": site}
    if site == "pe":
        if len(parts) != 1:
            raise ValueError(f"FTR TEST_TXT {text!r}: a 'pe' fault takes no bit or stuck value")
    else:
        if len(parts) != 3 or not all(p.lstrip("-").isdigit() for p in parts[1:]):
            raise ValueError(f"FTR TEST_TXT {text!r}: expected '{site}:<bit>:<stuck>', e.g. '{site}:3:1'")
        fault["bit"], fault["stuck"] = int(parts[1]), int(parts[2])
    return fault


def stdf_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(record name, {field: value}) for every record of an STDF V4 file, read with pystdf."""
    from pystdf.IO import Parser

    class Sink:
        def __init__(self) -> None:
            self.records: list[tuple[str, dict[str, Any]]] = []

        def after_send(self, _source: object, data: tuple[Any, list[Any]]) -> None:
            rec_type, values = data
            self.records.append((type(rec_type).__name__.upper(), dict(zip(rec_type.fieldNames, values, strict=False))))

    sink = Sink()
    with path.open("rb") as fh:
        parser = Parser(inp=fh)
        parser.addSink(sink)
        parser.parse()
    return sink.records


def read_stdf(path: Path, accelerator: str, rows: int, cols: int, label: str | None = None) -> list[Entry]:
    """One fault map per part (PIR..PRR); an error names the STDF record (1-based, FAR first)."""
    src = label or str(path)
    try:
        records = stdf_records(path)
    except Exception as exc:  # pystdf raises its own and struct errors on a damaged file
        return [Entry(src, 1, unit="record", error=f"not a readable STDF V4 file: {type(exc).__name__}: {exc}")]
    if not records or records[0][0] != "FAR":
        return [Entry(src, 1, unit="record", error="not an STDF V4 file: it does not start with a FAR record")]
    lot: str | None = None
    wafer: int | None = None
    open_parts: dict[tuple[int, int], dict[str, Any]] = {}
    out: list[Entry] = []
    for n, (name, f) in enumerate(records, start=1):
        if name == "MIR":
            lot = (f.get("LOT_ID") or "").strip() or None
        elif name in ("WIR", "WRR"):
            wafer = _wafer_number(f.get("WAFER_ID")) if f.get("WAFER_ID") else wafer
        elif name == "PIR":
            open_parts[(f["HEAD_NUM"], f["SITE_NUM"])] = {"start": n, "faults": [], "lines": [], "error": None}
        elif name == "FTR":
            part = open_parts.get((f["HEAD_NUM"], f["SITE_NUM"]))
            if part is None or not (int(f.get("TEST_FLG") or 0) & _FAIL) or part["error"]:
                continue  # outside a part, passing, or the part is already rejected
            try:
                part["faults"].append(_stdf_fault(f))
                part["lines"].append(n)
            except ValueError as exc:
                part["error"] = (n, str(exc))
        elif name == "PRR":
            part = open_parts.pop((f["HEAD_NUM"], f["SITE_NUM"]), None)
            if part is None:
                out.append(Entry(src, n, unit="record", error="PRR without a PIR on its head and site"))
                continue
            x, y = f.get("X_COORD"), f.get("Y_COORD")
            # -32768 is STDF's "no coordinate"
            x = None if x is None or x == -32768 else int(x)
            y = None if y is None or y == -32768 else int(y)
            cid = (f.get("PART_ID") or "").strip() or f"{lot or 'LOT'}-W{wafer if wafer is not None else 0}-X{x}Y{y}"
            if part["error"]:
                rec, msg = part["error"]
                out.append(Entry(src, rec, unit="record", chip_id=cid, error=msg))
                continue
            doc: dict[str, Any] = {"chip_id": cid, "accelerator": accelerator, "array": {"rows": rows, "cols": cols}}
            doc["faults"] = part["faults"]
            for k, v in (("lot", lot), ("wafer", wafer), ("die_x", x), ("die_y", y)):
                if v is not None:
                    doc[k] = v
            out.append(Entry(src, n, unit="record", body=_encode(doc), chip_id=cid, fault_lines=part["lines"]))
    for part in open_parts.values():
        out.append(Entry(src, part["start"], unit="record", error="PIR without its PRR (the file ends mid-part)"))
    return out
