"""Fault-map ingestion: validation through `accelerator.faults.FaultMap`, idempotent upserts, revisions.

Rules
- A chip id seen for the first time is *created* (revision 1).
- The identical document again is *unchanged* (nothing written).
- A different document is a conflict unless ``replace`` is set, which stores a new
  revision (the old ones are kept) and makes it current: *replaced*.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

import psycopg
from sqlalchemy import Engine, Table, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from accelerator.faults import FaultMap
from app.core.config import get_settings
from app.db.base import utcnow
from app.db.models import PENDING_LATE_JOB, Chip, ChipRevision
from app.schemas.chips import chip_id_problem, normalize_chip_id
from app.services.errors import Invalid, loc_from_field, value_error_to_item
from app.services.plans import MERGED_PKS, late_chips_subject
from app.services.profiles import ProfileInfo, get_profile

TOP_LEVEL_FIELDS = frozenset({"chip_id", "accelerator", "array", "faults", "lot", "wafer", "die_x", "die_y"})
# control characters, and unpaired UTF-16 surrogates (valid JSON escapes that no UTF-8 database stores)
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")

Status = Literal["created", "unchanged", "replaced", "conflict"]


class InvalidFaultMap(Invalid):
    """A fault-map document that fails validation; `errors` name each offending field."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        first = errors[0]["msg"] if errors else "invalid"
        super().__init__(f"invalid fault map: {first}", errors=errors)


@dataclass(frozen=True)
class Prepared:
    """A validated, canonicalised fault map ready to store."""

    chip_id: str
    profile_id: int
    accelerator: str
    lot: str | None
    wafer: int | None
    die_x: int | None
    die_y: int | None
    doc: dict[str, Any]
    doc_json: str  # canonical JSON of `doc` (sorted keys): hashed, and stored as is on PostgreSQL
    content_hash: str
    faults_digest: str
    n_faults: int
    fault_rate: float


def canonical_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def prepare(
    session: Session | None,
    d: Any,
    root: str = "body",
    profiles: Mapping[str, ProfileInfo] | Callable[[str], ProfileInfo | None] | None = None,
) -> Prepared:
    """Validate one fault-map document; raises `InvalidFaultMap` naming the offending field.

    Profiles come from `profiles` when given (a mapping, or a lookup by name), else from `session`.
    """

    def bad(field: str, msg: str) -> InvalidFaultMap:
        return InvalidFaultMap([{"loc": loc_from_field(field, root), "msg": f"{field}: {msg}"}])

    if not isinstance(d, dict):
        raise InvalidFaultMap(
            [{"loc": [root] if root else [], "msg": f"must be a JSON object, got {type(d).__name__}"}]
        )
    unknown = set(d) - TOP_LEVEL_FIELDS
    if unknown:
        raise bad(sorted(unknown)[0], f"unknown field (allowed: {sorted(TOP_LEVEL_FIELDS)})")
    chip_id = d.get("chip_id")
    if not isinstance(chip_id, str) or not chip_id.strip():
        raise bad("chip_id", f"required, a non-empty string, got {chip_id!r}")
    if _CONTROL.search(chip_id):  # before normalizing: NFC of a lone surrogate fails
        raise bad("chip_id", "must not contain control characters or unpaired surrogates")
    chip_id = normalize_chip_id(chip_id)
    problem = chip_id_problem(chip_id)
    if problem:
        raise bad("chip_id", problem)
    if chip_id != d["chip_id"]:
        d = {**d, "chip_id": chip_id}
    name = d.get("accelerator")
    if not isinstance(name, str) or not name or _CONTROL.search(name):
        raise bad("accelerator", f"required, the name of a registered accelerator profile, got {name!r}")
    if callable(profiles):
        profile = profiles(name)
    elif profiles is not None:
        profile = profiles.get(name)
    else:
        assert session is not None
        profile = get_profile(session, name)
    if profile is None:
        raise bad("accelerator", f"unknown accelerator profile {name!r}")
    lot = d.get("lot")
    if isinstance(lot, str) and (len(lot) > 64 or _CONTROL.search(lot)):
        raise bad("lot", "must be at most 64 characters, without control characters or unpaired surrogates")
    for field in ("wafer", "die_x", "die_y"):
        v = d.get(field)
        if isinstance(v, int) and not isinstance(v, bool) and not -(2**31) <= v < 2**31:
            raise bad(field, f"{v} out of the 32-bit range")
    faults = d.get("faults")
    cap = get_settings().max_faults_per_map
    if isinstance(faults, list) and len(faults) > cap:
        raise bad(
            "faults", f"{len(faults)} faults, more than max_faults_per_map ({cap}; FAULTFLEET_MAX_FAULTS_PER_MAP)"
        )
    try:
        fm = FaultMap.from_dict(d, array=profile.array)
    except RecursionError:
        raise InvalidFaultMap([{"loc": [root] if root else [], "msg": "document nested too deeply"}]) from None
    except Exception as exc:  # FaultMap raises ValueError; anything else on bad input is still a 422
        raise InvalidFaultMap([value_error_to_item(exc, root)]) from None
    doc = fm.to_dict()
    doc_json = canonical_json(doc)
    return Prepared(
        chip_id=chip_id,
        profile_id=profile.id,
        accelerator=profile.name,
        lot=fm.lot,
        wafer=fm.wafer,
        die_x=fm.die_x,
        die_y=fm.die_y,
        doc=doc,
        doc_json=doc_json,
        content_hash=hashlib.sha256(doc_json.encode()).hexdigest(),
        faults_digest=fm.digest,
        n_faults=len(fm),
        fault_rate=fm.rate,
    )


