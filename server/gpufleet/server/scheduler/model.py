"""Scheduler inputs and outputs: an immutable snapshot and requests in, a plan out.

Everything here is a frozen, keyword-only dataclass so that a snapshot can be shared
between threads and a plan can be logged or persisted as it is. Units follow the protos:
memory in MiB, CPU in millicores, SM share in percent of one GPU.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class SpreadPolicy(enum.Enum):
    """How to rank the nodes and GPUs that pass every filter (see ranking.py)."""

    BINPACK = "binpack"
    """Fill the fullest GPU (then node) that fits, to keep whole GPUs free."""
    SPREAD = "spread"
    """Use the emptiest GPU (then node), to limit the blast radius of a failure."""


def _check_non_negative(what: str, values: Mapping[str, int]) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{what}: {name} is {value}; it must be 0 or more")


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuState:
    """One GPU as the control plane last saw it."""

    uuid: str
    """NVML uuid; unique in the cluster."""
    index: int
    """NVML index on its node; unique on the node."""
    memory_total_mib: int
    """Memory capacity."""
    memory_reserved_mib: int = 0
    """Sum of the memory requests of instances placed on this GPU."""
    memory_measured_mib: int = 0
    """Memory in use as NVML reports it. When it exceeds the reservation (a neighbour
    overran its request, or a process outside gpufleet), it is what limits free memory."""
    core_reserved_percent: int = 0
    """Sum of the SM shares of instances placed on this GPU."""
    exclusive_owner: str | None = None
    """Instance holding this GPU whole, if any."""
    healthy: bool = True
    """False when NVML reported the GPU lost; such GPUs take no new instances."""

    def __post_init__(self) -> None:
        if not self.uuid:
            raise ValueError("GpuState: uuid is empty; pass the NVML uuid of the GPU")
        _check_non_negative(
            f"GpuState {self.uuid}",
            {
                "index": self.index,
                "memory_total_mib": self.memory_total_mib,
                "memory_reserved_mib": self.memory_reserved_mib,
                "memory_measured_mib": self.memory_measured_mib,
                "core_reserved_percent": self.core_reserved_percent,
            },
        )

    @property
    def memory_free_mib(self) -> int:
        """Capacity minus the larger of reserved and measured use, never below 0."""
        used = max(self.memory_reserved_mib, self.memory_measured_mib)
        return max(0, self.memory_total_mib - used)

    @property
    def untouched(self) -> bool:
        """No owner and nothing reserved: the GPU can be taken whole.

        Measured memory is deliberately not part of this: an idle card shows driver and
        context overhead in NVML, so requiring zero would reject every real GPU.
        """
        return (
            self.exclusive_owner is None
            and self.memory_reserved_mib == 0
            and self.core_reserved_percent == 0
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeState:
    """One node: its labels, host resources and GPUs."""

    node_id: str
    """Id given at registration; ties between equal candidates go to the smaller id."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Labels matched by node selectors."""
    schedulable: bool = True
    """False for cordoned, suspect or lost nodes: they take no new instances."""
    cpu_millis_total: int = 0
    """Allocatable CPU."""
    cpu_millis_reserved: int = 0
    """CPU requested by instances already placed here."""
    memory_mib_total: int = 0
    """Allocatable host memory."""
    memory_mib_reserved: int = 0
    """Host memory requested by instances already placed here."""
    gpus: tuple[GpuState, ...] = ()
    """GPUs of the node, any order."""

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("NodeState: node_id is empty; pass the id given at registration")
        _check_non_negative(
            f"NodeState {self.node_id}",
            {
                "cpu_millis_total": self.cpu_millis_total,
                "cpu_millis_reserved": self.cpu_millis_reserved,
                "memory_mib_total": self.memory_mib_total,
                "memory_mib_reserved": self.memory_mib_reserved,
            },
        )
        indexes = [gpu.index for gpu in self.gpus]
        if len(set(indexes)) != len(indexes):
            raise ValueError(
                f"NodeState {self.node_id}: GPU indexes {sorted(indexes)} repeat; "
                "each GPU of a node needs its own NVML index"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSnapshot:
    """The cluster at one moment. The scheduler never changes it."""

    nodes: tuple[NodeState, ...]
    """All known nodes, schedulable or not (unschedulable ones are counted in failures)."""
    deployment_instances: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Instances already running per deployment, per node id: used only for host spread.
    Their resources are already in the node and GPU reservations."""

    def __post_init__(self) -> None:
        node_ids = [node.node_id for node in self.nodes]
        if len(set(node_ids)) != len(node_ids):
            raise ValueError("ClusterSnapshot: node ids repeat; each node must appear once")
        uuids = [gpu.uuid for node in self.nodes for gpu in node.gpus]
        if len(set(uuids)) != len(uuids):
            raise ValueError(
                "ClusterSnapshot: GPU uuids repeat across nodes; each GPU must appear once"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceRequest:
    """One instance to place, with its deployment's resource request.

    Three kinds: whole GPUs (``gpus`` > 0, exclusive cards on one node), a GPU share
    (``gpu_memory_mib`` > 0, optional ``gpu_core_percent``, on one GPU), or no GPU.
    """

    instance_id: str
    """Unique within one schedule() call."""
    deployment: str
    """Deployment name; instances of one deployment are spread across nodes."""
    gpus: int = 0
    """Whole, exclusive GPUs, all on one node."""
    gpu_memory_mib: int = 0
    """GPU memory of a share; needs gpus = 0."""
    gpu_core_percent: int = 0
    """SM share, 1-100 percent of one GPU; 0 means not limited. Needs gpu_memory_mib > 0."""
    cpu_millis: int = 0
    """CPU; 0 always fits."""
    memory_mib: int = 0
    """Host memory; 0 always fits."""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    """Labels a node must carry, all with equal values."""
    spread: SpreadPolicy = SpreadPolicy.BINPACK
    """Ranking policy."""

    def __post_init__(self) -> None:
        if not self.instance_id:
            raise ValueError("InstanceRequest: instance_id is empty")
        what = f"InstanceRequest {self.instance_id}"
        _check_non_negative(
            what,
            {
                "gpus": self.gpus,
                "gpu_memory_mib": self.gpu_memory_mib,
                "gpu_core_percent": self.gpu_core_percent,
                "cpu_millis": self.cpu_millis,
                "memory_mib": self.memory_mib,
            },
        )
        if self.gpus > 0 and (self.gpu_memory_mib > 0 or self.gpu_core_percent > 0):
            raise ValueError(
                f"{what}: asks for {self.gpus} whole GPUs and a share; "
                "set either gpus or gpu_memory_mib (+ gpu_core_percent), not both"
            )
        if self.gpu_core_percent > 100:
            raise ValueError(
                f"{what}: gpu_core_percent is {self.gpu_core_percent}; it must be 0-100"
            )
        if self.gpu_core_percent > 0 and self.gpu_memory_mib == 0:
            raise ValueError(
                f"{what}: gpu_core_percent without gpu_memory_mib; a GPU share needs memory"
            )

    @property
    def whole(self) -> bool:
        """Asks for whole, exclusive GPUs."""
        return self.gpus > 0

    @property
    def fractional(self) -> bool:
        """Asks for a share of one GPU."""
        return self.gpu_memory_mib > 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """Where one instance goes."""

    instance_id: str
    deployment: str
    node_id: str
    gpu_uuids: tuple[str, ...]
    """GPUs in NVML index order: the whole cards, the one shared card, or none."""
    exclusive: bool
    """True when gpu_uuids are held whole."""
    colocated_replicas: int
    """Instances of the same deployment already on the node. Above 0 only when every
    node that fits already runs one: host spread could not be honoured."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementFailure:
    """Why one instance was not placed."""

    instance_id: str
    deployment: str
    reason: str
    """One line for people: what was asked, which filters rejected how many nodes, and
    what to change."""
    filter_rejections: Mapping[str, int]
    """Nodes rejected per filter (see filters.Filter). Each node is counted once, under the
    first filter it failed, so the counts add up to nodes_evaluated."""
    nodes_evaluated: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The outcome of one schedule() call."""

    placements: tuple[Placement, ...]
    """In the order they were decided (see planner.placement_order)."""
    failures: tuple[PlacementFailure, ...]
    """In the order they were decided."""
