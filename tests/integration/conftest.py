"""Fixtures for tests that run the real control plane on 127.0.0.1, port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from gpufleet.server.app import ControlPlane, start_control_plane
from gpufleet.server.config import ServerConfig
from gpufleet.v1 import deployment_pb2, deployment_service_pb2_grpc

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass
class RunningControlPlane:
    """A started control plane plus a plaintext channel to it."""

    plane: ControlPlane
    address: str
    admin_token: str
    state_dir: Path
    channel: grpc.aio.Channel
    stub: deployment_service_pb2_grpc.DeploymentServiceAsyncStub

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the admin token."""
        return (("authorization", f"Bearer {self.admin_token}"),)


@pytest.fixture
async def control_plane(tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    """A control plane without its reconciler: these tests write instances to the store
    themselves and expect no other writer."""
    state_dir = tmp_path / "state"
    plane = await start_control_plane(
        ServerConfig(state_dir=state_dir, listen="127.0.0.1:0", reconcile=False)
    )
    channel = grpc.aio.insecure_channel(plane.address)
    try:
        yield RunningControlPlane(
            plane=plane,
            address=plane.address,
            admin_token=plane.admin_token,
            state_dir=state_dir,
            channel=channel,
            stub=deployment_service_pb2_grpc.DeploymentServiceStub(channel),
        )
    finally:
        await channel.close(None)
        await plane.stop(grace=1.0)


@dataclass
class RichStatus:
    """The google.rpc details of a failed call."""

    status: status_pb2.Status
    error_info: error_details_pb2.ErrorInfo | None
    bad_request: error_details_pb2.BadRequest | None


def rich_status(err: grpc.aio.AioRpcError) -> RichStatus:
    """Decode `grpc-status-details-bin` from a failed call's trailing metadata."""
    trailers = cast(Iterable[tuple[str, Any]], err.trailing_metadata() or ())
    raw = [value for key, value in trailers if key == STATUS_DETAILS_KEY]
    if not raw or not isinstance(raw[0], bytes):
        raise AssertionError(f"no {STATUS_DETAILS_KEY} trailer in {err!r}")
    status = status_pb2.Status.FromString(raw[0])
    info: error_details_pb2.ErrorInfo | None = None
    bad: error_details_pb2.BadRequest | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
    return RichStatus(status, info, bad)


def make_spec(
    command: str = "python -m echo_server", min_instances: int = 0, max_instances: int = 0
) -> deployment_pb2.DeploymentSpec:
    """A small valid spec (max_instances 0 means the default)."""
    return deployment_pb2.DeploymentSpec(
        command=command,
        port=8000,
        scaling=deployment_pb2.ScalingSpec(
            min_instances=min_instances, max_instances=max_instances
        ),
    )
