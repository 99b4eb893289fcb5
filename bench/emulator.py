"""Emulator speed benchmark: prints JSON (figures, never pass/fail).

For lenet5 on mnist5k (28x28) and resnet20 on 32x32 inputs, batch 128, a 32x32
array, each fault site at 2% faulty PEs and all sites mixed: the median time of one
fault-aware training step (forward + backward + SGD update) and of one evaluation
batch on the emulated array, as ratios to the same model's plain float PyTorch step
and float evaluation batch, measured interleaved in the same run (the machine is
shared and noisy: medians of interleaved repetitions).

Weight preparation (quantizing the weights and applying the weight faults, cached
while the weights stay the same) is charged where it happens in use: to every
training step, whose weights the previous step changed, and to the first batch of
an evaluation (`eval_first_ratio`); `eval_ratio` is an evaluation's every further
batch. The `*_vs_float_step_ratio` figures divide by the float training step instead:
the issue's goal (every ratio at most 2.0) is worded on that ratio, for the FAT step
and an evaluation batch alike. Also the speed-up of the fast path over the
`systolic_matmul` reference on the same integer operands of one layer.

Usage: python bench/emulator.py [--reps N] [--models lenet5,resnet20] [--sites psum,mixed] [--threads N]
[--processes N] [--device cuda]
(--threads sets torch.set_num_threads for both sides; default: torch's default. On a
machine shared with other jobs, 1 thread gives steadier ratios. --processes repeats the
whole measurement in that many fresh processes and reports each ratio's median over
them and its range: on a shared 2-core VM one process's ratios were seen to differ from
the next one's by 15% and more. --device runs both sides there, each timed call ending
in a synchronize; the speed-up over systolic_matmul is then not measured: the reference
runs on the CPU.)
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import accelerator as A
from accelerator.faults import Fault
from accelerator.quant import quantizer

BATCH = 128
SITES = ("pe", "weight", "act", "psum", "mixed")


def fault_map(array: A.ArrayConfig, site: str, rate: float, seed: int) -> A.FaultMap:
    """`rate` of the PEs faulty, one fault each, of `site` (or a random site for mixed)."""
    rng = random.Random(seed)
    pes = rng.sample([(r, c) for r in range(array.rows) for c in range(array.cols)], round(rate * array.n_pes))
    faults = []
    for r, c in pes:
        s = rng.choice(("pe", "weight", "act", "psum")) if site == "mixed" else site
        if s == "pe":
            faults.append(Fault(r, c, "pe"))
        else:
            faults.append(Fault(r, c, s, rng.randrange(array.bit_width(s)), rng.randrange(2)))
    return A.FaultMap(array, tuple(faults))


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def synchronize(x: torch.Tensor) -> None:
    """Wait for the GPU's queued work (a timed call must include it)."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> object:
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        synchronize(x)
        return loss

    return step


