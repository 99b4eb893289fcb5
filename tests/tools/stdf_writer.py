"""A minimal STDF V4 writer for tests (pystdf only reads STDF).

Per the STDF V4 specification: every record is a 4-byte header (REC_LEN U*2 = bytes of data
that follow, REC_TYP U*1, REC_SUB U*1) and its fields in order; little-endian (FAR CPU_TYPE 2);
C*n is a length byte and that many ASCII bytes. A record may end before its last fields,
which then read as missing: pystdf reads it so, and the writer uses that to stop after the
fields a test needs.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

_FMT = {"U1": "B", "U2": "H", "U4": "I", "I2": "h", "I4": "i", "B1": "B", "C1": "c"}


def _field(kind: str, value: Any) -> bytes:
    if kind == "Cn":
        raw = value.encode("ascii")
        return struct.pack("<B", len(raw)) + raw
    return struct.pack("<" + _FMT[kind], value)


def record(typ: int, sub: int, fields: list[tuple[str, Any]]) -> bytes:
    data = b"".join(_field(kind, value) for kind, value in fields)
    return struct.pack("<HBB", len(data), typ, sub) + data


def far() -> bytes:
    return record(0, 10, [("U1", 2), ("U1", 4)])  # CPU_TYPE 2 (little-endian), STDF_VER 4


def mir(lot: str) -> bytes:
    head = [("U4", 0), ("U4", 0), ("U1", 1), ("C1", b"P"), ("C1", b" "), ("C1", b" "), ("U2", 0), ("C1", b" ")]
    return record(1, 10, [*head, ("Cn", lot), ("Cn", "SA-NPU"), ("Cn", "node1"), ("Cn", "tester"), ("Cn", "bist")])


def wir(wafer_id: str, head: int = 1) -> bytes:
    return record(2, 10, [("U1", head), ("U1", 255), ("U4", 0), ("Cn", wafer_id)])


def wrr(wafer_id: str, parts: int, head: int = 1) -> bytes:
    counts = [("U4", parts), ("U4", 0), ("U4", 0), ("U4", 0), ("U4", 0)]
    return record(2, 20, [("U1", head), ("U1", 255), ("U4", 0), *counts, ("Cn", wafer_id)])


def pir(head: int = 1, site: int = 1) -> bytes:
    return record(5, 10, [("U1", head), ("U1", site)])


def prr(part_id: str, x: int, y: int, n_tests: int, head: int = 1, site: int = 1, failed: bool = False) -> bytes:
    flags = 0x08 if failed else 0  # PART_FLG bit 3: the part failed
    fields = [("U1", head), ("U1", site), ("B1", flags), ("U2", n_tests), ("U2", 1), ("U2", 1)]
    return record(5, 20, [*fields, ("I2", x), ("I2", y), ("U4", 0), ("Cn", part_id)])


def ftr(
    test_num: int, text: str, row: int = 0, col: int = 0, failed: bool = True, head: int = 1, site: int = 1
) -> bytes:
    """A functional test result: the fail address (XFAIL_AD = col, YFAIL_AD = row) and TEST_TXT.

    OPT_FLAG 0xEF: every optional field invalid except bit 4's (the fail address)."""
    fields: list[tuple[str, Any]] = [
        ("U4", test_num),
        ("U1", head),
        ("U1", site),
        ("B1", 0x80 if failed else 0),  # TEST_FLG bit 7: failed
        ("B1", 0xEF),
        ("U4", 0),  # CYCL_CNT
        ("U4", 0),  # REL_VADR
        ("U4", 0),  # REPT_CNT
        ("U4", 0),  # NUM_FAIL
        ("I4", col),  # XFAIL_AD
        ("I4", row),  # YFAIL_AD
        ("I2", 0),  # VECT_OFF
        ("U2", 0),  # RTN_ICNT
        ("U2", 0),  # PGM_ICNT
        ("U2", 0),  # FAIL_PIN: a D*n of 0 bits
        ("Cn", ""),  # VECT_NAM
        ("Cn", ""),  # TIME_SET
        ("Cn", ""),  # OP_CODE
        ("Cn", text),  # TEST_TXT
    ]
    return record(15, 20, fields)


def mrr() -> bytes:
    return record(1, 20, [("U4", 0), ("C1", b" ")])


def write(path: Path, records: list[bytes]) -> Path:
    path.write_bytes(b"".join(records))
    return path
