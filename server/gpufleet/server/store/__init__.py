"""Durable control-plane state: the abstract Store contract and its SQLite implementation."""

from gpufleet.server.store.base import Store
from gpufleet.server.store.broadcast import ChangeHub, Subscription, SubscriptionLagged
from gpufleet.server.store.records import (
    ChangeType,
    ClusterRecords,
    DeleteResult,
    DeploymentPage,
    DeploymentRecord,
    InstanceMark,
    InstanceRecord,
    InstanceReport,
    JoinTokenRecord,
    NewInstance,
    NodeRecord,
    ObjectKind,
    ReconcileBatch,
    Snapshot,
    StatusWrite,
    StoredEvent,
)
from gpufleet.server.store.sqlite import SqliteStore

__all__ = [
    "ChangeHub",
    "ChangeType",
    "ClusterRecords",
    "DeleteResult",
    "DeploymentPage",
    "DeploymentRecord",
    "InstanceMark",
    "InstanceRecord",
    "InstanceReport",
    "JoinTokenRecord",
    "NewInstance",
    "NodeRecord",
    "ObjectKind",
    "ReconcileBatch",
    "Snapshot",
    "StatusWrite",
    "SqliteStore",
    "Store",
    "StoredEvent",
    "Subscription",
    "SubscriptionLagged",
]
