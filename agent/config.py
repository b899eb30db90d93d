"""Configuration: YAML validated into frozen msgspec structs, with env overrides.

Any key can be overridden with ``INFERD_<SECTION>__<KEY>`` (``INFERD_MQTT__HOST``).

Every error names the field path (``$.models[0].threads``) and the reason, and is raised as
:class:`ConfigError`; the CLI turns it into one line and exit code 78 (EX_CONFIG).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from runtime.addresses import is_loopback
from runtime.errors import ConfigError
from runtime.options import RuntimeOptions, runtime_for
from telemetry.broker import parse_node
from telemetry.config import QualityConfig, TelemetryConfig
from updater.device.config import UpdatesConfig

log = logging.getLogger(__name__)

EX_CONFIG = 78

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOPIC_BAD = re.compile(r"[#+\x00]")


def _check_name(what: str, value: str) -> None:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-64 letters, digits, '_', '.', '-' (no slashes or spaces)"
        )


class ModelConfig(RuntimeOptions, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One model slot: its runtime options plus where the model is and how it is reported."""

    name: str
    path: str
    version: str = "1"
    stuck_run_s: float = 30.0
    labels: tuple[str, ...] = ()
    log_tensors: bool = False

    def __post_init__(self) -> None:
        _check_name("model name", self.name)
        if self.runtime == "onnxruntime" and runtime_for(self.path) == "tflite":
            # a .tflite file is LiteRT's (onnxruntime cannot read it), as on the operator side:
            # a name and a path serve any model, the runtime default notwithstanding
            msgspec.structs.force_setattr(self, "runtime", "tflite")
        super().__post_init__()
        if self.stuck_run_s <= 0:
            raise ValueError("stuck_run_s must be > 0")


class ApiConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    listen: str = "127.0.0.1:8080"
    max_body_bytes: int = 16 * 1024 * 1024
    workers: int = 8
    """Requests run at once; more wait in arrival order (health checks never wait)."""
    max_connections: int = 128
    """Open connections; beyond it the longest-idle one is closed, else the new one gets 503."""
    max_header_bytes: int = 16384
    """Request line and header fields together (414/431 beyond)."""
    header_timeout_s: float = 10.0
    """From a request's first byte to the end of its header (408 after)."""
    body_timeout_s: float = 30.0
    """From the end of a request's header to the end of its body (408 after)."""
    idle_timeout_s: float = 10.0
    """A keep-alive connection waiting for its next request is closed after this."""
    drain_timeout_s: float = 5.0
    """At SIGTERM, how long requests already being run get to finish and be sent; keep it
    below the unit's TimeoutStopSec."""
    busy_poll_us: int = 200
    """After answering a keep-alive client that sends its requests back to back, a worker
    checks for the next one this long without sleeping (one worker at a time, yielding the
    CPU at each check); 0: it sleeps at once. Saves the wake-up of a small request;
    ``inferd_http_busy_polls_total`` counts the checks that paid and those that did not."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins (``https://host:port``) allowed to call the API; others get 403."""
    token_file: str | None = None
    """A file holding the bearer token clients must send (``Authorization: Bearer ...``)."""
    insecure: bool = False
    """Serve off loopback without a token (a warning at start)."""

    def __post_init__(self) -> None:
        address = listen_address(self.listen)
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if self.max_header_bytes < 1024:
            raise ValueError("max_header_bytes must be >= 1024")
        for key in ("header_timeout_s", "body_timeout_s", "idle_timeout_s", "drain_timeout_s"):
            if not 0 < getattr(self, key) <= 3600:  # also refuses NaN
                raise ValueError(f"{key} must be > 0 and <= 3600 seconds")
        if not 0 <= self.busy_poll_us <= 1000:
            raise ValueError("busy_poll_us must be between 0 and 1000")
        for origin in self.allowed_origins:
            if not _ORIGIN_RE.match(origin):
                raise ValueError(
                    f"allowed_origins: {origin!r} must be scheme://host[:port], as browsers send"
                )
        if (
            isinstance(address, tuple)
            and not is_loopback(address[0])
            and self.token_file is None
            and not self.insecure
        ):
            raise ValueError(
                f"listen {self.listen} is reachable from other hosts: set token_file (clients"
                " send Authorization: Bearer <token>) or insecure: true"
            )


