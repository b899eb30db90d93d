"""Config loading: the example file, field-path errors, env overrides, exit code 78."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import yaml

from agent.config import Config, load_config, parse_config
from runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "config.example.yaml"


def _keys(struct_type: type, prefix: str = "") -> set[str]:
    out = set()
    for field in msgspec.structs.fields(struct_type):
        out.add(prefix + field.name)
    return out


def test_example_config_loads_and_documents_every_key() -> None:
    cfg = load_config(EXAMPLE, environ={})
    assert cfg.device_id == "pi-kitchen-01"
    assert cfg.models[0].name == "classifier"
    assert Path(cfg.models[0].path).is_file(), "the example's model path resolves from its folder"
    raw = yaml.safe_load(EXAMPLE.read_text())
    missing = _keys(Config) - set(raw)
    for section in ("api", "mqtt", "telemetry", "updates", "quality"):
        section_type = type(getattr(cfg, section))
        missing |= {f"{section}.{k}" for k in _keys(section_type) - set(raw[section])}
    model_type = type(cfg.models[0])
    missing |= {f"models[].{k}" for k in _keys(model_type) - set(raw["models"][0])}
    assert not missing, f"config.example.yaml does not document: {sorted(missing)}"


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"models": [{"name": "a", "path": "m.onnx", "threads": "many"}]}, "$.models[0].threads"),
        ({"models": [{"name": "a", "path": "m.onnx", "runtime": "tvm"}]}, "$.models[0].runtime"),
        ({"models": [{"name": "a/b", "path": "m.onnx"}]}, "$.models[0]"),
        ({"models": [{"name": "a"}]}, "path"),
        ({"api": {"listen": "localhost"}}, "$.api"),
        ({"api": {"busy_poll_us": 5000}}, "busy_poll_us must be between 0 and 1000"),
        ({"api": {"busy_poll_us": -1}}, "busy_poll_us"),
        ({"mqtt": {"port": 70000}}, "port must be 1-65535"),
        ({"mqtt": {"hots": "x"}}, "hots"),
        ({"telemetry": {"prediction_sample_rate": 2}}, "prediction_sample_rate"),
        ({"updates": {"repository_url": "ftp://x"}}, "repository_url"),
        ({"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "used twice"),
        ([1, 2], "mapping"),
    ],
)
def test_bad_config_names_the_field(doc: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, environ={})
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_env_overrides_reach_nested_keys() -> None:
    env = {
        "INFERD_MQTT__HOST": "10.1.2.3",
        "INFERD_MQTT__PORT": "8883",
        "INFERD_DEVICE_ID": "pi-02",
        "INFERD_TELEMETRY__PREDICTION_SAMPLE_RATE": "0.25",
        "UNRELATED": "x",
    }
    cfg = parse_config({"mqtt": {"host": "a"}}, environ=env)
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.device_id) == ("10.1.2.3", 8883, "pi-02")
    assert cfg.telemetry.prediction_sample_rate == 0.25
    with pytest.raises(ConfigError, match=r"\$.mqtt.port"):
        parse_config({}, environ={"INFERD_MQTT__PORT": "[1"})  # not a scalar: YAML error
    with pytest.raises(ConfigError, match="port"):
        parse_config({}, environ={"INFERD_MQTT__PORT": "abc"})


def test_password_never_in_repr() -> None:
    cfg = parse_config({"mqtt": {"username": "u", "password": "hunter2"}}, environ={})
    assert "hunter2" not in repr(cfg)
    assert cfg.mqtt.secret() == "hunter2"


def test_defaults_are_sane() -> None:
    cfg = parse_config({}, environ={})
    assert cfg.api.listen.startswith("127.0.0.1:"), "loopback by default"
    assert cfg.device_id  # the hostname


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_check_config_exit_codes(tmp_path: Path) -> None:
    ok = _check(EXAMPLE)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: a\n    path: x.onnx\n    threads: many\n")
    res = _check(bad)
    assert res.returncode == 78
    assert res.stderr.count("\n") == 1 and "$.models[0].threads" in res.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [\n")
    res = _check(broken)
    assert res.returncode == 78 and "invalid YAML" in res.stderr and "Traceback" not in res.stderr
    res = _check(tmp_path / "missing.yaml")
    assert res.returncode == 78 and "cannot read config" in res.stderr


def test_relative_paths_are_taken_from_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    cfg_file = tmp_path / "sub" / "c.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "state_dir": "state",
                "models": [{"name": "m", "path": "m.onnx"}],
                "mqtt": {"password_file": "pw", "tls": {"ca_file": "ca.crt"}},
                "updates": {"trusted_root": "../root.json"},
            }
        )
    )
    cfg = load_config(cfg_file, environ={})
    assert cfg.state_dir == str(tmp_path / "sub" / "state")
    assert cfg.models[0].path == str(tmp_path / "sub" / "m.onnx")
    assert cfg.mqtt.password_file == str(tmp_path / "sub" / "pw")
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.ca_file == str(tmp_path / "sub" / "ca.crt")
    assert cfg.updates.trusted_root == str(tmp_path / "root.json")


@pytest.mark.parametrize(
    ("yaml_text", "fragment"),
    [
        ('mqtt: {port: "1883"}', "Expected `int`, got `str` - at `$.mqtt.port`"),
        ("mqtt: {keepalive_s: -5}", "keepalive_s"),
        ("mqtt: {reconnect_max_s: .inf}", "$.mqtt.reconnect_max_s"),
        ("telemetry: {metrics_interval_s: .nan}", "$.telemetry.metrics_interval_s"),
        ("telemetry: {spool_max_bytes: -1}", "spool_max_bytes"),
        ("telemetry: {prediction_sample_rate: .nan}", "prediction_sample_rate"),
        ('telemetry: {prediction_sample_rate: "nan"}', "got `str`"),
        ("quality: {join_max_bytes: .inf}", "$.quality.join_max_bytes"),
        ("updates: {poll_interval_s: .inf}", "$.updates.poll_interval_s"),
        ("updates: {trial_window_s: .nan}", "$.updates.trial_window_s"),
        ("updates: {max_download_bytes: -1}", "$.updates.max_download_bytes"),
        ('updates: {enabled: "yes"}', "Expected `bool`, got `str` - at `$.updates.enabled`"),
        ("models: [{name: a, path: m.onnx, stuck_run_s: .inf}]", "$.models[0].stuck_run_s"),
        ("models: [{name: a, path: m.onnx, threads: -2}]", "threads"),
        ('models: [{name: a, path: m.onnx, threads: "4"}]', "$.models[0].threads"),
        ("mqtt: {reply_topic_prefixes: ['inferd/#']}", "reply_topic_prefixes"),
        ("mqtt: {tls: {insecure: 1.5}}", "$.mqtt.tls.insecure"),
    ],
)
def test_numbers_are_finite_not_negative_and_never_text(yaml_text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_load(yaml_text), environ={})
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_numbers_where_text_goes_still_work() -> None:
    cfg = parse_config(yaml.safe_load("mqtt: {reconnect_min_s: 2, port: 8883}"), environ={})
    assert (cfg.mqtt.reconnect_min_s, cfg.mqtt.port) == (2.0, 8883)
    cfg = parse_config({}, environ={"INFERD_MQTT__KEEPALIVE_S": "15"})  # env values are YAML
    assert cfg.mqtt.keepalive_s == 15


def test_check_config_refuses_nan_with_the_field_path(tmp_path: Path) -> None:
    bad = tmp_path / "nan.yaml"
    bad.write_text("telemetry:\n  metrics_interval_s: .nan\n")
    res = _check(bad)
    assert res.returncode == 78, res.stderr
    assert "$.telemetry.metrics_interval_s" in res.stderr and "Traceback" not in res.stderr


def test_warnings_for_readable_secrets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("mqtt: {username: dev, password: hunter2}\n")
    cfg_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="agent.config"):
        load_config(cfg_file, environ={})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{cfg_file} holds the MQTT password" in text
    assert "hunter2" not in text

    pw = tmp_path / "pw"
    pw.write_text("hunter2\n")
    pw.chmod(0o640)
    cfg_file.write_text("mqtt: {username: dev, password_file: pw}\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agent.config"):
        load_config(cfg_file, environ={})
    assert [r.getMessage() for r in caplog.records] == [
        f"mqtt.password_file {pw} is readable by group or others: chmod 600 {pw}"
    ]

    pw.chmod(0o600)
    cfg_file.chmod(0o600)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agent.config"):
        load_config(cfg_file, environ={})
    assert caplog.records == []  # 0600 files: nothing to say
