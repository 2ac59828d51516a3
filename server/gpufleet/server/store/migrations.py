"""Numbered schema migrations. Append new ones; never edit or reorder applied ones.

Each migration runs in its own transaction together with the insert of its version into
`schema_version`, so a crash leaves the schema at a whole version.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    """One schema step."""

    version: int
    """1, 2, 3...: applied in order, each exactly once."""
    description: str
    """What it changes, for the log."""
    statements: tuple[str, ...]
    """SQL statements, run one by one inside one transaction."""


# Times are integer microseconds since the Unix epoch; labels and uuid lists are JSON text;
# specs and GPU lists are serialized protobuf messages.
_INITIAL = Migration(
    version=1,
    description="deployments, change log, nodes, instances",
    statements=(
        """
        CREATE TABLE store_meta (
            key TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        ) STRICT
        """,
        # revision: the store-wide counter; compacted_revision: events up to it are gone.
        "INSERT INTO store_meta (key, value) VALUES ('revision', 0), ('compacted_revision', 0)",
        """
        CREATE TABLE deployments (
            name TEXT PRIMARY KEY,
            labels TEXT NOT NULL,
            spec BLOB NOT NULL,
            revision INTEGER NOT NULL,
            generation INTEGER NOT NULL,
            observed_generation INTEGER NOT NULL DEFAULT 0,
            create_time_us INTEGER NOT NULL,
            update_time_us INTEGER NOT NULL,
            delete_time_us INTEGER,
            invoke_token_sha256 TEXT NOT NULL
        ) STRICT
        """,
        """
        CREATE TABLE events (
            revision INTEGER PRIMARY KEY,
            type TEXT NOT NULL CHECK (type IN ('CREATED', 'UPDATED', 'DELETED')),
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            payload BLOB NOT NULL
        ) STRICT
        """,
        """
        CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            labels TEXT NOT NULL,
            secret_sha256 TEXT NOT NULL,
            state INTEGER NOT NULL,
            cpu_millis INTEGER NOT NULL DEFAULT 0,
            memory_mib INTEGER NOT NULL DEFAULT 0,
            agent_version TEXT NOT NULL DEFAULT '',
            advertise_host TEXT NOT NULL DEFAULT '',
            gpus BLOB NOT NULL,
            register_time_us INTEGER NOT NULL,
            last_heartbeat_us INTEGER
        ) STRICT
        """,
        """
        CREATE TABLE instances (
            id TEXT PRIMARY KEY,
            deployment TEXT NOT NULL REFERENCES deployments (name),
            node_id TEXT NOT NULL REFERENCES nodes (id),
            generation INTEGER NOT NULL,
            state INTEGER NOT NULL,
            reason TEXT NOT NULL DEFAULT '',
            gpu_uuids TEXT NOT NULL,
            address TEXT NOT NULL DEFAULT '',
            pid INTEGER NOT NULL DEFAULT 0,
            restart_count INTEGER NOT NULL DEFAULT 0,
            crash_loop INTEGER NOT NULL DEFAULT 0,
            gpu_memory_reserved_mib INTEGER NOT NULL DEFAULT 0,
            gpu_memory_used_mib INTEGER NOT NULL DEFAULT 0,
            sm_utilization_percent INTEGER NOT NULL DEFAULT 0,
            gpu_memory_overrun INTEGER NOT NULL DEFAULT 0,
            create_time_us INTEGER NOT NULL,
            update_time_us INTEGER NOT NULL,
            ready_time_us INTEGER,
            spec BLOB NOT NULL
        ) STRICT
        """,
        "CREATE INDEX instances_by_deployment ON instances (deployment, id)",
        "CREATE INDEX instances_by_node ON instances (node_id)",
    ),
)

# The node side: the reconciler's status of each deployment, the control plane's intent for
# each instance (draining: told to stop; lost: its node was lost and it was replaced), and
# join tokens (only their hashes).
_NODE_SIDE = Migration(
    version=2,
    description="deployment status, instance draining/lost flags, join tokens",
    statements=(
        # Serialized DeploymentStatus written by the reconciler; NULL until it writes one.
        "ALTER TABLE deployments ADD COLUMN status BLOB",
        "ALTER TABLE instances ADD COLUMN draining INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE instances ADD COLUMN lost INTEGER NOT NULL DEFAULT 0",
        """
        CREATE TABLE join_tokens (
            token_sha256 TEXT PRIMARY KEY,
            create_time_us INTEGER NOT NULL,
            expire_time_us INTEGER
        ) STRICT
        """,
    ),
)

MIGRATIONS: tuple[Migration, ...] = (_INITIAL, _NODE_SIDE)
"""Every migration, by version."""