def _insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return pg_insert(table)
    if dialect == "sqlite":
        return sqlite_insert(table)
    raise RuntimeError(f"unsupported database dialect {dialect!r}")


def _chip_values(p: Prepared, now: datetime, revision: int = 1) -> dict[str, Any]:
    return {
        "chip_id": p.chip_id,
        "accelerator_id": p.profile_id,
        "lot": p.lot,
        "wafer": p.wafer,
        "die_x": p.die_x,
        "die_y": p.die_y,
        "revision": revision,
        "content_hash": p.content_hash,
        "faults_digest": p.faults_digest,
        "n_faults": p.n_faults,
        "fault_rate": p.fault_rate,
        "fault_map": p.doc,
        "created_at": now,
        "updated_at": now,
    }


def _rev_values(chip_pk: int, p: Prepared, revision: int, now: datetime) -> dict[str, Any]:
    return {
        "chip_pk": chip_pk,
        "revision": revision,
        "content_hash": p.content_hash,
        "faults_digest": p.faults_digest,
        "n_faults": p.n_faults,
        "fault_rate": p.fault_rate,
        "fault_map": p.doc,
        "created_at": now,
    }


# Core tables, not ORM entities: the ingest path skips the ORM's bulk-persistence machinery.
CHIPS: Table = Chip.__table__  # type: ignore[assignment]
REVISIONS: Table = ChipRevision.__table__  # type: ignore[assignment]
_c = CHIPS.c
_CURRENT_COLS = (_c.id, _c.chip_id, _c.revision, _c.content_hash, _c.created_at, _c.updated_at)


