"""InstanceSpec construction from protos, probe defaults, env building, JSON round trip."""

from __future__ import annotations

import json

import pytest
from google.protobuf import duration_pb2
from hypothesis import given
from hypothesis import strategies as st

from gpufleet.agent.runtime.env import build_instance_env, mps_memory_limit_value
from gpufleet.agent.runtime.spec import (
    DEFAULT_READINESS_PROBE,
    ExecAction,
    GrpcAction,
    HttpGetAction,
    InstanceSpec,
    ProbeSpec,
    TcpAction,
    instance_spec_from_assignment,
    spec_from_json,
    spec_to_json,
)
from gpufleet.v1 import deployment_pb2, node_service_pb2


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def test_probe_from_proto_applies_documented_defaults() -> None:
    probe = ProbeSpec.from_proto(
        deployment_pb2.Probe(tcp_socket=deployment_pb2.TcpSocketProbeAction(port=81))
    )
    assert probe == ProbeSpec(
        action=TcpAction(port=81),
        initial_delay=0.0,
        period=1.0,
        timeout=1.0,
        failure_threshold=3,
        success_threshold=1,
    )


def test_probe_from_proto_keeps_explicit_timing() -> None:
    probe = ProbeSpec.from_proto(
        deployment_pb2.Probe(
            http_get=deployment_pb2.HttpGetProbeAction(path="/healthz"),
            initial_delay=_seconds(2.5),
            period=_seconds(0.1),
            timeout=_seconds(0.3),
            failure_threshold=7,
            success_threshold=2,
        )
    )
    assert probe.action == HttpGetAction(port=0, path="/healthz")
    assert (probe.initial_delay, probe.period, probe.timeout) == (2.5, 0.1, 0.3)
    assert (probe.failure_threshold, probe.success_threshold) == (7, 2)


def test_probe_from_proto_each_action() -> None:
    grpc_probe = deployment_pb2.Probe(grpc=deployment_pb2.GrpcProbeAction(service="m"))
    assert ProbeSpec.from_proto(grpc_probe).action == GrpcAction(port=0, service="m")
    http_probe = deployment_pb2.Probe(http_get=deployment_pb2.HttpGetProbeAction(port=9))
    assert ProbeSpec.from_proto(http_probe).action == HttpGetAction(port=9, path="/")
    exec_probe = deployment_pb2.Probe(exec=deployment_pb2.ExecProbeAction(command=["true", "x"]))
    assert ProbeSpec.from_proto(exec_probe).action == ExecAction(command=("true", "x"))


def test_probe_from_proto_rejects_missing_action_and_empty_exec() -> None:
    with pytest.raises(ValueError, match="no action"):
        ProbeSpec.from_proto(deployment_pb2.Probe(period=_seconds(1)))
    with pytest.raises(ValueError, match="empty command"):
        ProbeSpec.from_proto(deployment_pb2.Probe(exec=deployment_pb2.ExecProbeAction()))


def _assignment(**spec_fields: object) -> node_service_pb2.InstanceAssignment:
    return node_service_pb2.InstanceAssignment(
        instance_id="echo-1",
        deployment="echo",
        generation=4,
        gpu_uuids=["GPU-a"],
        gpu_memory_mib=2048,
        env={"A": "from-assignment"},
        spec=deployment_pb2.DeploymentSpec(
            command="python serve.py", **spec_fields  # type: ignore[arg-type]
        ),
    )


def test_from_assignment_share_sets_mps_limits_and_defaults() -> None:
    assignment = _assignment(
        gpu=deployment_pb2.GpuRequest(memory_mib=2048, core_percent=25),
        env={"A": "from-spec", "B": "b"},
    )
    spec = instance_spec_from_assignment(assignment, picked_port=41000)
    assert spec.instance_id == "echo-1"
    assert spec.deployment == "echo"
    assert spec.generation == 4
    assert spec.command == "python serve.py"
    assert spec.port == 41000
    assert spec.env == {"A": "from-assignment", "B": "b"}
    assert spec.gpu_uuids == ("GPU-a",)
    assert (spec.mps_core_percent, spec.mps_memory_limit_mib) == (25, 2048)
    assert spec.gpu_memory_mib == 2048
    assert spec.readiness == DEFAULT_READINESS_PROBE
    assert spec.liveness is None and spec.startup is None
    assert spec.termination_grace_period == 30.0
    assert not spec.draining


