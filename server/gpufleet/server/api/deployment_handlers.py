"""DeploymentService logic as plain functions: (store, request) -> response.

They validate with gpufleet.server.validation, fill defaults with spec_defaults, call the
store, and raise domain errors; the servicer only forwards to them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from gpufleet.server.errors import FieldViolationLike, InvalidArgument, RevisionMismatch, Violation
from gpufleet.server.spec_defaults import with_defaults
from gpufleet.server.status import compute_status
from gpufleet.server.store import DeploymentRecord, Store
from gpufleet.server.tokens import new_invoke_token, sha256_hex
from gpufleet.server.validation import (
    validate_deployment,
    validate_label_selector,
    validate_name,
    validate_scale,
)
from gpufleet.v1 import deployment_pb2, deployment_service_pb2 as pb, instance_pb2

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Scale without a revision is read-check-write; a concurrent change makes the write stale,
# so it is retried against the fresh spec a few times before giving up with ABORTED.
SCALE_ATTEMPTS = 5


async def create_deployment(
    store: Store, request: pb.CreateDeploymentRequest
) -> pb.CreateDeploymentResponse:
    """Validate, store with defaults, and hand out a fresh invoke token (only its hash is kept)."""
    candidate = _input_fields(request.deployment)
    _raise_if(_prefixed("deployment.", validate_deployment(candidate)))
    token = new_invoke_token()
    record = await store.create_deployment(
        candidate.name, candidate.labels, with_defaults(candidate.spec), sha256_hex(token)
    )
    # A deployment created just now has no instance yet: its status needs no store read.
    return pb.CreateDeploymentResponse(deployment=_with_status(record, []), invoke_token=token)


async def get_deployment(
    store: Store, request: pb.GetDeploymentRequest
) -> pb.GetDeploymentResponse:
    """Return one deployment with its status."""
    _raise_if(validate_name(request.name))
    record = await store.get_deployment(request.name)
    return pb.GetDeploymentResponse(deployment=await _served(store, record))


async def list_deployments(
    store: Store, request: pb.ListDeploymentsRequest
) -> pb.ListDeploymentsResponse:
    """One page of deployments by name, filtered by the label selector."""
    violations: list[FieldViolationLike] = []
    if request.page_size > MAX_PAGE_SIZE:
        violations.append(
            Violation(
                "page_size",
                f"must be at most {MAX_PAGE_SIZE}; got {request.page_size}; 0 means "
                f"{DEFAULT_PAGE_SIZE}",
            )
        )
    selector, selector_violations = validate_label_selector(request.label_selector)
    violations.extend(selector_violations)
    _raise_if(violations)
    page = await store.list_deployments(
        request.page_size or DEFAULT_PAGE_SIZE, request.page_token, selector
    )
    instances = _by_deployment(await store.list_instances()) if page.deployments else {}
    return pb.ListDeploymentsResponse(
        deployments=[
            _with_status(r, instances.get(r.deployment.name, [])) for r in page.deployments
        ],
        next_page_token=page.next_page_token,
    )


async def update_deployment(
    store: Store, request: pb.UpdateDeploymentRequest
) -> pb.UpdateDeploymentResponse:
    """Replace labels and spec if the caller's revision is the stored one."""
    candidate = _input_fields(request.deployment)
    violations: list[FieldViolationLike] = []
    if request.revision <= 0:
        violations.append(
            Violation(
                "revision",
                f"must be the revision you read (GetDeployment or the last response); got "
                f"{request.revision}",
            )
        )
    violations.extend(_prefixed("deployment.", validate_deployment(candidate)))
    _raise_if(violations)
    record = await store.update_deployment(
        candidate.name, candidate.labels, with_defaults(candidate.spec), request.revision
    )
    return pb.UpdateDeploymentResponse(deployment=await _served(store, record))


async def delete_deployment(
    store: Store, request: pb.DeleteDeploymentRequest
) -> pb.DeleteDeploymentResponse:
    """Start a graceful delete; the deployment goes at once when it has no instance."""
    _raise_if(validate_name(request.name))
    result = await store.mark_deployment_deleted(
        request.name, request.revision if request.revision > 0 else None
    )
    if result.removed:
        return pb.DeleteDeploymentResponse(removed=True)
    return pb.DeleteDeploymentResponse(deployment=await _served(store, result.record))