def _replace(session: Session, p: Prepared, current: Any, now: datetime) -> int | None:
    """Store `p` as the next revision of the chip; None if another writer got there first."""
    new_rev = current.revision + 1
    res = session.execute(
        update(CHIPS)
        .where(_c.id == current.id, _c.revision == current.revision)
        .values(
            revision=new_rev,
            accelerator_id=p.profile_id,
            lot=p.lot,
            wafer=p.wafer,
            die_x=p.die_x,
            die_y=p.die_y,
            content_hash=p.content_hash,
            faults_digest=p.faults_digest,
            n_faults=p.n_faults,
            fault_rate=p.fault_rate,
            fault_map=p.doc,
            updated_at=now,
        )
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return None
    session.execute(_insert(session, REVISIONS), [_rev_values(current.id, p, new_rev, now)])
    return new_rev


@dataclass(frozen=True)
class Stored:
    status: Status
    revision: int
    created_at: datetime
    updated_at: datetime


def summary_of(p: Prepared, st: Stored) -> dict[str, Any]:
    """The stored chip's summary (what GET /chips lists), built without reading it back."""
    return {
        "chip_id": p.chip_id,
        "accelerator": p.accelerator,
        "lot": p.lot,
        "wafer": p.wafer,
        "die_x": p.die_x,
        "die_y": p.die_y,
        "revision": st.revision,
        "content_hash": p.content_hash,
        "faults_digest": p.faults_digest,
        "n_faults": p.n_faults,
        "fault_rate": p.fault_rate,
        "created_at": st.created_at,
        "updated_at": st.updated_at,
    }


_CREATE_SQL: str | None = None


def create_fast(engine: Engine, p: Prepared) -> tuple[Stored, str | None, bool] | None:
    """PostgreSQL: store a chip seen for the first time and its revision 1 in ONE autocommit
    statement (a data-modifying CTE, atomic on its own): one round trip instead of ~5.

    The same statement puts the chip into its accelerator's pending late-chip job when an
    executed plan covers the accelerator (see `plans.late_assignment_jobs`: the same upsert),
    atomically with the chip. Returns (stored, that job's id or None, whether the job is new:
    the caller enqueues a new one), or None when the chip id already exists (the caller takes
    the general path)."""
    global _CREATE_SQL
    now = utcnow()
    chip = _chip_values(p, now)
    cols = list(chip)
    if _CREATE_SQL is None:
        rev_cols = ["content_hash", "faults_digest", "n_faults", "fault_rate", "fault_map", "created_at"]
        _CREATE_SQL = (
            "WITH c AS ("
            + _pg_insert_sql("chips", cols, "ON CONFLICT (chip_id) DO NOTHING RETURNING id")
            + f"), r AS (INSERT INTO chip_revisions (chip_pk, revision, {', '.join(rev_cols)}) "
            "SELECT c.id, 1, content_hash, faults_digest, n_faults, fault_rate, fault_map::json, created_at "
            "FROM c CROSS JOIN (SELECT %s AS content_hash, %s AS faults_digest, %s::integer AS n_faults, "
            "%s::double precision AS fault_rate, %s AS fault_map, %s::timestamptz AS created_at) AS v "
            "RETURNING chip_pk), "
            "j AS (INSERT INTO jobs (id, kind, state, progress, message, params, attempts, subject, created_at, "
            "enqueued_at) SELECT %s, 'assign_chip', 'queued', 0, 'queued', "
            "json_build_object('chip_pks', json_build_array(r.chip_pk)), 0, %s, %s::timestamptz, "
            "%s::timestamptz FROM r WHERE EXISTS (SELECT 1 FROM plans JOIN base_models ON base_models.id = "
            "plans.base_model_id WHERE plans.status = 'executed' AND base_models.accelerator_id = %s) "
            f"ON CONFLICT (subject) WHERE {PENDING_LATE_JOB} DO UPDATE SET params = {MERGED_PKS['postgresql']} "
            "RETURNING id) "
            "SELECT r.chip_pk, (SELECT id FROM j) FROM r"
        )
    job_id = uuid.uuid4().hex
    params = [p.doc_json if c == "fault_map" else chip[c] for c in cols]
    params += [p.content_hash, p.faults_digest, p.n_faults, p.fault_rate, p.doc_json, now]
    params += [job_id, late_chips_subject(p.profile_id), now, now, p.profile_id]
    # The pool's DB-API connection itself (checked out through the pool's idle ping): SQLAlchemy's
    # Connection, isolation-level and result layers cost more CPU here than the statement.
    pooled = engine.raw_connection()
    try:
        conn = pooled.driver_connection
        assert conn is not None
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(_CREATE_SQL, params)
                row = cur.fetchone()
        except psycopg.Error as exc:  # as SQLAlchemy would handle and raise it (DataError is answered as a 4xx)
            if conn.closed or engine.dialect.is_disconnect(cast(Any, exc), conn, None):
                pooled.invalidate(exc)  # this connection is gone, and so are the idle ones:
                engine.pool.dispose()  # the next checkouts connect afresh
            raise DBAPIError.instance(_CREATE_SQL, params, exc, psycopg.Error) from exc
        finally:
            if not conn.closed:
                conn.autocommit = False
    finally:
        pooled.close()  # back to the pool
    return (Stored("created", 1, now, now), row[1], row[1] == job_id) if row is not None else None


def store_one(session: Session, p: Prepared, replace: bool) -> tuple[Status, int]:
    """Upsert one chip in the session's transaction (caller commits). Returns (status, revision)."""
    st = store_one_full(session, p, replace)
    return st.status, st.revision


def store_one_full(session: Session, p: Prepared, replace: bool) -> Stored:
    """`store_one` with the chip's timestamps, for answering without a read-back."""
    for _ in range(10):
        now = utcnow()
        ins = (
            _insert(session, CHIPS)
            .values(**_chip_values(p, now))
            .on_conflict_do_nothing(index_elements=["chip_id"])
            .returning(_c.id)
        )
        pk = session.execute(ins).scalar()
        if pk is not None:
            session.execute(_insert(session, REVISIONS), [_rev_values(pk, p, 1, now)])
            return Stored("created", 1, now, now)
        current = session.execute(select(*_CURRENT_COLS).where(_c.chip_id == p.chip_id)).one_or_none()
        if current is None:
            continue  # deleted in between: try the insert again
        if current.content_hash == p.content_hash:
            return Stored("unchanged", current.revision, current.created_at, current.updated_at)
        if not replace:
            return Stored("conflict", current.revision, current.created_at, current.updated_at)
        rev = _replace(session, p, current, now)
        if rev is not None:
            return Stored("replaced", rev, current.created_at, now)
    raise RuntimeError(f"could not store chip {p.chip_id!r}: too much concurrent churn")


@dataclass
class BulkOutcome:
    line: int
    status: str
    chip_id: str | None = None
    revision: int | None = None
    errors: list[dict[str, Any]] | None = None


def store_many(
    session: Session,
    items: Sequence[tuple[int, Prepared]],
    replace: bool,
    chunk: int = 1000,
    before_commit: Callable[[Session, list[BulkOutcome]], None] | None = None,
) -> list[BulkOutcome]:
    """Store validated maps (line number, map) in chunks, one transaction per chunk.

    Duplicate chip ids inside one request: the first occurrence wins; a later identical
    line is unchanged, a later different line is rejected (or, with replace, a new revision).
    `before_commit(session, outcomes)` runs in each chunk's transaction (e.g. to add the
    late-assignment job of the chunk's new chips atomically with them).
    """
    out: list[BulkOutcome] = []
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        outcomes = _store_chunk(session, part, replace)
        if before_commit is not None:
            before_commit(session, outcomes)
        session.commit()
        out.extend(outcomes)
    return out


def _store_chunk(session: Session, part: Sequence[tuple[int, Prepared]], replace: bool) -> list[BulkOutcome]:
    now = utcnow()
    ids = list({p.chip_id for _, p in part})
    existing = {r.chip_id: r for r in session.execute(select(*_CURRENT_COLS).where(_c.chip_id.in_(ids)))}
    first: dict[str, tuple[int, Prepared]] = {}
    later: list[tuple[int, Prepared]] = []
    for line, p in part:
        if p.chip_id in existing or p.chip_id in first:
            later.append((line, p))
        else:
            first[p.chip_id] = (line, p)
    # (revision, content hash) of each chip as this chunk leaves it, line by line
    current: dict[str, tuple[int, str]] = {cid: (r.revision, r.content_hash) for cid, r in existing.items()}
    results: dict[int, BulkOutcome] = {}
    if first:
        created = _insert_new_chips(session, [p for _, p in first.values()], now)
        if created:
            _insert_first_revisions(session, [(pk, first[cid][1]) for cid, pk in created.items()], now)
        for cid, (line, p) in first.items():
            if cid in created:
                results[line] = BulkOutcome(line, "created", cid, 1)
                current[cid] = (1, p.content_hash)
            else:  # inserted concurrently by another request: handle like an existing chip
                later.insert(0, (line, p))
    for line, p in sorted(later, key=lambda t: t[0]):
        known = current.get(p.chip_id)
        if known is not None and known[1] == p.content_hash:
            # unchanged (the common case of a re-posted file): nothing to write, no round trip
            results[line] = BulkOutcome(line, "unchanged", p.chip_id, known[0])
            continue
        status, rev = store_one(session, p, replace)
        if status == "conflict":
            results[line] = BulkOutcome(
                line,
                "rejected",
                p.chip_id,
                rev,
                [
                    {
                        "loc": ["line", line, "chip_id"],
                        "msg": f"chip_id: {p.chip_id!r} already exists with a different fault map "
                        f"(revision {rev}); send ?replace=true to store a new revision",
                    }
                ],
            )
        else:
            results[line] = BulkOutcome(line, status, p.chip_id, rev)
            if status in ("created", "replaced", "unchanged"):
                current[p.chip_id] = (rev, p.content_hash)
    return [results[line] for line, _ in part]


def _pg_insert_sql(table: str, cols: list[str], suffix: str = "") -> str:
    marks = ", ".join("%s::json" if c == "fault_map" else "%s" for c in cols)
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks}) {suffix}"


