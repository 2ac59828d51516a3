"""Layout of the runtime's part of the agent state directory.

    <state_dir>/instances/<instance_id>/state.json   what a restarted agent needs to adopt
    <state_dir>/instances/<instance_id>/logs/        instance.log, instance.log.1, ...
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
STATE_FILE_NAME = "state.json"


def check_instance_id(instance_id: str) -> str:
    """Return `instance_id` if it is safe as a directory name; raise ValueError otherwise."""
    if not _INSTANCE_ID.fullmatch(instance_id):
        raise ValueError(
            f"invalid instance id {instance_id!r}: use 1-253 characters of [A-Za-z0-9._-] "
            "starting with a letter or digit"
        )
    return instance_id


def instances_dir(state_dir: str | os.PathLike[str]) -> Path:
    """Directory holding one subdirectory per instance."""
    return Path(state_dir) / "instances"


def instance_dir(state_dir: str | os.PathLike[str], instance_id: str) -> Path:
    """Directory of one instance."""
    return instances_dir(state_dir) / check_instance_id(instance_id)


def instance_logs_dir(state_dir: str | os.PathLike[str], instance_id: str) -> Path:
    """Directory of one instance's log files."""
    return instance_dir(state_dir, instance_id) / "logs"


def state_file(state_dir: str | os.PathLike[str], instance_id: str) -> Path:
    """The instance's state file."""
    return instance_dir(state_dir, instance_id) / STATE_FILE_NAME
