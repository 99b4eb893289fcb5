"""faultfleet planner: eFAT resilience maps and retraining epochs, TRE-Map fusion and
schedules, fleet grouping, verification replans, and a synthetic fleet generator.

A pure library: numpy, scikit-learn (and matplotlib for plots) and the torch-free
fault types of `accelerator.faults`. No torch, no database.
"""

from planner.constraint import AccuracyConstraint, meets, meets_each
from planner.plan import ChipState, Group, Plan, PlanSettings, group_deployment, plan_fleet
from planner.replan import replan
from planner.resilience import CellTask, MeasureCell, ResilienceMap
from planner.schedules import (
    AllAtOnce,
    InjectionSchedule,
    ProgressiveUnion,
    SampleMembers,
    all_at_once,
    fuse_fault_maps,
    progressive_union,
    sample_members,
    schedule_from_spec,
)
from planner.severity import (
    SiteSeverity,
    measure_site_severity,
    screening_equivalent_rate,
    severity_from_measurements,
    severity_tasks,
)
from planner.synthetic_fleet import FaultMix, FleetSpec, generate_fleet, read_ndjson, sample_fault_map, write_ndjson

__all__ = [
    "AccuracyConstraint",
    "AllAtOnce",
    "CellTask",
    "ChipState",
    "FaultMix",
    "FleetSpec",
    "Group",
    "InjectionSchedule",
    "MeasureCell",
    "Plan",
    "PlanSettings",
    "ProgressiveUnion",
    "ResilienceMap",
    "SampleMembers",
    "SiteSeverity",
    "all_at_once",
    "fuse_fault_maps",
    "generate_fleet",
    "group_deployment",
    "measure_site_severity",
    "meets",
    "meets_each",
    "plan_fleet",
    "progressive_union",
    "read_ndjson",
    "replan",
    "sample_fault_map",
    "sample_members",
    "schedule_from_spec",
    "screening_equivalent_rate",
    "severity_from_measurements",
    "severity_tasks",
    "write_ndjson",
]