def _pg_rows(values: list[dict[str, Any]], maps: list[Prepared], cols: list[str]) -> list[list[Any]]:
    # the canonical JSON text is already there: no second serialisation
    return [[p.doc_json if c == "fault_map" else v[c] for c in cols] for v, p in zip(values, maps, strict=True)]


def _insert_first_revisions(session: Session, items: list[tuple[int, Prepared]], now: datetime) -> None:
    values = [_rev_values(pk, p, 1, now) for pk, p in items]
    if session.get_bind().dialect.name == "postgresql":
        cols = list(values[0])
        raw = session.connection().connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur:
            cur.executemany(_pg_insert_sql("chip_revisions", cols), _pg_rows(values, [p for _, p in items], cols))
        return
    session.execute(_insert(session, REVISIONS), values)


def _insert_new_chips(session: Session, maps: list[Prepared], now: datetime) -> dict[str, int]:
    """INSERT ... ON CONFLICT DO NOTHING RETURNING for many chips; {chip_id: pk} of those inserted."""
    values = [_chip_values(p, now) for p in maps]
    if session.get_bind().dialect.name == "postgresql":
        # psycopg's pipelined executemany(returning=True) parses the statement once; SQLAlchemy's
        # multi-VALUES batching makes psycopg re-parse a 14,000-placeholder query per page.
        cols = list(values[0])
        sql = _pg_insert_sql("chips", cols, "ON CONFLICT (chip_id) DO NOTHING RETURNING id, chip_id")
        raw = session.connection().connection.driver_connection
        assert raw is not None
        out: dict[str, int] = {}
        with raw.cursor() as cur:
            cur.executemany(sql, _pg_rows(values, maps, cols), returning=True)
            while True:
                row = cur.fetchone()
                if row is not None:
                    out[row[1]] = row[0]
                if not cur.nextset():
                    break
        return out
    ins = _insert(session, CHIPS).on_conflict_do_nothing(index_elements=["chip_id"]).returning(_c.id, _c.chip_id)
    return {r.chip_id: r.id for r in session.execute(ins, values)}


def chip_summaries(rows: Iterable[Chip], names: dict[int, str]) -> list[dict[str, Any]]:
    return [chip_summary(c, names) for c in rows]


def chip_summary(c: Chip, names: dict[int, str]) -> dict[str, Any]:
    return {
        "chip_id": c.chip_id,
        "accelerator": names.get(c.accelerator_id, str(c.accelerator_id)),
        "lot": c.lot,
        "wafer": c.wafer,
        "die_x": c.die_x,
        "die_y": c.die_y,
        "revision": c.revision,
        "content_hash": c.content_hash,
        "faults_digest": c.faults_digest,
        "n_faults": c.n_faults,
        "fault_rate": c.fault_rate,
        "created_at": c.created_at,
        "updated_at": c.updated_at,
    }
