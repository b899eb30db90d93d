"""Every operator command takes the same broker options; a password never on the command line."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from runtime.errors import MqttError
from telemetry.broker import BrokerOptions, parse_broker
from tests.support.broker import Broker
from updater.inferctl.broker import broker_from_args
from updater.inferctl.main import build_parser, main

BROKER_ARGS = [
    "--broker", "mqtts://mq.example:8884", "--prefix", "fleet", "--protocol", "3.1.1",
    "--username", "ops", "--ca-file", "ca.pem", "--cert-file", "c.pem", "--key-file", "k.pem",
]  # fmt: skip
COMMANDS = {
    "watch": ["watch"],
    "push": ["push", "--group", "g"],
    "status": ["status"],
    "rollout": ["rollout", "classifier"],
    "collect": ["collect", "--out", "data"],
}


def _options(argv: list[str], environ: dict[str, str] | None = None) -> BrokerOptions:
    args = build_parser().parse_args(argv)
    return broker_from_args(args, environ=environ or {})


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_operator_command_takes_the_same_broker_options(command: str) -> None:
    opts = _options([*COMMANDS[command], *BROKER_ARGS])
    assert (opts.host, opts.port, opts.protocol, opts.username) == (
        "mq.example",
        8884,
        "3.1.1",
        "ops",
    )
    assert (opts.tls, opts.ca_file, opts.cert_file, opts.key_file) == (
        True,
        "ca.pem",
        "c.pem",
        "k.pem",
    )
    assert build_parser().parse_args([*COMMANDS[command], *BROKER_ARGS]).prefix == "fleet"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_password_is_refused_on_the_command_line(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*COMMANDS[command], "--password", "s3cret"])
    assert "unrecognized arguments: --password" in capsys.readouterr().err


def test_password_from_the_environment_or_a_file(tmp_path: Path) -> None:
    env = {"INFERD_MQTT_PASSWORD": "from-env"}
    assert _options(["status", "--username", "ops"], env).password == "from-env"
    assert _options(["status"], env).password is None  # no user, no password sent
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    opts = _options(["status", "--username", "ops", "--password-file", str(pw)], env)
    assert opts.password == "from-file" and "from-file" not in repr(opts)
    with pytest.raises(MqttError, match="--password-file needs --username"):
        _options(["status", "--password-file", str(pw)])
    with pytest.raises(MqttError, match=r"--password-file .*missing"):
        _options(["status", "--username", "ops", "--password-file", str(tmp_path / "missing")])


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("broker.lan", ("broker.lan", None, False)),
        ("broker.lan:1884", ("broker.lan", 1884, False)),
        ("mqtt://10.0.0.5:1885", ("10.0.0.5", 1885, False)),
        ("mqtts://broker.lan", ("broker.lan", None, True)),
        ("[::1]:1886", ("::1", 1886, False)),
        ("::1", ("::1", None, False)),
    ],
)
def test_broker_address_forms(text: str, want: tuple[str, int | None, bool]) -> None:
    assert parse_broker(text) == want


@pytest.mark.parametrize("text", ["", "host:port", "http://host", "host:70000", ":1883"])
def test_bad_broker_addresses_are_one_clear_error(text: str) -> None:
    with pytest.raises(MqttError, match="--broker"):
        parse_broker(text)


def test_tls_default_port_is_8883() -> None:
    assert _options(["status", "--broker", "mqtts://b"]).port == 8883
    assert _options(["status", "--broker", "b", "--ca-file", "ca.pem"]).port == 8883
    assert _options(["status", "--broker", "b"]).port == 1883


def test_credentials_reach_a_broker_that_requires_them(
    tmp_path: Path,
    broker_factory: Callable[..., Broker],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("ops:right\n")
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True)
    b = broker_factory(f"allow_anonymous false\npassword_file {passwd}\n")
    status = ["status", "--broker", f"{b.host}:{b.port}", "--wait", "0.2", "--username", "ops"]
    monkeypatch.setenv("INFERD_MQTT_PASSWORD", "right")
    assert main(status) == 0
    assert "no device has published a status" in capsys.readouterr().out
    monkeypatch.setenv("INFERD_MQTT_PASSWORD", "wrong")
    assert main(status) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused the connection" in err[0] and "wrong" not in err[0]
