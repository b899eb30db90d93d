"""bench.openvino's rows from a probe result (the probe itself runs in tests/integration)."""

from __future__ import annotations

from bench._checks import INFO, verdict
from bench.openvino import rows


def _entry(providers: list[str], ms: list[float]) -> dict[str, object]:
    return {"providers": providers, "load_s": 0.1, "warmup_error": None, "latency_ms": ms}


def test_rows_put_openvino_beside_cpu_and_say_when_the_cpu_served() -> None:
    result = {
        "fast": {
            "openvino+cpu": _entry(["openvino", "cpu"], [1.0, 1.0, 3.0]),
            "cpu": _entry(["cpu"], [2.0, 2.0, 9.0]),
        },
        "refused": {
            "openvino+cpu": _entry(["cpu"], [4.0]),
            "cpu": _entry(["cpu"], [4.0]),
        },
    }
    fast, refused = rows(result)
    assert verdict(fast) == INFO and verdict(refused) == INFO
    assert "p50 1.000 ms" in fast["measured"] and "2.00x" in fast["measured"]
    assert "p50 2.000 ms" in fast["baseline"]
    assert "served by" not in fast["measured"]
    assert "served by cpu" in refused["measured"]
