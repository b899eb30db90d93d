"""``mqtt.hosts``: the nodes of a clustered broker, or ``host``/``port`` for one; not both."""

from __future__ import annotations

import pytest

from agent.config import parse_config
from agent.mqtt.link import broker_options
from runtime.errors import ConfigError, MqttError
from telemetry.broker import parse_brokers
from updater.inferctl.broker import broker_from_args
from updater.inferctl.main import build_parser


def test_host_and_port_stay_the_one_broker_shorthand() -> None:
    assert parse_config({}, environ={}).mqtt.nodes == (("127.0.0.1", 1883),)
    cfg = parse_config({"mqtt": {"host": "10.1.2.3", "port": 8883}}, environ={})
    assert cfg.mqtt.nodes == (("10.1.2.3", 8883),)
    opts = broker_options(cfg)
    assert (opts.host, opts.port, opts.nodes) == ("10.1.2.3", 8883, (("10.1.2.3", 8883),))


def test_hosts_keep_their_order_and_default_ports() -> None:
    cfg = parse_config({"mqtt": {"hosts": ["a.lan:1884", "b.lan", "[fd00::7]:1885"]}}, environ={})
    assert cfg.mqtt.nodes == (("a.lan", 1884), ("b.lan", 1883), ("fd00::7", 1885))
    tls = parse_config({"mqtt": {"hosts": ["a", "b"], "tls": {}}}, environ={})
    assert tls.mqtt.nodes == (("a", 8883), ("b", 8883))
    opts = broker_options(cfg)
    assert (opts.host, opts.port) == ("a.lan", 1884)
    assert opts.at(opts.nodes[2]).where == "mqtt://fd00::7:1885"


def test_hosts_from_the_environment() -> None:
    cfg = parse_config({}, environ={"INFERD_MQTT__HOSTS": "[n1:1883, n2:1883]"})
    assert cfg.mqtt.nodes == (("n1", 1883), ("n2", 1883))


@pytest.mark.parametrize(
    ("mqtt", "fragment"),
    [
        ({"hosts": ["a:1883"], "host": "b"}, "give hosts (a list of HOST:PORT) or host/port"),
        ({"hosts": ["a:1883"], "port": 1884}, "not both"),
        ({"hosts": ["a:port"]}, "'a:port' is not HOST[:PORT]"),
        ({"hosts": ["a:70000"]}, "is not HOST[:PORT]"),
        ({"hosts": [""]}, "is not HOST[:PORT]"),
        ({"hosts": "a:1883"}, "$.mqtt.hosts"),
    ],
)
def test_bad_hosts_are_one_line_naming_the_field(mqtt: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"mqtt": mqtt}, environ={})
    assert fragment in str(info.value)
    assert "$.mqtt" in str(info.value) and "\n" not in str(info.value)


def test_operator_broker_lists() -> None:
    assert parse_brokers("a:1,b:2") == ([("a", 1), ("b", 2)], False)
    assert parse_brokers("mqtts://a, b") == ([("a", None), ("b", None)], True)
    with pytest.raises(MqttError, match="--broker"):
        parse_brokers("a:1,,b")


@pytest.mark.parametrize("command", [["watch"], ["status"], ["push", "--group", "g"]])
def test_every_operator_command_takes_a_node_list(command: list[str]) -> None:
    args = build_parser().parse_args([*command, "--broker", "n1:1883,n2:1884,mqtts://n3"])
    opts = broker_from_args(args, environ={})
    assert opts.nodes == (("n1", 1883), ("n2", 1884), ("n3", 8883))
    assert (opts.host, opts.port, opts.tls) == ("n1", 1883, True)
