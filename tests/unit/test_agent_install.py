"""`gpufleet agent install-systemd`: the rendered unit, quoting, file modes, refusals."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from gpufleet.agent import install
from gpufleet.agent.main import main as agent_main
from gpufleet.agent.install import (
    InstallError,
    UnitSettings,
    check_settings,
    default_exec_path,
    quote_env_file_value,
    quote_environment,
    quote_exec_arg,
    render_environment_file,
    render_unit,
    state_directory,
)
from gpufleet.client.cli.main import main as client_main

TOKEN = "tok_en-0123456789abcdefghijklmnopqrstuvwxyzABCDE"


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUFLEET_JOIN_TOKEN", raising=False)


def settings(**changes: object) -> UnitSettings:
    base: dict[str, object] = {
        "exec_path": "/opt/gpufleet/bin/gpufleet",
        "server": "10.0.0.5:50051",
        "state_dir": "/var/lib/gpufleet/agent",
        "env_file": "/etc/gpufleet/agent.env",
        "user": "gpufleet",
    }
    base.update(changes)
    return UnitSettings(**base)  # type: ignore[arg-type]


def directives(unit: str) -> dict[str, list[str]]:
    """Key -> values, comments and section headers left out."""
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if not line or line.startswith(("#", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key, []).append(value)
    return found


# -- a reader of the systemd syntax the unit uses, to check that quoting round-trips -------


def split_exec(line: str) -> list[str]:
    """ExecStart= as systemd reads it: %-specifiers first (only %% here), then words split
    on whitespace with double quotes and C escapes, then $$ -> $."""
    if re.search(r"%[^%]", line.replace("%%", "")):
        raise AssertionError(f"unescaped % specifier in {line!r}")
    line = line.replace("%%", "\0")
    words: list[str] = []
    i = 0
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        word = ""
        if line[i] == '"':
            i += 1
            while line[i] != '"':
                if line[i] == "\\":
                    i += 1
                word += line[i]
                i += 1
            i += 1
            if i < len(line) and line[i] != " ":
                raise AssertionError(f"closing quote not followed by a space in {line!r}")
        else:
            while i < len(line) and line[i] != " ":
                if line[i] in "\\\"'":
                    raise AssertionError(f"unquoted {line[i]!r} in {line!r}")
                word += line[i]
                i += 1
        if re.search(r"\$[^$]|\$$", word.replace("$$", "")):
            raise AssertionError(f"unescaped $ in {word!r}")
        words.append(word.replace("$$", "$").replace("\0", "%"))
    return words


def read_env_file_value(text: str) -> str:
    """A double-quoted EnvironmentFile value as systemd reads it."""
    if not (text.startswith('"') and text.endswith('"')):
        raise AssertionError(f"not double quoted: {text!r}")
    out, i, body = "", 0, text[1:-1]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body) and body[i + 1] in '\\"$`':
            out += body[i + 1]
            i += 2
            continue
        if body[i] in '"$`':
            raise AssertionError(f"unescaped {body[i]!r} in {text!r}")
        out += body[i]
        i += 1
    return out


printable = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=40)


@given(printable)
def test_exec_arguments_round_trip_through_systemd_quoting(arg: str) -> None:
    assert split_exec("/bin/x " + quote_exec_arg(arg)) == ["/bin/x", arg]


@given(printable)
def test_env_file_values_round_trip(value: str) -> None:
    assert read_env_file_value(quote_env_file_value(value)) == value


def test_plain_words_stay_unquoted_and_odd_ones_are_quoted() -> None:
    assert quote_exec_arg("--labels") == "--labels"
    assert quote_exec_arg("zone=a,tier=gpu") == "zone=a,tier=gpu"
    assert quote_exec_arg("team=a b") == '"team=a b"'
    assert quote_exec_arg('say "hi"') == '"say \\"hi\\""'
    assert quote_exec_arg("cost=$5 50%") == '"cost=$$5 50%%"'
    assert quote_environment("DIR", '/srv/my "gpu" 100%') == '"DIR=/srv/my \\"gpu\\" 100%%"'


def test_unit_has_restart_kill_mode_ordering_and_no_token() -> None:
    unit = render_unit(settings(labels="zone=a", simulate_gpus="2x81559"))
    found = directives(unit)
    assert found["Type"] == ["simple"]
    assert found["Restart"] == ["always"]
    assert found["RestartSec"] == ["5"]
    assert found["KillMode"] == ["process"]
    assert found["User"] == ["gpufleet"]
    assert found["After"] == ["network-online.target nvidia-persistenced.service"]
    assert found["Wants"] == ["network-online.target nvidia-persistenced.service"]
    assert found["EnvironmentFile"] == ["-/etc/gpufleet/agent.env"]
    assert found["Environment"] == ['"GPUFLEET_AGENT_STATE_DIR=/var/lib/gpufleet/agent"']
    assert found["StateDirectory"] == ["gpufleet/agent"]
    assert found["StateDirectoryMode"] == ["0700"]
    assert found["WantedBy"] == ["multi-user.target"]
    assert split_exec(found["ExecStart"][0]) == [
        "/opt/gpufleet/bin/gpufleet", "agent", "--server", "10.0.0.5:50051",
        "--labels", "zone=a", "--simulate-gpus", "2x81559",
    ]
    assert "join" not in found["ExecStart"][0]
    # The comment explains why KillMode=process: instances survive an agent restart.
    lines = unit.splitlines()
    at = lines.index("KillMode=process")
    comment: list[str] = []
    while lines[at - 1 - len(comment)].startswith("#"):
        comment.insert(0, lines[at - 1 - len(comment)])
    text = " ".join(comment)
    assert "keep serving" in text and "adopts them" in text and "kill every instance" in text
    sections = re.findall(r"^\[(\w+)\]$", unit, re.MULTILINE)
    assert sections == ["Unit", "Service", "Install"]


def test_odd_values_are_quoted_in_the_unit() -> None:
    odd = settings(
        exec_path="/opt/my tools/gpufleet",
        state_dir='/srv/gpu "fleet" 100%',
        labels="team=ml ops,cost=$5",
        agent_args=("--advertise-host", "10.0.0.7", "--name", "node 'seven'"),
    )
    check_settings(odd)
    found = directives(render_unit(odd))
    assert split_exec(found["ExecStart"][0]) == [
        "/opt/my tools/gpufleet", "agent", "--server", "10.0.0.5:50051",
        "--labels", "team=ml ops,cost=$5", "--advertise-host", "10.0.0.7",
        "--name", "node 'seven'",
    ]
    assert found["Environment"] == ['"GPUFLEET_AGENT_STATE_DIR=/srv/gpu \\"fleet\\" 100%%"']
    # Outside /var/lib systemd cannot create the state dir; the operator is told to.
    assert "StateDirectory" not in found
    notes = install.setup_notes(odd, user_exists=False)
    assert any("useradd" in note for note in notes)
    assert any("install -d -m 0700 -o gpufleet '/srv/gpu \"fleet\" 100%'" in n for n in notes)


def test_environment_file_holds_the_token_quoted() -> None:
    text = render_environment_file('a"b$c')
    line = next(line for line in text.splitlines() if not line.startswith("#"))
    key, _, value = line.partition("=")
    assert key == "GPUFLEET_JOIN_TOKEN" and read_env_file_value(value) == 'a"b$c'


@pytest.mark.parametrize(
    ("state_dir", "expected"),
    [
        ("/var/lib/gpufleet/agent", "gpufleet/agent"),
        ("/var/lib/gpufleet", "gpufleet"),
        ("/var/lib", None),
        ("/var/lib/../etc", None),
        ("/srv/gpufleet", None),
        ("/var/lib/with space", None),
    ],
)
def test_state_directory_only_below_var_lib(state_dir: str, expected: str | None) -> None:
    assert state_directory(state_dir) == expected


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"server": "10.0.0.5"}, "--server"),
        ({"server": "host:99999"}, "--server"),
        ({"server": "a:1\nExecStartPre=/bin/rm"}, "--server"),
        ({"labels": "zone"}, "--labels"),
        ({"simulate_gpus": "lots"}, "--simulate-gpus"),
        ({"exec_path": "gpufleet"}, "--exec"),
        ({"state_dir": "relative/dir"}, "--state-dir"),
        ({"state_dir": "/var/lib/x\ny"}, "--state-dir"),
        ({"env_file": "/etc/gpu fleet.env"}, "--env-file"),
        ({"env_file": "agent.env"}, "--env-file"),
        ({"user": "Root User"}, "--user"),
        ({"agent_args": ("--name", "a\nb")}, "after --"),
    ],
)
def test_bad_values_are_refused(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(InstallError, match=re.escape(fragment)):
        check_settings(settings(**changes))


def test_join_token_must_be_one_word() -> None:
    for bad in ("", "two words", "line\nbreak"):
        with pytest.raises(InstallError, match="--join-token"):
            install.check_join_token(bad)
    install.check_join_token(TOKEN)


def test_default_exec_is_the_running_console_script() -> None:
    def which(command: str, path: str | None) -> str | None:
        return {"/venv/bin": "/venv/bin/gpufleet", None: "/usr/bin/gpufleet"}.get(path)

    assert default_exec_path("/usr/local/bin/gpufleet", "/usr/bin/python3", "/", which) == (
        "/usr/local/bin/gpufleet"
    )
    assert default_exec_path("./gpufleet", "/usr/bin/python3", "/home/me/bin", which) == (
        "/home/me/bin/gpufleet"
    )
    # `python -m ...`: the script beside the interpreter (a virtual environment), else PATH.
    assert default_exec_path("/x/__main__.py", "/venv/bin/python", "/", which) == "/venv/bin/gpufleet"
    assert default_exec_path("/x/__main__.py", "/usr/bin/python3", "/", which) == "/usr/bin/gpufleet"
    assert default_exec_path("/x/__main__.py", "/usr/bin/python3", "/", lambda c, p: None) is None


def run_install(tmp_path: Path, *extra: str, token: str | None = TOKEN) -> int:
    args = [
        "install-systemd",
        "--server", "10.0.0.5:50051",
        "--unit-dir", str(tmp_path / "units"),
        "--env-file", str(tmp_path / "etc" / "agent.env"),
        "--exec", "/opt/gpufleet/bin/gpufleet",
        *(["--join-token", token] if token is not None else []),
        *extra,
    ]
    return agent_main(args)


def test_install_writes_unit_0644_and_token_file_0600_whatever_the_umask(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "units").mkdir()
    old = os.umask(0o077)
    try:
        assert run_install(tmp_path, "--labels", "zone=a") == 0
    finally:
        os.umask(old)
    unit = tmp_path / "units" / "gpufleet-agent.service"
    env_file = tmp_path / "etc" / "agent.env"
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert TOKEN not in unit.read_text()
    assert f"EnvironmentFile=-{env_file}" in unit.read_text()
    assert TOKEN in env_file.read_text()
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].strip() == (
        "systemctl daemon-reload && systemctl enable --now gpufleet-agent"
    )
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == ["gpufleet-agent.service"]

    # Run again with another token and no token: the unit is replaced in place, and without
    # a token the environment file is left as it was.
    assert run_install(tmp_path, token="second-token") == 0
    assert "second-token" in env_file.read_text()
    assert run_install(tmp_path, token=None) == 0
    assert "second-token" in env_file.read_text()
    assert "left as it is" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--server", "nonsense"], "--server 'nonsense' is not HOST:PORT"),
        (["--server", "h:1", "--", "--join-token", "x"], "give --join-token to install-systemd"),
        (["--server", "h:1", "--", "--state-dir", "/x"], "give --state-dir to install-systemd"),
        (["--server", "h:1", "--", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--server", "h:1", "--user", "Bad User"], "--user must be a user name"),
        (["--server", "h:1", "--join-token", "a b"], "--join-token must be the token alone"),
    ],
)
def test_refused_flags_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "units").mkdir()
    code = agent_main(
        ["install-systemd", "--unit-dir", str(tmp_path / "units"),
         "--env-file", str(tmp_path / "agent.env"), "--exec", "/bin/gpufleet", *args]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert list((tmp_path / "units").iterdir()) == []
    assert not (tmp_path / "agent.env").exists()


def test_a_missing_unit_dir_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_install(tmp_path) == 1  # tmp_path/units does not exist
    assert "--unit-dir" in capsys.readouterr().err


def test_dry_run_prints_the_unit_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "units").mkdir()
    assert run_install(tmp_path, "--dry-run") == 0
    captured = capsys.readouterr()
    assert "KillMode=process" in captured.out and TOKEN not in captured.out
    assert "nothing written" in captured.err
    assert list((tmp_path / "units").iterdir()) == []
    assert not (tmp_path / "etc").exists()


def test_agent_flags_after_double_dash_reach_exec_start_through_the_gpufleet_cli(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = client_main(
        ["agent", "install-systemd", "--server", "10.0.0.5:50051", "--exec", "/bin/gpufleet",
         "--dry-run", "--", "--tls-ca", "/etc/ca.pem", "--advertise-host", "10.0.0.7"]
    )
    assert code == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("ExecStart=")]
    assert split_exec(line.removeprefix("ExecStart=")) == [
        "/bin/gpufleet", "agent", "--server", "10.0.0.5:50051",
        "--tls-ca", "/etc/ca.pem", "--advertise-host", "10.0.0.7",
    ]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    odd = settings(
        exec_path=sys.executable,
        state_dir='/srv/gpu "fleet" 100%',
        labels="team=ml ops,cost=$5",
        env_file=str(tmp_path / "agent.env"),
        user="root",
        agent_args=("--name", "node 'seven'"),
    )
    check_settings(odd)
    unit = tmp_path / "gpufleet-agent.service"
    unit.write_text(render_unit(odd))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "gpufleet-agent.service" not in result.stderr, result.stderr
