"""The one error type model code raises; the servicer turns it into a gRPC status."""

from __future__ import annotations

import grpc


class ModelError(Exception):
    """A request the server cannot serve, with the gRPC code the client should see."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ModelError:
    """An INVALID_ARGUMENT error: the request itself is wrong."""
    return ModelError(grpc.StatusCode.INVALID_ARGUMENT, message)


class StartupError(Exception):
    """The server cannot start or load its models; the message says what to change."""
