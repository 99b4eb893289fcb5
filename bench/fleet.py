"""The whole fleet loop in one process (no service), against baselines, on one fleet and one base model.

    .venv/bin/python bench/fleet.py --chips 200 --seed 0 --model lenet5 --dataset mnist5k \
        --array 32x32 --constraint 0.01 --json [--fleet FILE.ndjson] [--strategies ...] [--baseline-train]

Steps: base model (float training + calibration), severity per fault class (inference),
resilience map (rates x epochs, measured here), screening of every chip, then per
strategy retraining and verification of every chip on its own fault map:

- per_chip_fat: every chip failing screening alone for E epochs, E the smallest amount on
  the map that meets the constraint at the worst effective rate among the fleet's
  recoverable chips; its epochs are E x chips (trained and verified only with
  --baseline-train).
- efat_no_grouping: each chip alone, its own amount from the map (one round).
- tremap_fixed5: fixed groups of 5 in chip order, fused, progressive union, amount E (one round).
- faultfleet: plan_fleet, retraining, verification, replans until verified or unrecoverable;
  with `--bypass` (the default on arrays with bypass support) a chip whose screening the
  bypass of its faulty PEs raises is deployed that way (fault-aware pruning). The
  baselines keep the chips' own maps, as DESIGN.md defines per-chip FAT; for honesty the
  JSON also gives what per-chip FAT would cost on the bypassed maps
  (`per_chip_fat_with_bypass_epochs`).

`retraining_epochs` counts every epoch trained (resilience map apart, as
`resilience_map_epochs`). Progress goes to stderr, the JSON to stdout. `--constraint`
below 0.5 is a drop from the baseline (0.01 = one point), otherwise an absolute floor.
A benchmark: figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import accelerator as acc  # noqa: E402
from accelerator.faults import ArrayConfig, FaultMap  # noqa: E402
from planner import (  # noqa: E402
    AccuracyConstraint,
    FleetSpec,
    Group,
    Plan,
    ResilienceMap,
    SiteSeverity,
    fuse_fault_maps,
    generate_fleet,
    plan_fleet,
    read_ndjson,
    write_ndjson,
)
from planner.plan import PLACEMENTS  # noqa: E402
from planner.schedules import SCHEDULES  # noqa: E402
from planner.synthetic_fleet import FaultMix, parse_site_weights  # noqa: E402
from workers import pipeline as pl  # noqa: E402

STRATEGIES = ("per_chip_fat", "efat_no_grouping", "tremap_fixed5", "faultfleet")


def log(msg: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_array(text: str) -> ArrayConfig:
    r, c = text.lower().split("x")
    return ArrayConfig(int(r), int(c))


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def site_weights(text: str) -> dict[str, float]:
    try:
        return parse_site_weights(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def train_groups_once(
    model: torch.nn.Module,
    array: ArrayConfig,
    data: Any,
    groups: Sequence[Group],
    maps: Mapping[str, FaultMap],
    grid: Sequence[int],
    cfg: pl.TrainConfig,
    name: str,
) -> tuple[dict[str, float], int]:
    """One round: retrain every group, verify each member on its own map; (accuracy per chip, epochs)."""
    acc: dict[str, float] = {}
    epochs = 0
    for i, g in enumerate(groups, start=1):
        protect = (pl.most_sensitive_layer(model, array, g.fused, data, device=cfg.device),) if g.protect else ()
        m = pl.retrain_group(model, array, data, g, maps, grid, cfg, protect=protect)
        epochs += g.amount
        acc.update(pl.verify_group(m, array, data, g.members, maps, protect=protect, device=cfg.device))
        if i % 10 == 0 or i == len(groups):
            log(f"{name}: {i}/{len(groups)} groups, {epochs} epochs")
    return acc, epochs


def outcome(
    name: str,
    chips: Sequence[str],
    screening: Mapping[str, float],
    threshold: float,
    retrained: Mapping[str, float] | None,
    epochs: int,
    wall_s: float,
    per_chip_fat_epochs: int,
    unrecoverable: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The per-strategy JSON record. Chips needing nothing keep their screening accuracy."""
    needing_nothing = [c for c in chips if screening[c] >= threshold]
    rec: dict[str, Any] = {
        "retraining_epochs": epochs,
        "wall_s": round(wall_s, 2),
        "chips": len(chips),
        "chips_needing_nothing": len(needing_nothing),
        "epochs_ratio_vs_per_chip_fat": round(epochs / per_chip_fat_epochs, 4) if per_chip_fat_epochs else None,
        "speedup_vs_per_chip_fat": round(per_chip_fat_epochs / epochs, 2) if epochs else None,
    }
    if retrained is None:
        rec.update({"chips_meeting_constraint": None, "chips_unrecoverable": None, "worst_accuracy": None})
        rec["mean_accuracy"] = None
        return rec
    final = {c: (retrained[c] if c in retrained else screening[c]) for c in chips}
    meeting = [c for c in chips if final[c] >= threshold - 1e-12]
    if unrecoverable is None:  # one-round baselines: a chip left below the constraint stays there
        unrecoverable = {
            c: f"missed the constraint after one retraining ({final[c]:.4f} < {threshold:.4f}); no replanning"
            for c in chips
            if c not in meeting
        }
    rec.update(
        {
            "chips_meeting_constraint": len(meeting),
            "chips_unrecoverable": len(unrecoverable),
            "unrecoverable": dict(sorted(unrecoverable.items())),
            "worst_accuracy": round(min(final.values()), 4),
            "mean_accuracy": round(sum(final.values()) / len(final), 4),
        }
    )
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chips", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--array", default="32x32", help="RxC (ignored with --fleet: the maps carry their array)")
    ap.add_argument("--constraint", default="0.01", help="drop below baseline (<0.5) or absolute floor")
    ap.add_argument("--json", action="store_true", help="compact JSON on stdout")
    ap.add_argument("--fleet", type=Path, help="NDJSON file of fault maps (REST JSON) instead of a generated fleet")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma list of {', '.join(STRATEGIES)}")
    ap.add_argument("--baseline-train", action="store_true", help="also train and verify per_chip_fat")
    ap.add_argument("--max-group-size", type=int, default=5)
    ap.add_argument("--placement", default="screening", choices=PLACEMENTS, help="where a chip sits on the map")
    ap.add_argument(
        "--schedule", default="progressive_union", choices=sorted(SCHEDULES), help="faultfleet's group schedule"
    )
    ap.add_argument(
        "--bypass",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="faultfleet may deploy chips with their faulty PEs bypassed (needs array bypass support)",
    )
    ap.add_argument("--rates", type=floats, default=None, help="resilience-map fault rates (comma list)")
    ap.add_argument("--epochs", type=ints, default=[0, 1, 2, 4, 8], help="resilience-map amounts (comma list)")
    ap.add_argument("--samples", type=int, default=2, help="sampled fault maps per map rate")
    ap.add_argument("--severity-samples", type=int, default=3)
    ap.add_argument("--base-epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.01, help="fault-aware retraining learning rate")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--defects-per-die", type=float, default=None, help="generated fleet: mean defects per die")
    ap.add_argument(
        "--sites", type=site_weights, default=None, help="generated fleet: e.g. pe=0.1,weight=0.3,act=0.3,psum=0.3"
    )
    ap.add_argument(
        "--psum-high-bias", type=float, default=0.0, help="generated fleet: share of psum bits in the top half"
    )
    ap.add_argument("--write-fleet", type=Path, default=None, help="write the generated fleet as NDJSON and exit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--device", default=None, help="torch device for retraining and evaluation, e.g. cuda (default: cpu)"
    )
    ap.add_argument("--cache", type=Path, default=None, help="directory caching the base model and resilience map")
    args = ap.parse_args(argv)

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        ap.error(f"--strategies: unknown {unknown}; known: {list(STRATEGIES)}")
    torch.set_num_threads(args.threads)
    constraint = AccuracyConstraint.parse(args.constraint)
    cfg = pl.TrainConfig(lr=args.lr, batch_size=args.batch_size, seed=args.seed, device=args.device)
    t_all = time.perf_counter()

    # fleet
    if args.fleet is not None:
        maps = read_ndjson(args.fleet)
        if args.chips:
            maps = maps[: args.chips]
        array = maps[0].array
        if any(m.array != array for m in maps):
            ap.error("--fleet: every map must be on one array")
        source = str(args.fleet)
    else:
        array = parse_array(args.array)
        defects = args.defects_per_die if args.defects_per_die is not None else 1.0 if array.n_pes <= 256 else 2.0
        mix = FaultMix(**({"sites": args.sites} if args.sites else {}), psum_high_bias=args.psum_high_bias)
        maps = generate_fleet(args.chips, args.seed, FleetSpec(array=array, defects_per_die=defects, mix=mix))
        source = f"generated (seed {args.seed}, {defects} defects/die, mix {mix.to_dict()})"
        if args.write_fleet is not None:
            log(f"wrote {write_ndjson(maps, args.write_fleet)} fault maps to {args.write_fleet}")
            return 0
    maps = [m if m.chip_id else dataclasses.replace(m, chip_id=f"chip-{i:05d}") for i, m in enumerate(maps)]
    by_id = {str(m.chip_id): m for m in maps}
    chip_ids = sorted(by_id)
    log(f"fleet: {len(maps)} chips on {array.rows}x{array.cols} from {source}")

    # base model
    key = cache_key(model=args.model, dataset=args.dataset, seed=args.seed, epochs=args.base_epochs)
    t0 = time.perf_counter()
    data = acc.load_dataset(args.dataset, seed=args.seed)
    model_path = args.cache / f"base-{key}.safetensors" if args.cache else None
    if model_path is not None and model_path.exists():
        model = acc.load_model(args.model, model_path, data.input_shape, data.num_classes)
        log(f"base model from cache {model_path}")
    else:
        model, data = pl.train_base_model(args.model, data, epochs=args.base_epochs, seed=args.seed)
        if model_path is not None:
            model_path.parent.mkdir(parents=True, exist_ok=True)
            acc.save_model(model, model_path)
    baseline = pl.baseline_accuracy(model, array, data, device=args.device)
    threshold = constraint.threshold(baseline)
    log(f"base model {args.model}/{args.dataset}: fault-free array accuracy {baseline:.4f}; threshold {threshold:.4f}")
    base_s = time.perf_counter() - t0

    # severity + resilience map
    rates = args.rates or ([0.016, 0.031, 0.063, 0.125] if array.n_pes <= 64 else [0.005, 0.01, 0.02, 0.04, 0.08])
    rkey = cache_key(
        base=key,
        array=[array.rows, array.cols],
        rates=rates,
        epochs=args.epochs,
        samples=args.samples,
        sev=args.severity_samples,
        train=cfg.to_dict(),
    )
    rpath = args.cache / f"rmap-{rkey}.json" if args.cache else None
    t0 = time.perf_counter()
    if rpath is not None and rpath.exists():
        cached = json.loads(rpath.read_text())
        rmap, severity = ResilienceMap.from_dict(cached["map"]), SiteSeverity.from_dict(cached["severity"])
        log(f"resilience map from cache {rpath}")
    else:
        severity = pl.measure_severity(
            model,
            array,
            data,
            baseline,
            rate=rates[min(1, len(rates) - 1)],
            samples=args.severity_samples,
            seed=args.seed,
            device=args.device,
        )
        log(f"severity: {severity.weights}")
        rmap = pl.build_resilience_map(
            model,
            array,
            data,
            rates,
            args.epochs,
            args.samples,
            cfg,
            baseline=baseline,
            seed=args.seed,
            meta={"model": args.model, "dataset": args.dataset},
            on_progress=lambda n, total: log(f"resilience map: {n}/{total} sampled maps"),
        )
        if rpath is not None:
            rpath.parent.mkdir(parents=True, exist_ok=True)
            rpath.write_text(json.dumps({"map": rmap.to_dict(), "severity": severity.to_dict()}))
    rmap_s = time.perf_counter() - t0
    log(f"resilience map worst accuracy (rates x epochs): {rmap.worst.round(3).tolist()}")

    # screening
    t0 = time.perf_counter()
    screening = pl.screen_chips(model, array, data, [by_id[c] for c in chip_ids], device=args.device)
    screen_s = time.perf_counter() - t0
    failing = [c for c in chip_ids if screening[c] < threshold]
    log(f"screening: {len(chip_ids) - len(failing)} chips need nothing, {len(failing)} fail ({screen_s:.1f} s)")
    t0 = time.perf_counter()
    bypass_screening = (
        pl.screen_bypassed(model, array, data, [by_id[c] for c in failing], device=args.device) if args.bypass else {}
    )
    bypass_s = time.perf_counter() - t0
    failing_bypassed = [c for c in failing if max([screening[c], *bypass_screening.get(c, {}).values()]) < threshold]
    if args.bypass:
        log(f"screening with faulty PEs bypassed: {len(failing_bypassed)} still fail ({bypass_s:.1f} s)")

    def plan_alone(bypass: Mapping[str, Mapping[str, float]] | None = None) -> Plan:
        """Every chip alone at its own amount: efat_no_grouping, and per-chip FAT's amount E."""
        return plan_fleet(
            list(by_id.values()),
            screening,
            rmap,
            constraint,
            max_group_size=1,
            severity=severity,
            seed=args.seed,
            placement=args.placement,
            bypass_screening=bypass,
        )

    alone = plan_alone()
    E = alone.per_chip_fat_amount
    fat_epochs = E * len(failing)
    alone_bypassed = plan_alone(bypass_screening) if args.bypass else alone
    grid = rmap.epochs
    results: dict[str, Any] = {}

    for name in strategies:
        t0 = time.perf_counter()
        log(f"strategy {name} ...")
        if name == "per_chip_fat":
            retrained = None
            epochs = fat_epochs
            if args.baseline_train:
                groups = [
                    Group(f"fat-{c}", (c,), by_id[c], E, 0.0, {"name": "all_at_once", "params": {}}) for c in failing
                ]
                retrained, epochs = train_groups_once(model, array, data, groups, by_id, grid, cfg, name)
            rec = outcome(name, chip_ids, screening, threshold, retrained, epochs, time.perf_counter() - t0, fat_epochs)
            rec["amount"] = E
        elif name == "efat_no_grouping":
            groups = [g for g in alone.groups]
            retrained, epochs = train_groups_once(model, array, data, groups, by_id, grid, cfg, name)
            rec = outcome(name, chip_ids, screening, threshold, retrained, epochs, time.perf_counter() - t0, fat_epochs)
        elif name == "tremap_fixed5":
            groups = []
            for i in range(0, len(failing), 5):
                members = tuple(failing[i : i + 5])
                spec = {"name": "progressive_union", "params": {"ramp_epochs": E / 2}}
                fused = fuse_fault_maps([by_id[c] for c in members], chip_id=f"t5-{i // 5}")
                groups.append(Group(f"t5-{i // 5}", members, fused, E, 0.0, spec))
            retrained, epochs = train_groups_once(model, array, data, groups, by_id, grid, cfg, name)
            rec = outcome(name, chip_ids, screening, threshold, retrained, epochs, time.perf_counter() - t0, fat_epochs)
        else:
            run = pl.run_fleet(
                model,
                array,
                data,
                list(by_id.values()),
                screening,
                rmap,
                constraint,
                cfg,
                severity=severity,
                max_group_size=args.max_group_size,
                seed=args.seed,
                schedule=args.schedule,
                placement=args.placement,
                bypass_screening=bypass_screening,
                on_progress=log,
            )
            final = run.plan
            final_acc = run.accuracies()
            unrec = {c: st.reason or "" for c, st in final.chips.items() if st.status == "unrecoverable"}
            retrained = {c: final_acc[c] for c in chip_ids if final.chips[c].status != "needs_nothing"}
            rec = outcome(
                name,
                chip_ids,
                {c: st.screening for c, st in final.chips.items()},  # with the bypass where it was taken
                threshold,
                retrained,
                run.retraining_epochs,
                time.perf_counter() - t0,
                fat_epochs,
                unrec,
            )
            summary = final.summary()
            rec.update(
                {
                    "predicted_epochs": final.predicted_epochs,
                    "groups": summary["groups"],
                    "mean_group_size": round(summary["mean_group_size"], 3),
                    "rounds": run.rounds,
                    "protected_chips": run.protection,
                    "chips_verified": summary["verified"],
                    "chips_bypassed": summary["bypassed_chips"],
                    "speedup_vs_per_chip_fat_with_bypass": (
                        round(alone_bypassed.per_chip_fat_epochs / run.retraining_epochs, 2)
                        if run.retraining_epochs
                        else None
                    ),
                }
            )
        results[name] = rec
        log(f"{name}: {json.dumps({k: v for k, v in rec.items() if k not in ('unrecoverable', 'protected_chips')})}")

    out = {
        "config": {
            "chips": len(chip_ids),
            "seed": args.seed,
            "model": args.model,
            "dataset": args.dataset,
            "array": f"{array.rows}x{array.cols}",
            "constraint": constraint.to_dict(),
            "fleet": source,
            "rates": list(rmap.rates),
            "epochs": list(rmap.epochs),
            "samples": rmap.samples,
            "max_group_size": args.max_group_size,
            "placement": args.placement,
            "schedule": args.schedule,
            "bypass": args.bypass,
            "train": cfg.to_dict(),
            "threads": args.threads,
        },
        "baseline_accuracy": round(baseline, 4),
        "threshold": round(threshold, 4),
        "severity": severity.weights,
        "resilience_map_epochs": rmap.training_epochs,
        "resilience_map_worst": rmap.worst.round(4).tolist(),
        "per_chip_fat_amount": E,
        "per_chip_fat_epochs": fat_epochs,
        "efat_no_grouping_epochs_without_training": alone.predicted_epochs,
        "chips_failing_screening": len(failing),
        "chips_failing_screening_with_bypass": len(failing_bypassed) if args.bypass else None,
        "per_chip_fat_with_bypass_amount": alone_bypassed.per_chip_fat_amount if args.bypass else None,
        "per_chip_fat_with_bypass_epochs": alone_bypassed.per_chip_fat_epochs if args.bypass else None,
        "timing_s": {
            "base_model": round(base_s, 1),
            "resilience_map": round(rmap_s, 1),
            "screening": round(screen_s, 1),
            "screening_with_bypass": round(bypass_s, 1),
            "total": round(time.perf_counter() - t_all, 1),
        },
        "strategies": results,
    }
    print(json.dumps(out, separators=(",", ":")) if args.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
