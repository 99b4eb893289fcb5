"""eFAT + TRE-Map fleet planning: who needs nothing, how much retraining, which chips share it.

`plan_fleet` places every chip that fails screening on the resilience map by its
effective rate (`planner.severity`), reads its own retraining epochs, and groups chips in two stages.

Retraining epochs (`Group.epochs`, `ChipState.epochs`, `ResilienceMap.required_epochs`) are
a number of epochs, each reading `train.epoch_fraction` of the train split (a full pass at
the default 1): the same number the database and the manifests call a group's `epochs`.

1. Clustering (scikit-learn `MiniBatchKMeans`, per bucket of the chips' own epochs). Each chip is a
   sparse vector: its severity-weighted faulty PEs, their row and column projections
   and its fault-class histogram, L2-normalised, so Euclidean k-means is spherical
   k-means on cosine distance. Chips close in that distance share faulty PEs (their
   fused map grows least: the union counts a shared PE once) and share rows (act
   faults hit the same input indices) and columns (weight/psum faults hit the same
   output channels), so one retrained model compensates for both. MiniBatchKMeans
   on sparse input is linear in the fleet size: no all-pairs distance matrix.
2. Reward-driven packing inside each cluster (greedy, deterministic): a group starts
   from its hardest chip and takes the candidate with the largest reward
   ``own_epochs(candidate) - (epochs(group + candidate) - epochs(group))`` (epochs
   saved against retraining it alone), ties broken by the smallest growth of the fused
   effective rate, then by chip id. A candidate is taken only while the reward is
   positive, the fused effective rate is one the map says retraining can fix, and the
   group stays within `max_group_size`. Hence every group costs less than its members
   alone, and the plan never costs more than per-chip FAT.

Chips the map says no number of epochs can fix are planned alone at per-chip FAT's epochs
(what the baseline spends on them) with their most sensitive layer protected: plain
retraining is predicted to fail, and a stuck high psum bit in the columns of the last
layer (a garbage logit, which no retraining of the weights removes) is the common
cause. `replan` sends them to the top rung next (alone, the map's largest epochs, protected).

Bypass (fault-aware pruning, Zhang et al.'s FAP): on an array with bypass support a
chip can be deployed with PEs bypassed (`accelerator.faults.BYPASS_POLICIES`: those
whose weight or psum register is stuck, optionally those right of a stuck activation
register, or both only for faults on the register's high-order bits). Their weights then
act as 0 instead of being corrupted. Given
`bypass_screening`, a chip is planned on the policy's map that screens best, when that
beats its own map (a tie goes to the policy that bypasses fewer PEs). Why: a stuck high
psum or activation bit cannot be retrained away (one in a logit's column leaves chance
accuracy), while a pruned weight is what
retraining compensates best; and a union of bypassed maps is a union of pruning masks,
which fuses well (`workers.pipeline.retrain_group` keeps those weights at 0, so a group
model computes on every member what it computed on the fused map).

Placement (`placement`): ``"screening"`` (default) puts a chip where the map's
conservative 0-epoch curve falls to its screening accuracy: a measurement of this
chip's own faults, which sees what a class-average severity cannot (the same stuck
psum bit is harmless in a column no layer's last tile uses, and fatal in a logit's
column). ``"severity"`` uses the severity-weighted faulty-PE fraction, ``"conservative"``
the larger of the two. A group's fused rate is additive over its members' disjoint
faulty PEs either way (`_Packer`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from accelerator.faults import BYPASS_POLICIES, FaultMap, bypass_pes, bypassed_pes
from planner.constraint import AccuracyConstraint, meets
from planner.resilience import ResilienceMap
from planner.schedules import SCHEDULES, InjectionSchedule, fuse_fault_maps, schedule_from_spec
from planner.severity import SiteSeverity, fault_class, fault_classes, screening_equivalent_rate

# chip states
NEEDS_NOTHING = "needs_nothing"
PLANNED = "planned"
VERIFIED = "verified"
UNRECOVERABLE = "unrecoverable"
# How a chip retrained alone climbs the epochs ladder after a miss (`planner.replan`): "full"
# every rung to the top, then protected at the top (FAP+T); "bounded" stops a climb that its
# own accuracies predict cannot reach the constraint, and protection climbs from the first rung.
CLIMBS = ("full", "bounded")


def _rate_to_json(rate: float) -> float | None:
    """A rate past the map is `inf`, which strict JSON (and PostgreSQL's json) has no token for: null."""
    return rate if math.isfinite(rate) else None


def _rate_from_json(value: float | None) -> float:
    return math.inf if value is None else float(value)


def group_deployment(chip_map: FaultMap, fused: FaultMap) -> FaultMap:
    """`chip_map` (a member's planned map) with every PE dead in the group's `fused` map
    bypassed too, on an array with bypass support (a fused map has no dead PEs otherwise).

    Why: a fused map's dead PE swallows the weight and psum faults other members have
    on that PE (DESIGN.md: a bypassed PE's faults no longer matter), so the group's
    model never trained against them, and its weights there are 0
    (`workers.pipeline.retrain_group`). Bypassing those PEs on every member costs the
    model nothing and makes it compute on each member what it computed on the fused
    map; left on, a member's stuck high weight or psum bit there can cost it most of its
    accuracy, while the other members verify.
    """
    return bypass_pes(chip_map, fused.dead_pes)


@dataclass
class Group:
    """One retraining job: the base model retrained `epochs` epochs on the members' fused map.

    `epochs` is retraining epochs (each `train.epoch_fraction` of a pass over the train
    split): the group row's and its manifest's `epochs`.

    `members` are chip ids, mildest effective rate first (the order of a progressive
    union); `schedule` is a schedule spec (`planner.schedules`); `protect` asks for the
    most sensitive layer to run fault-free (3x its cycles). `round` 0 is the initial
    plan, later rounds come from `replan`; `reason` says why the group exists.
    `warm_from`: the group whose retrained model this one continues from (None: the
    base model), which had seen `start_epoch` epochs; `epochs` counts only the epochs
    trained here, so the group's model has seen `total_epochs` (`start_epoch + epochs`).
    """

    group_id: str
    members: tuple[str, ...]
    fused: FaultMap
    epochs: int
    effective_rate: float
    schedule: dict[str, Any]
    protect: bool = False
    round: int = 0
    reason: str = "grouped"
    status: str = "pending"  # pending -> done (after verification)
    warm_from: str | None = None
    start_epoch: int = 0

    @property
    def total_epochs(self) -> int:
        return self.start_epoch + self.epochs

    def injection_schedule(self, maps: Mapping[str, FaultMap], steps_per_epoch: int | None = None) -> InjectionSchedule:
        """The schedule over the members' own maps (`maps`: chip id -> map)."""
        spec = {"name": self.schedule["name"], "params": dict(self.schedule.get("params", {}))}
        if spec["name"] == "progressive_union":
            spec["params"]["steps_per_epoch"] = steps_per_epoch
        return schedule_from_spec(spec, [maps[c] for c in self.members])

    def to_dict(self) -> dict[str, Any]:
        return {
            "group_id": self.group_id,
            "members": list(self.members),
            "fused": self.fused.to_dict(),
            "fused_digest": self.fused.digest,
            "epochs": self.epochs,
            "effective_rate": _rate_to_json(self.effective_rate),
            "schedule": self.schedule,
            "protect": self.protect,
            "round": self.round,
            "reason": self.reason,
            "status": self.status,
            "warm_from": self.warm_from,
            "start_epoch": self.start_epoch,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Group:
        return cls(
            d["group_id"],
            tuple(d["members"]),
            FaultMap.from_dict(d["fused"]),
            int(d["epochs"]),
            _rate_from_json(d["effective_rate"]),
            dict(d["schedule"]),
            bool(d.get("protect", False)),
            int(d.get("round", 0)),
            d.get("reason", "grouped"),
            d.get("status", "pending"),
            d.get("warm_from"),
            int(d.get("start_epoch", 0)),
        )


@dataclass
class ChipState:
    """Where one chip stands. Accuracies are fractions; `epochs` is its own retraining epochs
    on the map (what it would need alone, counted as a group's `epochs`; None: beyond the map)."""

    chip_id: str
    status: str
    screening: float
    effective_rate: float
    epochs: int | None = None
    group_id: str | None = None
    accuracy: float | None = None
    best_accuracy: float | None = None
    reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    bypass: str | None = None  # the bypass policy it is deployed with (`BYPASS_POLICIES`), None: none
    bypassed: list[list[int]] = field(default_factory=list)  # [row, col] the deployment bypasses beyond dead PEs
    test_accuracy: float | None = None  # on the test split, which no decision saw (verification)
    served_by: str | None = None  # the library model a chip that needs no retraining runs ("base", ...)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chip_id": self.chip_id,
            "status": self.status,
            "screening": self.screening,
            "effective_rate": _rate_to_json(self.effective_rate),
            "epochs": self.epochs,
            "group_id": self.group_id,
            "accuracy": self.accuracy,
            "best_accuracy": self.best_accuracy,
            "reason": self.reason,
            "history": self.history,
            "bypass": self.bypass,
            "bypassed": self.bypassed,
            "test_accuracy": self.test_accuracy,
            "served_by": self.served_by,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChipState:
        return cls(
            d["chip_id"],
            d["status"],
            float(d["screening"]),
            _rate_from_json(d["effective_rate"]),
            d.get("epochs"),
            d.get("group_id"),
            d.get("accuracy"),
            d.get("best_accuracy"),
            d.get("reason"),
            list(d.get("history", [])),
            d.get("bypass"),
            [list(pe) for pe in d.get("bypassed", [])],
            d.get("test_accuracy"),
            d.get("served_by"),
        )


@dataclass
class PlanSettings:
    """Knobs of `plan_fleet`, kept with the plan so `replan` applies the same rules."""

    max_group_size: int = 5
    seed: int = 0
    schedule: str = "progressive_union"
    ramp_fraction: float = 0.5
    placement: str = "screening"  # or "severity", or "conservative": the larger of both
    coarse_cluster_size: int = 128
    climb: str = "full"  # or "bounded" (`CLIMBS`, `planner.replan`)

    def __post_init__(self) -> None:
        _check_int("max_group_size", self.max_group_size, 1)
        _check_int("seed", self.seed, 0)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: {self.schedule!r} is not one of {sorted(SCHEDULES)}")
        _check_fraction("ramp_fraction", self.ramp_fraction)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: {self.placement!r} is not one of {list(PLACEMENTS)}")
        _check_int("coarse_cluster_size", self.coarse_cluster_size, 1)
        if self.climb not in CLIMBS:
            raise ValueError(f"climb: {self.climb!r} is not one of {list(CLIMBS)}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanSettings:
        return cls(**dict(d))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")


def _check_fraction(name: str, value: Any) -> None:
    """A number in [0, 1] (accuracies, fractions); NaN is refused."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name}: must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: must be in [0, 1], got {value!r}")


@dataclass
class Plan:
    """A fleet plan: groups to retrain, chips' states, and its cost against per-chip FAT (epochs).

    `per_chip_fat_epochs_each`: the epochs per-chip FAT retrains each chip failing screening
    alone (the largest own epochs of a chip the map can fix); `per_chip_fat_epochs` is their
    total over those chips.
    """

    constraint: AccuracyConstraint
    resilience_map: ResilienceMap
    severity: SiteSeverity
    settings: PlanSettings
    maps: dict[str, FaultMap]
    chips: dict[str, ChipState]
    groups: list[Group]
    per_chip_fat_epochs_each: int
    round: int = 0

    # --- views --------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return self.constraint.threshold(self.resilience_map.baseline)

    def chips_with(self, status: str) -> list[str]:
        return [c for c, s in self.chips.items() if s.status == status]

    @property
    def needs_nothing(self) -> list[str]:
        return self.chips_with(NEEDS_NOTHING)

    @property
    def pending_groups(self) -> list[Group]:
        return [g for g in self.groups if g.status == "pending"]

    @property
    def done(self) -> bool:
        return not self.pending_groups

    @property
    def chips_failing_screening(self) -> int:
        return sum(1 for s in self.chips.values() if s.status != NEEDS_NOTHING)

    @property
    def predicted_epochs(self) -> int:
        """Epochs of the initial plan (round 0)."""
        return sum(g.epochs for g in self.groups if g.round == 0)

    @property
    def planned_epochs(self) -> int:
        """Epochs of every group so far, replans included."""
        return sum(g.epochs for g in self.groups)

    @property
    def per_chip_fat_epochs(self) -> int:
        """Per-chip FAT: every chip failing screening retrained alone for `per_chip_fat_epochs_each` epochs."""
        return self.per_chip_fat_epochs_each * self.chips_failing_screening

    def summary(self) -> dict[str, Any]:
        sizes = [len(g.members) for g in self.groups if g.round == 0]
        return {
            "chips": len(self.chips),
            "needs_nothing": len(self.needs_nothing),
            "groups": len(sizes),
            "mean_group_size": float(np.mean(sizes)) if sizes else 0.0,
            "predicted_epochs": self.predicted_epochs,
            "planned_epochs": self.planned_epochs,
            "per_chip_fat_epochs_each": self.per_chip_fat_epochs_each,
            "per_chip_fat_epochs": self.per_chip_fat_epochs,
            "verified": len(self.chips_with(VERIFIED)),
            "unrecoverable": len(self.chips_with(UNRECOVERABLE)),
            "bypassed_chips": sum(1 for s in self.chips.values() if s.bypassed),
            "round": self.round,
        }

    # --- JSON ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "constraint": self.constraint.to_dict(),
            "resilience_map": self.resilience_map.to_dict(),
            "severity": self.severity.to_dict(),
            "settings": self.settings.to_dict(),
            "maps": [m.to_dict() for m in self.maps.values()],
            "chips": [s.to_dict() for s in self.chips.values()],
            "groups": [g.to_dict() for g in self.groups],
            "per_chip_fat_epochs_each": self.per_chip_fat_epochs_each,
            "round": self.round,
            "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        maps = [FaultMap.from_dict(m) for m in d["maps"]]
        return cls(
            AccuracyConstraint.from_dict(d["constraint"]),
            ResilienceMap.from_dict(d["resilience_map"]),
            SiteSeverity.from_dict(d["severity"]),
            PlanSettings.from_dict(d["settings"]),
            {m.chip_id: m for m in maps if m.chip_id is not None},
            {s["chip_id"]: ChipState.from_dict(s) for s in d["chips"]},
            [Group.from_dict(g) for g in d["groups"]],
            int(d["per_chip_fat_epochs_each"]),
            int(d.get("round", 0)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


# --- placement ------------------------------------------------------------------------

PLACEMENTS = ("screening", "severity", "conservative")


def chip_effective_rate(
    fault_map: FaultMap, screening: float, severity: SiteSeverity, rmap: ResilienceMap, placement: str
) -> float:
    """Where a single chip sits on the map (faulty-PE fraction), see `planner.severity`."""
    if placement == "screening":
        return screening_equivalent_rate(screening, rmap)
    rate = severity.effective_rate(fault_map)
    if placement == "conservative":
        rate = max(rate, screening_equivalent_rate(screening, rmap))
    elif placement != "severity":
        raise ValueError(f"placement: {placement!r} is not one of {PLACEMENTS}")
    return rate


class _Packer:
    """Each chip's placed rate spread over its faulty PEs, for fast fused-rate arithmetic.

    Chip i's faulty PEs carry weights proportional to their severities, scaled so
    they sum to the chip's placed rate x n_pes. The fused rate of a group is sum over
    PEs of the max weight among its members / n_pes: additive over disjoint faulty
    PEs (the union of reference-mix maps has the sum of their rates), a shared PE
    counted once, and never less than a member's own rate.
    """

    def __init__(self, maps: Sequence[FaultMap], rates: np.ndarray, severity: SiteSeverity) -> None:
        self.n_pes = maps[0].array.n_pes
        self.cols = maps[0].array.cols
        indptr, indices, data = [0], [], []
        for m, rate in zip(maps, rates, strict=True):
            sev = severity.pe_severities(m)
            total = sum(sev.values())
            scale = rate * self.n_pes / total if total > 0 else 0.0
            for (r, c), s in sorted(sev.items()):
                indices.append(r * self.cols + c)
                data.append(s * scale)
            indptr.append(len(indices))
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.data = np.asarray(data, dtype=float)
        self.rates = np.asarray(rates, dtype=float)

    def rows(self, chips: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(owner position in `chips`, PE index, severity) of the faulty PEs of `chips`."""
        starts, ends = self.indptr[chips], self.indptr[chips + 1]
        lens = ends - starts
        owner = np.repeat(np.arange(len(chips)), lens)
        offs = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        pos = np.repeat(starts, lens) + offs
        return owner, self.indices[pos], self.data[pos]


def _features(maps: Sequence[FaultMap], severity: SiteSeverity) -> sp.csr_matrix:
    """Sparse L2-normalised chip vectors: PE severities | row sums | column sums | class histogram."""
    array = maps[0].array
    n_pes, rows, cols = array.n_pes, array.rows, array.cols
    classes = {c: i for i, c in enumerate(fault_classes())}
    ri, ci, vals = [], [], []
    for i, m in enumerate(maps):
        sev = severity.pe_severities(m)
        row_sum: dict[int, float] = {}
        col_sum: dict[int, float] = {}
        for (r, c), s in sev.items():
            ri.append(i)
            ci.append(r * cols + c)
            vals.append(s)
            row_sum[r] = row_sum.get(r, 0.0) + s
            col_sum[c] = col_sum.get(c, 0.0) + s
        for r, s in row_sum.items():
            ri.append(i)
            ci.append(n_pes + r)
            vals.append(s / math.sqrt(cols))
        for c, s in col_sum.items():
            ri.append(i)
            ci.append(n_pes + rows + c)
            vals.append(s / math.sqrt(rows))
        hist: dict[int, float] = {}
        for f in m.faults:
            k = classes[fault_class(f, array)]
            hist[k] = hist.get(k, 0.0) + 1.0
        for k, v in hist.items():
            ri.append(i)
            ci.append(n_pes + rows + cols + k)
            vals.append(0.5 * v)
    x = sp.csr_matrix((vals, (ri, ci)), shape=(len(maps), n_pes + rows + cols + len(classes)), dtype=np.float64)
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.csr_matrix(sp.diags(1.0 / norms) @ x)


def cluster_chips(features: sp.csr_matrix, target_size: int, seed: int) -> list[np.ndarray]:
    """Index sets of about `target_size` chips with similar fault maps (MiniBatchKMeans, cosine).

    Clusters bigger than twice the target are cut into target-size chunks in order of
    their chips' first faulty PE, so a skewed k-means still gives bounded work.
    """
    n = features.shape[0]
    if n <= target_size:
        return [np.arange(n)]
    from sklearn.cluster import MiniBatchKMeans

    k = int(math.ceil(n / target_size))
    km = MiniBatchKMeans(
        n_clusters=k, random_state=seed, batch_size=4096, n_init=1, max_iter=20, reassignment_ratio=0.0
    )
    labels = km.fit_predict(features)
    first_pe = np.asarray(features.indptr[:-1], dtype=np.int64)
    first_col = np.where(np.diff(features.indptr) > 0, features.indices[np.minimum(first_pe, features.nnz - 1)], -1)
    out: list[np.ndarray] = []
    for lab in range(k):
        idx = np.nonzero(labels == lab)[0]
        if len(idx) == 0:
            continue
        if len(idx) > 2 * target_size:
            idx = idx[np.lexsort((idx, first_col[idx]))]
            out.extend(idx[i : i + target_size] for i in range(0, len(idx), target_size))
        else:
            out.append(idx)
    return out


def pack_groups(
    cluster: np.ndarray,
    packer: _Packer,
    own: np.ndarray,
    rmap: ResilienceMap,
    constraint: AccuracyConstraint,
    max_group_size: int,
    min_epochs: int,
) -> list[tuple[list[int], float, int]]:
    """Reward-driven greedy packing of one cluster: list of (chip indices, fused rate, epochs).

    `min_epochs` is the map's smallest positive epochs (its first rung): chips here failed screening,
    so even a group the map would credit with 0 epochs gets that much.
    """
    remaining = [int(i) for i in sorted(cluster.tolist(), key=lambda i: (-own[i], -packer.rates[i], i))]
    groups = []
    while remaining:
        seed_chip = remaining.pop(0)
        members = [seed_chip]
        pe_max = np.zeros(packer.n_pes)
        o, idx, val = packer.rows(np.array([seed_chip]))
        np.maximum.at(pe_max, idx, val)
        g_rate, g_epochs = float(packer.rates[seed_chip]), int(own[seed_chip])
        g_fused = float(pe_max.sum()) / packer.n_pes
        while len(members) < max_group_size and remaining:
            cand = np.asarray(remaining, dtype=np.int64)
            owner, idx, val = packer.rows(cand)
            growth = np.bincount(owner, weights=np.maximum(0.0, val - pe_max[idx]), minlength=len(cand))
            new_rate = np.maximum(np.maximum(g_rate, packer.rates[cand]), g_fused + growth / packer.n_pes)
            need = rmap.required_epochs_array(new_rate, constraint)
            new_epochs = np.where(
                need >= 0, np.maximum(need, min_epochs), -1
            )  # a failing chip trains >= the first rung
            reward = np.where(new_epochs >= 0, g_epochs + own[cand] - new_epochs, -1)
            best = np.lexsort((cand, growth, -reward))[0]
            if reward[best] <= 0:
                break
            c = int(cand[best])
            members.append(c)
            remaining.remove(c)
            o, idx, val = packer.rows(np.array([c]))
            np.maximum.at(pe_max, idx, val)
            g_fused = float(pe_max.sum()) / packer.n_pes
            g_rate, g_epochs = float(new_rate[best]), int(new_epochs[best])
        groups.append((members, g_rate, g_epochs))
    return groups


def _schedule_spec(settings: PlanSettings, size: int, epochs: int) -> dict[str, Any]:
    if size == 1:
        return {"name": "all_at_once", "params": {}}
    if settings.schedule == "progressive_union":
        return {"name": "progressive_union", "params": {"ramp_epochs": round(settings.ramp_fraction * epochs, 3)}}
    if settings.schedule == "sample_members":
        return {"name": "sample_members", "params": {"seed": settings.seed}}
    return {"name": settings.schedule, "params": {}}


def make_group(
    group_id: str,
    members: Sequence[str],
    maps: Mapping[str, FaultMap],
    chips: Mapping[str, ChipState],
    epochs: int,
    rate: float,
    settings: PlanSettings,
    *,
    round: int = 0,
    reason: str = "grouped",
    protect: bool = False,
    warm_from: str | None = None,
    start_epoch: int = 0,
) -> Group:
    ordered = tuple(sorted(members, key=lambda c: (chips[c].effective_rate, c)))
    fused = fuse_fault_maps([maps[c] for c in ordered], chip_id=group_id)
    return Group(
        group_id,
        ordered,
        fused,
        int(epochs),
        float(rate),
        _schedule_spec(settings, len(ordered), epochs),
        protect,
        round,
        reason,
        warm_from=warm_from,
        start_epoch=start_epoch,
    )


def group_chips(
    chip_ids: Sequence[str],
    maps: Mapping[str, FaultMap],
    chips: Mapping[str, ChipState],
    rmap: ResilienceMap,
    constraint: AccuracyConstraint,
    severity: SiteSeverity,
    settings: PlanSettings,
    max_group_size: int,
) -> list[tuple[list[str], float, int]]:
    """Cluster + reward-pack chips that the map can fix; (member ids, fused rate, epochs) per group."""
    ids = sorted(chip_ids)
    if not ids:
        return []
    own = np.array([chips[c].epochs for c in ids], dtype=np.int64)
    rates = np.array([chips[c].effective_rate for c in ids])
    ordered_maps = [maps[c] for c in ids]
    packer = _Packer(ordered_maps, rates, severity)
    min_epochs = rmap.smallest_positive_epochs
    out: list[tuple[list[str], float, int]] = []
    for epochs in sorted(set(own.tolist())):
        bucket = np.nonzero(own == epochs)[0]
        if max_group_size <= 1:
            out.extend(([ids[i]], float(rates[i]), int(own[i])) for i in bucket)
            continue
        feats = _features([ordered_maps[i] for i in bucket], severity)
        for cl in cluster_chips(feats, settings.coarse_cluster_size, settings.seed):
            for members, rate, amt in pack_groups(
                bucket[cl], packer, own, rmap, constraint, max_group_size, min_epochs
            ):
                out.append(([ids[i] for i in members], rate, amt))
    return out


def plan_fleet(
    chips: Sequence[FaultMap],
    screening: Mapping[str, float],
    resilience_map: ResilienceMap,
    constraint: AccuracyConstraint,
    *,
    max_group_size: int = 5,
    severity: SiteSeverity | None = None,
    seed: int = 0,
    schedule: str = "progressive_union",
    ramp_fraction: float = 0.5,
    placement: str = "screening",
    coarse_cluster_size: int = 128,
    climb: str = "full",
    bypass_screening: Mapping[str, Mapping[str, float]] | None = None,
    served_by: Mapping[str, str] | None = None,
) -> Plan:
    """Plan the retraining of a fleet (see module doc). Deterministic under `seed`.

    `chips`: every chip's own fault map (with a distinct `chip_id`, one array);
    `screening`: chip id -> accuracy (fraction) of the base model on that chip's map.
    `bypass_screening`: chip id -> {bypass policy: the same accuracy on the chip's map
    with PEs bypassed under that policy} (`accelerator.faults.bypass_faulty_pes`). A
    chip is deployed with the policy of highest accuracy when it beats its own map's
    (ties: the one that bypasses fewer PEs): from here on its map in the plan is the bypassed one
    (fused, retrained and verified as such), and its state names the policy and lists
    the bypassed PEs, which the chip must be configured with.
    `served_by`: chip id -> the library model whose screening `screening` holds, for chips
    that need nothing (recorded in their state; default "base").
    `climb`: how verification escalates a chip alone (`CLIMBS`, `planner.replan`).
    """
    # Every argument is checked here, before any work: a bad one fails now, never later in a worker.
    try:
        settings = PlanSettings(max_group_size, seed, schedule, ramp_fraction, placement, coarse_cluster_size, climb)
    except ValueError as exc:
        raise ValueError(f"plan_fleet: {exc}") from None
    for name, value, kind, what in (
        ("resilience_map", resilience_map, ResilienceMap, "a ResilienceMap"),
        ("constraint", constraint, AccuracyConstraint, "an AccuracyConstraint"),
        ("severity", severity, SiteSeverity | None, "a SiteSeverity or None"),
        ("screening", screening, Mapping, "a mapping chip id -> accuracy"),
        ("bypass_screening", bypass_screening, Mapping | None, "a mapping chip id -> {policy: accuracy}, or None"),
    ):
        if not isinstance(value, kind):
            raise TypeError(f"plan_fleet: {name} must be {what}, got {type(value).__name__}")
    if isinstance(chips, str | bytes) or not isinstance(chips, Sequence):
        raise TypeError(f"plan_fleet: chips must be a sequence of FaultMap, got {type(chips).__name__}")
    if not chips:
        raise ValueError("plan_fleet: no chips")
    for cid, acc in screening.items():
        _check_fraction(f"plan_fleet: screening[{cid!r}]", acc)
    for cid, by_policy in (bypass_screening or {}).items():
        if not isinstance(by_policy, Mapping):
            raise TypeError(f"plan_fleet: bypass_screening[{cid!r}] must be a mapping policy -> accuracy")
        unknown = set(by_policy) - set(BYPASS_POLICIES)
        if unknown:
            raise ValueError(f"plan_fleet: chip {cid!r}: unknown bypass policy {sorted(unknown)}")
        for policy, acc in by_policy.items():
            _check_fraction(f"plan_fleet: bypass_screening[{cid!r}][{policy!r}]", acc)
    severity = severity or SiteSeverity.uniform()
    maps: dict[str, FaultMap] = {}
    for m in chips:
        if not isinstance(m, FaultMap):
            raise TypeError(f"plan_fleet: chips must be FaultMap objects, got {type(m).__name__}")
        if m.chip_id is None:
            raise ValueError("plan_fleet: every fault map needs a chip_id")
        if m.chip_id in maps:
            raise ValueError(f"plan_fleet: duplicate chip_id {m.chip_id!r}")
        if m.array != chips[0].array:
            raise ValueError(f"plan_fleet: chip {m.chip_id!r} has array {m.array}, expected {chips[0].array}")
        if m.chip_id not in screening:
            raise ValueError(f"plan_fleet: no screening accuracy for chip {m.chip_id!r}")
        maps[m.chip_id] = m
    maps = dict(sorted(maps.items()))
    screened = {cid: float(screening[cid]) for cid in maps}
    policies: dict[str, str] = {}
    bypassed: dict[str, list[list[int]]] = {}
    for cid, by_policy in (bypass_screening or {}).items():
        if cid not in maps:
            continue
        pes = {p: bypassed_pes(maps[cid], p) for p in BYPASS_POLICIES if p in by_policy}
        # best accuracy; a tie goes to the policy that bypasses fewer PEs (then the earlier one)
        best = min(pes, key=lambda p: (-float(by_policy[p]), len(pes[p]), BYPASS_POLICIES.index(p)), default=None)
        if best is not None and float(by_policy[best]) > screened[cid]:
            policies[cid], screened[cid] = best, float(by_policy[best])
            bypassed[cid] = [list(pe) for pe in pes[best]]
            maps[cid] = bypass_pes(maps[cid], pes[best])
    rmap, thr = resilience_map, constraint.threshold(resilience_map.baseline)
    smallest_positive = rmap.smallest_positive_epochs

    states: dict[str, ChipState] = {}
    for cid, m in maps.items():
        acc = screened[cid]
        if meets(acc, thr):
            states[cid] = ChipState(
                cid, NEEDS_NOTHING, acc, severity.effective_rate(m), 0, accuracy=acc, best_accuracy=acc
            )
            states[cid].served_by = (served_by or {}).get(cid, "base")
        else:
            rate = chip_effective_rate(m, acc, severity, rmap, placement)
            need = rmap.required_epochs(rate, constraint) if math.isfinite(rate) else None
            own_epochs = None if need is None else max(need, smallest_positive)
            states[cid] = ChipState(cid, PLANNED, acc, rate, own_epochs, best_accuracy=acc)
        states[cid].bypass, states[cid].bypassed = policies.get(cid), bypassed.get(cid, [])

    fixable = [c for c, s in states.items() if s.status == PLANNED and s.epochs is not None]
    beyond = [c for c, s in states.items() if s.status == PLANNED and s.epochs is None]
    fat_epochs = max((states[c].epochs or 0 for c in fixable), default=rmap.largest_epochs)

    packed = group_chips(fixable, maps, states, rmap, constraint, severity, settings, max_group_size)
    packed += [([c], states[c].effective_rate, fat_epochs) for c in beyond]
    packed.sort(key=lambda g: (-g[2], sorted(g[0])))
    groups = []
    for i, (members, rate, epochs) in enumerate(packed):
        is_beyond = members[0] in beyond
        reason = "beyond_map" if is_beyond else ("grouped" if len(members) > 1 else "alone")
        g = make_group(f"r0-g{i:06d}", members, maps, states, epochs, rate, settings, reason=reason, protect=is_beyond)
        groups.append(g)
        for c in members:
            states[c].group_id = g.group_id
    # Never more epochs than per-chip FAT, by construction (a group forms only when cheaper than its
    # members alone); the tests check it, so it is not asserted here.
    return Plan(constraint, rmap, severity, settings, maps, states, groups, fat_epochs)
