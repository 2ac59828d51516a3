"""From a call's target name and metadata to a held slot on one instance.

The steps, in order, each ending the call with its own status:

1. name -> deployment (a service name picks one of its deployments by weight);
   unknown: NOT_FOUND, ROUTE_TARGET_NOT_FOUND;
2. invoke token (UNAUTHENTICATED / PERMISSION_DENIED);
3. `deploy-route-rule` (INVALID_ARGUMENT for a malformed one);
4. admission: wait for a slot, bounded by queue_timeout and the call's own deadline
   (queue, rate limit, quota and target errors from DESIGN.md's table);
5. the instance's channel.

The resulting `CallTarget` must be released when the call ends, however it ends: use it as
a context manager (`with await dispatcher.admit(...) as target:`), whose exit also tells the
dispatcher's `CallObserver` (the gateway's metrics) how the call ended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import grpc

from gpufleet.gateway.admission import Lease
from gpufleet.gateway.call_observer import (
    CALL_KIND,
    CLIENT_CANCELLED,
    CallContext,
    NULL_OBSERVER,
    OTHER_KIND,
    UNKNOWN_DEPLOYMENT,
    CallObserver,
    call_outcome,
)
from gpufleet.gateway.errors import GatewayError, Reason
from gpufleet.gateway.invoke_auth import check_invoke_token_for
from gpufleet.gateway.metadata import Metadatum, first_text, first_value
from gpufleet.gateway.route_rules import (
    ROUTE_RULE_METADATA_KEY,
    RouteRule,
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
    context: CallContext | None = None
    """The call's server context; its status is read when the call ends."""
    kind: str = OTHER_KIND
    """Handler kind (see call_observer.CALL_KIND)."""
    arrived_at: float = 0.0
    """time.monotonic() when the call arrived at the gateway."""
    observer: CallObserver = field(default=NULL_OBSERVER)
    """Told how the call ended."""

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
        if self.context is not None:
            code, reason = call_outcome(exc, self.context)
            self.observer.ended(
                self.deployment.name,
                self.kind,
                code,
                reason,
                time.monotonic() - self.arrived_at,
            )


class Dispatcher:
    """Admits calls against the route table."""

    def __init__(
        self,
        table: RouteTable,
        upstreams: UpstreamPool,
        observer: CallObserver | None = None,
    ) -> None:
        self._table = table
        self._upstreams = upstreams
        self._observer: CallObserver = NULL_OBSERVER if observer is None else observer

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
        context: CallContext,
        metadata: Iterable[Metadatum] | None,
    ) -> CallTarget:
        """Run steps 1-5 for a call to `name`; raises CallError.

        The observer hears here of the call's arrival, of a cold start (no ready instance
        when the call reaches admission), and of its refusal or admission; the returned
        target tells it how the call ended.
        """
        arrived_at = time.monotonic()
        kind = CALL_KIND.get()
        observer = self._observer
        try:
            state = self.find(name)
        except CallError as err:
            observer.arrived(UNKNOWN_DEPLOYMENT, kind)
            observer.rejected(UNKNOWN_DEPLOYMENT, kind, err.code, err.reason)
            raise
        observer.arrived(state.name, kind)
        try:
            accepted = [c.invoke_token_sha256 for c in self._table.candidates(name)]
            rule, hash_value = self._route_rule(state, name, accepted, tuple(metadata or ()))
            cold = not state.has_ready_endpoint()
            if cold:
                observer.cold_start(state.name)
            lease, upstream = await self._acquire(state, context, rule, hash_value)
        except CallError as err:
            observer.rejected(state.name, kind, err.code, err.reason)
            raise
        except asyncio.CancelledError:
            observer.ended(state.name, kind, grpc.StatusCode.CANCELLED, CLIENT_CANCELLED, None)
            raise
        observer.admitted(state.name, kind, cold, time.monotonic() - arrived_at)
        return CallTarget(state, lease, upstream, context, kind, arrived_at, observer)

    @staticmethod
    def _route_rule(
        state: DeploymentState,
        name: str,
        accepted_tokens_sha256: Sequence[str],
        entries: tuple[Metadatum, ...],
    ) -> tuple[RouteRule, str | bytes | None]:
        """Steps 2 and 3: the invoke token (for a service name, that of any of its
        deployments), then the route rule and its hash value."""
        check_invoke_token_for(entries, name, accepted_tokens_sha256)
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
        return rule, hash_value

    async def _acquire(
        self,
        state: DeploymentState,
        context: CallContext,
        rule: RouteRule,
        hash_value: str | bytes | None,
    ) -> tuple[Lease, Upstream]:
        """Steps 4 and 5: a slot on an instance, then the instance's channel."""
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
        return lease, self._upstreams.checkout(address)
