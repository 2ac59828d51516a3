"""The command line every benchmark floor proxy shares: `--upstream HOST:PORT` and
`--listen HOST:PORT`, then serve until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

Serve = Callable[[str, str], Coroutine[Any, Any, None]]
"""serve(upstream, listen): runs the proxy until wait_for_stop_signal() returns."""


async def wait_for_stop_signal() -> None:
    """Return once the process gets SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def run_proxy(argv: Sequence[str] | None, prog: str, description: str, serve: Serve) -> int:
    """Parse the shared flags and run `serve`; returns the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--upstream", required=True, metavar="HOST:PORT")
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.upstream, args.listen))
    return 0
