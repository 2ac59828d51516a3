"""Stubs for other languages from buf.gen.yaml, generated into a temp dir (they are not
committed): TypeScript/ES stubs always, loaded by Node.js and checked on the wire against
the Python stubs; Go stubs where Debian's protoc-gen-go and protoc-gen-go-grpc are
installed (`make stubs` installs them when run as root)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.v1 import deployment_pb2

REPO = Path(__file__).resolve().parents[2]
BUF = REPO / "node_modules" / ".bin" / "buf"
TEMPLATE = REPO / "buf.gen.yaml"
NODE = shutil.which("node")
GO_PLUGINS = ("protoc-gen-go", "protoc-gen-go-grpc")
TIMEOUT_S = 120
PROTO_FILES = ("deployment", "deployment_service", "instance", "node", "node_service",
               "routing_service")

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        NODE is None,
        reason="node is not on PATH: stub generation needs Node.js 18+ and `npm install` at "
        "the repository root (make setup does both)",
    ),
]

# Builds a Deployment with the generated ES code and prints its binary form as base64.
ENCODE_SCRIPT = """\
import { create, toBinary } from "@bufbuild/protobuf";
import { DeploymentSchema, SpreadPolicy } from "./clients/ts/gen/gpufleet/v1/deployment_pb.js";
import { DeploymentService } from "./clients/ts/gen/gpufleet/v1/deployment_service_pb.js";

const deployment = create(DeploymentSchema, {
  name: "from-ts",
  labels: { team: "web" },
  spec: {
    command: "python -m examples.model_server --port $PORT",
    gpu: { memoryMib: 2048n, corePercent: 25 },
    scaling: { minInstances: 0, maxInstances: 3, idleRetention: { seconds: 30n } },
    traffic: { maxRequestConcurrency: 2, maxQueueSize: 0 },
    spreadPolicy: SpreadPolicy.SPREAD,
  },
});
const methods = DeploymentService.methods.map((method) => method.name);
process.stdout.write(JSON.stringify({
  binary: Buffer.from(toBinary(DeploymentSchema, deployment)).toString("base64"),
  service: DeploymentService.typeName,
  methods,
}));
"""


def _template() -> dict[str, Any]:
    loaded = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise AssertionError(f"{TEMPLATE} is not a mapping")
    return loaded


def _generate(out: Path, template: dict[str, Any] | None = None) -> None:
    if not BUF.exists():
        raise AssertionError(f"{BUF} is missing: run `npm install` (make setup)")
    args = [str(BUF), "generate", "-o", str(out)]
    if template is not None:
        args += ["--template", json.dumps(template)]
    result = subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert result.returncode == 0, f"buf generate failed:\n{result.stderr}"


def test_typescript_stubs_generate_and_encode_what_python_decodes(tmp_path: Path) -> None:
    template = _template()
    template["plugins"] = [
        plugin for plugin in template["plugins"]
        if str(plugin.get("local", "")).endswith("protoc-gen-es")
    ]
    assert template["plugins"], "buf.gen.yaml has no protoc-gen-es plugin"
    _generate(tmp_path, template)
    generated = tmp_path / "clients" / "ts" / "gen" / "gpufleet" / "v1"
    for name in PROTO_FILES:
        assert (generated / f"{name}_pb.js").is_file()
        assert (generated / f"{name}_pb.d.ts").is_file()
    # The committed package.json makes the generated .js files ES modules; Node resolves
    # @bufbuild/protobuf from a node_modules beside the script.
    shutil.copy(REPO / "clients" / "ts" / "package.json", tmp_path / "clients" / "ts")
    (tmp_path / "node_modules").symlink_to(REPO / "node_modules")
    script = tmp_path / "encode.mjs"
    script.write_text(ENCODE_SCRIPT, encoding="utf-8")
    result = subprocess.run(
        [str(NODE), str(script)], cwd=tmp_path, capture_output=True, text=True,
        timeout=TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["service"] == "gpufleet.v1.DeploymentService"
    assert "CreateDeployment" in output["methods"] and "WatchEvents" in output["methods"]

    decoded = deployment_pb2.Deployment.FromString(base64.b64decode(output["binary"]))
    spec = decoded.spec
    assert (decoded.name, dict(decoded.labels)) == ("from-ts", {"team": "web"})
    assert (spec.gpu.memory_mib, spec.gpu.core_percent) == (2048, 25)
    assert (spec.scaling.max_instances, spec.scaling.idle_retention.seconds) == (3, 30)
    # Presence survives the trip: an explicit 0 queue is not "unset" (which means 100).
    assert spec.traffic.HasField("max_queue_size") and spec.traffic.max_queue_size == 0
    assert spec.spread_policy == deployment_pb2.SPREAD_POLICY_SPREAD


@pytest.mark.skipif(
    any(shutil.which(plugin) is None for plugin in GO_PLUGINS),
    reason="protoc-gen-go / protoc-gen-go-grpc are not on PATH: install Debian's packages "
    "protoc-gen-go and protoc-gen-go-grpc (`make stubs` does when run as root)",
)
def test_full_template_generates_go_and_typescript(tmp_path: Path) -> None:
    _generate(tmp_path)
    go = tmp_path / "clients" / "go" / "gpufleet" / "v1"
    for name in PROTO_FILES:
        text = (go / f"{name}.pb.go").read_text(encoding="utf-8")
        assert text.splitlines()[0].startswith("// Code generated by protoc-gen-go.")
        assert "\npackage gpufleetv1\n" in text
    services = (go / "deployment_service_grpc.pb.go").read_text(encoding="utf-8")
    assert "type DeploymentServiceClient interface" in services
    assert "func NewDeploymentServiceClient(" in services
    for name in ("node_service", "routing_service"):
        assert (go / f"{name}_grpc.pb.go").is_file()
    assert (tmp_path / "clients" / "ts" / "gen" / "gpufleet" / "v1" / "deployment_pb.js").is_file()
