"""Every `gpufleet` command's --help ends with an "Examples:" block that shows the command."""

from __future__ import annotations

import argparse

import pytest

from gpufleet.client.cli.commands import COMMANDS
from gpufleet.client.cli.main import build_parser, main


def registered_commands() -> list[str]:
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(subparsers.choices)


# Commands with subcommands of their own, run by the process they forward to.
NESTED = [
    ["agent", "install-systemd"],
    ["server", "join-token"],
    ["server", "join-token", "create"],
    ["server", "join-token", "list"],
]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("GPUFLEET_SERVER", "GPUFLEET_TOKEN", "GPUFLEET_JOIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GPUFLEET_STATE_DIR", str(tmp_path / "state"))


def test_every_registered_command_is_walked() -> None:
    names = registered_commands()
    assert len(names) == len(COMMANDS)
    assert {"server", "gateway", "agent", "up", "apply", "scale", "invoke"} <= set(names)


@pytest.mark.parametrize(
    "command", [[name] for name in registered_commands()] + NESTED, ids=" ".join
)
def test_help_has_examples_of_the_command(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "Examples:" in lines, f"no Examples: block in `gpufleet {' '.join(command)} --help`"
    block = lines[lines.index("Examples:") + 1 :]
    examples = [line for line in block if line.startswith("  ")]
    assert examples, out
    invocation = f"gpufleet {' '.join(command)}"
    assert any(invocation in line for line in examples), out


def test_wait_is_documented_where_it_exists(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("apply", "scale"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "--wait" in out and "--timeout SECONDS" in out
        assert f"gpufleet {command}" in out.split("Examples:")[1] and "--wait" in out.split("Examples:")[1]
