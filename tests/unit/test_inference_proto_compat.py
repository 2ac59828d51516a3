"""Our inference proto must stay wire-compatible with the one tritonclient was built from.

The two descriptor sets declare the same `inference.*` symbols, so each is loaded in its own
interpreter and compared field by field (number, type, message type, oneof) and RPC by RPC.
"""

from __future__ import annotations

import json
import subprocess
import sys

DUMP = r"""
import importlib, json, sys
mod = importlib.import_module(sys.argv[1])
out = {}
def walk(d, prefix):
    for f in d.fields:
        out[prefix + d.name + "." + f.name] = [
            f.number, f.type, f.message_type.full_name if f.message_type else None,
            f.containing_oneof.name if f.containing_oneof else None,
        ]
    for n in d.nested_types:
        walk(n, prefix + d.name + ".")
for d in mod.DESCRIPTOR.message_types_by_name.values():
    walk(d, "")
for m in mod.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    out["rpc." + m.name] = [m.input_type.full_name, m.output_type.full_name,
                            m.client_streaming, m.server_streaming]
json.dump(out, sys.stdout)
"""


def dump(module: str) -> dict[str, list[object]]:
    result = subprocess.run(
        [sys.executable, "-c", DUMP, module], check=True, capture_output=True, text=True
    )
    loaded: dict[str, list[object]] = json.loads(result.stdout)
    return loaded


def test_every_field_and_rpc_matches_tritonclient() -> None:
    ours = dump("gpufleet.inference.grpc_service_pb2")
    theirs = dump("tritonclient.grpc.service_pb2")
    assert len(ours) > 70
    mismatched = {key: (value, theirs.get(key)) for key, value in ours.items() if theirs.get(key) != value}
    assert mismatched == {}


def test_stream_rpc_is_bidirectional() -> None:
    ours = dump("gpufleet.inference.grpc_service_pb2")
    assert ours["rpc.ModelStreamInfer"] == [
        "inference.ModelInferRequest",
        "inference.ModelStreamInferResponse",
        True,
        True,
    ]
