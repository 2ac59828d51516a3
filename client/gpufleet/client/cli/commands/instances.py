"""`gpufleet instances [DEPLOYMENT]`: where each instance runs and how it is doing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

from gpufleet.client.cli.context import connect
from gpufleet.client.cli.errors import EXIT_OK
from gpufleet.client.cli.options import Subparsers, add_command, output_format
from gpufleet.client.output import Table, dumps, instance_state_name, message_dict, render_table
from gpufleet.v1 import instance_pb2, node_pb2

COLUMNS = (
    "INSTANCE",
    "DEPLOYMENT",
    "NODE",
    "GPU",
    "STATE",
    "REASON",
    "ADDRESS",
    "PID",
    "RESTARTS",
    "GPU MiB USED/RESERVED",
)


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers,
        "instances",
        help="list instances (of one deployment or all)",
        description="List instances with their node, GPUs (by index on the node), state and "
        "reason, address, pid, restart count, and measured against reserved GPU memory "
        "('!' marks an instance using more than it requested).",
        example="  gpufleet instances\n  gpufleet instances echo -o json",
    )
    parser.add_argument("deployment", nargs="?", default="", help="only this deployment's instances")
    return parser


def gpu_labels(nodes: Sequence[node_pb2.Node]) -> dict[str, str]:
    """GPU uuid -> its index on its node, as `gpufleet nodes` shows GPUs."""
    return {gpu.uuid: str(gpu.index) for node in nodes for gpu in node.gpus}


def _state(instance: instance_pb2.Instance) -> str:
    name = instance_state_name(instance.state)
    return f"{name} (crash loop)" if instance.crash_loop else name


def _memory(instance: instance_pb2.Instance) -> str:
    if not instance.gpu_uuids and not instance.gpu_memory_reserved_mib and not instance.gpu_memory_used_mib:
        return "-"
    overrun = "!" if instance.gpu_memory_overrun else ""
    return f"{instance.gpu_memory_used_mib}/{instance.gpu_memory_reserved_mib}{overrun}"


def instances_table(
    instances: Sequence[instance_pb2.Instance],
    node_names: Mapping[str, str],
    gpu_indexes: Mapping[str, str],
) -> Table:
    """The instance list view; node ids show as names and GPU uuids as indexes when known."""
    rows = tuple(
        (
            instance.id,
            instance.deployment,
            node_names.get(instance.node_id, instance.node_id) or "-",
            ",".join(gpu_indexes.get(uuid, uuid) for uuid in instance.gpu_uuids) or "-",
            _state(instance),
            instance.reason or "-",
            instance.address or "-",
            str(instance.pid) if instance.pid else "-",
            str(instance.restart_count),
            _memory(instance),
        )
        for instance in instances
    )
    return Table(COLUMNS, rows)


def run(args: argparse.Namespace) -> int:
    with connect(args) as client:
        instances = client.list_instances(args.deployment)
        fmt = output_format(args)
        if fmt != "table":
            sys.stdout.write(dumps([message_dict(instance) for instance in instances], fmt))
            return EXIT_OK
        nodes = client.list_nodes()
    names = {node.id: node.name or node.id for node in nodes}
    render_table(instances_table(instances, names, gpu_labels(nodes)), sys.stdout)
    return EXIT_OK
