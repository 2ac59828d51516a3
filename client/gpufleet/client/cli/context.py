"""Builds the SDK client from the command line, the environment and the state directory."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gpufleet.client.cli.errors import CliError
from gpufleet.client.resolve import TokenNotFoundError, resolve_server, resolve_token
from gpufleet.client.sdk import Client


def server_address(args: argparse.Namespace) -> str:
    """The control plane address the command talks to."""
    return resolve_server(args.server, os.environ)


def connect(args: argparse.Namespace) -> Client:
    """A Client for the address, token and TLS files given on the command line."""
    try:
        token = resolve_token(args.token, os.environ)
    except TokenNotFoundError as error:
        raise CliError(str(error)) from None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CliError("mutual TLS needs both --tls-cert and --tls-key; only one was given")
    return Client(
        server_address(args),
        token,
        tls=bool(args.tls),
        tls_root_cert=_read_pem(args.tls_ca, "--tls-ca"),
        tls_client_cert=_read_pem(args.tls_cert, "--tls-cert"),
        tls_client_key=_read_pem(args.tls_key, "--tls-key"),
    )


def _read_pem(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CliError(f"cannot read {flag} {path}: {error.strerror or error}") from None
