"""Exit codes and the CLI's rendering of errors (no tracebacks for expected failures)."""

from __future__ import annotations

import grpc

from gpufleet.client.errors import RPCError
from gpufleet.client.resolve import SERVER_ENV, STATE_DIR_ENV, TOKEN_ENV, TOKEN_FILE

EXIT_OK = 0
EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """Bad command line or local input; exits with EXIT_USAGE."""


def is_unreachable(error: RPCError) -> bool:
    """True when the control plane could not be reached at all.

    gRPC reports a failed connection as UNAVAILABLE without status details; a server that
    answers UNAVAILABLE itself attaches details.
    """
    return error.code == grpc.StatusCode.UNAVAILABLE and error.status is None


def describe_rpc_error(error: RPCError, target: str) -> tuple[int, str]:
    """(exit code, message lines) for a failed call to the control plane at ``target``."""
    if is_unreachable(error):
        return EXIT_UNREACHABLE, (
            f"error: cannot connect to the control plane at {target}: {error.message}\n"
            "Start one with `gpufleet server` (or `gpufleet up`), or point --server or "
            f"${SERVER_ENV} at a running one."
        )
    lines = [f"error: {error.code.name}: {error.message}"]
    lines.extend(
        f"  {violation.field}: {violation.description}" for violation in error.field_violations
    )
    if error.reason and error.reason != error.code.name:
        lines.append(f"  reason: {error.reason}")
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        lines.append(
            f"The admin token was not accepted: pass --token, set ${TOKEN_ENV}, or set "
            f"${STATE_DIR_ENV} to the server's state directory (it holds {TOKEN_FILE})."
        )
    return EXIT_SERVER_ERROR, "\n".join(lines)
