"""The whole fleet loop in one process (no service): faultfleet against FAP+T, batch by batch.

    .venv/bin/python bench/fleet.py --chips 200 --seed 0 --model lenet5 --dataset mnist5k \
        --array 32x32 --constraint 0.01 --threads 1 --json [--fleet FILE.ndjson] \
        [--second-batch FILE.ndjson] [--strategies fap_t,faultfleet,per_chip_fat]

Both strategies run through `workers.pipeline.run_fleet`, the loop the service runs job by
job, on the same fleet in one run:

- fap_t: FAP+T (Zhang et al. 2018), the strongest per-chip alternative that brings every
  chip to the constraint: each chip with its best bypass (the same screening faultfleet
  uses), each chip still failing retrained alone from the base model on the ladder 1, 2, 4,
  8 epochs (warm, verified after each rung), then with its most sensitive layer protected;
  only then unrecoverable. No map, no robust base, no library.
- faultfleet: the same screening against the model library, a fault-robust base where it
  pays, the chips it still fails retrained alone (or in groups with fused maps, with
  --max-group-size) on the ladder 1, 2, 3, 4, 6, 8, ... rungs of --epoch-fraction passes up
  to FAP+T's 8 passes (`pipeline.fine_ladder`), climbed warm with the "bounded" climb
  (`planner.replan`), or on a measured map where it pays; verification and replans;
  verified models join the library.
- per_chip_fat (opt-in): the eFAT paper's baseline: a measured resilience map, every chip
  failing on its own map retrained alone for the map's epochs E, one round.

Decisions use a validation split, verification a test split no decision saw (the
dataset's test split cut in two). Every cost is counted (`workers.pipeline.Ledger`):
`training_epochs_total` (map cells, robust base, groups, replans), `evaluation_passes`
(screening, library, verification, in passes over the test split) and `wall_s`. Work both
strategies share on a batch (its baselines and the base model's screening of batch 1) is
measured once and charged to each. `--second-batch`: chips arriving after the first batch
was served: faultfleet serves them from its library first; fap_t starts over.

Progress goes to stderr, the JSON to stdout. `--constraint` below 0.5 is a drop from the
baseline (0.01 = one point), otherwise an absolute floor. A benchmark: figures, never
pass/fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import accelerator as acc  # noqa: E402
from accelerator.faults import ArrayConfig, FaultMap  # noqa: E402
from planner import AccuracyConstraint, FleetSpec, generate_fleet, plan_fleet, read_ndjson, write_ndjson  # noqa: E402
from planner.constraint import meets  # noqa: E402
from planner.synthetic_fleet import FaultMix, parse_site_weights  # noqa: E402
from workers import pipeline as pl  # noqa: E402

STRATEGIES = ("fap_t", "faultfleet", "per_chip_fat")


def log(msg: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_array(text: str) -> ArrayConfig:
    r, c = text.lower().split("x")
    return ArrayConfig(int(r), int(c))


def site_weights(text: str) -> dict[str, float]:
    try:
        return parse_site_weights(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def load_fleet(path: Path, prefix: str = "") -> list[FaultMap]:
    maps = read_ndjson(path)
    return [dataclasses.replace(m, chip_id=f"{prefix}{m.chip_id or f'chip-{i:05d}'}") for i, m in enumerate(maps)]


def per_chip_fat(
    em: pl.Emulation,
    base: torch.nn.Module,
    maps: list[FaultMap],
    constraint: AccuracyConstraint,
    thr: pl.Thresholds,
    settings: pl.FleetSettings,
) -> dict[str, Any]:
    """The eFAT paper's baseline: a measured map; every chip failing on its own map alone for E epochs, one round."""
    t0 = time.perf_counter()
    rmap = pl.measure_map(em, base, thr, settings)
    screening = {str(m.chip_id): em.screen(base, m, thr.decision, kind="screening") for m in maps}
    plan = plan_fleet(maps, screening, rmap, constraint, max_group_size=1, seed=settings.seed)
    E = plan.per_chip_fat_epochs_each
    for g in plan.groups:
        g.epochs, g.protect, g.reason = E, False, "per_chip_fat"

    def run_round(p: Any, pending: list[Any]) -> dict[str, pl.GroupResult]:
        return {g.group_id: pl.retrain_and_verify(em, base, g, p.maps, rmap.epochs, group_base=base) for g in pending}

    plan = pl.run_rounds(plan, run_round, max_rounds=1)
    for cid, st in plan.chips.items():
        if st.status == "needs_nothing":
            st.test_accuracy = em.verify(base, plan.maps[cid], kind="verification")
    out = pl.FleetOutcome(plan, em.ledger, thr, [], {}, {"epochs": E}, time.perf_counter() - t0, 1).record()
    out["chips_unrecoverable"] = out["chips"] - out["chips_meeting_constraint"]  # no replans: a miss stays one
    return out


