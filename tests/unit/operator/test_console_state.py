"""What the console keeps from the broker: devices through the watch model, an hour of latency
and throughput per model, quality and drift, versions per group, bounded everywhere."""

from __future__ import annotations

import msgspec

from telemetry.payloads import (
    ClassificationQuality,
    DriftQuality,
    Event,
    HostFacts,
    LastUpdate,
    Metrics,
    ModelMetrics,
    Offline,
    QualityPayload,
    SlotStatus,
    SpoolMetrics,
    Status,
    SystemMetrics,
    utc_now,
)
from updater.operator.console.state import SHARE_GROUP, ConsoleState, Limits, topics

P = "inferd"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def status(device: str, version: str, groups: list[str], last: LastUpdate | None = None) -> bytes:
    slot = SlotStatus(name="classifier", ready=True, version=version, runtime="onnxruntime",
                      providers=["cpu"], digest=None, signature_digest=None,
                      update_state="idle", last_update=last)  # type: ignore[arg-type]  # fmt: skip
    return msgspec.json.encode(
        Status(
            device=device,
            groups=groups,
            agent_version="0.1",
            started_at=utc_now(),
            host=HostFacts(hostname=device, arch="x86_64", os="Linux", python="3"),
            models=[slot],
        )
    )


def metrics(device: str, p50: float, p99: float, rps: float, model: str = "classifier") -> bytes:
    mm = ModelMetrics(count=10, errors=0, interval_count=10, interval_errors=0, rps=rps,
                      p50_ms=p50, p99_ms=p99)  # fmt: skip
    return msgspec.json.encode(
        Metrics(
            device=device,
            interval_s=10,
            models={model: mm},
            system=SystemMetrics(cpu_percent=12.5, temperature_c=48.0),
            spool=SpoolMetrics(
                queued_messages=0, queued_bytes=0, dropped_records=0, dropped_records_total=0
            ),
        )
    )


def test_subscriptions_share_the_streams_but_not_the_retained_state():
    assert topics(P, shared=True) == [
        (f"{P}/+/status", 1),
        (f"{P}/groups/+/update", 1),
        (f"{P}/+/events", 1),
        (f"$share/{SHARE_GROUP}/{P}/+/metrics", 0),
        (f"$share/{SHARE_GROUP}/{P}/+/quality", 1),
    ]
    assert all(not t.startswith("$share") for t, _ in topics(P, shared=False))  # MQTT 3.1.1


def test_devices_carry_groups_versions_and_the_last_update_outcome():
    s = ConsoleState(P)
    last = LastUpdate(version="2", seq=4, outcome="failed", reason="golden mismatch", ts=utc_now())
    s.feed(f"{P}/pi-1/status", status("pi-1", "1", ["fleet", "canary"], last))
    s.feed(f"{P}/pi-2/status", status("pi-2", "2", ["fleet"]))
    s.feed(f"{P}/pi-3/status", status("pi-3", "2", []))
    s.feed(f"{P}/pi-3/status", msgspec.json.encode(Offline(device="pi-3")))
    s.feed(f"{P}/pi-1/metrics", metrics("pi-1", 1.5, 4.0, 20.0))
    snap = s.snapshot()
    rows = {d["device"]: d for d in snap["devices"]}
    assert [d["online"] for d in snap["devices"]] == [True, True, False]
    assert rows["pi-1"]["groups"] == ["fleet", "canary"]
    m = rows["pi-1"]["models"]["classifier"]
    assert (m["version"], m["p50_ms"], m["p99_ms"], m["rps"]) == ("1", 1.5, 4.0, 20.0)
    assert m["last_update"]["outcome"] == "failed"
    assert m["last_update"]["reason"] == "golden mismatch"
    assert rows["pi-1"]["cpu_percent"] == 12.5
    # the offline will names no model: the page shows what it served last
    assert rows["pi-3"]["models"]["classifier"]["version"] == "2"
    assert rows["pi-3"]["models"]["classifier"]["rps"] is None
    assert snap["groups"] == {
        "-": {"classifier": {"2": 1}},
        "canary": {"classifier": {"1": 1}},
        "fleet": {"classifier": {"1": 1, "2": 1}},
    }