def test_from_assignment_whole_gpu_has_no_mps_limits_and_keeps_fixed_port() -> None:
    assignment = _assignment(
        gpu=deployment_pb2.GpuRequest(count=1),
        port=8001,
        termination_grace_period=_seconds(0),
        liveness_probe=deployment_pb2.Probe(tcp_socket=deployment_pb2.TcpSocketProbeAction()),
    )
    spec = instance_spec_from_assignment(assignment, picked_port=41000)
    assert (spec.mps_core_percent, spec.mps_memory_limit_mib) == (0, 0)
    assert spec.port == 8001
    assert spec.termination_grace_period == 0.0
    assert spec.liveness is not None and spec.liveness.action == TcpAction()


def test_from_assignment_rejects_images() -> None:
    assignment = node_service_pb2.InstanceAssignment(
        instance_id="x-1", deployment="x", spec=deployment_pb2.DeploymentSpec(image="nginx")
    )
    with pytest.raises(ValueError, match="set spec.command"):
        instance_spec_from_assignment(assignment)


def test_env_is_explicit_and_agent_owned_vars_win() -> None:
    spec = InstanceSpec(
        instance_id="echo-1",
        deployment="echo",
        generation=1,
        command="true",
        env={"CUDA_VISIBLE_DEVICES": "all", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100", "X": "1"},
        gpu_uuids=("GPU-a",),
        mps_core_percent=25,
        mps_memory_limit_mib=2048,
    )
    agent_env = {"PATH": "/bin", "HOME": "/root", "LANG": "C.UTF-8", "SECRET_TOKEN": "t"}
    env = build_instance_env(spec, 4321, agent_env)
    assert env == {
        "PATH": "/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "X": "1",
        "CUDA_VISIBLE_DEVICES": "GPU-a",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=2048M",
        "PORT": "4321",
        "GPUFLEET_INSTANCE_ID": "echo-1",
        "GPUFLEET_DEPLOYMENT": "echo",
    }


def test_env_without_gpu_hides_all_gpus_and_sets_no_mps() -> None:
    spec = InstanceSpec(
        instance_id="cpu-1",
        deployment="cpu",
        generation=1,
        command="true",
        env={"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=99999M"},
        mps_memory_limit_mib=1024,
    )
    env = build_instance_env(spec, 1, {})
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in env
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in env


def test_mps_memory_limit_lists_every_visible_device() -> None:
    assert mps_memory_limit_value(2, 512) == "0=512M,1=512M"


_names = st.text(alphabet="abc-_0123456789", min_size=1, max_size=12)
_probes = st.none() | st.builds(
    ProbeSpec,
    action=st.one_of(
        st.builds(GrpcAction, port=st.integers(0, 65535), service=st.text(max_size=5)),
        st.builds(HttpGetAction, port=st.integers(0, 65535), path=st.just("/x")),
        st.builds(TcpAction, port=st.integers(0, 65535)),
        st.builds(ExecAction, command=st.lists(st.text(max_size=4), min_size=1).map(tuple)),
    ),
    initial_delay=st.floats(0, 100),
    period=st.floats(0.1, 100),
    timeout=st.floats(0.1, 100),
    failure_threshold=st.integers(1, 1000),
    success_threshold=st.integers(1, 1000),
)


@given(
    spec=st.builds(
        InstanceSpec,
        instance_id=_names,
        deployment=_names,
        generation=st.integers(0, 2**40),
        command=st.text(max_size=20),
        port=st.integers(0, 65535),
        env=st.dictionaries(_names, st.text(max_size=8), max_size=3),
        gpu_uuids=st.lists(_names, max_size=2).map(tuple),
        mps_core_percent=st.integers(0, 100),
        mps_memory_limit_mib=st.integers(0, 2**20),
        gpu_memory_mib=st.integers(0, 2**20),
        readiness=_probes,
        liveness=_probes,
        startup=_probes,
        termination_grace_period=st.floats(0, 3600),
        draining=st.booleans(),
        restart_on_gpu_memory_overrun=st.booleans(),
    )
)
def test_spec_json_round_trip(spec: InstanceSpec) -> None:
    assert spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec
