"""The loopback rule the device's API and the operator console share (a listener reachable
from other hosts needs a token)."""

from __future__ import annotations

import pytest

from agent.config import parse_config
from runtime.addresses import is_loopback
from runtime.errors import ConfigError


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.8.9.10", "::1"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org", "", "[::1]"])
def test_other_hosts(host: str) -> None:
    assert not is_loopback(host)


def test_the_api_on_another_address_needs_a_token(tmp_path) -> None:
    base = {"device_id": "d", "state_dir": str(tmp_path)}
    parse_config({**base, "api": {"listen": "127.0.0.1:8080"}}, environ={})
    with pytest.raises(ConfigError, match="reachable from other hosts"):
        parse_config({**base, "api": {"listen": "0.0.0.0:8080"}}, environ={})
