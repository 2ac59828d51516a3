"""`gpufleet agent install-systemd`: run the agent as a systemd service on this node.

It writes two files and never runs systemctl itself (it prints the line to run):
- `<unit dir>/gpufleet-agent.service` (mode 0644), rendered by the pure `render_unit`;
- the environment file (mode 0600, default /etc/gpufleet/agent.env) holding the join token,
  so that the token is on no command line: `ps` and `systemctl show` show command lines
  and Environment= to every user, never an EnvironmentFile's contents.

Agent flags that install-systemd does not own are passed after `--` and checked with the
agent's own parser before anything is written.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gpufleet.agent.config import ConfigError, parse_labels, split_host_port
from gpufleet.agent.gpu.simulated import parse_simulate_gpus
from gpufleet.agent.cli_parser import OneLineErrorParser

PROG = "gpufleet agent install-systemd"
UNIT_NAME = "gpufleet-agent.service"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
DEFAULT_STATE_DIR = "/var/lib/gpufleet/agent"
DEFAULT_ENV_FILE = "/etc/gpufleet/agent.env"
DEFAULT_USER = "gpufleet"
JOIN_TOKEN_ENV = "GPUFLEET_JOIN_TOKEN"
STATE_DIR_ENV = "GPUFLEET_AGENT_STATE_DIR"
ENABLE_LINE = "systemctl daemon-reload && systemctl enable --now gpufleet-agent"
RESTART_SEC = 5

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# systemd creates StateDirectory= paths below /var/lib, owned by User=.
_SYSTEMD_STATE_ROOT = PurePosixPath("/var/lib")
_SAFE_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+")
# A path written unquoted (EnvironmentFile=, StateDirectory=): systemd cannot quote it.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9_@+=:,./-]*")
# useradd's NAME_REGEX default, which every distribution's user names fit.
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")

_EPILOG = f"""\
Examples:
  sudo gpufleet agent install-systemd --server 10.0.0.5:50051 --join-token "$TOKEN" \\
      --labels zone=a,tier=a100
  gpufleet agent install-systemd --server cp.internal:50051 --dry-run
  sudo gpufleet agent install-systemd --server cp.internal:50051 --join-token "$TOKEN" \\
      -- --tls-ca /etc/gpufleet/ca.pem --advertise-host 10.0.0.7

Then, as root, start it with:
  {ENABLE_LINE}

The unit uses KillMode=process: `systemctl restart gpufleet-agent` (an upgrade) leaves the
instances running and the new agent adopts them. The join token is needed only until the
node has registered once; the environment file may be deleted after that."""


class InstallError(ValueError):
    """A value cannot go into the unit; the message says which and how to fix it."""


@dataclass(frozen=True)
class UnitSettings:
    """What the unit runs and as whom. Every value must pass `check_settings`."""

    exec_path: str
    """Absolute path of the gpufleet command; the unit runs `<exec_path> agent ...`."""
    server: str
    """Control plane address HOST:PORT."""
    state_dir: str
    """Absolute path of the agent's state dir (node identity, instance state, logs)."""
    env_file: str
    """Absolute path of the environment file holding the join token."""
    user: str
    """User the agent and its instances run as."""
    labels: str = ""
    """Node labels K=V,... ("" for none)."""
    simulate_gpus: str | None = None
    """--simulate-gpus value, None to read NVML."""
    agent_args: tuple[str, ...] = ()
    """Further agent flags, appended as given."""


def check_settings(settings: UnitSettings) -> None:
    """InstallError when a value is malformed or cannot be written into a unit."""
    try:
        split_host_port(settings.server)
        parse_labels(settings.labels)
        if settings.simulate_gpus is not None:
            parse_simulate_gpus(settings.simulate_gpus)
    except ConfigError as err:
        raise InstallError(str(err)) from None
    except ValueError as err:
        raise InstallError(f"--simulate-gpus: {err}") from None
    for flag, value in (
        ("--exec", settings.exec_path),
        ("--state-dir", settings.state_dir),
        ("--server", settings.server),
        ("--labels", settings.labels),
        ("--simulate-gpus", settings.simulate_gpus or ""),
        *(("an agent flag after --", arg) for arg in settings.agent_args),
    ):
        _refuse_control_characters(flag, value)
    for flag, path in (("--exec", settings.exec_path), ("--state-dir", settings.state_dir)):
        if not PurePosixPath(path).is_absolute():
            raise InstallError(f"{flag} must be an absolute path, got {path!r}")
    if not _SAFE_PATH.fullmatch(settings.env_file):
        raise InstallError(
            f"--env-file must be an absolute path of letters, digits and _@+=:,./- (systemd "
            f"cannot quote it), got {settings.env_file!r}"
        )
    if not _USER_NAME.fullmatch(settings.user):
        raise InstallError(
            f"--user must be a user name such as {DEFAULT_USER} (lowercase letters, digits, _ "
            f"and -, at most 32), got {settings.user!r}"
        )


