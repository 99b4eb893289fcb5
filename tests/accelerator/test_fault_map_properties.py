"""Property tests (hypothesis) of fault-map parsing: `FaultMap.from_dict` and the service's `prepare`.

- every valid map round-trips: parse -> to_dict -> parse is the same map, the canonical JSON is
  stable, and the service stores a document its own OpenAPI schema (FAULT_MAP_SCHEMA) accepts;
- every map with one bad fault entry is a ValueError (service: InvalidFaultMap, a 422) whose
  message and `loc` name that entry;
- any JSON document at all gives a map or InvalidFaultMap, never another exception.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from accelerator.faults import ArrayConfig, FaultMap
from app.schemas.chips import FAULT_MAP_SCHEMA
from app.services.chips import InvalidFaultMap, canonical_json, prepare
from app.services.profiles import ProfileInfo

FAULT_MAP_VALIDATOR = jsonschema_rs.validator_for(FAULT_MAP_SCHEMA)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

arrays = st.builds(
    ArrayConfig, rows=st.integers(1, 12), cols=st.integers(1, 12), fmt=st.just("int8"), bypass=st.booleans()
)


@st.composite
def fault_dicts(draw: st.DrawFn, array: ArrayConfig, max_faults: int = 20) -> list[dict[str, Any]]:
    sites = ["weight", "act", "psum"] + (["pe"] if array.bypass else [])
    faults: dict[tuple[Any, ...], dict[str, Any]] = {}
    for _ in range(draw(st.integers(0, max_faults))):
        site = draw(st.sampled_from(sites))
        f: dict[str, Any] = {
            "row": draw(st.integers(0, array.rows - 1)),
            "col": draw(st.integers(0, array.cols - 1)),
            "site": site,
        }
        if site != "pe":
            f["bit"] = draw(st.integers(0, array.bit_width(site) - 1))
            f["stuck"] = draw(st.sampled_from([0, 1]))
        faults.setdefault((f["row"], f["col"], site, f.get("bit")), f)
    return list(faults.values())


texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), min_size=1, max_size=40)
REFUSED = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
# what CHIP_ID_RULES allows, by this Python's Unicode database (NFD spellings included: stored as NFC)
chip_ids = st.text(
    st.characters(codec="utf-8", exclude_categories=list(REFUSED), exclude_characters="/\\").filter(
        lambda c: unicodedata.category(c) not in REFUSED and (c == " " or not c.isspace())
    ),
    min_size=1,
    max_size=40,
).filter(lambda s: s == s.strip() and s not in (".", ".."))
int32 = st.integers(-(2**31), 2**31 - 1)


@st.composite
def valid_maps(draw: st.DrawFn) -> tuple[ArrayConfig, dict[str, Any]]:
    array = draw(arrays)
    d: dict[str, Any] = {
        "chip_id": draw(chip_ids),
        "accelerator": "prof",
        "array": {"rows": array.rows, "cols": array.cols},
        "faults": draw(fault_dicts(array)),
    }
    for name, strategy in (("lot", texts), ("wafer", int32), ("die_x", int32), ("die_y", int32)):
        if draw(st.booleans()):
            d[name] = draw(strategy)
    return array, d


def _profiles(array: ArrayConfig) -> dict[str, ProfileInfo]:
    return {"prof": ProfileInfo(1, "prof", array)}


@SETTINGS
@given(valid_maps())
def test_valid_maps_round_trip(case: tuple[ArrayConfig, dict[str, Any]]) -> None:
    array, d = case
    fm = FaultMap.from_dict(d, array=array)
    assert len(fm) == len(d["faults"])
    again = FaultMap.from_dict(fm.to_dict(), array=array)
    assert again == fm and again.digest == fm.digest
    assert again.to_dict() == fm.to_dict()
    # the order faults arrive in changes nothing
    shuffled = {**d, "faults": list(reversed(d["faults"]))}
    assert FaultMap.from_dict(shuffled, array=array).digest == fm.digest
    p = prepare(None, d, profiles=_profiles(array))
    assert p.chip_id == unicodedata.normalize("NFC", d["chip_id"]) and p.n_faults == len(fm)
    assert p.doc["chip_id"] == p.chip_id
    assert prepare(None, json.loads(p.doc_json), profiles=_profiles(array)).content_hash == p.content_hash
    assert canonical_json(p.doc) == p.doc_json
    FAULT_MAP_VALIDATOR.validate(p.doc)  # what the service stores, its OpenAPI schema describes
    FAULT_MAP_VALIDATOR.validate(d)


# one bad value for a field of a fault entry (given the array and the site)
BAD_VALUES: list[Any] = [None, True, False, 1.0, 0.0, "1", [], {}, -1, 2**63, 4096, 1.5, float("nan")]


@st.composite
def maps_with_one_bad_fault(draw: st.DrawFn) -> tuple[ArrayConfig, dict[str, Any], int, str | None]:
    array, d = draw(valid_maps())
    faults = d["faults"]
    if not faults:
        faults.append({"row": 0, "col": 0, "site": "weight", "bit": 0, "stuck": 0})
    i = draw(st.integers(0, len(faults) - 1))
    f = dict(faults[i])
    kind = draw(st.sampled_from(["value", "missing", "unknown", "duplicate", "not_object", "pe_with_bit"]))
    field: str | None = None
    if kind == "value":
        field = draw(st.sampled_from(["row", "col", "site"] + (["bit", "stuck"] if f["site"] != "pe" else [])))
        bad = draw(st.sampled_from([*BAD_VALUES, "nowhere"]))
        limit = {"row": array.rows, "col": array.cols, "bit": array.bit_width(f["site"]), "stuck": 2}.get(field)
        # skip the values that are in fact valid here
        assume(not (isinstance(bad, int) and not isinstance(bad, bool) and limit is not None and 0 <= bad < limit))
        assume(not (field == "site" and bad in ("pe", "weight", "act", "psum")))
        f[field] = bad
        if field == "site":
            field = None  # a bad site may be reported on the entry or on .site
    elif kind == "missing":
        field = draw(st.sampled_from(["row", "col", "site"]))
        del f[field]
    elif kind == "unknown":
        f["colour"] = "red"
    elif kind == "duplicate":
        faults.append(dict(f))
        i = len(faults) - 1
    elif kind == "not_object":
        f = draw(st.sampled_from([[], "fault", 3, None]))  # type: ignore[assignment]
    else:  # pe_with_bit
        f = {"row": f["row"], "col": f["col"], "site": "pe", "bit": 0, "stuck": 1}
    if kind != "duplicate":
        faults[i] = f
    if not array.bypass and isinstance(f, dict) and f.get("site") == "pe" and kind != "pe_with_bit":
        field = None  # a dead PE on an array without bypass is itself an error of this entry
    return array, d, i, field


@SETTINGS
@given(maps_with_one_bad_fault())
def test_a_bad_fault_entry_is_named(case: tuple[ArrayConfig, dict[str, Any], int, str | None]) -> None:
    array, d, i, field = case
    with pytest.raises(ValueError) as info:
        FaultMap.from_dict(d, array=array)
    assert str(info.value).startswith(f"faults[{i}]"), str(info.value)
    if field is not None:
        assert str(info.value).startswith((f"faults[{i}].{field}:", f"faults[{i}]:")), str(info.value)
    with pytest.raises(InvalidFaultMap) as err:
        prepare(None, d, profiles=_profiles(array))
    loc = err.value.errors[0]["loc"]
    assert loc[:3] == ["body", "faults", i], err.value.errors
    assert err.value.errors[0]["msg"].startswith(f"faults[{i}]")


@SETTINGS
@given(
    arrays,
    st.integers(1, 12),
    st.sampled_from([True, False, 1.0, 2.0, "2", None, [2], -1, 0, 2**64]),
    st.sampled_from(["rows", "cols"]),
)
def test_array_must_match_the_profile_exactly(array: ArrayConfig, _n: int, bad: Any, dim: str) -> None:
    assume(not (type(bad) is int and bad == getattr(array, dim)))
    d = {"chip_id": "c", "accelerator": "prof", "array": {"rows": array.rows, "cols": array.cols}, "faults": []}
    d["array"][dim] = bad
    with pytest.raises(ValueError) as info:
        FaultMap.from_dict(d, array=array)
    assert str(info.value).startswith("array"), str(info.value)
    with pytest.raises(InvalidFaultMap) as err:
        prepare(None, d, profiles=_profiles(array))
    assert err.value.errors[0]["loc"][:2] == ["body", "array"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(["chip_id", "accelerator", "array", "faults", "lot", "wafer", "die_x", "die_y"])


@SETTINGS
@given(
    st.one_of(
        json_values,
        st.dictionaries(field_names, json_values, max_size=8),
        valid_maps().flatmap(
            lambda c: st.tuples(st.just(c[1]), field_names, json_values).map(lambda t: {**t[0], t[1]: t[2]})
        ),
    )
)
def test_any_json_is_a_map_or_a_422(doc: Any) -> None:
    array = ArrayConfig(4, 4)
    try:
        p = prepare(None, doc, profiles=_profiles(array))
    except InvalidFaultMap as exc:
        assert exc.errors and all(isinstance(e["msg"], str) and e["msg"] for e in exc.errors)
        assert exc.errors[0]["loc"][0] == "body"
    else:
        FAULT_MAP_VALIDATOR.validate(p.doc)


@pytest.mark.parametrize(
    "fault, field",
    [
        ({"row": 0, "col": 0, "site": "weight", "bit": 0, "stuck": 1.0}, "stuck"),
        ({"row": 0, "col": 0, "site": "weight", "bit": 0, "stuck": True}, "stuck"),
        ({"row": 0, "col": 0, "site": "psum", "bit": True, "stuck": 0}, "bit"),
        ({"row": 1.0, "col": 0, "site": "act", "bit": 0, "stuck": 0}, "row"),
        ({"row": 0, "col": False, "site": "pe"}, "col"),
    ],
)
def test_bools_and_floats_are_not_integers(fault: dict[str, Any], field: str) -> None:
    array = ArrayConfig(2, 2)
    d = {"chip_id": "c", "accelerator": "prof", "array": {"rows": 2, "cols": 2}, "faults": [fault]}
    with pytest.raises(InvalidFaultMap) as err:
        prepare(None, d, profiles=_profiles(array))
    assert err.value.errors[0]["loc"] == ["body", "faults", 0, field], err.value.errors
    with pytest.raises(ValueError, match=r"array\.rows: must be an integer, got True"):
        FaultMap.from_dict({**d, "array": {"rows": True, "cols": 2}, "faults": []}, array=ArrayConfig(1, 2))
    with pytest.raises(ValueError, match="array: rows and cols must be integers"):
        ArrayConfig(True, 2)
