"""Python SDK and the gpufleet CLI.

from gpufleet.client import Client
with Client("127.0.0.1:50051", token) as client:
    result = client.apply(deployment)
"""

from gpufleet.client.aio import AsyncClient
from gpufleet.client.config import ClientConfig
from gpufleet.client.errors import FieldViolation, RPCError
from gpufleet.client.operations import ApplyAction, ApplyResult
from gpufleet.client.sdk import Client
from gpufleet.client.spec_file import SpecFileError, load_spec_file, parse_spec_text

__all__ = [
    "ApplyAction",
    "ApplyResult",
    "AsyncClient",
    "Client",
    "ClientConfig",
    "FieldViolation",
    "RPCError",
    "SpecFileError",
    "load_spec_file",
    "parse_spec_text",
]
