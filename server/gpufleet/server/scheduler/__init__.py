"""The GPU scheduler: a pure function from a cluster snapshot and requests to a plan.

No I/O and no protos: callers convert their state into the frozen dataclasses of
model.py, call schedule(), and act on the Plan (persist the placements, report the
failures). See planner.py for the steps, filters.py for feasibility and ranking.py for
the scores.
"""

from gpufleet.server.scheduler.filters import Filter
from gpufleet.server.scheduler.model import (
    ClusterSnapshot,
    GpuState,
    InstanceRequest,
    NodeState,
    Placement,
    PlacementFailure,
    Plan,
    SpreadPolicy,
)
from gpufleet.server.scheduler.planner import placement_order, schedule

__all__ = [
    "ClusterSnapshot",
    "Filter",
    "GpuState",
    "InstanceRequest",
    "NodeState",
    "Placement",
    "PlacementFailure",
    "Plan",
    "SpreadPolicy",
    "placement_order",
    "schedule",
]
