"""Which hosts count as this machine only, and what a token must be: the rules behind "a
listener reachable from other hosts needs a token", shared by the device's API (``api.listen``,
``api.token_file``) and the operator console (``--listen``, ``--token-file``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from runtime.errors import InferdError


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token_file(path: str, option: str, error: type[InferdError] = InferdError) -> bytes:
    """The bearer token in ``path`` (surrounding whitespace dropped): at least 16 printable
    ASCII characters without spaces, else ``error`` naming ``option``."""
    try:
        token = Path(path).read_bytes().strip()
    except OSError as err:
        raise error(f"{option} {path}: cannot read: {err.strerror}") from err
    if len(token) < 16 or not token.isascii() or any(c <= 32 or c == 127 for c in token):
        raise error(
            f"{option} {path}: the token must be at least 16 printable characters"
            " without spaces (e.g. the output of: openssl rand -hex 32)"
        )
    return token
