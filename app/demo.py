"""`faultfleet demo`: a whole fleet through the running service, over HTTP only.

It does what a fab would: registers an accelerator profile and a base model (trained on
a worker), posts a generated fleet like a test line (NDJSON bulk), plans, executes,
prints one line per group and the cost against per-chip FAT, and downloads every
group's model and manifest. Every step is a public API call, so the demo is also a
smoke test of the running service it talks to.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


@dataclass(frozen=True)
class DemoConfig:
    chips: int = 60
    seed: int = 7
    rows: int = 16
    cols: int = 16
    architecture: str = "lenet5"
    dataset: str = "digits"
    train_epochs: int = 15
    max_drop: float = 0.02
    max_group_size: int = 5
    out_dir: Path = Path("var/demo")
    timeout_s: float = 900.0


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _check(r: httpx.Response, *ok: int) -> dict[str, Any]:
    if r.status_code not in (ok or (200, 201, 202)):
        raise RuntimeError(f"{r.request.method} {r.request.url.path}: HTTP {r.status_code}: {r.text[:500]}")
    return dict(r.json()) if r.content else {}


def wait_job(client: httpx.Client, job_id: str, timeout_s: float, label: str) -> dict[str, Any]:
    """Poll GET /jobs/{id} until it ends; progress lines go to stderr. Raises if it did not succeed."""
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        job = _check(client.get(f"/api/v1/jobs/{job_id}"))
        line = f"{label}: {job['state']} {job['progress']['fraction']:.0%} {job['progress']['message']}"
        if line != last:
            _log(line)
            last = line
        if job["state"] in ("succeeded", "failed", "cancelled"):
            if job["state"] != "succeeded":
                raise RuntimeError(f"{label} {job['state']}: {job.get('error')}")
            return job
        time.sleep(0.5)
    raise TimeoutError(f"{label}: job {job_id} not done after {timeout_s:.0f} s")


def get_plan(client: httpx.Client, plan_id: int) -> dict[str, Any]:
    """GET /plans/{id} with every chip and every group: both come in pages, joined here."""
    sizes = {"limit": 1000, "groups_limit": 1000}
    plan = _check(client.get(f"/api/v1/plans/{plan_id}", params=sizes))
    while plan["next_cursor"] is not None or plan["next_groups_cursor"] is not None:
        at = {"cursor": plan["next_cursor"], "groups_cursor": plan["next_groups_cursor"]}
        page = _check(
            client.get(f"/api/v1/plans/{plan_id}", params={**sizes, **{k: v for k, v in at.items() if v is not None}})
        )
        for items, cursor in (("chips", "cursor"), ("groups", "groups_cursor")):
            if at[cursor] is not None:  # a list whose pages are done comes from its first page again
                plan[items] += page[items]
                plan[f"next_{cursor}"] = page[f"next_{cursor}"]
    return plan


def generate_ndjson(cfg: DemoConfig, accelerator: str, *, seed: int | None = None, prefix: str = "") -> str:
    from accelerator import ArrayConfig
    from planner import FleetSpec, generate_fleet

    spec = FleetSpec(array=ArrayConfig(cfg.rows, cfg.cols), accelerator=accelerator, defects_per_die=1.5)
    maps = generate_fleet(cfg.chips, cfg.seed if seed is None else seed, spec)
    return "".join(json.dumps({**m.to_dict(), "chip_id": f"{prefix}{m.chip_id}"}) + "\n" for m in maps)


def run_demo(base_url: str, api_key: str, cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo against `base_url`; returns the executed plan (GET /plans/{id})."""
    t0 = time.monotonic()
    accel = f"demo-sa{cfg.rows}x{cfg.cols}"
    model_name = f"demo-{cfg.architecture}-{cfg.dataset}-{accel}"
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=120.0) as c:
        r = c.post(
            "/api/v1/accelerators",
            json={"name": accel, "rows": cfg.rows, "cols": cfg.cols, "fmt": "int8", "bypass": True},
        )
        _check(r, 200, 201, 409)
        ndjson = generate_ndjson(cfg, accel)
        bulk = _check(c.post("/api/v1/chips/bulk", content=ndjson, headers={"Content-Type": "application/x-ndjson"}))
        _log(f"test line posted {cfg.chips} fault maps: {json.dumps({k: v for k, v in bulk.items() if k != 'lines'})}")
        r = c.get(f"/api/v1/models/{model_name}")
        if r.status_code == 404:
            body = {
                "name": model_name,
                "architecture": cfg.architecture,
                "dataset": cfg.dataset,
                "accelerator": accel,
                "train": True,
                "epochs": cfg.train_epochs,
            }
            acc = _check(c.post("/api/v1/models", json=body), 202)
            wait_job(c, acc["job"]["id"], cfg.timeout_s, "base model")
        model = _check(c.get(f"/api/v1/models/{model_name}"))
        _log(f"base model {model_name}: baseline accuracy {model['baseline_accuracy']:.4f} on the fault-free array")
        plan_body = {
            "model": model_name,
            "constraint": {"max_drop": cfg.max_drop},
            "chips": {"ids": [json.loads(line)["chip_id"] for line in ndjson.splitlines()]},
            "max_group_size": cfg.max_group_size,
        }
        accepted = _check(c.post("/api/v1/plans", json=plan_body), 202)
        plan_id = accepted["plan"]["id"]
        wait_job(c, accepted["job"]["id"], cfg.timeout_s, f"plan {plan_id}")
        job = _check(c.post(f"/api/v1/plans/{plan_id}/execute"), 202)
        wait_job(c, job["id"], cfg.timeout_s, f"execute plan {plan_id}")
        plan = get_plan(c, plan_id)
        print_report(plan)
        out = cfg.out_dir / f"plan-{plan_id}"
        out.mkdir(parents=True, exist_ok=True)
        for g in plan["groups"]:
            if g["model_sha256"] is None:
                continue
            for fmt, name in (("safetensors", "model.safetensors"), ("manifest", "manifest.json")):
                with c.stream("GET", f"/api/v1/groups/{g['id']}/model", params={"format": fmt}) as resp:
                    resp.raise_for_status()
                    with open(out / f"group-{g['id']}-{name}", "wb") as fh:
                        for chunk in resp.iter_bytes():
                            fh.write(chunk)
        _log(f"downloaded the group models and manifests to {out}")
        second_batch(c, cfg, accel, model_name)
        _log(f"finished in {time.monotonic() - t0:.0f} s")
        return plan