def test_series_combine_devices_per_bucket_and_keep_one_hour():
    clock = Clock()
    s = ConsoleState(P, Limits(window_s=60, bucket_s=10), clock=clock)
    s.feed(f"{P}/a/metrics", metrics("a", 1.0, 5.0, 10.0))
    s.feed(f"{P}/b/metrics", metrics("b", 3.0, 9.0, 30.0))
    s.feed(f"{P}/c/metrics", metrics("c", 2.0, 4.0, 5.0))
    s.feed(f"{P}/a/metrics", metrics("a", 1.2, 6.0, 12.0))  # a's latest in the bucket counts
    series = s.snapshot()["series"]["classifier"]
    assert series == {"t": [clock.now - clock.now % 10], "p50": [2.0], "p99": [9.0],
                      "rps": [47.0]}  # fmt: skip
    for _ in range(8):
        clock.now += 10
        s.feed(f"{P}/a/metrics", metrics("a", 1.0, 2.0, 1.0))
    series = s.snapshot()["series"]["classifier"]
    assert len(series["t"]) == 7  # 60 s window, 10 s buckets: the oldest fell out
    assert series["t"] == sorted(series["t"]) and series["rps"][-1] == 1.0


def test_quality_drift_and_events_are_kept_and_bounded():
    s = ConsoleState(P, Limits(max_events=3))
    q = QualityPayload(
        device="pi-1", model="classifier", version="2", task="classification", samples=50,
        window_count=50, window_s=600,
        classification=ClassificationQuality(accuracy=0.9, precision_macro=0.9,
                                             recall_macro=0.9, f1_macro=0.88, roc_auc=None,
                                             per_class=[]),
        drift=DriftQuality(samples=50, psi_max=0.31, threshold=0.2, drifted=True, features=[]),
    )  # fmt: skip
    s.feed(f"{P}/pi-1/quality", msgspec.json.encode(q))
    (row,) = s.snapshot()["quality"]
    assert (row["accuracy"], row["f1"], row["psi_max"], row["drifted"]) == (0.9, 0.88, 0.31, True)
    for i in range(5):
        e = Event(device="pi-1", kind="update", message=f"m{i}", model="classifier", version="2")
        s.feed(f"{P}/pi-1/events", msgspec.json.encode(e))
    assert [e["message"] for e in s.snapshot()["events"]] == ["m4", "m3", "m2"]


def test_garbage_and_strangers_cost_a_count_not_memory():
    s = ConsoleState(P, Limits(max_devices=2, max_models=1))
    before = s.generation
    s.feed(f"{P}/x/metrics", b"{not json")
    s.feed(f"{P}/x/quality", b'{"schema_version": 1}')
    s.feed("other/x/status", status("x", "1", []))  # another prefix: not ours at all
    s.feed(f"{P}/a/b/status", status("x", "1", []))  # too deep
    assert s.ignored == 2 and s.generation > before
    for d in ("a", "b", "c"):
        s.feed(f"{P}/{d}/status", status(d, "1", []))
    s.feed(f"{P}/a/metrics", metrics("a", 1, 2, 3, model="m1"))
    s.feed(f"{P}/a/metrics", metrics("a", 1, 2, 3, model="m2"))
    snap = s.snapshot()
    assert [d["device"] for d in snap["devices"]] == ["a", "b"]
    assert list(snap["series"]) == ["m1"]
    assert snap["ignored_messages"] == 4


def test_wait_returns_when_the_state_changes():
    s = ConsoleState(P)
    g = s.wait(-1, 0)
    assert s.wait(g, 0.01) == g  # nothing new: times out
    s.feed(f"{P}/a/status", status("a", "1", []))
    assert s.wait(g, 5) > g
