"""Wakes each node's Connect stream when its desired instances may have changed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


class NodeChannel:
    """The open Connect stream of one node."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.changed = asyncio.Event()
        """Set when the node's desired set may have changed (or the channel was replaced)."""
        self.replaced = False
        """A newer stream of the same node took over: this one should end."""


class NodeHub:
    """One channel per connected node."""

    def __init__(self) -> None:
        self._channels: dict[str, NodeChannel] = {}

    def attach(self, node_id: str) -> NodeChannel:
        """Open a channel for a new stream; an older stream of the node is told to end."""
        old = self._channels.get(node_id)
        if old is not None:
            old.replaced = True
            old.changed.set()
        channel = NodeChannel(node_id)
        self._channels[node_id] = channel
        return channel

    def detach(self, channel: NodeChannel) -> None:
        """The stream ended (idempotent)."""
        if self._channels.get(channel.node_id) is channel:
            del self._channels[channel.node_id]

    def notify(self, node_ids: Iterable[str]) -> None:
        """Tell these nodes' streams to check their desired set."""
        for node_id in node_ids:
            channel = self._channels.get(node_id)
            if channel is not None:
                channel.changed.set()

    def close_all(self) -> None:
        """End every stream (shutdown)."""
        for channel in list(self._channels.values()):
            channel.replaced = True
            channel.changed.set()
        self._channels.clear()
