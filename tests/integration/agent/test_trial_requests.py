"""An update's trial judges requests, not backend runs: for a batched model the slot adapter
reports each request (the API's per-request counts), where the backend counts one run a batch."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from agent.config import ModelConfig
from agent.slots import ModelSlot
from agent.updates import SlotAdapter
from telemetry.request_histogram import RequestHistograms
from tests.support import models
from updater.device.updater import RunCounts

CLIENTS = 8


def test_a_batched_slot_reports_requests_to_the_trial(tmp_path: Path) -> None:
    path = models.classifier(tmp_path / "clf.onnx", 4, 3)
    # a long window: the clients' requests meet in one batch on a busy machine
    slot = ModelSlot(ModelConfig(name="clf", path=str(path), max_batch=8, batch_window_us=200_000))
    requests = RequestHistograms()
    slot.listeners.append(requests.listener)
    slot.swap(slot.load(path, "1"))
    adapter = SlotAdapter(slot, None, requests)
    plain = SlotAdapter(slot)
    try:
        serving = adapter.serving()
        assert serving is not None and serving.stats == RunCounts(0, 0, 0)
        start = threading.Barrier(CLIENTS)

        def client(i: int) -> None:
            start.wait()
            slot.predict({"x": np.full((1, 4), i, np.float32)})

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        serving = adapter.serving()
        assert serving is not None
        assert (serving.stats.runs, serving.stats.errors) == (CLIENTS, 0)
        assert serving.stats.total_ns > 0
        backend = plain.serving()
        assert backend is not None and 1 <= backend.stats.runs < CLIENTS, "one run per batch"
    finally:
        slot.close()