async def scale_deployment(
    store: Store, request: pb.ScaleDeploymentRequest
) -> pb.ScaleDeploymentResponse:
    """Change instance bounds, checked against the stored spec."""
    violations: list[FieldViolationLike] = list(validate_name(request.name))
    min_instances = request.min_instances if request.HasField("min_instances") else None
    max_instances = request.max_instances if request.HasField("max_instances") else None
    if min_instances is None and max_instances is None:
        violations.append(Violation("min_instances", "set min_instances, max_instances or both"))
    _raise_if(violations)
    attempt = 0
    while True:
        attempt += 1
        record = await store.get_deployment(request.name)
        _raise_if(validate_scale(record.deployment.spec, min_instances, max_instances))
        expected = request.revision if request.revision > 0 else record.deployment.revision
        try:
            record = await store.scale_deployment(
                request.name, min_instances, max_instances, expected
            )
        except RevisionMismatch:
            if request.revision > 0 or attempt >= SCALE_ATTEMPTS:
                raise
            continue
        return pb.ScaleDeploymentResponse(deployment=await _served(store, record))


async def rotate_invoke_token(
    store: Store, request: pb.RotateInvokeTokenRequest
) -> pb.RotateInvokeTokenResponse:
    """Replace the invoke token; the old one stops working once gateways see the change."""
    _raise_if(validate_name(request.name))
    token = new_invoke_token()
    await store.set_invoke_token_hash(request.name, sha256_hex(token))
    return pb.RotateInvokeTokenResponse(invoke_token=token)


async def list_nodes(store: Store, request: pb.ListNodesRequest) -> pb.ListNodesResponse:
    """Every registered node."""
    return pb.ListNodesResponse(nodes=await store.list_nodes())


async def list_instances(
    store: Store, request: pb.ListInstancesRequest
) -> pb.ListInstancesResponse:
    """Instances of one deployment (NOT_FOUND if it does not exist), or all."""
    if request.deployment:
        _raise_if(validate_name(request.deployment, "deployment"))
        await store.get_deployment(request.deployment)
        return pb.ListInstancesResponse(instances=await store.list_instances(request.deployment))
    return pb.ListInstancesResponse(instances=await store.list_instances())


async def deployment_with_status(
    store: Store, deployment: deployment_pb2.Deployment, gone: bool = False
) -> deployment_pb2.Deployment:
    """A copy of `deployment` with its status computed from its current instances."""
    instances = [] if gone else await store.list_instances(deployment.name)
    served = deployment_pb2.Deployment()
    served.CopyFrom(deployment)
    served.status.CopyFrom(compute_status(deployment, instances))
    return served


def _input_fields(given: deployment_pb2.Deployment) -> deployment_pb2.Deployment:
    """Only what a caller may set: output-only fields are ignored, as the API says."""
    return deployment_pb2.Deployment(name=given.name, labels=given.labels, spec=given.spec)


async def _served(store: Store, record: DeploymentRecord) -> deployment_pb2.Deployment:
    return await deployment_with_status(store, record.deployment)


def _with_status(
    record: DeploymentRecord, instances: Sequence[instance_pb2.Instance]
) -> deployment_pb2.Deployment:
    served = deployment_pb2.Deployment()
    served.CopyFrom(record.deployment)
    served.status.CopyFrom(compute_status(record.deployment, instances))
    return served


def _by_deployment(
    instances: Sequence[instance_pb2.Instance],
) -> dict[str, list[instance_pb2.Instance]]:
    grouped: dict[str, list[instance_pb2.Instance]] = defaultdict(list)
    for instance in instances:
        grouped[instance.deployment].append(instance)
    return grouped


def _prefixed(prefix: str, violations: Sequence[FieldViolationLike]) -> list[FieldViolationLike]:
    return [Violation(prefix + v.field, v.description) for v in violations]


def _raise_if(violations: Sequence[FieldViolationLike]) -> None:
    if violations:
        raise InvalidArgument(violations)
