"""What telemetry reads from a served prediction: one protocol for every slot listener.

The agent's ``agent.slots.Prediction`` fits it; telemetry never imports the agent, so metrics,
the prediction log and the quality monitor all take this protocol instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np


class Prediction(Protocol):
    """One served request as slot listeners hear about it."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def request_id(self) -> str: ...
    @property
    def ts(self) -> float:
        """Wall-clock time of the request (``time.time()``)."""
        ...

    @property
    def latency_ns(self) -> int: ...
    @property
    def feeds(self) -> Mapping[str, np.ndarray]: ...
    @property
    def outputs(self) -> Mapping[str, np.ndarray] | None:
        """None when the run failed."""
        ...

    @property
    def error(self) -> str | None: ...


def tensor_bytes(p: Prediction) -> int:
    """Bytes of the arrays a prediction keeps alive while it waits in a queue (the bound of the
    prediction log's and the quality monitor's queues). Plain loops: a generator per request
    cost a third of the prediction log's listener."""
    size = 0
    for a in p.feeds.values():
        size += a.nbytes
    outputs = p.outputs
    if outputs:
        for a in outputs.values():
            size += a.nbytes
    return size
