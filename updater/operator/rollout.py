"""``inferctl rollout``: stage a published model version across the fleet, watch it, halt it.

::

    inferctl rollout SLOT [--repo DIR] [--version V] [--percent P [--group G]]
                     [--halt-ratio R] [--min-attempted N] [--window S | --follow]
                     [--poke-group G ...] [--no-poke] [--json] [--broker HOST:PORT] ...

``--percent`` sets the share of devices that install the version (of every group, or of
``--group`` only), re-signs targets, snapshot and timestamp and pokes the version's groups.
Then the tally (:class:`telemetry.fleet.rollout.RolloutTally`): the retained status of every device
(which says how its last update job ended, so a wave that already finished is judged too)
and the update events seen for ``--window`` seconds, or with ``--follow`` until every device
in the rollout has finished. When failures / attempted exceeds ``--halt-ratio`` (after at least
``--min-attempted`` attempts) the rollout is halted: every share is set to 0 and signed, with
the reason, and the groups are poked so devices still downloading give up. A halted rollout
does not take back devices that installed the version; raising the percentage resumes it.
Exit code 3 when the rollout is halted.

Every change is signed under the repository's signing lock
(:mod:`updater.operator.signing_lock`, the one ``inferctl console`` takes), against the metadata
read again under it: an operator and a console never sign over each other's change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import msgspec
import paho.mqtt.client as mqtt

from runtime.errors import MqttError
from telemetry.broker import BrokerOptions, connect
from telemetry.fleet.rollout import RolloutSummary, RolloutTally
from telemetry.shares import ALL, FULL, shares_text
from updater.meta import ModelMeta, Rollout
from updater.operator.push import poke, poke_topic
from updater.operator.repository import OperatorRepository
from updater.operator.signing_lock import signing_lock

EXIT_HALTED = 3


def raised(current: Rollout | None, bp: int, group: str | None) -> Rollout:
    """The rollout after setting ``group``'s share (all groups' default when None) to ``bp``.

    A version published without a rollout goes to every device: it starts from 100 %.
    """
    shares = dict(current.shares) if current is not None else {ALL: FULL}
    shares[group or ALL] = bp
    return Rollout(shares=shares)


def halted(current: Rollout | None, reason: str) -> Rollout:
    """The rollout with every share at 0, saying why."""
    shares = dict.fromkeys(current.shares if current is not None else (), 0) | {ALL: 0}
    return Rollout(shares=shares, halted=reason)


HALT_RATIO, MIN_ATTEMPTED = 0.05, 5
"""The halt rule's defaults (``inferctl rollout`` and the console): see :func:`halt_reason`."""


def halt_reason(s: RolloutSummary, ratio: float, min_attempted: int) -> str | None:
    """Why the rollout must stop now, or None while it may go on."""
    if s.attempted < max(1, min_attempted) or s.failure_ratio <= ratio:
        return None
    return (
        f"{s.failed} of {s.attempted} devices failed ({s.failure_ratio:.1%} > {ratio:.1%}) "
        f"at {shares_text(s.shares)}"
    )


def poke_groups(meta: ModelMeta, extra: list[str] | None = None) -> list[str]:
    """The groups to poke for a rollout change: the version's, the named shares', ``extra``."""
    named = [g for g in (meta.rollout.shares if meta.rollout else {}) if g != ALL]
    return sorted({*meta.groups, *named, *(extra or [])})


def poke_payload(meta: ModelMeta) -> bytes:
    """What a rollout poke says (for dashboards; devices only ever check the repository)."""
    return msgspec.json.encode(
        {
            "ts": time.time(),
            "by": "inferctl rollout",
            "model": meta.name,
            "version": meta.version,
            "seq": meta.seq,
            "groups": list(meta.groups),
            "rollout": None if meta.rollout is None else meta.rollout.shares,
            "halted": None if meta.rollout is None else meta.rollout.halted,
        }
    )


