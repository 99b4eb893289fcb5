"""Planning time alone for large fleets: `plan_fleet` given screening results and a resilience map.

Each size runs in its own subprocess so its peak RSS is its own. The resilience map
and screening accuracies come from a smooth synthetic accuracy model (this measures
the planner, not the emulator). Prints a JSON list of {chips, wall_s, peak_rss_mb}
with --json; progress on stderr. A benchmark: figures, never pass/fail.

    .venv/bin/python bench/planner_scale.py --json [--sizes 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def synthetic_accuracy(rate: float, epochs: int, noise: float) -> float:
    """A plausible accuracy (fraction) of a 0.99 model at faulty-PE fraction `rate` after `epochs`."""
    return 0.99 - min(0.89, 1.5 * rate / (1 + epochs) ** 1.5) - noise


def one_size(chips: int, seed: int, max_group_size: int) -> dict[str, float]:
    """Generate a fleet, then time `plan_fleet` alone; returns {chips, wall_s, peak_rss_mb, ...}."""
    from planner import AccuracyConstraint, FleetSpec, ResilienceMap, generate_fleet, plan_fleet

    def measure(task):  # noqa: ANN001, ANN202
        rng = np.random.default_rng(task.seed)
        return [synthetic_accuracy(task.rate, e, 0.005 * rng.random()) for e in task.epochs]

    rmap = ResilienceMap.build(
        [0.01, 0.02, 0.04, 0.08, 0.16, 0.32], [0, 1, 2, 4, 8], 3, measure, baseline=0.99, seed=seed
    )
    fleet = generate_fleet(chips, seed, FleetSpec())
    screening = {str(m.chip_id): synthetic_accuracy(m.rate, 0, 0.0) for m in fleet}
    import sklearn.cluster  # noqa: F401  (import cost is not planning time)

    t0 = time.perf_counter()
    plan = plan_fleet(
        fleet, screening, rmap, AccuracyConstraint.relative(0.01), max_group_size=max_group_size, seed=seed
    )
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    s = plan.summary()
    return {
        "chips": chips,
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(peak_mb, 1),
        "groups": s["groups"],
        "mean_group_size": round(s["mean_group_size"], 3),
        "predicted_epochs": s["predicted_epochs"],
        "per_chip_fat_epochs": s["per_chip_fat_epochs"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the JSON list on stdout")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-group-size", type=int, default=5)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: one size
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.seed, args.max_group_size)))
        return 0
    rows = []
    for n in args.sizes:
        print(f"planner_scale: {n} chips ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--one", str(n), "--seed", str(args.seed)]
        cmd += ["--max-group-size", str(args.max_group_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"planner_scale: {row}", file=sys.stderr, flush=True)
        rows.append(row)
    print(json.dumps(rows, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
