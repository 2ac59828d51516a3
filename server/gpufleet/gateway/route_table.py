"""The gateway's copy of the control plane's routing table.

`RouteTable.apply` takes one `WatchRoutesResponse`: a snapshot replaces the whole table, an
update upserts the routes it lists and drops `removed_deployments`. Each deployment keeps
one `DeploymentAdmission` for as long as it is in the table, so calls queued across updates
keep their place; endpoint and config changes are pushed into it. Instance channels are
kept for exactly the addresses in the table (UpstreamPool.retain).

Nothing here reaches the network: the watch client (route_watch.py) feeds it, and when the
control plane is down the last table simply stays (static stability).

Names: a call names a deployment or a service. A service name is split across its
deployments by `service_weight` (smooth weighted round robin: exact shares, interleaved)
and takes precedence over a deployment of the same name, so that a canary can join the
original deployment's name as a service ("llm" 90 + "llm-canary" 10).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from gpufleet.gateway.admission import DeploymentAdmission, EndpointInfo
from gpufleet.gateway.config import AdmissionConfig
from gpufleet.gateway.traffic_split import (
    MAX_WEIGHT,
    SmoothState,
    WeightedTarget,
    smooth_weighted_choice,
)
from gpufleet.gateway.upstreams import UpstreamPool
from gpufleet.v1 import routing_service_pb2

_log = logging.getLogger(__name__)

AdmissionFactory = Callable[[str, AdmissionConfig], DeploymentAdmission]
"""Makes the admission controller of a deployment that enters the table."""


@dataclass(slots=True)
class DeploymentState:
    """One deployment in the table; updated in place while it stays there."""

    name: str
    """Deployment name."""
    admission: DeploymentAdmission
    """Its admission controller (slots, queue, rate limit)."""
    addresses: dict[str, str] = field(default_factory=dict)
    """Instance id -> "host:port" of every endpoint in the route, draining ones too."""
    invoke_token_sha256: str = ""
    """Lowercase hex SHA-256 of the invoke token; empty means no call is accepted."""
    service: str = ""
    """Service name for weighted splits; empty if none."""
    service_weight: int = 0
    """Weight inside the service."""

    def has_ready_endpoint(self) -> bool:
        """True when some endpoint may take new calls (present and not draining)."""
        return any(not view.draining for view in self.admission.endpoint_views())


class RouteTable:
    """Deployments and services as last seen from the control plane."""

    def __init__(
        self,
        upstreams: UpstreamPool,
        admission_factory: AdmissionFactory | None = None,
    ) -> None:
        self._upstreams = upstreams
        self._make_admission: AdmissionFactory = admission_factory or DeploymentAdmission
        self._deployments: dict[str, DeploymentState] = {}
        self._services: dict[str, list[WeightedTarget]] = {}
        self._split_state: dict[str, SmoothState] = {}
        self._synced = asyncio.Event()

    # ----- reading

    @property
    def synced(self) -> bool:
        """True once a snapshot arrived; stays True while the control plane is away."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        """Return once the first snapshot has been applied."""
        await self._synced.wait()

    def deployment(self, name: str) -> DeploymentState | None:
        """The deployment called `name`, or None."""
        return self._deployments.get(name)

    def deployments(self) -> list[DeploymentState]:
        """Every deployment, in name order."""
        return [self._deployments[name] for name in sorted(self._deployments)]

    def services(self) -> dict[str, list[WeightedTarget]]:
        """Service name -> its deployments and weights."""
        return {name: list(targets) for name, targets in self._services.items()}

    def candidates(self, name: str) -> list[DeploymentState]:
        """The deployments a call to `name` may go to (a service's deployments with a
        weight above 0, else the deployment of that name), without choosing one."""
        targets = self._services.get(name)
        if targets:
            chosen = [self._deployments[t.name] for t in targets if t.weight > 0]
            if chosen:
                return chosen
        state = self._deployments.get(name)
        return [] if state is None else [state]

    def resolve(self, name: str) -> DeploymentState | None:
        """The deployment a call to `name` goes to: a service's next deployment by weight,
        else the deployment of that name; None if neither exists (or all weights are 0
        and no deployment has the name)."""
        targets = self._services.get(name)
        if targets:
            chosen, state = smooth_weighted_choice(
                targets, self._split_state.get(name, SmoothState())
            )
            self._split_state[name] = state
            if chosen is not None:
                return self._deployments.get(chosen)
        return self._deployments.get(name)

    # ----- changes

    def apply(self, response: routing_service_pb2.WatchRoutesResponse) -> None:
        """Apply one snapshot or update from WatchRoutes."""
        if response.snapshot:
            listed = {route.deployment for route in response.routes}
            for name in [n for n in self._deployments if n not in listed]:
                self._remove(name)
        for route in response.routes:
            self._upsert(route)
        for name in response.removed_deployments:
            self._remove(name)
        self._rebuild_services()
        self._upstreams.retain(self._all_addresses())
        if response.snapshot:
            self._synced.set()

    def close(self) -> None:
        """Fail queued calls everywhere; the gateway is stopping."""
        for state in self._deployments.values():
            state.admission.close("the gateway is shutting down; retry on another gateway")

    def _upsert(self, route: routing_service_pb2.DeploymentRoute) -> None:
        name = route.deployment
        if not name:
            _log.warning("ignoring a route without a deployment name from the control plane")
            return
        state = self._deployments.get(name)
        config = self._config_of(route, None if state is None else state.admission.config)
        if state is None:
            state = DeploymentState(name=name, admission=self._make_admission(name, config))
            self._deployments[name] = state
        elif config != state.admission.config:
            state.admission.update_config(config)
        state.invoke_token_sha256 = route.invoke_token_sha256.strip().lower()
        state.service = route.service
        state.service_weight = route.service_weight
        state.addresses = {}
        endpoints: list[EndpointInfo] = []
        for endpoint in route.endpoints:
            if not endpoint.instance_id or not endpoint.address:
                _log.warning(
                    "deployment %s: ignoring endpoint %r without an instance id or address",
                    name,
                    endpoint.instance_id or endpoint.address,
                )
                continue
            state.addresses[endpoint.instance_id] = endpoint.address
            endpoints.append(EndpointInfo(endpoint.instance_id, draining=endpoint.draining))
        state.admission.set_endpoints(endpoints)

    def _remove(self, name: str) -> None:
        state = self._deployments.pop(name, None)
        if state is None:
            return
        state.admission.close(
            f"deployment {name!r} was deleted or is no longer served; check `gpufleet get`"
        )

    def _rebuild_services(self) -> None:
        services: dict[str, list[WeightedTarget]] = {}
        for state in self.deployments():
            if state.service:
                weight = min(max(state.service_weight, 0), MAX_WEIGHT)
                services.setdefault(state.service, []).append(WeightedTarget(state.name, weight))
        self._services = services
        self._split_state = {
            name: split for name, split in self._split_state.items() if name in services
        }

    def _all_addresses(self) -> set[str]:
        return {a for state in self._deployments.values() for a in state.addresses.values()}

    @staticmethod
    def _config_of(
        route: routing_service_pb2.DeploymentRoute, previous: AdmissionConfig | None
    ) -> AdmissionConfig:
        try:
            return AdmissionConfig.from_spec(route.traffic, route.scaling)
        except ValueError as err:
            kept = previous or AdmissionConfig()
            _log.error(
                "deployment %s: the control plane sent traffic settings the gateway cannot "
                "use (%s); keeping %s",
                route.deployment,
                err,
                "the previous settings" if previous else "the defaults",
            )
            return kept