def weights_changed(model: nn.Module) -> None:
    """Bump every parameter's version (values unchanged), as an optimizer step does: the
    array layers then prepare their weights again on their next forward."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0)


def eval_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        model.eval()
        with torch.no_grad():
            out = model(x)
        synchronize(x)
        return out

    return run


def reference_speedup(model: nn.Module, array: A.ArrayConfig, fm: A.FaultMap, x: torch.Tensor, rows: int) -> float:
    """Speed-up of the fast path over systolic_matmul on one conv layer's integer operands
    (the model's second array layer, `rows` lowered input rows)."""
    model_arr = A.on_array(model, array, fm)
    name = list(A.array_layers(model_arr))[1]
    captured: list[torch.Tensor] = []
    A.array_layers(model_arr)[name].register_forward_pre_hook(lambda _m, inp: captured.append(inp[0]))
    with torch.no_grad():
        model_arr.eval()(x)
    q = quantizer(array.fmt)
    arr_layer = A.array_layers(model_arr)[name]
    xq = q.act(captured[-1], arr_layer.scale_tensor())
    wq, _ = q.weight(arr_layer.weight)
    if isinstance(arr_layer, nn.Conv2d):
        g = arr_layer.groups
        cols = F.unfold(
            F.pad(xq, arr_layer.pads), arr_layer.kernel_size, dilation=arr_layer.dilation, stride=arr_layer.stride
        )
        xm = cols.permute(0, 2, 1).reshape(-1, cols.shape[1] // g)[:rows]
        wm = wq.reshape(wq.shape[0], -1)[: wq.shape[0] // g]
    else:
        xm, wm = xq[:rows], wq
    t_fast = statistics.median(timed(lambda: A.fast_matmul(xm, wm, array, fm)) for _ in range(5))
    t_ref = timed(lambda: A.systolic_matmul(xm, wm, array, fm))
    return t_ref / t_fast


def bench_model(
    arch: str,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    reps: int,
    budget_s: float,
    sites: list[str],
    device: torch.device,
) -> dict[str, object]:
    array = A.ArrayConfig(32, 32)
    model = A.build_model(arch, tuple(x.shape[1:]), num_classes)  # type: ignore[arg-type]
    A.calibrate(model, x)
    ref_model, model = model, copy.deepcopy(model).to(device)  # the reference runs on the CPU
    x, y = x.to(device), y.to(device)
    float_model = model
    out: dict[str, object] = {"arch": arch, "input_shape": list(x.shape[1:]), "batch": BATCH, "array": [32, 32]}
    by_site: dict[str, object] = {}
    for site in sites:
        fm = fault_map(array, site, 0.02, seed=1)
        arr_model = A.on_array(model, array, fm, seed=0)
        f_step, a_step = step_fn(float_model, x, y), step_fn(arr_model, x, y)
        f_eval, a_eval = eval_fn(float_model, x), eval_fn(arr_model, x)
        for fn in (f_step, a_step, f_eval, a_eval):  # warm-up (plans, index caches, allocator)
            fn()
        keys = ("float_step", "fat_step", "float_eval", "eval_first", "eval")
        times: dict[str, list[float]] = {k: [] for k in keys}
        t_cfg = time.perf_counter()
        for rep in range(reps):  # interleaved; at least one round, more while the budget lasts
            if rep and time.perf_counter() - t_cfg > budget_s:
                break
            times["float_step"].append(timed(f_step))
            # the evaluations below prepared the array layers' weights (quantized, fault
            # edits) for the weights the last step left; in training nothing runs between
            # two steps, so each step prepares its own: as if the weights had changed
            weights_changed(arr_model)
            times["fat_step"].append(timed(a_step))
            times["float_eval"].append(timed(f_eval))
            times["eval_first"].append(timed(a_eval))  # prepares the new weights
            times["eval"].append(timed(a_eval))  # an evaluation's every further batch
        med = {k: statistics.median(v) for k, v in times.items()}
        by_site[site] = {
            "faults": len(fm),
            "rounds": len(times["fat_step"]),
            "fat_step_s": round(med["fat_step"], 4),
            "float_step_s": round(med["float_step"], 4),
            "fat_step_ratio": round(med["fat_step"] / med["float_step"], 3),
            "eval_s": round(med["eval"], 4),
            "float_eval_s": round(med["float_eval"], 4),
            "eval_ratio": round(med["eval"] / med["float_eval"], 3),
            "eval_first_ratio": round(med["eval_first"] / med["float_eval"], 3),
            "eval_vs_float_step_ratio": round(med["eval"] / med["float_step"], 3),
            "eval_first_vs_float_step_ratio": round(med["eval_first"] / med["float_step"], 3),
        }
    out["sites"] = by_site
    if device.type == "cpu":
        mixed = fault_map(array, "mixed", 0.02, seed=1)
        out["speedup_over_systolic_matmul"] = round(reference_speedup(ref_model, array, mixed, x, rows=256), 1)
    else:
        out["speedup_over_systolic_matmul"] = None
    return out


RATIOS = (
    "fat_step_ratio",
    "eval_ratio",
    "eval_first_ratio",
    "eval_vs_float_step_ratio",
    "eval_first_vs_float_step_ratio",
)


def maxima(results: list[dict[str, Any]]) -> dict[str, float]:
    """The summary's largest ratio of each kind over models and sites. The issue's goal
    (2.0) is on the ratio to the float *step*: the FAT step's and an eval batch's
    (`max_eval_vs_float_step_ratio`, first batch included); `max_eval_ratio` and
    `max_eval_first_ratio` compare with the float eval batch, a stricter yardstick."""
    sites = [s for r in results for s in r["sites"].values()]
    return {
        f"max_{key}": max(s[key] for s in sites)
        for key in (
            "fat_step_ratio",
            "eval_vs_float_step_ratio",
            "eval_first_vs_float_step_ratio",
            "eval_ratio",
            "eval_first_ratio",
        )
    }


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON of several whole runs (fresh processes) as one: each ratio's median over
    the runs, with its [min, max] as `<ratio>_range`; the summary's maxima over the
    medians."""
    results = []
    for i, first in enumerate(runs[0]["results"]):
        sites = {}
        for site in first["sites"]:
            per_run = [r["results"][i]["sites"][site] for r in runs]
            entry: dict[str, Any] = {"faults": per_run[0]["faults"]}
            for key in RATIOS:
                vals = [s[key] for s in per_run]
                entry[key] = round(statistics.median(vals), 3)
                entry[f"{key}_range"] = [min(vals), max(vals)]
            sites[site] = entry
        speedups = [r["results"][i]["speedup_over_systolic_matmul"] for r in runs]
        speedups = [v for v in speedups if v is not None] or [None]
        results.append(
            {
                **{k: first[k] for k in ("arch", "input_shape", "batch", "array")},
                "sites": sites,
                "speedup_over_systolic_matmul": None if speedups == [None] else statistics.median(speedups),
            }
        )
    summary = {
        **{k: runs[0]["summary"][k] for k in ("torch_threads", "reps", "goal_ratio", "device")},
        "processes": len(runs),
        **maxima(results),
        "wall_s": round(sum(r["summary"]["wall_s"] for r in runs), 1),
    }
    return {"summary": summary, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", default="lenet5,resnet20")
    ap.add_argument("--budget-s", type=float, default=12.0, help="per model and site: stop adding rounds after this")
    ap.add_argument("--sites", default=",".join(SITES), help="fault sites to measure, comma-separated")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--processes", type=int, default=1, help="repeat in this many fresh processes: medians and ranges")
    ap.add_argument("--device", default="cpu", help="where both sides run, e.g. cuda (default: cpu)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device on this machine")
    if args.processes > 1:
        one = ["--reps", str(args.reps), "--models", args.models, "--budget-s", str(args.budget_s)]
        one += ["--sites", args.sites, "--threads", str(args.threads), "--device", args.device]
        cmd = [sys.executable, __file__, *one]
        runs = [
            json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            for _ in range(args.processes)
        ]
        print(json.dumps(combine_runs(runs), indent=1))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sites = args.sites.split(",")
    if not set(sites) <= set(SITES):
        ap.error(f"--sites: unknown {sorted(set(sites) - set(SITES))}; known: {','.join(SITES)}")
    results = []
    t0 = time.perf_counter()
    for arch in args.models.split(","):
        if arch == "lenet5":
            d = A.load_dataset("mnist5k")
            x, y = d.x_train[:BATCH], d.y_train[:BATCH]
            results.append(bench_model("lenet5", x, y, d.num_classes, args.reps, args.budget_s, sites, device))
        else:
            g = torch.Generator().manual_seed(0)
            x = torch.rand(BATCH, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (BATCH,), generator=g)
            results.append(bench_model(arch, x, y, 10, args.reps, args.budget_s, sites, device))
    summary = {
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "reps": args.reps,
        "goal_ratio": 2.0,
        **maxima(results),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps({"summary": summary, "results": results}, indent=1))


if __name__ == "__main__":
    main()
