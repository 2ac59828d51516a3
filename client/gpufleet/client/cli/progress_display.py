"""`--wait` for apply and scale: follow WatchEvents until the deployments are ready, showing
their progress (see progress.py for what ready means).

On a terminal the progress is a rich live display, one bar per deployment; otherwise one
plain line per change, with no control codes, so logs and pipes stay readable.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, TextIO

import grpc
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column

from gpufleet.client.cli.errors import EXIT_OK, EXIT_SERVER_ERROR
from gpufleet.client.cli.progress import DeploymentProgress, Outcome, RolloutTracker, Target
from gpufleet.client.errors import RPCError
from gpufleet.client.sdk import Client


class ProgressDisplay(Protocol):
    """Shows the latest view; used as a context manager around the wait."""

    def __enter__(self) -> ProgressDisplay: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def show(self, view: Sequence[DeploymentProgress]) -> None:
        """Render the view (called after every change)."""
        ...


class PlainDisplay:
    """One line per deployment whenever its line changes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last: dict[str, str] = {}

    def __enter__(self) -> PlainDisplay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stream.flush()

    def show(self, view: Sequence[DeploymentProgress]) -> None:
        for progress in view:
            line = progress.line()
            if self._last.get(progress.name) != line:
                self._last[progress.name] = line
                self._stream.write(line + "\n")
        self._stream.flush()


class RichDisplay:
    """A live bar per deployment: ready out of desired, then what is starting or wrong."""

    def __init__(self, stream: TextIO, names: Sequence[str]) -> None:
        # Names keep their full width; a long status message is cut at the terminal's edge
        # (the whole message is printed if the wait fails).
        name_width = max((len(name) for name in names), default=0) + len("deployment/")
        self._progress = Progress(
            TextColumn(
                "deployment/{task.description}",
                table_column=Column(no_wrap=True, min_width=name_width),
            ),
            BarColumn(bar_width=24),
            TimeElapsedColumn(),
            TextColumn(
                "{task.fields[detail]}",
                table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1),
            ),
            console=Console(file=stream),
        )
        self._tasks: dict[str, TaskID] = {
            name: self._progress.add_task(name, total=1, detail="waiting for the control plane")
            for name in names
        }

    def __enter__(self) -> RichDisplay:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def show(self, view: Sequence[DeploymentProgress]) -> None:
        for progress in view:
            # A deployment that scales to zero wants no instance: its bar fills once ready.
            total = max(progress.desired, 1)
            done = progress.ready if progress.desired else int(progress.outcome is Outcome.READY)
            if progress.outcome is Outcome.READY:
                detail = "[green]ready[/]" if progress.desired else "[green]ready (standby)[/]"
            elif progress.outcome is Outcome.GONE:
                detail = f"[red]{escape(progress.message)}[/]"
            else:
                detail = escape(progress.summary())
            self._progress.update(
                self._tasks[progress.name], total=total, completed=min(done, total), detail=detail
            )


def make_display(stream: TextIO, names: Sequence[str]) -> ProgressDisplay:
    """Rich on a terminal, plain lines otherwise."""
    if stream.isatty():
        return RichDisplay(stream, names)
    return PlainDisplay(stream)


def wait_until_ready(
    client: Client, targets: Sequence[Target], timeout: float, stream: TextIO
) -> int:
    """Show progress on `stream` until every target is ready (EXIT_OK), or until `timeout`
    seconds pass or one is deleted (EXIT_SERVER_ERROR, the status on stderr)."""
    tracker = RolloutTracker(targets)
    ended = False
    with make_display(stream, [target.name for target in targets]) as display:
        try:
            ended = _follow(client, tracker, display, timeout)
        except RPCError as error:
            if error.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
    if tracker.finished():
        return EXIT_OK
    for progress in tracker.view():
        if progress.outcome is Outcome.GONE:
            print(f"error: deployment/{progress.name} {progress.message}", file=sys.stderr)
        elif progress.outcome is Outcome.WAITING:
            why = "and the control plane ended the watch" if ended else f"after {timeout:g}s"
            print(
                f"error: deployment/{progress.name} is not ready {why}: {progress.summary()}\n"
                f"  see `gpufleet get {progress.name}` and `gpufleet instances {progress.name}`",
                file=sys.stderr,
            )
    return EXIT_SERVER_ERROR


def _follow(
    client: Client, tracker: RolloutTracker, display: ProgressDisplay, timeout: float
) -> bool:
    """Feed events until done; True when the stream ended first."""
    events = client.watch_events(0, timeout=timeout)
    try:
        for event in events:
            if not tracker.feed(event):
                continue
            view = tracker.view()
            display.show(view)
            if tracker.finished() or any(p.outcome is Outcome.GONE for p in view):
                return False
    finally:
        events.close()
    return True
