"""Agent flag parsing: labels, addresses, state dir defaults, and `gpufleet agent` usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.agent.config import ConfigError, default_state_dir, parse_labels, split_host_port
from gpufleet.agent.main import build_parser, config_from_args, main


def test_parse_labels() -> None:
    assert parse_labels("") == {}
    assert parse_labels("zone=a, tier=gpu ,") == {"zone": "a", "tier": "gpu"}
    assert parse_labels("empty=") == {"empty": ""}
    assert parse_labels("example.com/rack=r1") == {"example.com/rack": "r1"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zone", "is not KEY=VALUE"),
        ("=a", "key ''"),
        ("bad key=a", "key 'bad key'"),
        ("zone=a,zone=b", "given twice"),
        ("k=" + "v" * 254, "longer than 253"),
    ],
)
def test_parse_labels_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_labels(text)


def test_split_host_port() -> None:
    assert split_host_port("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert split_host_port("[::1]:7") == ("::1", 7)
    assert split_host_port("cp.example.com:443") == ("cp.example.com", 443)
    for bad in ("127.0.0.1", ":50051", "host:0", "host:65536", "host:port"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            split_host_port(bad)


def test_default_state_dir() -> None:
    home = Path("/home/u")
    assert default_state_dir({}, home) == home / ".gpufleet" / "agent"
    assert default_state_dir({"GPUFLEET_STATE_DIR": "/srv/gf"}, home) == Path("/srv/gf/agent")
    assert default_state_dir(
        {"GPUFLEET_STATE_DIR": "/srv/gf", "GPUFLEET_AGENT_STATE_DIR": "/var/agent"}, home
    ) == Path("/var/agent")


def test_config_from_args(tmp_path: Path) -> None:
    args = build_parser({}).parse_args(
        [
            "--server", "127.0.0.1:6000", "--join-token", "T", "--labels", "zone=a",
            "--state-dir", str(tmp_path / "s"), "--name", "gpu-1", "--simulate-gpus", "2x81559",
            "--workdir", str(tmp_path),
        ]
    )
    config = config_from_args(args, {})
    assert config.server == "127.0.0.1:6000"
    assert config.join_token == "T"
    assert dict(config.labels) == {"zone": "a"}
    assert config.state_dir == tmp_path / "s"
    assert config.node_name == "gpu-1"
    assert config.simulate_gpus == "2x81559"
    assert config.workdir == str(tmp_path)
    # The route towards a loopback control plane starts at loopback.
    assert config.advertise_host == "127.0.0.1"
    assert config.tls is None and not config.stop_instances_on_exit


def test_environment_supplies_server_and_join_token() -> None:
    args = build_parser({"GPUFLEET_SERVER": "10.1.2.3:9", "GPUFLEET_JOIN_TOKEN": "from-env"}).parse_args([])
    assert (args.server, args.join_token) == ("10.1.2.3:9", "from-env")


def test_tls_flags(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"CA")
    config = config_from_args(build_parser({}).parse_args(["--tls-ca", str(ca)]), {})
    assert config.tls is not None and config.tls.root_cert == b"CA" and config.tls.client_cert is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--server", "nohost"], "--server 'nohost' is not HOST:PORT"),
        (["--labels", "zone"], "--labels: 'zone' is not KEY=VALUE"),
        (["--simulate-gpus", "81559x2"], "COUNT comes first"),
        (["--simulate-gpus", "two"], "is not COUNTxMIB"),
        (["--tls-cert", "c.pem"], "needs both --tls-cert and --tls-key"),
        (["--tls-ca", "/nonexistent/ca.pem"], "cannot read --tls-ca /nonexistent/ca.pem"),
        (["--workdir", "/nonexistent/dir"], "--workdir /nonexistent/dir is not a directory"),
        (["--heartbeat-interval", "0"], "--heartbeat-interval must be"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--heartbeat-interval", "soon"], "invalid float value"),
    ],
)
def test_bad_flags_exit_2_with_one_clear_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("gpufleet agent: error:")
    assert "Traceback" not in err


def test_help_exits_0_and_documents_sigterm(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--stop-instances-on-exit" in out and "SIGTERM" in out