def tally_for(meta: ModelMeta, prefix: str) -> RolloutTally:
    """A tally of ``meta``'s rollout, knowing from the signed metadata who is meant to join."""
    return RolloutTally(
        prefix,
        meta.name,
        meta.version,
        seq=meta.seq,
        target_groups=meta.groups,
        shares=None if meta.rollout is None else meta.rollout.shares,
        shares_known=True,
        halted=None if meta.rollout is None else meta.rollout.halted,
    )


def listen(client: mqtt.Client, tally: RolloutTally) -> None:
    """Feed ``tally`` from ``client``, returning once the broker has the subscriptions."""
    topics = tally.topics()
    acked = threading.Semaphore(0)
    client.on_message = lambda _c, _u, msg: tally.feed(msg.topic, bytes(msg.payload))
    client.on_subscribe = lambda *_: acked.release()
    for topic, qos in topics:
        client.subscribe(topic, qos=qos)
    # the window starts once the broker has the subscriptions: no event before it is missed
    for _ in topics:
        if not acked.acquire(timeout=10):
            raise MqttError("the broker did not acknowledge the subscriptions")


class RolloutDriver:
    """One model version's staged rollout: re-signs its shares, pokes its groups, feeds a tally.

    The broker connection is made on first use, so changing shares with ``poke=False`` needs none.
    """

    def __init__(
        self,
        repo: OperatorRepository,
        slot: str,
        version: str | None,
        *,
        broker: Callable[[], BrokerOptions],
        prefix: str = "inferd",
        poke: bool = True,
        poke_groups: list[str] | None = None,
    ) -> None:
        self.repo = repo
        _path, _target, self.meta = repo.model(slot, version)
        self.prefix = prefix
        self.poke = poke
        self.extra_groups = poke_groups
        self._broker_options = broker
        self.client: mqtt.Client | None = None
        self.notes: list[str] = []

    def broker(self) -> mqtt.Client:
        """The connected client, connecting on first use."""
        if self.client is None:
            self.client = connect(self._broker_options())
        return self.client

    def locked(self) -> AbstractContextManager[None]:
        """The repository's signing lock (reentrant in this thread)."""
        return signing_lock(self.repo.path, who=f"{self.meta.name} {self.meta.version}")

    def reread(self) -> ModelMeta:
        """The version's metadata as signed now (another signer may have changed it)."""
        _path, _target, self.meta = self.repo.model(self.meta.name, self.meta.version)
        return self.meta

    def change(self, new: Callable[[Rollout | None], Rollout | None]) -> bool:
        """Sign ``new(rollout as signed now)`` under the lock; False when it returns None."""
        with self.locked():
            rollout = new(self.reread().rollout)
            if rollout is None:
                return False
            self.sign(rollout)
            return True

    def sign(self, rollout: Rollout) -> None:
        """Sign ``rollout`` for this version (under the signing lock) and poke its groups."""
        before = self.meta.rollout
        with self.locked():
            self.meta = self.repo.set_rollout(self.meta.name, self.meta.version, rollout)
            signed = self.repo.targets().version
        was = "100 % (not staged)" if before is None else shares_text(before.shares)
        self.notes.append(
            f"{self.meta.name} {self.meta.version}: rollout {was} -> "
            f"{shares_text(rollout.shares)}; signed targets v{signed}"
        )
        if not self.poke:
            return
        groups = poke_groups(self.meta, self.extra_groups)
        if not groups:
            self.notes.append(
                "no group to poke (the version is for every device): "
                "devices see the change at their next poll"
            )
            return
        topics = [poke_topic(self.prefix, group=g) for g in groups]
        try:
            poke(self.broker(), topics, poke_payload(self.meta))
        except MqttError as err:
            raise MqttError(f"{self.notes[-1]}, but the groups were not poked: {err}") from err
        self.notes.append(f"poked {', '.join(groups)}")

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