def check_join_token(token: str) -> None:
    """InstallError for a join token that cannot be a token (whitespace, control chars)."""
    if not token or any(char.isspace() or not char.isprintable() for char in token):
        raise InstallError(
            "--join-token must be the token alone, without spaces or line breaks; copy it "
            "from `gpufleet server join-token create`"
        )


def _refuse_control_characters(flag: str, value: str) -> None:
    if any(not char.isprintable() for char in value):
        raise InstallError(f"{flag} {value!r} holds control characters; remove them")


def quote_exec_arg(arg: str) -> str:
    """One ExecStart= argument as systemd reads it back unchanged.

    systemd expands %-specifiers everywhere and $VAR in command lines, and splits on
    whitespace outside quotes; inside double quotes it reads C escapes.
    """
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if _SAFE_WORD.fullmatch(arg):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_environment(name: str, value: str) -> str:
    """An Environment= assignment; $ is literal there, but %-specifiers are expanded."""
    assignment = f"{name}={value}".replace("%", "%%")
    return '"' + assignment.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_env_file_value(value: str) -> str:
    """A value in an EnvironmentFile: inside double quotes systemd unescapes \\ " $ `."""
    escaped = re.sub(r'([\\"$`])', r"\\\1", value)
    return f'"{escaped}"'


def state_directory(state_dir: str) -> str | None:
    """The StateDirectory= value (relative to /var/lib) when systemd can create the state
    dir itself, owned by User=; None when the operator has to create it."""
    path = PurePosixPath(state_dir)
    if not path.is_relative_to(_SYSTEMD_STATE_ROOT) or path == _SYSTEMD_STATE_ROOT:
        return None
    relative = str(path.relative_to(_SYSTEMD_STATE_ROOT))
    if not _SAFE_PATH.fullmatch("/" + relative) or ".." in path.parts:
        return None
    return relative


def exec_start(settings: UnitSettings) -> str:
    """The ExecStart= value: the agent with its flags, the join token left out."""
    args = [settings.exec_path, "agent", "--server", settings.server]
    if settings.labels:
        args += ["--labels", settings.labels]
    if settings.simulate_gpus is not None:
        args += ["--simulate-gpus", settings.simulate_gpus]
    args += settings.agent_args
    return " ".join(quote_exec_arg(arg) for arg in args)


def render_unit(settings: UnitSettings) -> str:
    """The text of gpufleet-agent.service. Pure; call check_settings first."""
    state_dir_lines = ""
    relative = state_directory(settings.state_dir)
    if relative is not None:
        state_dir_lines = (
            "# systemd creates the state dir, owned by User=, before the agent starts.\n"
            f"StateDirectory={relative}\n"
            "StateDirectoryMode=0700\n"
        )
    return f"""\
# Written by `{PROG}`; run it again to change this file.
# After a change: systemctl daemon-reload && systemctl restart gpufleet-agent
[Unit]
Description=gpufleet node agent
# The agent dials the control plane at once, and NVML answers faster with persistence
# mode on. A missing nvidia-persistenced.service is not an error (Wants=, not Requires=).
Wants=network-online.target nvidia-persistenced.service
After=network-online.target nvidia-persistenced.service

[Service]
Type=simple
User={settings.user}
ExecStart={exec_start(settings)}
# The join token is read from this root-only file (mode 0600): on the command line, `ps`
# and `systemctl show` would show it to every user. The leading "-" lets the agent start
# without it: the token is needed only until the node has registered once.
EnvironmentFile=-{settings.env_file.replace("%", "%%")}
Environment={quote_environment(STATE_DIR_ENV, settings.state_dir)}
{state_dir_lines}Restart=always
RestartSec={RESTART_SEC}
# KillMode=process: stopping or restarting the agent signals the agent alone. Instances run
# in process groups of their own and keep serving; the next agent on the same state dir
# adopts them (same pids, no restart), so an agent upgrade is invisible to callers. The
# default, control-group, would kill every instance whenever the agent restarts. Drain the
# node (or start the agent with --stop-instances-on-exit) to stop the instances too.
KillMode=process
TimeoutStopSec=30
# Instances inherit this limit; model servers hold many files and sockets.
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"""


