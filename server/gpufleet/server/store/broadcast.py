"""In-process fan-out of committed changes to watchers.

The store publishes each transaction's events right after COMMIT, in commit order, so a
watcher that subscribes before it reads the log sees every later change either in its read
or in its subscription (possibly both: it drops revisions it already sent).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from types import TracebackType

from gpufleet.server.errors import Unavailable
from gpufleet.server.store.records import StoredEvent

DEFAULT_MAX_PENDING = 10_000


class SubscriptionLagged(Exception):
    """The subscriber fell more than max_pending events behind; its buffer was dropped.

    It should subscribe again and replay the log from the last revision it handled.
    """


class Subscription:
    """Events published after `subscribe`, in revision order. Use as a context manager."""

    def __init__(self, hub: ChangeHub, max_pending: int) -> None:
        self._hub = hub
        self._max_pending = max_pending
        self._pending: deque[StoredEvent] = deque()
        self._wakeup = asyncio.Event()
        self._lagged = False
        self._closed = False

    def deliver(self, events: Sequence[StoredEvent]) -> None:
        """Queue events (called by the hub); overflowing marks the subscription lagged."""
        if self._lagged or self._closed:
            return
        if len(self._pending) + len(events) > self._max_pending:
            # Dropping the buffer bounds memory; the watcher recovers from the durable log.
            self._lagged = True
            self._pending.clear()
        else:
            self._pending.extend(events)
        self._wakeup.set()

    def end(self) -> None:
        """Stop delivering; a waiting `next` raises Unavailable once the buffer is empty."""
        self._closed = True
        self._wakeup.set()

    async def next(self) -> StoredEvent:
        """Wait for the next event.

        Raises SubscriptionLagged if events were dropped, Unavailable once the hub closed.
        """
        while True:
            if self._lagged:
                raise SubscriptionLagged()
            if self._pending:
                return self._pending.popleft()
            if self._closed:
                raise Unavailable(
                    "the control plane is shutting down; reconnect and resume the watch "
                    "from the last revision you received"
                )
            self._wakeup.clear()
            await self._wakeup.wait()

    def take_pending(self) -> list[StoredEvent]:
        """Every event already delivered and not yet taken, without waiting.

        Raises SubscriptionLagged if events were dropped.
        """
        if self._lagged:
            raise SubscriptionLagged()
        events = list(self._pending)
        self._pending.clear()
        return events

    def close(self) -> None:
        """Unsubscribe."""
        self._hub.unsubscribe(self)
        self.end()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ChangeHub:
    """Fans committed events out to every live subscription."""

    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    def subscribe(self, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        """Start receiving events published from now on."""
        subscription = Subscription(self, max_pending)
        if self._closed:
            subscription.end()
        else:
            self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop delivering to a subscription (idempotent)."""
        self._subscriptions.discard(subscription)

    def publish(self, events: Sequence[StoredEvent]) -> None:
        """Deliver committed events, in revision order, to every subscription."""
        if not events:
            return
        for subscription in list(self._subscriptions):
            subscription.deliver(events)

    def close(self) -> None:
        """End every subscription (server shutdown); later subscriptions end at once."""
        self._closed = True
        for subscription in list(self._subscriptions):
            subscription.end()
        self._subscriptions.clear()
