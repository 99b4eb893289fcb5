"""`faultfleet chips upload | import-csv | import-stdf | show`: fault maps from the test floor."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.cli import formats
from app.cli.api import ApiClient, CliError
from app.cli.output import JsonOpt, KeyOpt, UrlOpt, client, err, out, print_json

app = typer.Typer(help="Send fault maps to the service: JSON/NDJSON files, CSV or STDF V4.", no_args_is_help=True)

BATCH_BYTES = 16 << 20  # well under the server's default bulk body limit (64 MiB)

BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, max=100_000, help="fault maps per bulk request")]
ReplaceOpt = Annotated[
    bool, typer.Option("--replace", help="store a changed map as a new revision instead of rejecting it")
]


@dataclass
class Rejection:
    where: str
    chip_id: str | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"where": self.where, "chip_id": self.chip_id, "reason": self.reason}


@dataclass
class UploadSummary:
    created: int = 0
    unchanged: int = 0
    replaced: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    assignment_jobs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "unchanged": self.unchanged,
            "replaced": self.replaced,
            "rejected": len(self.rejected),
            "rejections": [r.as_dict() for r in self.rejected],
            "assignment_jobs": self.assignment_jobs,
        }


def _reason(entry: formats.Entry, errors: list[dict[str, Any]] | None) -> tuple[str, str]:
    """(where, why) of a server rejection: the CSV line / STDF record of the fault it names, if any."""
    if not errors:
        return entry.where, "rejected"
    first = errors[0]
    loc = list(first.get("loc") or [])
    where = entry.where
    if "faults" in loc:
        i = loc.index("faults")
        if i + 1 < len(loc) and isinstance(loc[i + 1], int):
            where = entry.where_fault(loc[i + 1])
    msg = str(first.get("msg") or "rejected")
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more)"
    return where, msg


def _batches(entries: list[formats.Entry], size: int) -> Iterable[list[formats.Entry]]:
    batch: list[formats.Entry] = []
    nbytes = 0
    for e in entries:
        assert e.body is not None
        if batch and (len(batch) >= size or nbytes + len(e.body) + 1 > BATCH_BYTES):
            yield batch
            batch, nbytes = [], 0
        batch.append(e)
        nbytes += len(e.body) + 1
    if batch:
        yield batch


def send(api: ApiClient, entries: list[formats.Entry], batch_size: int, replace: bool, quiet: bool) -> UploadSummary:
    """POST the readable entries in bulk batches (a progress bar on stderr); count every outcome.

    Re-running after an interruption is safe: a map the server already holds answers 'unchanged'."""
    summary = UploadSummary()
    summary.rejected += [Rejection(e.where, e.chip_id, e.error or "unreadable") for e in entries if e.body is None]
    todo = [e for e in entries if e.body is not None]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, disable=quiet, transient=False) as progress:
        task = progress.add_task("fault maps", total=len(todo))
        for batch in _batches(todo, batch_size):
            body = b"\n".join(e.body for e in batch if e.body is not None) + b"\n"
            res = api.post(
                "/chips/bulk",
                content=body,
                params={"replace": "true"} if replace else None,
                headers={"Content-Type": "application/x-ndjson"},
            )
            for line in res["lines"]:
                entry = batch[line["line"] - 1]
                status = line["status"]
                if status == "rejected":
                    where, why = _reason(entry, line.get("errors"))
                    summary.rejected.append(Rejection(where, line.get("chip_id") or entry.chip_id, why))
                else:
                    setattr(summary, status, getattr(summary, status) + 1)
            if res.get("assignment_job"):
                summary.assignment_jobs.append(res["assignment_job"])
            progress.advance(task, len(batch))
    return summary


def report(summary: UploadSummary, as_json: bool) -> None:
    """The summary (stdout), then exit 1 when anything was rejected."""
    if as_json:
        print_json(summary.as_dict())
    else:
        t = Table(title="upload summary", show_header=True)
        for col in ("created", "unchanged", "replaced", "rejected"):
            t.add_column(col, justify="right")
        t.add_row(str(summary.created), str(summary.unchanged), str(summary.replaced), str(len(summary.rejected)))
        out.print(t)
        for r in summary.rejected:
            chip = f" {r.chip_id}" if r.chip_id else ""
            out.print(f"rejected {r.where}{chip}: {r.reason}", markup=False)
        if summary.assignment_jobs:
            out.print(f"late-chip assignment job(s): {', '.join(summary.assignment_jobs)}", markup=False)
    if summary.rejected:
        raise typer.Exit(1)


def _array_of(api: ApiClient, accelerator: str, rows: int | None, cols: int | None) -> tuple[int, int]:
    """The array size: as given, else the registered profile's."""
    if rows is not None and cols is not None:
        return rows, cols
    prof = api.get(f"/accelerators/{accelerator}")
    return rows if rows is not None else int(prof["rows"]), cols if cols is not None else int(prof["cols"])


