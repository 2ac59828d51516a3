"""Command-line configuration of the example model server and its model-name mapping."""

from __future__ import annotations

import argparse
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_PORT = 8001


class ModelKind(enum.Enum):
    """The behaviour a model name is served with."""

    ECHO = "echo"
    TOKENS = "tokens"


# The names that need no --model flag; each kind is reachable under its own name.
BUILTIN_MODELS: Mapping[str, ModelKind] = {kind.value: kind for kind in ModelKind}


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to start, parsed from flags and environment."""

    host: str = "127.0.0.1"
    """Address to bind; `0.0.0.0` or `::` to accept calls from other hosts."""
    port: int = DEFAULT_PORT
    """TCP port; 0 lets the OS pick one (printed on stdout and written to port_file)."""
    port_file: str | None = None
    """File that receives the bound port as decimal text once the server listens."""
    models: Mapping[str, ModelKind] = field(default_factory=lambda: dict(BUILTIN_MODELS))
    """Explicit model name -> kind mapping."""
    default_kind: ModelKind | None = ModelKind.ECHO
    """Kind of every name not in `models`; None rejects unknown names with NOT_FOUND."""
    token_delay_seconds: float = 0.01
    """Pause between two tokens of the `tokens` model, to look like generation."""
    load_seconds: float = 0.0
    """Simulated model load time: health stays NOT_SERVING this long after start."""
    gpu_memory_mib: int = 0
    """GPU memory to hold while serving (needs torch with CUDA); 0 holds none."""
    shutdown_grace_seconds: float = 5.0
    """On SIGTERM, how long in-flight calls may finish before they are cancelled."""
    ready_file: str | None = None
    """File that receives {"ready_seconds": X} once the server is SERVING."""

    def resolve(self, model_name: str) -> ModelKind | None:
        """The kind served under `model_name`, or None when the name is not served."""
        return self.models.get(model_name, self.default_kind)


def _model_mapping(text: str) -> tuple[str, ModelKind]:
    name, sep, kind_text = text.partition("=")
    kinds = ", ".join(kind.value for kind in ModelKind)
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=KIND (KIND one of {kinds}), got {text!r}")
    try:
        return name, ModelKind(kind_text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown model kind {kind_text!r} in {text!r}; use one of {kinds}"
        ) from None


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The server's argument parser (also documents the flags in --help)."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.model_server",
        description="Open Inference Protocol gRPC model server with an echo and a token model.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=_port,
        default=None,
        help=f"port to bind; 0 picks a free one (default: $PORT, else {DEFAULT_PORT})",
    )
    parser.add_argument("--port-file", default=None, help="write the bound port to this file")
    parser.add_argument(
        "--model",
        dest="models",
        type=_model_mapping,
        action="append",
        default=[],
        metavar="NAME=KIND",
        help="serve model NAME with KIND (echo or tokens); repeatable",
    )
    parser.add_argument(
        "--default-model-kind",
        choices=[kind.value for kind in ModelKind] + ["none"],
        default=ModelKind.ECHO.value,
        help="kind of every other model name; 'none' answers NOT_FOUND (default echo)",
    )
    parser.add_argument(
        "--token-delay-ms",
        type=_non_negative_float,
        default=10.0,
        help="pause between generated tokens in milliseconds (default 10)",
    )
    parser.add_argument(
        "--load-seconds",
        type=_non_negative_float,
        default=0.0,
        help="simulated model load time before health turns SERVING (default 0)",
    )
    parser.add_argument(
        "--gpu-memory-mib",
        type=_non_negative_int,
        default=0,
        help="hold this much GPU memory while serving; needs torch with CUDA (default 0)",
    )
    parser.add_argument(
        "--shutdown-grace-seconds",
        type=_non_negative_float,
        default=5.0,
        help="on SIGTERM, time in-flight calls get before they are cancelled (default 5)",
    )
    return parser


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> ServerConfig:
    """Parses flags; $PORT and $GPUFLEET_READY_FILE come from `environ`. Exits on bad input."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    port: int | None = args.port
    if port is None:
        env_port = environ.get("PORT", "")
        try:
            port = _port(env_port) if env_port else DEFAULT_PORT
        except argparse.ArgumentTypeError as error:
            parser.error(f"environment variable PORT: {error}; set it to 0-65535 or pass --port")
    models = dict(BUILTIN_MODELS)
    models.update(dict(args.models))
    default_kind = None if args.default_model_kind == "none" else ModelKind(args.default_model_kind)
    return ServerConfig(
        host=args.host,
        port=port,
        port_file=args.port_file,
        models=models,
        default_kind=default_kind,
        token_delay_seconds=args.token_delay_ms / 1000.0,
        load_seconds=args.load_seconds,
        gpu_memory_mib=args.gpu_memory_mib,
        shutdown_grace_seconds=args.shutdown_grace_seconds,
        ready_file=environ.get("GPUFLEET_READY_FILE") or None,
    )