def _write_chip_states(path: Path, plan: Any) -> None:
    """The chips a strategy retrained (those with tries), as `ChipState.to_dict`, for analysis."""
    retrained = {c: st.to_dict() for c, st in plan.chips.items() if st.history}
    path.write_text(json.dumps(retrained, indent=1, default=str))
    log(f"wrote {len(retrained)} retrained chips' states to {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--chips", type=int, default=None, help="generated fleet size (default 200; with --fleet: the first N chips)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--array", default="32x32", help="RxC (ignored with --fleet: the maps carry their array)")
    ap.add_argument("--constraint", default="0.01", help="drop below baseline (<0.5) or absolute floor")
    ap.add_argument("--json", action="store_true", help="compact JSON on stdout")
    ap.add_argument("--fleet", type=Path, help="NDJSON file of fault maps (REST JSON) instead of a generated fleet")
    ap.add_argument("--second-batch", type=Path, help="NDJSON file of chips arriving after the first batch")
    ap.add_argument("--strategies", default="fap_t,faultfleet", help=f"comma list of {', '.join(STRATEGIES)}")
    ap.add_argument(
        "--max-group-size", type=int, default=1, help="faultfleet's groups (1: alone, the service's default)"
    )
    ap.add_argument("--robust-base", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--resilience-map", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--schedule", default="progressive_union", help="faultfleet's group injection schedule")
    ap.add_argument(
        "--epoch-fraction",
        type=float,
        default=1.0,
        help="faultfleet's retraining epoch as a share of the train split (the service's train.epoch_fraction); "
        "fap_t always retrains whole epochs",
    )
    ap.add_argument("--library", action=argparse.BooleanOptionalAction, default=True, help="faultfleet's library")
    ap.add_argument("--base-epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.01, help="fault-aware retraining learning rate")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--defects-per-die", type=float, default=None, help="generated fleet: mean defects per die")
    ap.add_argument(
        "--sites", type=site_weights, default=None, help="generated fleet: e.g. pe=0.15,weight=0.3,act=0.25,psum=0.3"
    )
    ap.add_argument("--psum-high-bias", type=float, default=0.0, help="generated fleet: share of psum bits in top half")
    ap.add_argument("--write-fleet", type=Path, default=None, help="write the generated fleet as NDJSON and exit")
    ap.add_argument("--chip-prefix", default="", help="generated fleet: prefix of the chip ids (a distinct batch)")
    ap.add_argument("--compare-screening", type=int, default=50, help="chips screened both ways to time screening")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None, help="torch device for retraining and evaluation (default: cpu)")
    ap.add_argument("--cache", type=Path, default=None, help="directory caching the trained base model")
    ap.add_argument(
        "--chip-states",
        default=None,
        help="write PREFIX.STRATEGY.batchN.json: each retrained chip's state and every try (epochs, accuracy)",
    )
    args = ap.parse_args(argv)
    if not 0 < args.epoch_fraction <= 1:
        ap.error(f"--epoch-fraction {args.epoch_fraction}: must be in (0, 1]")

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        ap.error(f"--strategies: unknown {unknown}; known: {list(STRATEGIES)}")
    torch.set_num_threads(args.threads)
    constraint = AccuracyConstraint.parse(args.constraint)
    cfg = pl.TrainConfig(lr=args.lr, batch_size=args.batch_size, seed=args.seed, device=args.device)
    t_all = time.perf_counter()

    # fleets
    if args.fleet is not None:
        maps = load_fleet(args.fleet)[: args.chips]
        source = str(args.fleet)
    else:
        array = parse_array(args.array)
        defects = args.defects_per_die if args.defects_per_die is not None else 1.0 if array.n_pes <= 256 else 2.0
        mix = FaultMix(**({"sites": args.sites} if args.sites else {}), psum_high_bias=args.psum_high_bias)
        maps = generate_fleet(args.chips or 200, args.seed, FleetSpec(array=array, defects_per_die=defects, mix=mix))
        maps = [dataclasses.replace(m, chip_id=f"{args.chip_prefix}{m.chip_id}") for m in maps]
        source = f"generated (seed {args.seed}, {defects} defects/die, mix {mix.to_dict()})"
        if args.write_fleet is not None:
            log(f"wrote {write_ndjson(maps, args.write_fleet)} fault maps to {args.write_fleet}")
            return 0
    batches = [maps]
    if args.second_batch is not None:
        batches.append(load_fleet(args.second_batch))
    array = maps[0].array
    every = [m for b in batches for m in b]
    if any(m.array != array for m in every):
        ap.error("every map of every batch must be on one array")
    if len({m.chip_id for m in every}) != len(every):
        ap.error("chip ids must be distinct across batches (generate the second batch with --chip-prefix)")
    log(f"fleet: {' + '.join(str(len(b)) for b in batches)} chips on {array.rows}x{array.cols} from {source}")

    # base model (trained before any fleet exists: not a cost of serving one)
    key = cache_key(model=args.model, dataset=args.dataset, seed=args.seed, epochs=args.base_epochs)
    data = acc.load_dataset(args.dataset, seed=args.seed)
    model_path = args.cache / f"base-{key}.safetensors" if args.cache else None
    if model_path is not None and model_path.exists():
        base = acc.load_model(args.model, model_path, data.input_shape, data.num_classes)
        log(f"base model from cache {model_path}")
    else:
        base, data = pl.train_base_model(args.model, data, epochs=args.base_epochs, seed=args.seed)
        if model_path is not None:
            model_path.parent.mkdir(parents=True, exist_ok=True)
            acc.save_model(base, model_path)
    root = pl.Emulation.of(array, data, cfg)
    fap_t_settings = pl.FleetSettings.fap_t(seed=args.seed)
    # faultfleet's ladder reaches the same whole epochs as FAP+T's top rung, in its shorter rungs
    faultfleet_settings = pl.FleetSettings(
        ladder=pl.fine_ladder(round(max(fap_t_settings.ladder) / args.epoch_fraction)),
        max_group_size=args.max_group_size,
        robust_base=args.robust_base,
        resilience_map=args.resilience_map,
        library=args.library,
        schedule=args.schedule,
        seed=args.seed,
    )

    # screening, timed both ways on the first chips: every deployment read in full (as
    # before bounded screening) against bounded reads; the decisions must agree
    t0 = time.perf_counter()
    shared = root.fork()
    thr = shared.thresholds(base, constraint)
    log(
        f"baseline validation {thr.baseline_validation:.4f} / test {thr.baseline_test:.4f}; "
        f"thresholds {thr.decision:.4f} / {thr.verification:.4f}"
    )
    probe = maps[: args.compare_screening]
    full_em, bounded_em = root.fork(), root.fork()
    t1 = time.perf_counter()
    full_fits = {}
    for m in probe:
        scores = {p: full_em.validate(base, d, kind="screening") for p, d in pl.deployments(m)}
        passing = [
            (a, -(len(acc.bypassed_pes(m, p)) if p else 0), -i, p)
            for i, (p, a) in enumerate(scores.items())
            if meets(a, thr.decision)
        ]
        full_fits[str(m.chip_id)] = max(passing)[3] if passing else "fails"
    full_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    bounded = pl.screen_fleet(
        bounded_em, [pl.LibraryModel("base", base)], probe, thr.decision, bypass=True, group_base="base"
    )
    bounded_s = time.perf_counter() - t1
    agree = sum(1 for c, s in bounded.items() if (s.fit.policy if s.fit else "fails") == full_fits[c])
    screening_figures = {
        "chips": len(probe),
        "full_reads_chips_per_s": round(len(probe) / full_s, 2) if full_s else None,
        "bounded_reads_chips_per_s": round(len(probe) / bounded_s, 2) if bounded_s else None,
        "speedup": round(full_s / bounded_s, 2) if probe and bounded_s else None,
        "full_reads_passes": round(full_em.ledger.evaluation_passes, 1),
        "bounded_reads_passes": round(bounded_em.ledger.evaluation_passes, 1),
        "same_decisions": f"{agree}/{len(probe)}",
        "threads": args.threads,
    }
    log(f"screening: {screening_figures}")
    screens = pl.screen_fleet(
        shared, [pl.LibraryModel("base", base)], maps, thr.decision, bypass=True, group_base="base", on_progress=log
    )
    shared_s = time.perf_counter() - t0 - full_s - bounded_s

    per_batch: list[dict[str, Any]] = []
    libraries: dict[str, list[pl.LibraryModel] | None] = {"faultfleet": None}
    for b, batch in enumerate(batches):
        results: dict[str, Any] = {}
        batch_shared = shared if b == 0 else None
        for name in strategies:
            if name == "per_chip_fat" and b > 0:
                continue
            # FAP+T's ladder is in whole epochs (the issue defines it); faultfleet's rungs may be shorter
            em = root.fork(
                dataclasses.replace(cfg, epoch_fraction=args.epoch_fraction) if name == "faultfleet" else None
            )
            extra_s = 0.0
            if batch_shared is not None:
                em.ledger.add(batch_shared.ledger)
                extra_s = shared_s
            log(f"batch {b + 1}: strategy {name} ...")
            if name == "per_chip_fat":
                rec = per_chip_fat(em, base, batch, constraint, thr, faultfleet_settings)
                rec["wall_s"] = round(rec["wall_s"] + extra_s, 1)
            else:
                settings = fap_t_settings if name == "fap_t" else faultfleet_settings
                library = libraries.get(name)
                out = pl.run_fleet(
                    em,
                    base,
                    batch,
                    constraint,
                    settings,
                    library=library,
                    thresholds=thr,
                    screens=screens if b == 0 else None,
                    on_progress=lambda msg, n=name: log(f"{n}: {msg}"),
                )
                if name == "faultfleet":
                    libraries[name] = out.library
                rec = out.record()
                if args.chip_states:
                    _write_chip_states(Path(f"{args.chip_states}.{name}.batch{b + 1}.json"), out.plan)
                rec["wall_s"] = round(out.wall_s + extra_s, 1)
            results[name] = rec
            log(f"batch {b + 1} {name}: {json.dumps({k: v for k, v in rec.items() if k != 'decisions'})}")
        if "fap_t" in results and "faultfleet" in results:
            f, ff = results["fap_t"], results["faultfleet"]
            ff["ratio_vs_fap_t"] = {
                "training_epochs": round(f["training_epochs_total"] / ff["training_epochs_total"], 2)
                if ff["training_epochs_total"]
                else None,
                "wall_s": round(f["wall_s"] / ff["wall_s"], 2) if ff["wall_s"] else None,
            }
        per_batch.append({"chips": len(batch), "strategies": results})

    out_json = {
        "config": {
            "chips": [len(b) for b in batches],
            "seed": args.seed,
            "model": args.model,
            "dataset": args.dataset,
            "array": f"{array.rows}x{array.cols}",
            "constraint": constraint.to_dict(),
            "fleet": source,
            "second_batch": str(args.second_batch) if args.second_batch else None,
            "max_group_size": args.max_group_size,
            "robust_base": args.robust_base,
            "resilience_map": args.resilience_map,
            "ladder": list(faultfleet_settings.ladder),
            "faultfleet_epoch_fraction": args.epoch_fraction,
            "train": cfg.to_dict(),
            "threads": args.threads,
            "validation_samples": len(root.validation.x_test),
            "test_samples": len(root.test.x_test),
        },
        "baseline_accuracy": {"validation": round(thr.baseline_validation, 4), "test": round(thr.baseline_test, 4)},
        "threshold": {"validation": round(thr.decision, 4), "test": round(thr.verification, 4)},
        "screening": screening_figures,
        "strategies": per_batch[0]["strategies"],
        "batches": per_batch,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    print(json.dumps(out_json, separators=(",", ":")) if args.json else json.dumps(out_json, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
