"""`gpufleet nodes`: nodes with, per GPU, total / reserved / measured memory, SM % and instances."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from gpufleet.client.cli.context import connect
from gpufleet.client.cli.errors import EXIT_OK
from gpufleet.client.cli.options import Subparsers, add_command, output_format
from gpufleet.client.output import Table, age, dumps, message_dict, render_table
from gpufleet.v1 import node_pb2

COLUMNS = (
    "NODE",
    "NAME",
    "STATE",
    "HEARTBEAT",
    "GPU",
    "TOTAL MiB",
    "RESERVED MiB",
    "USED MiB",
    "SM%",
    "INSTANCES",
)


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    return add_command(
        subparsers,
        "nodes",
        help="list nodes and the use of each GPU",
        description="List every registered node, one row per GPU: its total memory, the memory "
        "reserved by placed instances, the memory NVML measures in use (the sum of declared "
        "requests on simulated GPUs), SM utilisation and the instances sharing it.",
        example="  gpufleet nodes\n  gpufleet nodes -o yaml",
    )


def node_state_name(state: node_pb2.NodeState.ValueType) -> str:
    """``NODE_STATE_READY`` -> ``Ready``; unknown shows as ``-``."""
    if state == node_pb2.NODE_STATE_UNSPECIFIED:
        return "-"
    return node_pb2.NodeState.Name(state).removeprefix("NODE_STATE_").capitalize()


def _gpu_cells(gpu: node_pb2.Gpu) -> tuple[str, ...]:
    health = ""
    if gpu.health in (node_pb2.GPU_HEALTH_DEGRADED, node_pb2.GPU_HEALTH_LOST):
        health = f" ({node_pb2.GpuHealth.Name(gpu.health).removeprefix('GPU_HEALTH_').lower()})"
    return (
        f"{gpu.index}{health}",
        str(gpu.memory_total_mib),
        str(gpu.memory_reserved_mib),
        str(gpu.memory_used_mib),
        str(gpu.sm_utilization_percent),
        ",".join(gpu.instance_ids) or "-",
    )


def nodes_table(nodes: Sequence[node_pb2.Node], now: datetime) -> Table:
    """One row per GPU; the node's own cells only on its first row. ``now`` is timezone aware."""
    rows: list[tuple[str, ...]] = []
    for node in nodes:
        heartbeat = f"{age(node.last_heartbeat_time, now)} ago" if node.HasField("last_heartbeat_time") else "never"
        head = (node.id, node.name, node_state_name(node.state), heartbeat)
        gpus = sorted(node.gpus, key=lambda gpu: gpu.index)
        if not gpus:
            rows.append((*head, "-", "-", "-", "-", "-", "-"))
            continue
        blank = ("",) * len(head)
        for position, gpu in enumerate(gpus):
            rows.append((*(head if position == 0 else blank), *_gpu_cells(gpu)))
    return Table(COLUMNS, tuple(rows))


def run(args: argparse.Namespace) -> int:
    with connect(args) as client:
        nodes = client.list_nodes()
    fmt = output_format(args)
    if fmt == "table":
        render_table(nodes_table(nodes, datetime.now(UTC)), sys.stdout)
    else:
        sys.stdout.write(dumps([message_dict(node) for node in nodes], fmt))
    return EXIT_OK