def second_batch(c: httpx.Client, cfg: DemoConfig, accel: str, model_name: str) -> None:
    """A later batch of the same line: the library serves what it can at ingestion, a plan the rest."""
    ndjson = generate_ndjson(cfg, accel, seed=cfg.seed + 1, prefix="b2-")
    bulk = _check(c.post("/api/v1/chips/bulk", content=ndjson, headers={"Content-Type": "application/x-ndjson"}))
    _log(f"second batch: {bulk['created']} more chips posted; the model library screens them at ingestion")
    if "assignment_job" not in bulk:
        return
    job = wait_job(c, bulk["assignment_job"], cfg.timeout_s, "library screening")
    model_id = str(_check(c.get(f"/api/v1/models/{model_name}"))["id"])
    verdicts = {cid: v.get(model_id) for cid, v in job["result"]["assignments"].items()}
    waiting = sorted(cid for cid, v in verdicts.items() if v == "waiting")
    print_library(_check(c.get(f"/api/v1/models/{model_name}/library")))
    print(
        f"second batch: {len(verdicts) - len(waiting)} of {len(verdicts)} chips served by the library, "
        f"no retraining; {len(waiting)} planned"
    )
    if not waiting:
        return
    accepted = _check(
        c.post(
            "/api/v1/plans",
            json={
                "model": model_name,
                "constraint": {"max_drop": cfg.max_drop},
                "chips": {"ids": waiting},
                "max_group_size": cfg.max_group_size,
            },
        ),
        202,
    )
    plan_id = accepted["plan"]["id"]
    wait_job(c, accepted["job"]["id"], cfg.timeout_s, f"plan {plan_id} (second batch)")
    job = _check(c.post(f"/api/v1/plans/{plan_id}/execute"), 202)
    wait_job(c, job["id"], cfg.timeout_s, f"execute plan {plan_id} (second batch)")
    print_report(get_plan(c, plan_id))


def print_library(library: dict[str, Any]) -> None:
    """The base model's library: each model and how many chips it serves."""
    print(f"\nmodel library of {library['model']}: {library['chips_served']} chips served")
    print(f"{'key':<24} {'kind':<7} {'epochs':>6} {'chips':>6}")
    for m in library["models"]:
        print(f"{m['key']:<24} {m['kind']:<7} {m['training_epochs']:>6} {m['chips_served']:>6}")


def print_report(plan: dict[str, Any]) -> None:
    """One line per group, then the cost against per-chip FAT."""
    print(f"\nplan {plan['id']} for {plan['model']} ({plan['status']})")
    print(
        f"{'group':>6} {'key':<12} {'round':>5} {'size':>4} {'epochs':>6} {'fused rate':>10} "
        f"{'protect':<10} {'min acc':>8} {'status':<9}"
    )
    for g in plan["groups"]:
        accs = [m["accuracy"] for m in g["members"] if m["accuracy"] is not None]
        print(
            f"{g['id']:>6} {g['key']:<12} {g['round']:>5} {len(g['members']):>4} {g['epochs']:>6} "
            f"{g['fused_rate']:>10.4f} "
            f"{(g['protect_layer'] or '-'):<10} {(min(accs) if accs else float('nan')):>8.4f} {g['status']:<9}"
        )
    s = plan["summary"] or {}
    statuses: dict[str, int] = {}
    for ch in plan["chips"]:
        statuses[ch["status"]] = statuses.get(ch["status"], 0) + 1
    print(f"\nchips: {s.get('chips')} ({', '.join(f'{k}: {v}' for k, v in sorted(statuses.items()))})")
    print(
        f"training epochs in all: {s.get('training_epochs_total')} ({s.get('training_epochs')}); "
        f"FAP+T would train at least {s.get('fap_t_epochs_at_least')} "
        f"(1 epoch for each of the {s.get('chips', 0) - s.get('needs_nothing', 0)} chips no library model serves); "
        f"{s.get('evaluation_passes')} evaluation passes; "
        f"{s.get('chips_meeting_constraint')} chips meet the constraint on the test split"
    )
    if s.get("bypassed_chips"):
        print(
            f"{s['bypassed_chips']} chips run with PEs bypassed where that screened better "
            "(both counts are on those deployed maps; see each chip's manifest for its bypass list)"
        )
