"""Optional GPU memory hold, so that NVML on a real GPU sees the instance's usage."""

from __future__ import annotations

import importlib
import logging

from examples.model_server.errors import StartupError

_log = logging.getLogger(__name__)


def hold_gpu_memory(mib: int) -> object | None:
    """Allocates `mib` MiB on the first visible CUDA GPU and returns the buffer to keep alive.

    torch is imported only here, and only when asked for: without torch or without a CUDA
    GPU the request is logged and ignored (None), so the server runs the same on CPU hosts.
    """
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        _log.warning("--gpu-memory-mib %d ignored: torch is not installed, no GPU found", mib)
        return None
    if not torch.cuda.is_available():
        _log.warning("--gpu-memory-mib %d ignored: torch finds no CUDA GPU", mib)
        return None
    try:
        buffer: object = torch.empty(mib * 1024 * 1024, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
    except RuntimeError as error:
        raise StartupError(
            f"cannot allocate {mib} MiB on GPU {torch.cuda.get_device_name()}: {error}; "
            "lower --gpu-memory-mib or free memory on that GPU"
        ) from error
    _log.info("holding %d MiB on GPU %s", mib, torch.cuda.get_device_name())
    return buffer
