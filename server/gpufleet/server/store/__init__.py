"""Durable control-plane state: the abstract Store contract and its SQLite implementation."""

from gpufleet.server.store.base import Store
from gpufleet.server.store.broadcast import ChangeHub, Subscription, SubscriptionLagged
from gpufleet.server.store.records import (
    ChangeType,
    DeleteResult,
    DeploymentPage,
    DeploymentRecord,
    ObjectKind,
    Snapshot,
    StoredEvent,
)
from gpufleet.server.store.sqlite import SqliteStore

__all__ = [
    "ChangeHub",
    "ChangeType",
    "DeleteResult",
    "DeploymentPage",
    "DeploymentRecord",
    "ObjectKind",
    "Snapshot",
    "SqliteStore",
    "Store",
    "StoredEvent",
    "Subscription",
    "SubscriptionLagged",
]
