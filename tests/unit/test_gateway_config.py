from __future__ import annotations

import asyncio

import pytest
from google.protobuf.duration_pb2 import Duration

from gpufleet.gateway.clock import LoopClock, ManualClock
from gpufleet.gateway.config import AdmissionConfig, ScalingConfig
from gpufleet.gateway.errors import Code, GatewayError, Reason
from gpufleet.v1 import deployment_pb2


def test_admission_defaults_from_an_empty_spec() -> None:
    config = AdmissionConfig.from_spec(deployment_pb2.TrafficSpec(), deployment_pb2.ScalingSpec())
    assert config == AdmissionConfig(
        max_request_concurrency=1,
        max_streams_per_connection=0,
        max_queue_size=100,
        queue_timeout_s=60.0,
        rate_limit_per_second=0.0,
        rate_limit_burst=0,
        max_instances=1,
    )


def test_admission_explicit_zeroes_differ_from_unset() -> None:
    traffic = deployment_pb2.TrafficSpec(
        max_request_concurrency=4,
        max_streams_per_connection=2,
        max_queue_size=0,
        queue_timeout=Duration(seconds=0),
        rate_limit_per_second=2.5,
        rate_limit_burst=7,
    )
    config = AdmissionConfig.from_spec(traffic, deployment_pb2.ScalingSpec(max_instances=3))
    assert config == AdmissionConfig(4, 2, 0, 0.0, 2.5, 7, 3)


def test_admission_duration_with_nanos() -> None:
    traffic = deployment_pb2.TrafficSpec(queue_timeout=Duration(seconds=1, nanos=500_000_000))
    assert AdmissionConfig.from_spec(traffic, deployment_pb2.ScalingSpec()).queue_timeout_s == 1.5


def test_scaling_defaults_from_an_empty_spec() -> None:
    config = ScalingConfig.from_spec(deployment_pb2.ScalingSpec(), deployment_pb2.TrafficSpec())
    assert config == ScalingConfig(
        min_instances=0,
        max_instances=1,
        target_concurrency=1.0,
        idle_retention_s=300.0,
        scale_up_delay_s=0.0,
        scale_down_delay_s=60.0,
    )


def test_scaling_target_falls_back_to_max_request_concurrency() -> None:
    scaling = deployment_pb2.ScalingSpec(
        min_instances=1,
        max_instances=4,
        idle_retention=Duration(seconds=0),
        scale_up_delay=Duration(seconds=5),
        scale_down_delay=Duration(seconds=0),
    )
    traffic = deployment_pb2.TrafficSpec(max_request_concurrency=8)
    assert ScalingConfig.from_spec(scaling, traffic) == ScalingConfig(1, 4, 8.0, 0.0, 5.0, 0.0)
    scaling.target_concurrency = 3
    assert ScalingConfig.from_spec(scaling, traffic).target_concurrency == 3.0


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        (dict(max_request_concurrency=0), "max_request_concurrency must be >= 1"),
        (dict(max_streams_per_connection=-1), "max_streams_per_connection"),
        (dict(max_queue_size=-1), "max_queue_size"),
        (dict(queue_timeout_s=-0.1), "queue_timeout_s"),
        (dict(queue_timeout_s=float("inf")), "queue_timeout_s"),
        (dict(rate_limit_per_second=float("nan")), "rate_limit_per_second"),
        (dict(rate_limit_burst=-2), "rate_limit_burst"),
        (dict(max_instances=0), "max_instances"),
    ],
)
def test_admission_rejects_out_of_range(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        AdmissionConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        (dict(min_instances=-1), "min_instances must be >= 0"),
        (dict(max_instances=0), "max_instances must be >= 1"),
        (dict(min_instances=3, max_instances=2), "min_instances must be <= max_instances"),
        (dict(target_concurrency=0), "target_concurrency"),
        (dict(idle_retention_s=-1), "idle_retention_s"),
        (dict(scale_up_delay_s=float("nan")), "scale_up_delay_s"),
        (dict(scale_down_delay_s=-5), "scale_down_delay_s"),
    ],
)
def test_scaling_rejects_out_of_range(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        ScalingConfig(**kwargs)


def test_gateway_error_carries_everything_the_status_needs() -> None:
    error = GatewayError(
        Reason.QUEUE_FULL, Code.RESOURCE_EXHAUSTED, "full", retry_pushback_ms=250,
        metadata={"deployment": "echo"},
    )
    assert str(error) == "full"
    assert (error.reason, error.code) == ("QUEUE_FULL", "RESOURCE_EXHAUSTED")
    assert error.retry_pushback_ms == 250
    assert error.metadata == {"deployment": "echo"}
    assert "QUEUE_FULL" in repr(error)


def test_codes_are_grpc_status_code_names() -> None:
    import grpc

    for code in Code:
        assert grpc.StatusCode[code.value].name == code.value


def test_manual_clock_fires_timers_in_order_and_skips_cancelled() -> None:
    clock = ManualClock(start=0.0)
    fired = []
    clock.call_at(2.0, lambda: fired.append(("b", clock.now())))
    clock.call_at(1.0, lambda: fired.append(("a", clock.now())))
    cancelled = clock.call_at(1.5, lambda: fired.append(("x", clock.now())))
    clock.call_at(2.0, lambda: fired.append(("c", clock.now())))
    cancelled.cancel()
    assert clock.pending_timers == 3
    clock.advance(1.0)
    assert fired == [("a", 1.0)]
    clock.advance(5.0)
    assert fired == [("a", 1.0), ("b", 2.0), ("c", 2.0)]
    assert clock.now() == 6.0 and clock.pending_timers == 0
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-1)


async def test_loop_clock_uses_the_running_loop() -> None:
    clock = LoopClock()
    loop = asyncio.get_running_loop()
    assert abs(clock.now() - loop.time()) < 1.0
    fired = asyncio.Event()
    clock.call_at(clock.now(), fired.set)
    await asyncio.wait_for(fired.wait(), timeout=5)
