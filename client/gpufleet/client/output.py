"""Rendering of API objects for the CLI: tables, JSON, YAML and watch event lines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TextIO

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from gpufleet.v1 import deployment_pb2, deployment_service_pb2, instance_pb2

DataFormat = Literal["json", "yaml"]


@dataclass(frozen=True)
class Table:
    """Rows of cells under column headers, all as text."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def message_dict(message: Message) -> dict[str, Any]:
    """A message as plain data, with the proto field names (as spec files use them)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def dumps(data: object, fmt: DataFormat) -> str:
    """``data`` as JSON or YAML text ending in a newline."""
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def deployments_table(deployments: Sequence[deployment_pb2.Deployment], now: datetime) -> Table:
    """The deployment list view; ``now`` (timezone aware) dates the AGE column.

    PHASE is Standby (no instance; the next call starts one), Starting, Running, Draining
    or Failed; READY is ready/desired instances; QUEUED and IN-FLIGHT are the calls waiting
    in and passing through the gateways, as they last reported.
    """
    rows = tuple(
        (
            d.name,
            phase_name(d.status.phase),
            f"{d.status.ready_instances}/{d.status.desired_instances}",
            str(d.status.queue_depth),
            str(d.status.in_flight),
            f"{d.spec.scaling.min_instances}-{d.spec.scaling.max_instances}",
            gpu_summary(d.spec.gpu),
            str(d.revision),
            age(d.create_time, now) if d.HasField("create_time") else "-",
        )
        for d in deployments
    )
    return Table(
        ("NAME", "PHASE", "READY", "QUEUED", "IN-FLIGHT", "MIN-MAX", "GPU", "REVISION", "AGE"),
        rows,
    )


def status_message_line(deployment: deployment_pb2.Deployment) -> str:
    """The status message as its own line under `gpufleet get`'s table; empty without one."""
    message = deployment.status.message.strip()
    return f"message: {message}\n" if message else ""


def phase_name(phase: deployment_pb2.DeploymentPhase.ValueType) -> str:
    """``DEPLOYMENT_PHASE_RUNNING`` -> ``Running``; unreconciled shows as ``Pending``."""
    if phase == deployment_pb2.DEPLOYMENT_PHASE_UNSPECIFIED:
        return "Pending"
    name = deployment_pb2.DeploymentPhase.Name(phase)
    return name.removeprefix("DEPLOYMENT_PHASE_").capitalize()


def gpu_summary(gpu: deployment_pb2.GpuRequest) -> str:
    """Whole cards as ``2 GPU``, a share as ``2048 MiB 25%``, none as ``-``."""
    if gpu.count:
        return f"{gpu.count} GPU"
    if gpu.memory_mib:
        share = f" {gpu.core_percent}%" if gpu.core_percent else ""
        return f"{gpu.memory_mib} MiB{share}"
    return "-"


def age(since: Timestamp, now: datetime) -> str:
    """Elapsed time in its largest unit: ``45s``, ``12m``, ``3h``, ``9d``."""
    seconds = max(int((now - since.ToDatetime(tzinfo=now.tzinfo)).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def event_line(event: deployment_service_pb2.WatchEventsResponse) -> str:
    """One watch event as a line: revision, type, object and its state."""
    kind = deployment_service_pb2.EventType.Name(event.type).removeprefix("EVENT_TYPE_")
    which = event.WhichOneof("object")
    if which == "deployment":
        subject = f"deployment/{event.deployment.name}"
        state = phase_name(event.deployment.status.phase)
    elif which == "instance":
        subject = f"instance/{event.instance.id}"
        state = instance_state_name(event.instance.state)
    else:
        subject, state = "-", ""
    return f"{event.revision:>8}  {kind:<13}  {subject}  {state}".rstrip()


def instance_state_name(state: instance_pb2.InstanceState.ValueType) -> str:
    """``INSTANCE_STATE_READY`` -> ``Ready``; unknown shows as ``-``."""
    if state == instance_pb2.INSTANCE_STATE_UNSPECIFIED:
        return "-"
    return instance_pb2.InstanceState.Name(state).removeprefix("INSTANCE_STATE_").capitalize()


def plain_table(table: Table) -> str:
    """Columns aligned with spaces, for pipes and tests."""
    widths = [len(column) for column in table.columns]
    for row in table.rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    lines = [
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (table.columns, *table.rows)
    ]
    return "\n".join(lines) + "\n"


def render_table(table: Table, stream: TextIO) -> None:
    """A rich table on a terminal, plain aligned text otherwise."""
    if not stream.isatty():
        stream.write(plain_table(table))
        return
    from rich.console import Console
    from rich.table import Table as RichTable

    rich_table = RichTable(box=None, header_style="bold")
    for column in table.columns:
        rich_table.add_column(column)
    for row in table.rows:
        rich_table.add_row(*row)
    Console(file=stream).print(rich_table)