def render_environment_file(join_token: str) -> str:
    """The environment file's text. Pure; call check_join_token first."""
    return (
        f"# Read by {UNIT_NAME} (EnvironmentFile=). The join token is needed only until the\n"
        "# node has registered once; this file may be deleted after that.\n"
        f"{JOIN_TOKEN_ENV}={quote_env_file_value(join_token)}\n"
    )


def default_exec_path(
    argv0: str, executable: str, cwd: str, which: Callable[[str, str | None], str | None]
) -> str | None:
    """The running gpufleet command: argv[0] when it is the console script, else the
    gpufleet script beside this Python (a virtual environment), else the one on PATH."""
    if PurePosixPath(argv0).name == "gpufleet":
        return os.path.normpath(os.path.join(cwd, argv0))
    beside = which("gpufleet", str(PurePosixPath(executable).parent))
    if beside is not None:
        return beside
    return which("gpufleet", None)


def _which(command: str, path: str | None) -> str | None:
    return shutil.which(command, path=path)


def write_file(path: Path, text: str, mode: int) -> None:
    """Replace `path` atomically with `text` at `mode` (the umask does not apply)."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), mode)
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class InstallPlan:
    """Everything install-systemd writes."""

    settings: UnitSettings
    unit_path: Path
    join_token: str | None
    """None: leave the environment file as it is."""


def install(plan: InstallPlan) -> list[str]:
    """Write the unit (0644) and, with a token, the environment file (0600); return what
    was written, one line each. Raises InstallError for a file that cannot be written."""
    written: list[str] = []
    if not plan.unit_path.parent.is_dir():
        raise InstallError(
            f"--unit-dir {plan.unit_path.parent} is not a directory; is systemd installed?"
        )
    try:
        if plan.join_token is not None:
            env_file = Path(plan.settings.env_file)
            env_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            write_file(env_file, render_environment_file(plan.join_token), 0o600)
            written.append(f"wrote {env_file} (mode 0600, holds the join token)")
        write_file(plan.unit_path, render_unit(plan.settings), 0o644)
        written.append(f"wrote {plan.unit_path}")
    except OSError as err:
        raise InstallError(
            f"cannot write {err.filename or plan.unit_path}: {err.strerror or err}; run it "
            "as root (sudo), or use --dry-run to print the unit"
        ) from None
    return written


def setup_notes(settings: UnitSettings, user_exists: bool) -> list[str]:
    """What the operator still has to do before the enable line works."""
    notes: list[str] = []
    if not user_exists:
        # Instances inherit HOME: model servers cache downloads under it.
        notes.append(
            f"user {settings.user} does not exist; create it: useradd --system --create-home "
            f"--home-dir /var/lib/{settings.user} --shell /usr/sbin/nologin {settings.user}"
        )
    if state_directory(settings.state_dir) is None:
        notes.append(
            f"systemd creates state dirs only below /var/lib; create this one: install -d "
            f"-m 0700 -o {settings.user} {shlex.quote(settings.state_dir)}"
        )
    return notes


def build_parser() -> argparse.ArgumentParser:
    """The flags of `gpufleet agent install-systemd` (agent flags go after `--`)."""
    parser = OneLineErrorParser(
        prog=PROG,
        usage=f"{PROG} --server HOST:PORT [--join-token T] [options] [-- AGENT_FLAG ...]",
        description="Write a systemd unit that runs the gpufleet agent on this node, and the "
        "environment file holding its join token. Nothing is started: the last line printed "
        "is the systemctl command to run.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="control plane address")
    parser.add_argument(
        "--join-token",
        default=os.environ.get(JOIN_TOKEN_ENV) or None,
        help=f"join token (default: ${JOIN_TOKEN_ENV}); written to --env-file, never to the "
        "unit; without one the environment file is left as it is",
    )
    parser.add_argument("--simulate-gpus", metavar="COUNTxMIB", help="simulated GPUs, e.g. 2x81559")
    parser.add_argument("--labels", default="", metavar="K=V,...", help="node labels, e.g. zone=a")
    parser.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        help=f"agent state dir (default: {DEFAULT_STATE_DIR}; systemd creates it when below /var/lib)",
    )
    parser.add_argument(
        "--unit-dir", type=Path, default=Path(DEFAULT_UNIT_DIR), help=f"default: {DEFAULT_UNIT_DIR}"
    )
    parser.add_argument(
        "--env-file", default=DEFAULT_ENV_FILE, help=f"join token file (default: {DEFAULT_ENV_FILE})"
    )
    parser.add_argument(
        "--user", default=DEFAULT_USER, help=f"user the agent and its instances run as (default: {DEFAULT_USER})"
    )
    parser.add_argument(
        "--exec",
        dest="exec_path",
        metavar="PATH",
        default=None,
        help="the gpufleet command the unit runs (default: the one running now)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the unit instead of writing anything"
    )
    return parser


def split_agent_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(install-systemd's own flags, the agent flags after the first `--`)."""
    if "--" not in argv:
        return list(argv), []
    cut = list(argv).index("--")
    return list(argv[:cut]), list(argv[cut + 1 :])