@app.command("upload")
def upload(
    paths: Annotated[list[Path], typer.Argument(help="JSON (one map or an array) / NDJSON files, or directories")],
    batch_size: BatchOpt = 1000,
    replace: ReplaceOpt = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload fault maps in bulk; exits 1 if any was rejected (each named with its file and line)."""
    try:
        entries = list(formats.read_fault_files(paths))
    except OSError as exc:
        raise CliError(str(exc), exit_code=2) from None
    if not entries:
        raise CliError("no fault maps found in " + ", ".join(map(str, paths)), exit_code=2)
    with client(url, api_key) as api:
        summary = send(api, entries, batch_size, replace, quiet=as_json)
    report(summary, as_json)


AccelOpt = Annotated[str, typer.Option("--accelerator", "-a", help="registered accelerator profile name")]
RowsOpt = Annotated[int | None, typer.Option("--rows", min=1, help="array rows [default: the profile's]")]
ColsOpt = Annotated[int | None, typer.Option("--cols", min=1, help="array columns [default: the profile's]")]


def _file(path: Path) -> Path:
    if not path.is_file():
        raise CliError(f"no such file: {path}", exit_code=2)
    return path


def _import(
    reader: Callable[[Path, str, int, int], list[formats.Entry]],
    file: Path,
    accelerator: str,
    rows: int | None,
    cols: int | None,
    batch_size: int,
    replace: bool,
    url: str | None,
    api_key: str | None,
    as_json: bool,
) -> None:
    """Read `file` with `reader` for the array given (else the profile's), upload it, report."""
    _file(file)
    with client(url, api_key) as api:
        r, c = _array_of(api, accelerator, rows, cols)
        summary = send(api, reader(file, accelerator, r, c), batch_size, replace, quiet=as_json)
    report(summary, as_json)


@app.command("import-csv")
def import_csv(
    file: Annotated[Path, typer.Argument(help="CSV: chip_id,lot,wafer,die_x,die_y,row,col,site,bit,stuck")],
    accelerator: AccelOpt,
    rows: RowsOpt = None,
    cols: ColsOpt = None,
    batch_size: BatchOpt = 1000,
    replace: ReplaceOpt = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import a CSV with one row per fault (a chip with no faults: one row with the fault columns empty)."""
    _import(formats.read_csv, file, accelerator, rows, cols, batch_size, replace, url, api_key, as_json)


@app.command("import-stdf")
def import_stdf(
    file: Annotated[Path, typer.Argument(help="STDF V4 file (PIR/PRR per part, a failing FTR per fault)")],
    accelerator: AccelOpt,
    rows: RowsOpt = None,
    cols: ColsOpt = None,
    batch_size: BatchOpt = 1000,
    replace: ReplaceOpt = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import an STDF V4 file: one chip per part, one fault per failing FTR (mapping: README)."""
    _import(formats.read_stdf, file, accelerator, rows, cols, batch_size, replace, url, api_key, as_json)


@app.command("show")
def show(chip_id: str, url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """One chip: its metadata and current fault map."""
    with client(url, api_key) as api:
        chip = api.get(f"/chips/{chip_id}")
    if as_json:
        print_json(chip)
        return
    out.print(
        f"chip {chip['chip_id']} on {chip['accelerator']}: lot {chip['lot']} wafer {chip['wafer']} "
        f"die ({chip['die_x']}, {chip['die_y']}), revision {chip['revision']}, "
        f"{chip['n_faults']} faults (rate {chip['fault_rate']:.4f})",
        markup=False,
    )
    t = Table("row", "col", "site", "bit", "stuck")
    for f in chip["fault_map"].get("faults", []):
        t.add_row(str(f["row"]), str(f["col"]), f["site"], str(f.get("bit", "")), str(f.get("stuck", "")))
    out.print(t)
