"""From a call's target name and metadata to a held slot on one instance.

The steps, in order, each ending the call with its own status:

1. name -> deployment (a service name picks one of its deployments by weight);
   unknown: NOT_FOUND, ROUTE_TARGET_NOT_FOUND;
2. invoke token (UNAUTHENTICATED / PERMISSION_DENIED);
3. `deploy-route-rule` (INVALID_ARGUMENT for a malformed one);
4. admission: wait for a slot, bounded by queue_timeout and the call's own deadline
   (queue, rate limit, quota and target errors from DESIGN.md's table);
5. the instance's channel.

The resulting `CallTarget` must be released when the call ends, however it ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from gpufleet.gateway.admission import Lease
from gpufleet.gateway.errors import GatewayError, Reason
from gpufleet.gateway.invoke_auth import check_invoke_token
from gpufleet.gateway.metadata import Metadatum, first_text, first_value
from gpufleet.gateway.route_rules import (
    ROUTE_RULE_METADATA_KEY,
    RouteRuleError,
    RuleKind,
    parse_route_rule,
)
from gpufleet.gateway.route_table import DeploymentState, RouteTable
from gpufleet.gateway.rpc_errors import INVALID_METADATA, CallError
from gpufleet.gateway.upstreams import Upstream, UpstreamPool


@dataclass(slots=True)
class CallTarget:
    """Where one admitted call goes, and what it holds until it ends."""

    deployment: DeploymentState
    """The deployment serving the call."""
    lease: Lease
    """Its slot on the instance."""
    upstream: Upstream
    """The instance's channel."""

    @property
    def instance_id(self) -> str:
        """The instance (the `deploy-route-target` value)."""
        return self.lease.instance_id

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to the instance."""
        return self.upstream.channel

    def release(self) -> None:
        """Free the slot and the channel use; later calls do nothing."""
        self.lease.release()
        self.upstream.release()

    def __enter__(self) -> CallTarget:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class Dispatcher:
    """Admits calls against the route table."""

    def __init__(self, table: RouteTable, upstreams: UpstreamPool) -> None:
        self._table = table
        self._upstreams = upstreams

    def find(self, name: str) -> DeploymentState:
        """The deployment a call to `name` goes to; CallError NOT_FOUND if none."""
        state = self._table.resolve(name)
        if state is None:
            raise CallError(
                grpc.StatusCode.NOT_FOUND,
                f"no deployment or service named {name!r} on this gateway; list deployments "
                "with `gpufleet list` (a new one can take a moment to reach the gateway)",
                reason=Reason.ROUTE_TARGET_NOT_FOUND.value,
                metadata={"deployment": name},
            )
        return state

    async def admit(
        self,
        name: str,
        context: grpc.aio.ServicerContext[Any, Any],
        metadata: Iterable[Metadatum] | None,
    ) -> CallTarget:
        """Run steps 1-5 for a call to `name`; raises CallError."""
        entries = tuple(metadata or ())
        state = self.find(name)
        check_invoke_token(entries, state.name, state.invoke_token_sha256)
        try:
            rule = parse_route_rule(first_text(entries, ROUTE_RULE_METADATA_KEY))
        except RouteRuleError as err:
            raise CallError(
                grpc.StatusCode.INVALID_ARGUMENT,
                str(err),
                reason=INVALID_METADATA,
                metadata={"deployment": state.name},
                bad_field=ROUTE_RULE_METADATA_KEY,
            ) from None
        hash_value = first_value(entries, rule.hash_key) if rule.kind is RuleKind.HASH else None
        # Typed as float, but None when the call has no deadline.
        remaining: float | None = context.time_remaining()
        try:
            lease = await state.admission.acquire(
                connection_id=context.peer(),
                rule=rule,
                hash_value=hash_value,
                timeout=remaining,
            )
        except GatewayError as err:
            raise CallError.from_gateway_error(err) from None
        address = state.addresses.get(lease.instance_id)
        if address is None:
            # The table dropped the instance between the grant and this task resuming.
            lease.release()
            raise CallError(
                grpc.StatusCode.UNAVAILABLE,
                f"instance {lease.instance_id!r} of deployment {state.name!r} left the "
                "routing table as the call was about to start; retry the call",
                reason=Reason.ROUTE_TARGET_NOT_FOUND.value,
                metadata={"deployment": state.name, "instance": lease.instance_id},
            )
        return CallTarget(state, lease, self._upstreams.checkout(address))
