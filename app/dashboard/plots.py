"""The dashboard's pictures: matplotlib on its Agg canvas (no pyplot, no global state), PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

STATE_COLORS = {
    "unplanned": "#b0b0b0",
    "planned": "#f2c14e",
    "retraining": "#f78154",
    "needs_nothing": "#4d9de0",
    "verified": "#3bb273",
    "served_by_library": "#7768ae",
    "unrecoverable": "#e15554",
    "waiting": "#5c5c5c",
}
SITE_MARKERS = {"weight": ("o", "#1f77b4"), "act": (">", "#ff7f0e"), "psum": ("v", "#9467bd"), "pe": ("x", "#d62728")}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def wafer_map(dies: Sequence[tuple[int | None, int | None, str]], title: str) -> bytes:
    """One square per die at (die_x, die_y), coloured by its chip's state."""
    fig = _figure(4.2, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    placed = [(x, y, s) for x, y, s in dies if x is not None and y is not None]
    for state, color in STATE_COLORS.items():
        pts = [(x, y) for x, y, s in placed if s == state]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, marker="s", s=60, c=color, edgecolors="k", linewidths=0.3, label=state)
    missing = len(dies) - len(placed)
    ax.set_title(title + (f" ({missing} without die coordinates)" if missing else ""), fontsize=8)
    ax.set_xlabel("die x", fontsize=7)
    ax.set_ylabel("die y", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.set_aspect("equal", adjustable="datalim")
    ax.invert_yaxis()
    if placed:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return _png(fig)


def fault_grid(rows: int, cols: int, faults: list[dict[str, Any]], bypassed: set[tuple[int, int]], title: str) -> bytes:
    """The PE grid: dead and bypassed PEs shaded, each fault site marked at its PE."""
    size = min(8.0, max(3.5, 0.18 * max(rows, cols)))
    fig = _figure(size + 1.6, size)
    ax = fig.add_subplot(1, 1, 1)
    shade = np.zeros((rows, cols))
    dead = {(f["row"], f["col"]) for f in faults if f["site"] == "pe"}
    for r, c in bypassed | dead:
        if 0 <= r < rows and 0 <= c < cols:
            shade[r, c] = 2 if (r, c) in dead else 1
    ax.imshow(shade, cmap=ListedColormap(["#ffffff", "#c8c8c8", "#7a7a7a"]), vmin=0, vmax=2, origin="upper")
    ax.set_xticks(np.arange(-0.5, cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, rows, 1), minor=True)
    ax.grid(which="minor", color="#dddddd", linewidth=0.4)
    ax.tick_params(which="minor", length=0)
    ax.tick_params(labelsize=6)
    for site, (marker, color) in SITE_MARKERS.items():
        pts = [(f["col"], f["row"]) for f in faults if f["site"] == site]
        if pts and site != "pe":
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, marker=marker, c=color, s=22, label=f"{site} ({len(pts)})")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color="#7a7a7a", label=f"dead PE ({len(dead)})"), Patch(color="#c8c8c8", label="bypassed PE")]
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_xlabel("column", fontsize=7)
    ax.set_ylabel("row", fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _png(fig)


def resilience_map(rmap: Any, threshold: float | None, chips: list[dict[str, Any]], title: str) -> bytes:
    """Worst-case accuracy of a `planner.ResilienceMap` (epochs x fault rate), the constraint's
    contour, and each chip at its (effective fault rate, retraining epochs), coloured by state."""
    rates = [float(r) for r in rmap.rates]
    epochs = [int(e) for e in rmap.epochs]
    # rows: epochs, cols: rates; cells an adaptive map did not measure (NaN) stay blank, marked "-"
    worst = np.ma.masked_invalid(np.asarray(rmap.worst, dtype=float).T)
    missing = np.ma.getmaskarray(worst)
    fig = _figure(1.8 + 0.9 * len(rates), 1.6 + 0.6 * len(epochs))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(worst, origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-9, float(worst.max())))
    for j in range(len(epochs)):
        for i in range(len(rates)):
            text, color = ("-", "0.4") if missing[j, i] else (f"{worst[j, i]:.2f}", "w")
            ax.text(i, j, text, ha="center", va="center", fontsize=6, color=color)
    if threshold is not None and len(rates) > 1 and len(epochs) > 1 and worst.min() < threshold < worst.max():
        ax.contour(np.arange(len(rates)), np.arange(len(epochs)), worst, levels=[threshold], colors="r")
    xs, ys, cs = [], [], []
    for ch in chips:
        rate, own_epochs = ch.get("effective_rate"), ch.get("epochs")
        if rate is None:
            continue
        xs.append(float(np.interp(rate, rates, np.arange(len(rates)))))
        ys.append(float(np.interp(own_epochs or 0, epochs, np.arange(len(epochs)))))
        cs.append(STATE_COLORS.get(_plan_state(ch.get("status")), "#ffffff"))
    if xs:
        jitter = np.random.default_rng(0).uniform(-0.12, 0.12, size=(2, len(xs)))
        ax.scatter(np.add(xs, jitter[0]), np.add(ys, jitter[1]), c=cs, s=14, edgecolors="k", linewidths=0.4)
    ax.set_xticks(range(len(rates)), [f"{r:.3g}" for r in rates], fontsize=7)
    ax.set_yticks(range(len(epochs)), [str(e) for e in epochs], fontsize=7)
    ax.set_xlabel("fault rate (faulty-PE fraction)", fontsize=7)
    ax.set_ylabel("retraining epochs", fontsize=7)
    ax.set_title(title + (f"; red: constraint {threshold:.3f}" if threshold is not None else ""), fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _png(fig)


def _plan_state(status: str | None) -> str:
    return {"missed": "retraining", "pending": "planned"}.get(status or "", status or "planned")


def cost_bars(costs: list[tuple[str, float]], title: str) -> bytes:
    fig = _figure(5.6, 2.4)
    ax = fig.add_subplot(1, 1, 1)
    labels = [c[0] for c in costs]
    values = [c[1] for c in costs]
    bars = ax.barh(labels, values, color=["#3bb273"] + ["#b0b0b0"] * (len(costs) - 1))
    ax.bar_label(bars, labels=[f"{v:g}" for v in values], fontsize=7, padding=2)
    ax.invert_yaxis()
    ax.set_xlabel("training epochs", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=8)
    ax.set_xlim(0, max(values + [1]) * 1.15)
    fig.tight_layout()
    return _png(fig)