def check_agent_args(agent_args: Sequence[str], agent_parser: argparse.ArgumentParser) -> None:
    """InstallError for agent flags that install-systemd sets itself; the agent's parser
    exits (SystemExit, message on stderr) for flags it does not accept."""
    if not agent_args:
        return
    parsed = agent_parser.parse_args(list(agent_args))
    owned = {
        "--server": parsed.server != agent_parser.get_default("server"),
        "--join-token": parsed.join_token is not None,
        "--state-dir": parsed.state_dir is not None,
        "--labels": parsed.labels != "",
        "--simulate-gpus": parsed.simulate_gpus is not None,
    }
    for flag, given in owned.items():
        if given:
            raise InstallError(
                f"give {flag} to install-systemd itself, before --, not as an agent flag"
                + (" (the token belongs in the environment file)" if flag == "--join-token" else "")
            )


def main(argv: Sequence[str], agent_parser: argparse.ArgumentParser) -> int:
    """Run install-systemd; 0 when written (or printed), 1 when a file cannot be written,
    2 for bad flags. `agent_parser` checks the agent flags given after `--`."""
    own, agent_args = split_agent_args(argv)
    try:
        args = build_parser().parse_args(own)
        check_agent_args(agent_args, agent_parser)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    except InstallError as err:
        return _fail(str(err), EXIT_USAGE)
    exec_path = args.exec_path or default_exec_path(sys.argv[0], sys.executable, os.getcwd(), _which)
    if exec_path is None:
        return _fail(
            "cannot tell where the gpufleet command is installed; pass --exec /path/to/gpufleet",
            EXIT_USAGE,
        )
    settings = UnitSettings(
        exec_path=exec_path,
        server=args.server,
        state_dir=args.state_dir,
        env_file=args.env_file,
        user=args.user,
        labels=args.labels,
        simulate_gpus=args.simulate_gpus,
        agent_args=tuple(agent_args),
    )
    try:
        check_settings(settings)
        if args.join_token is not None:
            check_join_token(args.join_token)
    except InstallError as err:
        return _fail(str(err), EXIT_USAGE)
    if args.dry_run:
        sys.stdout.write(render_unit(settings))
        token_note = f"; {settings.env_file} (mode 0600) the join token" if args.join_token else ""
        print(
            f"dry run, nothing written: {args.unit_dir / UNIT_NAME} would hold the unit "
            f"above{token_note}",
            file=sys.stderr,
        )
        return EXIT_OK
    plan = InstallPlan(settings, args.unit_dir / UNIT_NAME, args.join_token)
    try:
        written = install(plan)
    except InstallError as err:
        return _fail(str(err), EXIT_FAILED)
    for line in written:
        print(line)
    if args.join_token is None:
        print(
            f"no --join-token: {settings.env_file} was left as it is; the agent can start "
            f"only if it holds a token or {settings.state_dir} already holds the node's identity"
        )
    for note in setup_notes(settings, _user_exists(settings.user)):
        print(f"note: {note}")
    print("start it with:")
    print(f"  {ENABLE_LINE}")
    return EXIT_OK


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return code
