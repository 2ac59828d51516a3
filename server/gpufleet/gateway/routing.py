"""Choosing the instance for one call: a pure function of the endpoints' load and the rule.

What each rule does (instances are taken in instance id order, so every gateway that sees
the same table makes the same ordered choices):

- DEFAULT: least calls in flight; ties go to the next tied instance after the cursor, so
  light traffic is spread evenly over all instances.
- LEAST_REQUEST: least calls in flight; ties go to the first instance by id, with no
  rotation. Serial traffic therefore stays on one instance and spare ones go idle and can be
  released, where DEFAULT would keep all of them warm.
- ROUND_ROBIN: the next instance after the cursor that has a free slot, whatever its load.
- RANDOM: uniformly among instances with a free slot.
- SCALE_OUT: like DEFAULT; the caller passes only the instances that it may use (those that
  started after the call arrived).
- HASH: rendezvous (highest random weight) hashing of the key value over the instances that
  are not draining, so adding or removing one of n instances moves only about 1/n of the
  keys. The call is sticky: if the owner has no free slot the call waits for that instance
  rather than spilling to another (NoFreeInstance.wait_for names it). A call without the key
  is routed like DEFAULT. The hash is BLAKE2b, not Python's salted hash(), so all gateways
  agree on the owner.
- INSTANCE: that instance; TargetNotFound if it is absent or draining, NoFreeInstance
  waiting for it if it is full.

Draining instances never get a new call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gpufleet.gateway.route_rules import RouteRule, RuleKind


class RandomSource(Protocol):
    """What routing needs from a random generator; `random.Random` fits."""

    def random(self) -> float:
        """A float uniformly in [0, 1)."""
        ...


@dataclass(frozen=True, slots=True)
class EndpointView:
    """One instance of the deployment as routing sees it."""

    instance_id: str
    """Instance id."""
    in_flight: int
    """Calls this gateway has in flight on the instance."""
    free_slots: int
    """Calls it may still take: max_request_concurrency minus in flight, at least 0."""
    draining: bool = False
    """Draining instances finish their calls and get no new ones."""


@dataclass(frozen=True, slots=True)
class Chosen:
    """Send the call to this instance."""

    instance_id: str
    """The instance."""
    cursor: str
    """The round-robin cursor to keep for the next call (unchanged by non-rotating rules)."""


@dataclass(frozen=True, slots=True)
class NoFreeInstance:
    """No instance the call may use has a free slot now; the call waits."""

    wait_for: str | None
    """None: any instance will do. Otherwise the only instance the call may run on."""


@dataclass(frozen=True, slots=True)
class TargetNotFound:
    """The call named an instance that is not (or no longer) serving."""

    instance_id: str
    """The instance id the call asked for."""


RouteDecision = Chosen | NoFreeInstance | TargetNotFound


def choose_endpoint(
    endpoints: Sequence[EndpointView],
    rule: RouteRule,
    *,
    cursor: str,
    rng: RandomSource,
    hash_value: str | bytes | None = None,
) -> RouteDecision:
    """Choose the instance for one call.

    `endpoints` may come in any order and must have distinct ids. `cursor` is the instance id
    this deployment's rotation last chose ("" at first). `hash_value` is the value of the
    request metadata key named by a HASH rule, None when the request lacks it.
    """
    ordered = sorted(endpoints, key=lambda e: e.instance_id)
    kind = rule.kind
    if kind is RuleKind.INSTANCE:
        return _choose_target(ordered, rule.instance_id, cursor)
    if kind is RuleKind.HASH and hash_value is not None:
        return _choose_hashed(ordered, hash_value, cursor)
    free = [e for e in ordered if not e.draining and e.free_slots > 0]
    if not free:
        return NoFreeInstance(wait_for=None)
    if kind is RuleKind.ROUND_ROBIN:
        chosen = _next_after(free, cursor)
        return Chosen(chosen.instance_id, cursor=chosen.instance_id)
    if kind is RuleKind.RANDOM:
        index = min(int(rng.random() * len(free)), len(free) - 1)
        return Chosen(free[index].instance_id, cursor=cursor)
    least = min(e.in_flight for e in free)
    tied = [e for e in free if e.in_flight == least]
    if kind is RuleKind.LEAST_REQUEST:
        return Chosen(tied[0].instance_id, cursor=cursor)
    # DEFAULT, SCALE_OUT, and HASH without a key value.
    chosen = _next_after(tied, cursor)
    return Chosen(chosen.instance_id, cursor=chosen.instance_id)


def rendezvous_score(key: str | bytes, instance_id: str) -> int:
    """The weight of `instance_id` for `key`; the instance with the highest weight owns it."""
    key_bytes = key.encode() if isinstance(key, str) else key
    digest = hashlib.blake2b(
        key_bytes + b"\x00" + instance_id.encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


def rendezvous_owner(key: str | bytes, instance_ids: Sequence[str]) -> str | None:
    """The instance that owns `key` among `instance_ids`; None if there are none."""
    if not instance_ids:
        return None
    # The id breaks (astronomically unlikely) score ties so the owner never depends on order.
    return max(instance_ids, key=lambda i: (rendezvous_score(key, i), i))


def _next_after(ordered: Sequence[EndpointView], cursor: str) -> EndpointView:
    """The first endpoint whose id sorts after the cursor, wrapping around."""
    for endpoint in ordered:
        if endpoint.instance_id > cursor:
            return endpoint
    return ordered[0]


def _choose_target(
    ordered: Sequence[EndpointView], instance_id: str, cursor: str
) -> RouteDecision:
    for endpoint in ordered:
        if endpoint.instance_id == instance_id:
            if endpoint.draining:
                return TargetNotFound(instance_id)
            if endpoint.free_slots > 0:
                return Chosen(instance_id, cursor=cursor)
            return NoFreeInstance(wait_for=instance_id)
    return TargetNotFound(instance_id)


def _choose_hashed(
    ordered: Sequence[EndpointView], hash_value: str | bytes, cursor: str
) -> RouteDecision:
    active = [e for e in ordered if not e.draining]
    owner_id = rendezvous_owner(hash_value, [e.instance_id for e in active])
    if owner_id is None:
        return NoFreeInstance(wait_for=None)
    owner = next(e for e in active if e.instance_id == owner_id)
    if owner.free_slots > 0:
        return Chosen(owner_id, cursor=cursor)
    return NoFreeInstance(wait_for=owner_id)