_ORIGIN_RE = re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s?#]+$")


class TlsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")


class MqttConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    host: str | None = None
    """One broker (default 127.0.0.1); the shorthand of ``hosts`` with one entry."""
    port: int | None = None
    """Its port (default 1883)."""
    hosts: tuple[str, ...] = ()
    """The nodes of a clustered broker, ``HOST[:PORT]`` (port 1883, or 8883 with TLS): the
    device connects to the first that answers and moves to the next when its node goes away."""
    topic_prefix: str = "inferd"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    tls: TlsConfig | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    reply_topic_prefixes: tuple[str, ...] = ("{root}/infer/", "replies/")
    """Topics an MQTT reply (inference or command) may go to; ``{root}`` is
    ``{topic_prefix}/{device_id}``. A topic the device subscribes to is refused whatever
    these say."""
    max_payload_bytes: int | None = None
    """An inference request larger than this gets 413 (None: ``api.max_body_bytes``)."""
    inbox_max_bytes: int = 32 * 1024 * 1024
    """Received messages waiting for their handler, in bytes; beyond it new ones are dropped."""
    homeassistant_discovery: bool = False
    """Publish Home Assistant MQTT discovery configs (retained) on every connect, so each
    device's latency, requests/s, CPU, temperature and model versions appear in HA."""
    homeassistant_prefix: str = "homeassistant"
    """Home Assistant's discovery prefix (a setting of its MQTT integration)."""

    def __post_init__(self) -> None:
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError("port must be 1-65535")
        if self.hosts and (self.host is not None or self.port is not None):
            raise ValueError("give hosts (a list of HOST:PORT) or host/port, not both")
        for entry in self.hosts:
            if parse_node(entry) is None:
                raise ValueError(f"hosts: {entry!r} is not HOST[:PORT] (IPv6 as [ADDR]:PORT)")
        if not self.topic_prefix or _TOPIC_BAD.search(self.topic_prefix):
            raise ValueError("topic_prefix must be non-empty and free of '#', '+'")
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        if not 1 <= self.keepalive_s <= 65535:
            raise ValueError("keepalive_s must be 1-65535")
        for prefix in self.reply_topic_prefixes:
            if not prefix or _TOPIC_BAD.search(prefix) or prefix.startswith("$"):
                raise ValueError(
                    f"reply_topic_prefixes: {prefix!r} must be non-empty, free of '#', '+' "
                    "and not start with '$'"
                )
        if self.max_payload_bytes is not None and self.max_payload_bytes < 1024:
            raise ValueError("max_payload_bytes must be >= 1024")
        if self.inbox_max_bytes < 64 * 1024:
            raise ValueError("inbox_max_bytes must be >= 65536")
        if not self.homeassistant_prefix or _TOPIC_BAD.search(self.homeassistant_prefix):
            raise ValueError("homeassistant_prefix must be non-empty and free of '#', '+'")

    def __repr__(self) -> str:  # never show the password
        return f"MqttConfig(nodes={self.nodes!r}, username={self.username!r})"

    @property
    def nodes(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every broker node, in the order the device tries them."""
        if not self.hosts:
            return ((self.host or "127.0.0.1", self.port or 1883),)
        default = 8883 if self.tls is not None else 1883
        parsed = [parse_node(entry) for entry in self.hosts]
        return tuple((n[0], n[1] or default) for n in parsed if n is not None)

    def secret(self) -> str | None:
        """The password, read from ``password_file`` when that is how it is given."""
        if self.password_file is not None:
            try:
                return Path(self.password_file).read_text(encoding="utf-8").strip()
            except OSError as err:
                raise ConfigError(
                    f"mqtt.password_file: cannot read {self.password_file}: {err.strerror}"
                ) from err
        return self.password


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    device_id: str = msgspec.field(default_factory=socket.gethostname)
    groups: tuple[str, ...] = ()
    state_dir: str = "/var/lib/inferd"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    models: tuple[ModelConfig, ...] = ()
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    updates: UpdatesConfig = msgspec.field(default_factory=UpdatesConfig)
    quality: QualityConfig = msgspec.field(default_factory=QualityConfig)

    def __post_init__(self) -> None:
        _check_name("device_id", self.device_id)
        for group in self.groups:
            _check_name("group", group)
        names = [m.name for m in self.models]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"model name {name!r} is used twice")

    def model(self, name: str) -> ModelConfig:
        """The config of the model slot called ``name``."""
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"models: no model named {name!r}")


def listen_address(listen: str) -> tuple[str, int] | str:
    """``host:port`` as a tuple, or ``unix:/path`` as the path; ValueError when neither."""
    if listen.startswith("unix:"):
        path = listen[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError("unix socket path must be absolute: unix:/run/inferd/api.sock")
        return path
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise ValueError(f"listen {listen!r} must be HOST:PORT or unix:/PATH")
    return host.strip("[]"), int(port)


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for key, raw in environ.items():
        if not key.startswith("INFERD_") or key in ("INFERD_CONFIG",):
            continue
        parts = key[len("INFERD_") :].lower().split("__")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw  # not YAML: keep the text and let validation name the field
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value


def parse_config(
    data: Any, *, base_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Validate an already-parsed YAML document (plus env overrides) into a :class:`Config`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("$: the config must be a mapping of sections")
    _apply_env(data, os.environ if environ is None else environ)
    _refuse_text_numbers(data, _config_type_info(), "$")
    try:
        # Not strict: a number where text goes (``version: 2``, ``protocol: 5``) is fine; text
        # where a number or a boolean goes was refused just above.
        cfg = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as err:
        raise ConfigError(str(err)) from err
    _check_numbers(cfg, "$")
    if base_dir is not None:
        cfg = _resolve_paths(cfg, base_dir)
    return cfg


_SCALAR_NAMES: dict[type, str] = {
    msgspec.inspect.IntType: "int",
    msgspec.inspect.FloatType: "float",
    msgspec.inspect.BoolType: "bool",
}


@functools.cache
def _config_type_info() -> msgspec.inspect.Type:
    return msgspec.inspect.type_info(Config)


def _takes_text(t: msgspec.inspect.Type) -> bool:
    if isinstance(t, msgspec.inspect.UnionType):  # ``int | None`` takes no text either
        return any(_takes_text(m) for m in t.types if not isinstance(m, msgspec.inspect.NoneType))
    if isinstance(t, msgspec.inspect.LiteralType):
        return any(isinstance(v, str) for v in t.values)
    return not isinstance(t, tuple(_SCALAR_NAMES))


def _refuse_text_numbers(data: Any, t: msgspec.inspect.Type, path: str) -> None:
    """Refuse text where the config wants a number or a boolean (``port: "1883"``, ``"nan"``):
    non-strict conversion would accept it, and a quoted number is usually a mistake elsewhere."""
    if isinstance(data, str):
        if not _takes_text(t):
            members = t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)
            wanted = " | ".join(
                _SCALAR_NAMES.get(type(m), "?")
                for m in members
                if not isinstance(m, msgspec.inspect.NoneType)
            )
            raise ConfigError(f"Expected `{wanted}`, got `str` - at `{path}`")
        return
    if isinstance(t, msgspec.inspect.UnionType):
        for member in t.types:
            if isinstance(member, msgspec.inspect.StructType) and isinstance(data, dict):
                _refuse_text_numbers(data, member, path)
        return
    if isinstance(t, msgspec.inspect.StructType) and isinstance(data, dict):
        for f in t.fields:
            if f.encode_name in data:
                _refuse_text_numbers(data[f.encode_name], f.type, f"{path}.{f.encode_name}")
    elif isinstance(t, msgspec.inspect.VarTupleType | msgspec.inspect.ListType) and isinstance(
        data, list
    ):
        for i, item in enumerate(data):
            _refuse_text_numbers(item, t.item_type, f"{path}[{i}]")


def _check_numbers(obj: msgspec.Struct, path: str) -> None:
    """Every number in the config is finite and not negative: YAML's ``.nan`` and ``.inf``
    compare false against every bound, so a ``< 0`` check alone would let them through."""
    for f in msgspec.structs.fields(obj):
        value = getattr(obj, f.name)
        where = f"{path}.{f.encode_name}"
        if isinstance(value, msgspec.Struct):
            _check_numbers(value, where)
        elif isinstance(value, tuple):
            for i, item in enumerate(value):
                if isinstance(item, msgspec.Struct):
                    _check_numbers(item, f"{where}[{i}]")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"Expected a finite number, got {value} - at `{where}`")
            if value < 0:
                raise ConfigError(f"Expected a number >= 0, got {value} - at `{where}`")


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def res(p: str) -> str:
        return p if os.path.isabs(p) else str((base / p).resolve())

    def res_opt(p: str | None) -> str | None:
        return None if p is None else res(p)

    replace = msgspec.structs.replace
    models = tuple(replace(m, path=res(m.path)) for m in cfg.models)
    mqtt = replace(cfg.mqtt, password_file=res_opt(cfg.mqtt.password_file))
    if cfg.mqtt.tls is not None:
        tls = cfg.mqtt.tls
        mqtt = replace(
            mqtt,
            tls=replace(
                tls,
                ca_file=res_opt(tls.ca_file),
                cert_file=res_opt(tls.cert_file),
                key_file=res_opt(tls.key_file),
            ),
        )
    updates = replace(cfg.updates, trusted_root=res(cfg.updates.trusted_root))
    api = replace(cfg.api, token_file=res_opt(cfg.api.token_file))
    return replace(
        cfg, models=models, mqtt=mqtt, updates=updates, api=api, state_dir=res(cfg.state_dir)
    )


def _read_yaml(p: Path) -> Any:
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{p}: cannot read config: {err.strerror}") from err
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} invalid YAML: {getattr(err, 'problem', err)}") from err


def merge_config(base: Any, over: Any) -> Any:
    """``over`` laid on ``base``: mappings merge key by key, ``models`` entries merge by name,
    anything else is replaced."""
    if not isinstance(base, dict) or not isinstance(over, dict):
        return over if over is not None else base
    out = dict(base)
    for key, value in over.items():
        if key == "models" and isinstance(value, list) and isinstance(base.get(key), list):
            models = list(base[key])
            names = [m.get("name") if isinstance(m, dict) else None for m in models]
            for entry in value:
                name = entry.get("name") if isinstance(entry, dict) else None
                if name is not None and name in names:
                    i = names.index(name)
                    models[i] = merge_config(models[i], entry)
                else:
                    models.append(entry)
            out[key] = models
        else:
            out[key] = merge_config(base.get(key), value)
    return out


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file; relative model paths are taken from its folder.

    Drop-ins in ``<file>.d/*.yaml`` (e.g. what ``inferd tune`` writes) are merged over the file
    in name order; a model entry in a drop-in changes the model of the same name.
    """
    p = Path(path)
    data = _read_yaml(p)
    files = [p]
    dropins = p.with_name(f"{p.name}.d")
    if dropins.is_dir():
        for extra in sorted(dropins.glob("*.yaml")):
            data = merge_config(data, _read_yaml(extra))
            files.append(extra)
    cfg = parse_config(data, base_dir=p.resolve().parent, environ=environ)
    for warning in config_warnings(cfg, files):
        log.warning("%s", warning)
    return cfg


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def _mentions_password(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    mqtt = data.get("mqtt") if isinstance(data, dict) else None
    return isinstance(mqtt, dict) and mqtt.get("password") is not None


def config_warnings(cfg: Config, files: list[Path]) -> list[str]:
    """What in a valid config an operator should fix: secrets readable by other users."""
    out = []
    for f in files:
        if _readable_by_others(f) and _mentions_password(f):
            out.append(
                f"{f} holds the MQTT password and is readable by group or others: "
                f"chmod 600 {f}, or move the password to mqtt.password_file"
            )
    pw = cfg.mqtt.password_file
    if pw is not None and _readable_by_others(Path(pw)):
        out.append(f"mqtt.password_file {pw} is readable by group or others: chmod 600 {pw}")
    # api.listen off loopback is the API's own check: refused without api.token_file, and
    # warned about by the server when api.insecure lets it through.
    return out
