"""Entry point: `python -m examples.model_server --port PORT` (run from the repository root)."""

from __future__ import annotations

# First, so that the fallback start time is taken before the slower imports below.
from examples.model_server.reporting import process_started_at  # isort: skip

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from examples.model_server.config import parse_config
from examples.model_server.errors import StartupError
from examples.model_server.server import serve


def main(argv: Sequence[str] | None = None) -> int:
    """Parses flags, serves until SIGTERM/SIGINT; returns the process exit status."""
    started_at = process_started_at()
    config = parse_config(sys.argv[1:] if argv is None else argv, os.environ)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(config, started_at))
    except StartupError as error:
        print(f"model server failed to start: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
