"""`faultfleet plan | jobs | models`: plan a fleet's retraining, follow its jobs, download its models."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.cli.api import ApiClient, CliError
from app.cli.output import JsonOpt, KeyOpt, UrlOpt, client, err, out, pct, print_json
from app.services.plan_costs import alone_epochs, cost_alternatives

plan_app = typer.Typer(help="Plan, show and execute the retraining of a fleet.", no_args_is_help=True)
jobs_app = typer.Typer(help="Follow jobs.", no_args_is_help=True)
models_app = typer.Typer(help="Download retrained models, verified against their sha256.", no_args_is_help=True)

FINAL = ("succeeded", "failed", "cancelled")


# --- jobs --------------------------------------------------------------------------------------


def watch_job(api: ApiClient, job_id: str, quiet: bool, poll_s: float = 0.5) -> dict[str, Any]:
    """Follow a job (and its child jobs, e.g. one per retrained group) with progress bars until it ends."""
    columns = (
        TextColumn("{task.fields[label]:<28}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[state]:<9} {task.fields[msg]}"),
        TimeElapsedColumn(),
    )
    tasks: dict[str, TaskID] = {}
    with Progress(*columns, console=err, disable=quiet) as progress:

        def show(job: dict[str, Any], label: str) -> None:
            fields = {"state": job["state"], "msg": (job["progress"]["message"] or "")[:60]}
            if job["id"] not in tasks:
                tasks[job["id"]] = progress.add_task("", total=1.0, label=label, **fields)
            progress.update(tasks[job["id"]], completed=job["progress"]["fraction"], **fields)

        while True:
            job = api.get(f"/jobs/{job_id}")
            show(job, f"{job['kind']} {job['id'][:8]}")
            for child in api.get(f"/jobs/{job_id}/children"):
                show(child, f"  {child['subject'] or child['kind']}")
            if job["state"] in FINAL:
                break
            time.sleep(poll_s)
    if job["state"] != "succeeded":
        raise CliError(f"job {job_id} ({job['kind']}) {job['state']}: {job.get('error') or job['progress']['message']}")
    return dict(job)


@jobs_app.command("watch")
def jobs_watch(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Live progress of a job and its child jobs; exits 1 if it fails or is cancelled."""
    with client(url, api_key) as api:
        job = watch_job(api, job_id, quiet=as_json)
    if as_json:
        print_json(job)
    else:
        out.print(f"job {job_id} ({job['kind']}) succeeded: {job['progress']['message']}", markup=False)


@jobs_app.command("show")
def jobs_show(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """A job's state, progress and error."""
    with client(url, api_key) as api:
        job = api.get(f"/jobs/{job_id}")
    if as_json:
        print_json(job)
    else:
        out.print(
            f"job {job['id']} {job['kind']} {job['state']} {job['progress']['fraction']:.0%} "
            f"{job['progress']['message']}" + (f" error: {job['error']}" if job.get("error") else ""),
            markup=False,
        )


# --- plans -------------------------------------------------------------------------------------


def _floats(text: str | None, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{name}: expected comma-separated numbers, got {text!r}", exit_code=2) from None


@plan_app.command("create")
def plan_create(
    model: Annotated[str, typer.Option("--model", "-m", help="base model name")],
    max_drop: Annotated[float | None, typer.Option(min=0, max=1, help="accuracy drop allowed (fraction)")] = None,
    min_accuracy: Annotated[float | None, typer.Option(min=0, max=1, help="accuracy required (fraction)")] = None,
    lot: Annotated[str | None, typer.Option(help="only the chips of this lot")] = None,
    wafer: Annotated[int | None, typer.Option(help="only the chips of this wafer")] = None,
    chip: Annotated[list[str] | None, typer.Option("--chip", help="a chip id (repeatable)")] = None,
    chips_file: Annotated[Path | None, typer.Option(help="a file of chip ids, one a line")] = None,
    max_group_size: Annotated[int, typer.Option(min=1, max=256)] = 1,
    schedule: Annotated[str, typer.Option(help="progressive_union, all_at_once or sample_members")] = (
        "progressive_union"
    ),
    bypass: Annotated[bool, typer.Option("--bypass/--no-bypass", help="deploy chips with faulty PEs bypassed")] = True,
    rates: Annotated[str | None, typer.Option(help="resilience-map fault rates, e.g. 0.01,0.03,0.06")] = None,
    epochs: Annotated[
        str | None, typer.Option(help="resilience-map retraining epochs (the ladder), e.g. 0,1,2,4")
    ] = None,
    samples: Annotated[int | None, typer.Option(min=1, help="sampled fault maps per resilience-map cell")] = None,
    resilience_map: Annotated[
        str | None, typer.Option(help="measure the resilience map: on, off or auto (where it pays) [server default]")
    ] = None,
    robust_base: Annotated[
        str | None, typer.Option(help="train a fault-robust base model: on, off or auto [server default]")
    ] = None,
    map_cells: Annotated[
        str | None,
        typer.Option(
            help="a measured map's cells: adaptive (only those the chips' epochs need) or full [server default]"
        ),
    ] = None,
    seed: int = 0,
    wait: Annotated[bool, typer.Option("--wait", help="follow the planning job, then show the plan")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Plan the retraining of a fleet (POST /plans): screening, retraining epochs, groups."""
    if (max_drop is None) == (min_accuracy is None):
        raise CliError("give exactly one of --max-drop or --min-accuracy", exit_code=2)
    ids = list(chip or [])
    if chips_file is not None:
        try:
            ids += [ln.strip() for ln in chips_file.read_text().splitlines() if ln.strip()]
        except OSError as exc:
            raise CliError(f"--chips-file: {exc}", exit_code=2) from None
    body: dict[str, Any] = {
        "model": model,
        "constraint": {"max_drop": max_drop} if max_drop is not None else {"min_accuracy": min_accuracy},
        "chips": {k: v for k, v in (("lot", lot), ("wafer", wafer), ("ids", ids)) if v},
        "max_group_size": max_group_size,
        "schedule": schedule,
        "bypass": bypass,
        "seed": seed,
    }
    grid: dict[str, Any] = {}
    if (r := _floats(rates, "--rates")) is not None:
        grid["rates"] = r
    if (e := _floats(epochs, "--epochs")) is not None:
        grid["epochs"] = [int(x) for x in e]
    if samples is not None:
        grid["samples"] = samples
    for name, value in (("resilience_map", resilience_map), ("robust_base", robust_base), ("map_cells", map_cells)):
        if value is not None:
            body[name] = value
    if grid:
        body["resilience"] = grid
    with client(url, api_key) as api:
        accepted = api.post("/plans", json=body)
        plan_id, job_id = accepted["plan"]["id"], accepted["job"]["id"]
        if not as_json:
            out.print(f"plan {plan_id} created; planning job {job_id}", markup=False)
        if not wait:
            if as_json:
                print_json(accepted)
            return
        watch_job(api, job_id, quiet=as_json)
        plan = get_plan(api, plan_id)
    _show_plan(plan, as_json)


def get_plan(api: ApiClient, plan_id: int) -> dict[str, Any]:
    """GET /plans/{id} with every chip and every group: their pages (`next_cursor`,
    `next_groups_cursor`) gathered into one `chips` and one `groups` list."""
    sizes = {"limit": 1000, "groups_limit": 1000}
    plan = api.get(f"/plans/{plan_id}", params=sizes)
    chips, groups = list(plan.get("chips") or []), list(plan.get("groups") or [])
    cursor, groups_cursor = plan.get("next_cursor"), plan.get("next_groups_cursor")
    while cursor or groups_cursor:
        # a list whose pages are done is served from its first page again: ignored
        at = {"cursor": cursor, "groups_cursor": groups_cursor}
        page = api.get(f"/plans/{plan_id}", params={**sizes, **{k: v for k, v in at.items() if v}})
        if cursor:
            chips += page.get("chips") or []
            cursor = page.get("next_cursor")
        if groups_cursor:
            groups += page.get("groups") or []
            groups_cursor = page.get("next_groups_cursor")
    plan["chips"], plan["next_cursor"] = chips, None
    plan["groups"], plan["next_groups_cursor"] = groups, None
    return dict(plan)


def _show_plan(plan: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(plan)
        return
    c = plan["constraint"]
    rule = f"max drop {c['max_drop']:.2%}" if c.get("kind") == "relative" else f"min accuracy {c['min_accuracy']:.2%}"
    out.print(f"plan {plan['id']} for model {plan['model']}: {plan['status']}, {rule}", markup=False)
    alone = alone_epochs(plan)
    t = Table(title="groups", show_lines=False)
    for col, just in (
        ("group", "right"),
        ("round", "right"),
        ("members", "left"),
        ("epochs", "right"),
        ("alone", "right"),
        ("fused rate", "right"),
        ("protect", "left"),
        ("min acc", "right"),
        ("status", "left"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for g in plan["groups"]:
        ids = [m["chip_id"] for m in g["members"]]
        accs = [m["accuracy"] for m in g["members"] if m["accuracy"] is not None]
        shown = ", ".join(ids[:4]) + (f" +{len(ids) - 4}" if len(ids) > 4 else "")
        t.add_row(
            str(g["id"]),
            str(g["round"]),
            f"{len(ids)}: {shown}",
            str(g["epochs"]),
            str(alone[g["id"]]),
            f"{g['fused_rate']:.4f}",
            g["protect_layer"] or "-",
            pct(min(accs) if accs else None),
            g["status"],
        )
    out.print(t)
    statuses: dict[str, int] = {}
    for ch in plan["chips"]:
        statuses[ch["status"]] = statuses.get(ch["status"], 0) + 1
    out.print("chips: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())), markup=False)
    s = plan.get("summary") or {}
    if s:
        cost = Table(title="cost (training epochs)")
        cost.add_column("strategy")
        cost.add_column("epochs", justify="right")
        for label, epochs in cost_alternatives(plan):
            cost.add_row(label, f"{epochs:g}")
        if s.get("training_epochs_total") is not None:
            cost.add_row("everything this plan trained (maps, robust base, groups)", str(s["training_epochs_total"]))
        out.print(cost)


@plan_app.command("show")
def plan_show(plan_id: int, url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """A plan: its groups (members, epochs), chip outcomes, and cost against the per-chip alternatives."""
    with client(url, api_key) as api:
        plan = get_plan(api, plan_id)
    _show_plan(plan, as_json)


@plan_app.command("execute")
def plan_execute(
    plan_id: int,
    watch: Annotated[bool, typer.Option("--watch", help="live progress of the execution and every group job")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Execute a plan: retrain every group on the workers, verify every member chip, replan the misses."""
    with client(url, api_key) as api:
        job = api.post(f"/plans/{plan_id}/execute")
        if not watch:
            if as_json:
                print_json(job)
            else:
                out.print(f"plan {plan_id}: execute job {job['id']} {job['state']}", markup=False)
            return
        watch_job(api, job["id"], quiet=as_json)
        plan = get_plan(api, plan_id)
    _show_plan(plan, as_json)


# --- models ------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _etag(value: str | None) -> str | None:
    if not value:
        return None
    return value.removeprefix("W/").strip('"')


def download(api: ApiClient, path: str, params: dict[str, str], dest: Path) -> dict[str, Any]:
    """GET one file to `dest`, its sha256 checked against the ETag; a file already there and
    identical is kept (If-None-Match -> 304). A mismatch leaves no file and raises."""
    headers = {}
    if dest.exists():
        headers["If-None-Match"] = f'"{_sha256(dest)}"'
    with api.stream(path, params=params, headers=headers) as r:
        etag = _etag(r.headers.get("etag"))
        if r.status_code == 304:
            return {"file": str(dest), "sha256": etag, "size": dest.stat().st_size, "status": "unchanged"}
        if etag is None:
            raise CliError(f"GET {path}: the answer has no ETag to verify it against")
        tmp = dest.with_name(dest.name + ".part")
        h = hashlib.sha256()
        size = 0
        with tmp.open("wb") as fh:
            for chunk in r.iter_bytes():
                h.update(chunk)
                fh.write(chunk)
                size += len(chunk)
    got = h.hexdigest()
    if got != etag:
        tmp.unlink(missing_ok=True)
        raise CliError(f"{dest.name}: sha256 {got} does not match the server's ETag {etag}; nothing was kept")
    os.replace(tmp, dest)
    return {"file": str(dest), "sha256": got, "size": size, "status": "downloaded"}


def _group_files(api: ApiClient, group_id: int, out_dir: Path) -> list[dict[str, Any]]:
    files = []
    for fmt, name in (("safetensors", "model.safetensors"), ("manifest", "manifest.json")):
        files.append(download(api, f"/groups/{group_id}/model", {"format": fmt}, out_dir / f"group-{group_id}-{name}"))
    return files


@models_app.command("download")
def models_download(
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write the files to (created if missing)")],
    group: Annotated[int | None, typer.Option("--group", help="a group's model and manifest")] = None,
    chip: Annotated[str | None, typer.Option("--chip", help="the model a chip must run, and its manifest")] = None,
    plan: Annotated[int | None, typer.Option("--plan", help="every trained group model of a plan")] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download models with their manifests; every file's sha256 is checked against its ETag."""
    if sum(x is not None for x in (group, chip, plan)) != 1:
        raise CliError("give exactly one of --group, --chip or --plan", exit_code=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[dict[str, Any]] = []
    with client(url, api_key) as api:
        if group is not None:
            files = _group_files(api, group, out_dir)
        elif chip is not None:
            safe = quote(chip, safe="")
            base = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in chip)
            for fmt, name in (("safetensors", "model.safetensors"), ("manifest", "manifest.json")):
                files.append(download(api, f"/chips/{safe}/model", {"format": fmt}, out_dir / f"{base}-{name}"))
        else:
            assert plan is not None  # exactly one of the three was given
            doc = get_plan(api, plan)
            trained = [g for g in doc["groups"] if g["model_sha256"]]
            if not trained:
                raise CliError(f"plan {plan} has no trained group model yet (status {doc['status']})")
            for g in trained:
                got = _group_files(api, g["id"], out_dir)
                if got[0]["sha256"] != g["model_sha256"]:
                    raise CliError(f"group {g['id']}: model sha256 {got[0]['sha256']} is not the plan's")
                files += got
    if as_json:
        print_json(files)
        return
    t = Table("file", "size", "sha256 (verified)", "status")
    for f in files:
        t.add_row(Path(f["file"]).name, str(f["size"]), f["sha256"], f["status"])
    out.print(t)
