"""Fleet scale: N agents, one mosquitto, one TUF repository over HTTP; waves of updates.

Lightweight agent mode: ``--procs`` worker processes each run their share of the agents. Every
agent is a real ``agent.daemon.Daemon`` (model slot on an onnxruntime session, local API on a
unix socket, telemetry, quality monitor, update loop) with its own state dir, its own TUF
client (the updater's device code, HTTP to the repository) and its own MQTT link: its own
client id, session, last will and SQLite spool. Only the process is shared; DESIGN's "one MQTT
client per process" is one client per device, and each simulated device keeps exactly one, so
the broker sees N devices. Each agent serves ``--rps`` in-process predictions per second
(ModelSlot.predict, the path HTTP requests take after decoding), so metrics and sampled
prediction batches flow as on a working device. Defaults are the product's (metrics every 10 s,
every prediction sampled, batches per second); updates poll hourly so waves are poke-driven.

In one run, against a private mosquitto on a free port and ``inferctl repo serve``:
  idle     broker messages and bytes per device per minute with no update going on
  solo     one agent alone updated while the rest idle: push to serving (the baseline)
  wave     a version for the whole fleet: time until 50/95/100 % of the agents serve it (their
           retained status says so), broker messages/s, repository requests per device and /s
  staged   a version rolled out in stages (--stages) while 10 % of the agents fail validation
           (their loader refuses that version). The same code as ``inferctl rollout`` raises
           the share, tallies the fleet's events and halts above --halt-ratio; the repository
           log shows who downloaded the artifact. Faulty agents are spread evenly over the
           rollout order (every 10th by its bucket for that version), so the result does not
           hang on which agents a small first stage happens to draw.
Usage: python -m bench.fleet [--agents 100] [--procs 4] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from bench._checks import Check, gated, info, report
from runtime.errors import MqttError
from telemetry.broker import BrokerOptions, connect
from telemetry.fleet.rollout import RolloutTally
from telemetry.shares import ALL, bucket
from tests.support import models
from tests.support.broker import Broker
from tests.support.net import free_port
from updater.meta import Rollout
from updater.operator.push import poke, poke_topic
from updater.operator.repository import OperatorRepository
from updater.operator.rollout import halt_reason, halted, poke_payload, raised, tally_for

ROOT = Path(__file__).resolve().parents[1]

SLOT = "classifier"
PREFIX = "fleet"
FAIL_VERSION = "4"


# -- worker: the agents -------------------------------------------------------------------------


def worker(spec: dict[str, Any]) -> int:
    """Run this worker's agents until stdin says stop (or closes)."""
    import logging

    import numpy as np

    from agent.app import build_daemon
    from agent.config import parse_config
    from runtime.errors import BackendError

    logging.basicConfig(level=logging.WARNING, filename=spec["log"])
    daemons = []
    for agent in spec["agents"]:
        state = Path(spec["base"]) / agent["id"]
        cfg = parse_config(
            {
                "device_id": agent["id"],
                "groups": agent["groups"],
                "state_dir": str(state),
                "models": [{"name": SLOT, "path": spec["model"], "threads": 1}],
                "api": {"listen": f"unix:{state}/api.sock", "workers": 1},
                "mqtt": {"host": "127.0.0.1", "port": spec["port"], "topic_prefix": PREFIX},
                "updates": {
                    "repository_url": spec["repo_url"],
                    "trusted_root": spec["trusted_root"],
                    "poll_interval_s": 3600,
                    "trial_window_s": spec["trial_s"],
                },
            },
            environ={},
        )
        daemon = build_daemon(cfg)
        if agent["faulty"]:
            adapter = daemon.updates.adapters[SLOT]
            real_load = adapter.load

            def load(
                path: Path, version: str, real: Any = real_load, who: str = agent["id"]
            ) -> Any:
                if version == FAIL_VERSION:  # the injected fault: this device cannot load it
                    raise BackendError(f"{who}: runtime refuses this model (bench fault)")
                return real(path, version)

            adapter.load = load  # type: ignore[method-assign]
        daemons.append(daemon)
    for daemon in daemons:
        daemon.start()
    stop = threading.Event()

    def traffic() -> None:
        x = {"x": np.full((1, 4), 0.25, np.float32)}
        period = 1.0 / max(1e-9, spec["rps"] * len(daemons))
        nxt = time.monotonic()
        i = 0
        while not stop.is_set():
            # a slot mid-swap or stopping may refuse: the bench counts no requests
            with contextlib.suppress(Exception):
                daemons[i % len(daemons)].slots[SLOT].predict(x)
            i += 1
            nxt += period
            stop.wait(max(0.0, nxt - time.monotonic()))

    load_thread = threading.Thread(target=traffic, name="fleet-traffic")
    if spec["rps"] > 0:
        load_thread.start()
    print("READY", flush=True)
    sys.stdin.readline()
    stop.set()
    if load_thread.is_alive():
        load_thread.join()
    stoppers = [threading.Thread(target=d.stop, name="fleet-stop") for d in daemons]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join()
    print("STOPPED", flush=True)
    return 0


# -- the operator's side: broker, repository, monitor -------------------------------------------


class RepoLog:
    """``inferctl -v repo serve`` in a process of its own; every GET it logs, with its time."""

    LINE = re.compile(r'"GET (\S+) HTTP/[\d.]+" (\d{3})')

    def __init__(self, repo: OperatorRepository, port: int) -> None:
        self.public = repo.public_dir
        self.gets: list[tuple[float, str, int]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "updater.inferctl", "-v", "repo", "serve", str(repo.path),
             "--port", str(port)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}/"
        self.thread = threading.Thread(target=self._read, name="fleet-repo-log", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            m = self.LINE.search(line)
            if m:
                self.gets.append((time.monotonic(), m.group(1), int(m.group(2))))

    def window(self, start: float, end: float) -> list[tuple[float, str, int]]:
        return [g for g in list(self.gets) if start <= g[0] < end]

    def size(self, path: str) -> int:
        f = self.public / path.lstrip("/")
        return f.stat().st_size if f.is_file() else 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Monitor:
    """One subscriber to ``{prefix}/#``: counts messages, tracks who serves what, feeds tallies."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[float, str, int]] = []
        self.first_serving: dict[str, dict[str, float]] = {}
        self.online: set[str] = set()
        self.retained: dict[str, bytes] = {}
        """The latest status per topic: what a new subscriber would get first."""
        self.tally: RolloutTally | None = None
        self.lock = threading.Lock()
        self.client = connect(BrokerOptions(port=port, client_id="fleet-bench-monitor"))
        self.client.on_message = self._on_message
        self.client.subscribe(f"{PREFIX}/#", qos=1)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        now = time.monotonic()
        payload = bytes(msg.payload)
        leaf = msg.topic.rsplit("/", 1)[-1]
        self.messages.append((now, leaf, len(msg.topic) + len(payload)))
        if leaf == "status" and payload:
            self.retained[msg.topic] = payload
            data = msgspec.json.decode(payload)
            device = msg.topic.split("/")[1]
            if data.get("state") == "online":
                self.online.add(device)
                for m in data.get("models", []):
                    if m.get("name") == SLOT and m.get("version"):
                        self.first_serving.setdefault(m["version"], {}).setdefault(device, now)
            else:
                self.online.discard(device)
        with self.lock:
            tally = self.tally
        if tally is not None:
            tally.feed(msg.topic, payload)

    def follow(self, tally: RolloutTally | None) -> None:
        """Feed ``tally`` from now on, starting with the retained statuses (as inferctl gets)."""
        with self.lock:
            self.tally = tally
            if tally is not None:
                for topic, payload in list(self.retained.items()):
                    tally.feed(topic, payload)

    def serving(self, version: str) -> dict[str, float]:
        return dict(self.first_serving.get(version, {}))

    def window(self, start: float, end: float) -> list[tuple[float, str, int]]:
        return [m for m in list(self.messages) if start <= m[0] < end]

    def poke(self, group: str, payload: bytes) -> float:
        start = time.monotonic()
        poke(self.client, [poke_topic(PREFIX, group=group)], payload)
        return start

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class CpuMeter:
    """CPU seconds used by the agents' workers, the broker and the repository server."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        import psutil

        self.procs = {k: [psutil.Process(p) for p in v] for k, v in pids.items()}

    def read(self) -> dict[str, float]:
        out = {}
        for key, procs in self.procs.items():
            total = 0.0
            for p in procs:
                t = p.cpu_times()
                total += t.user + t.system
            out[key] = total
        return out

    @staticmethod
    def used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: round(after[k] - before[k], 3) for k in before}


def wait_for(what: str, cond: Any, timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"fleet bench: timed out waiting for {what}")
        time.sleep(interval)


def peak_per_s(times: list[float]) -> float:
    if not times:
        return 0.0
    return float(max(Counter(int(t) for t in times).values()))


def push_payload() -> bytes:
    return msgspec.json.encode({"ts": time.time(), "by": "bench/fleet.py"})


def percentile_time(times: list[float], n: int, pct: float) -> float | None:
    """When ``pct`` % of ``n`` agents had arrived (times sorted from the push), None if never."""
    need = math.ceil(n * pct / 100)
    return times[need - 1] if len(times) >= need else None


# -- phases -------------------------------------------------------------------------------------


def phase_idle(
    mon: Monitor, repo_log: RepoLog, cpu: CpuMeter, n: int, seconds: float
) -> dict[str, Any]:
    before = cpu.read()
    start = time.monotonic()
    time.sleep(seconds)
    used = CpuMeter.used(before, cpu.read())
    msgs = mon.window(start, start + seconds)
    per_min = 60.0 / seconds / n
    return {
        "seconds": seconds,
        "messages": len(msgs),
        "msgs_per_device_per_min": len(msgs) * per_min,
        "bytes_per_device_per_min": sum(m[2] for m in msgs) * per_min,
        "by_topic_per_device_per_min": {
            k: round(v * per_min, 2) for k, v in sorted(Counter(m[1] for m in msgs).items())
        },
        "bytes_by_topic_per_device_per_min": {
            k: round(sum(m[2] for m in msgs if m[1] == k) * per_min)
            for k in sorted({m[1] for m in msgs})
        },
        "broker_msgs_per_s": len(msgs) / seconds,
        "repo_requests": len(repo_log.window(start, start + seconds)),
        "cpu_s": used,
        "agent_cpu_percent_of_core": 100 * used["agents"] / seconds / n,
    }


def phase_wave(
    repo: OperatorRepository,
    mon: Monitor,
    repo_log: RepoLog,
    cpu: CpuMeter,
    model: Path,
    version: str,
    group: str,
    n: int,
    timeout: float,
) -> dict[str, Any]:
    repo.add_model(model, name=SLOT, version=version, groups=[group])
    before = cpu.read()
    pushed = mon.poke(group, push_payload())
    wait_for(f"{n} agents on {version}", lambda: len(mon.serving(version)) >= n, timeout, 0.02)
    times = sorted(t - pushed for t in mon.serving(version).values())
    done = pushed + times[-1]
    settle = done + 1.0
    time.sleep(max(0.0, settle - time.monotonic()))
    used = CpuMeter.used(before, cpu.read())
    msgs = mon.window(pushed, settle)
    gets = repo_log.window(pushed, settle)
    meta = [g for g in gets if "/metadata/" in g[1]]
    targets = [g for g in gets if "/targets/" in g[1]]
    span = settle - pushed
    return {
        "agents": n,
        "served": len(times),
        "t50_s": percentile_time(times, n, 50),
        "t95_s": percentile_time(times, n, 95),
        "t100_s": percentile_time(times, n, 100),
        "broker_msgs": len(msgs),
        "broker_msgs_per_s": len(msgs) / span,
        "broker_msgs_peak_per_s": peak_per_s([m[0] for m in msgs]),
        "broker_msgs_per_device": len(msgs) / n,
        "broker_update_bytes_per_device": sum(
            m[2] for m in msgs if m[1] not in ("metrics", "predictions")
        )
        / n,
        "repo_requests": len(gets),
        "repo_requests_per_device": len(gets) / n,
        "repo_metadata_requests": len(meta),
        "repo_target_requests": len(targets),
        "repo_requests_per_s": len(gets) / span,
        "repo_requests_peak_per_s": peak_per_s([g[0] for g in gets]),
        "repo_bytes": sum(repo_log.size(g[1]) for g in gets if g[2] == 200),
        "repo_not_found": sum(g[2] == 404 for g in gets),
        "cpu_s": used,
        "broker_cpu_ms_per_msg": 1000 * used["broker"] / max(1, len(msgs)),
        "repo_cpu_ms_per_request": 1000 * used["repository"] / max(1, len(gets)),
    }


def phase_noop(mon: Monitor, repo_log: RepoLog, n: int, timeout: float) -> dict[str, Any]:
    """A poke with nothing new: what a periodic poll costs the broker and the repository."""
    pushed = mon.poke("fleet", push_payload())
    quiet = pushed
    deadline = pushed + timeout
    while time.monotonic() < deadline:  # until a second passes without a request
        time.sleep(0.2)
        gets = repo_log.window(pushed, time.monotonic() + 1)
        if gets:
            quiet = gets[-1][0]
        if len(gets) >= 2 * n and time.monotonic() - quiet > 1.0:
            break
    end = time.monotonic()
    gets = repo_log.window(pushed, end)
    msgs = [m for m in mon.window(pushed, end) if m[1] not in ("metrics", "predictions")]
    return {
        "repo_requests_per_device": len(gets) / n,
        "repo_bytes_per_device": sum(repo_log.size(g[1]) for g in gets if g[2] == 200) / n,
        "broker_msgs_per_device": len(msgs) / n,
        "by_path": dict(Counter(re.sub(r"/\d+\.", "/N.", g[1]) for g in gets)),
    }


def phase_staged(
    repo: OperatorRepository,
    mon: Monitor,
    repo_log: RepoLog,
    model: Path,
    args: argparse.Namespace,
    faulty: list[str],
) -> dict[str, Any]:
    meta = repo.add_model(
        model, name=SLOT, version=FAIL_VERSION, groups=["fleet"], rollout=Rollout(shares={ALL: 0})
    )
    tally = tally_for(meta, PREFIX)
    mon.follow(tally)
    stages: list[dict[str, Any]] = []
    halted_at = None
    halt_time = 0.0
    started = time.monotonic()
    for pct in args.stages:
        meta = repo.set_rollout(SLOT, FAIL_VERSION, raised(meta.rollout, pct * 100, None))
        tally.set_rollout(meta.rollout.shares if meta.rollout else None)
        stage_start = mon.poke("fleet", poke_payload(meta))
        deadline = stage_start + args.timeout
        while time.monotonic() < deadline:
            time.sleep(0.1)
            s = tally.summary()
            reason = halt_reason(s, args.halt_ratio, args.min_attempted)
            if reason is not None:
                meta = repo.set_rollout(SLOT, FAIL_VERSION, halted(meta.rollout, reason))
                halt_time = mon.poke("fleet", poke_payload(meta))
                halted_at = pct
                break
            if s.settled:
                break
        stages.append(
            {"percent": pct, "joined": s.joined, "attempted": s.attempted, "failed": s.failed,
             "seconds": time.monotonic() - stage_start}
        )  # fmt: skip
        if halted_at is not None:
            break
    downloads_at_halt = None
    if halted_at is not None:
        downloads_at_halt = _artifact_gets(repo_log, started)
        time.sleep(args.after_halt_s)  # anyone not in the rollout who still downloads shows here
    s = tally.summary()
    mon.follow(None)
    downloads = _artifact_gets(repo_log, started)
    first_failure = min(
        (d.finished for d in tally.devices.values() if d.state in ("failed", "rolled_back")),
        default=None,
    )
    return {
        "stages": stages,
        "halted_at_percent": halted_at,
        "halt_reason": s.halted,
        "reaction_s": None
        if halted_at is None or first_failure is None
        else halt_time - first_failure,
        "faulty_agents": len(faulty),
        "joined": s.joined,
        "attempted": s.attempted,
        "failed": s.failed,
        "failure_ratio": s.failure_ratio,
        "serving_new": s.serving,
        "artifact_downloads": downloads,
        "artifact_downloads_at_halt": downloads_at_halt,
        "never_downloaded": args.agents - downloads,
        "states": s.states,
    }


def _artifact_gets(repo_log: RepoLog, since: float) -> int:
    return sum(
        f"/targets/{SLOT}/{FAIL_VERSION}/" in g[1] and g[1].endswith(".onnx") and g[2] == 200
        for g in repo_log.window(since, time.monotonic() + 1)
    )


# -- main ---------------------------------------------------------------------------------------


def start_workers(
    procs: list[subprocess.Popen[str]],
    tmp: Path,
    args: argparse.Namespace,
    spec: dict[str, Any],
    ids: list[str],
    faulty: set[str],
    solo: str,
) -> None:
    """Start the worker processes (into ``procs``, so they are stopped whatever happens)."""
    for w in range(args.procs):
        mine = ids[w :: args.procs]
        agents = [
            {
                "id": a,
                "groups": ["fleet", "solo"] if a == solo else ["fleet"],
                "faulty": a in faulty,
            }
            for a in mine
        ]
        wspec = spec | {"agents": agents, "log": str(tmp / f"worker{w}.log")}
        cmd = [sys.executable, "-m", "bench.fleet", "--worker", json.dumps(wspec)]
        pipe = subprocess.PIPE
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdin=pipe, stdout=pipe, text=True))
    for p in procs:
        assert p.stdout is not None
        if p.stdout.readline().strip() != "READY":
            raise SystemExit(f"a fleet worker did not start; see {tmp}/worker*.log")


def stop_workers(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None and p.stdin is not None:
            p.stdin.write("stop\n")
            p.stdin.flush()
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    n = args.agents
    broker = Broker(tmp, "max_queued_messages 0\n")
    broker.start()
    repo = OperatorRepository.init(tmp / "repo")
    trusted = tmp / "root.json"
    shutil.copyfile(repo.metadata_dir / "1.root.json", trusted)
    repo_log = RepoLog(repo, free_port())
    mon = Monitor(broker.port)
    procs: list[subprocess.Popen[str]] = []
    try:
        wait_for("the repository server", lambda: bool(_get(repo_log.url)), 10)
        v = {i: models.classifier(tmp / f"v{i}.onnx", seed=i) for i in range(1, 5)}
        ids = [f"sim-{i:04d}" for i in range(n)]
        by_bucket = sorted(ids, key=lambda a: bucket(a, SLOT, FAIL_VERSION))
        step = max(1, round(1 / args.fail_ratio))
        faulty = by_bucket[::step]
        solo = next(a for a in ids if a not in faulty)
        spec = {
            "base": str(tmp / "agents"),
            "model": str(v[1]),
            "port": broker.port,
            "repo_url": repo_log.url,
            "trusted_root": str(trusted),
            "trial_s": args.trial_s,
            "rps": args.rps,
        }
        t0 = time.monotonic()
        start_workers(procs, tmp, args, spec, ids, set(faulty), solo)
        wait_for(f"{n} agents online", lambda: len(mon.serving("1")) >= n, 60)
        startup = time.monotonic() - t0
        cpu = CpuMeter(
            {
                "agents": [p.pid for p in procs],
                "broker": [broker.proc.pid] if broker.proc else [],
                "repository": [repo_log.proc.pid],
                "monitor": [os.getpid()],
            }
        )
        time.sleep(2.0)  # the start-up checks and first status burst are over
        idle = phase_idle(mon, repo_log, cpu, n, args.idle_s)
        solo_wave = phase_wave(repo, mon, repo_log, cpu, v[2], "2", "solo", 1, args.timeout)
        wave = phase_wave(repo, mon, repo_log, cpu, v[3], "3", "fleet", n, args.timeout)
        time.sleep(args.trial_s + 1.0)  # every agent through its trial before the next wave
        noop = phase_noop(mon, repo_log, n, args.timeout)
        staged = phase_staged(repo, mon, repo_log, v[4], args, faulty)
    finally:
        stop_workers(procs)
        mon.close()
        repo_log.stop()
        broker.stop()
    return {
        "agents": n,
        "procs": args.procs,
        "rps_per_agent": args.rps,
        "startup_s": startup,
        "idle": idle,
        "solo": solo_wave,
        "wave": wave,
        "noop_check": noop,
        "staged": staged,
    }


def _get(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "metadata/timestamp.json", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def checks(r: dict[str, Any], args: argparse.Namespace) -> list[Check]:
    w, st, idle, n = r["wave"], r["staged"], r["idle"], r["agents"]

    def s(x: float | None) -> str:
        return "never" if x is None else f"{x:.2f} s"

    halted_before_all = st["halted_at_percent"] is not None and st["halted_at_percent"] < 100
    return [
        gated(
            f"fleet wave: {n} agents serving the new version",
            f"100 % within {args.timeout:g} s",
            f"50 % {s(w['t50_s'])}, 95 % {s(w['t95_s'])}, 100 % {s(w['t100_s'])}",
            f"one agent alone {s(r['solo']['t100_s'])}",
            w["served"] >= n,
        ),
        gated(
            "staged rollout: devices not in it download nothing",
            "artifact GETs <= devices that attempted",
            f"{st['artifact_downloads']} GETs; {st['never_downloaded']} agents none",
            f"{st['attempted']} attempted of {st['joined']} in the rollout",
            st["artifact_downloads"] <= st["attempted"] <= st["joined"],
        ),
        gated(
            f"{args.fail_ratio:.0%} failing agents halt the rollout",
            f"halted before 100 % (failed/attempted > {args.halt_ratio:g})",
            f"halted at {st['halted_at_percent']} %: {st['failed']} of {st['attempted']} failed,"
            f" {st['reaction_s'] or 0:.2f} s after the first",
            f"{st['faulty_agents']} of {n} agents refuse the version",
            halted_before_all,
        ),
        info(
            "broker load, idle fleet (metrics, predictions at --rps)",
            f"{idle['msgs_per_device_per_min']:.1f} msgs"
            f" ({idle['bytes_per_device_per_min'] / 1024:.1f} KiB) /device/min",
            f"fleet {idle['broker_msgs_per_s']:.0f} msgs/s",
        ),
        info(
            "broker and repository load, update wave",
            f"{w['broker_msgs_per_device']:.1f} msgs and {w['repo_requests_per_device']:.1f}"
            f" HTTP GETs per device; peak {w['broker_msgs_peak_per_s']:.0f} msgs/s,"
            f" {w['repo_requests_peak_per_s']:.0f} GETs/s",
            f"idle {idle['broker_msgs_per_s']:.0f} msgs/s, {idle['repo_requests']} GETs",
        ),
    ]


# -- scale: thousands of lightweight simulated devices ------------------------------------------


class SimWorkers:
    """``--procs`` processes of :mod:`bench._fleet_sim` devices, driven over their stdin."""

    def __init__(self, tmp: Path, args: argparse.Namespace, spec: dict[str, Any]) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        devices = spec.pop("devices")
        for w in range(args.procs):
            wspec = spec | {"devices": devices[w :: args.procs], "log": str(tmp / f"sim{w}.log")}
            spec_file = tmp / f"sim{w}.json"
            spec_file.write_text(json.dumps(wspec))
            cmd = [sys.executable, "-m", "bench.fleet", "--sim-worker", str(spec_file)]
            pipe = subprocess.PIPE
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, stdin=pipe, stdout=pipe, text=True))
        for p in self.procs:
            if "ready" not in self._read(p):
                raise SystemExit(f"a simulated-device worker did not start; see {tmp}/sim*.log")

    @staticmethod
    def _read(p: subprocess.Popen[str]) -> dict[str, Any]:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise SystemExit("a simulated-device worker died")
        return dict(json.loads(line))

    def send(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(json.dumps(cmd) + "\n")
            p.stdin.flush()
        return [self._read(p) for p in self.procs]

    def report(self) -> dict[str, Any]:
        total: dict[str, Any] = {"pokes": []}
        for r in self.send({"report": True}):
            for k, v in r.items():
                total[k] = total.get(k, 0) + v if k != "pokes" else total[k] + v
        return total

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None and p.stdin is not None:
                with contextlib.suppress(OSError):
                    p.stdin.write(json.dumps({"stop": True}) + "\n")
                    p.stdin.flush()
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _watch_json(node: str, wait_s: float) -> dict[str, Any]:
    """``inferctl watch --json`` in its own process: rows seen, wall and CPU seconds."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = usage.ru_utime + usage.ru_stime
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "updater.inferctl", "watch", "--json", "--wait", str(wait_s),
         "--broker", node, "--prefix", PREFIX],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = proc.communicate(timeout=wait_s + 120)
    wall = time.monotonic() - start
    try:
        rows = json.loads(out)
    except ValueError:
        return {"error": (err or out)[-300:], "wall_s": wall}
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wait_s": wait_s,
        "rows": len(rows),
        "online": sum(1 for r in rows if r.get("online")),
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime - cpu_before, 2),
    }


def run_scale(args: argparse.Namespace, tmp: Path, kind: str) -> dict[str, Any]:
    """One broker kind (``mosquitto`` or ``nats``): storm, steady load, poke, watch."""
    from bench._fleet_sim import raise_fd_limit
    from tests.support.nats import NatsCluster

    n = args.devices
    raise_fd_limit()  # the broker inherits it: one socket per device
    cluster: NatsCluster | None = None
    broker: Broker | None = None
    if kind == "nats":
        cluster = NatsCluster(tmp / "nats", size=3, mqtt_extra=args.nats_mqtt)
        cluster.start()
        nodes = [node.where for node in cluster.nodes]
        broker_pids = [node.proc.pid for node in cluster.nodes if node.proc]
        protocol = "3.1.1"
    else:
        # mosquitto's default max_queued_messages (1000) drops the retained statuses beyond it
        # that a dashboard joining a large fleet is sent at once (measured: --mosquitto-queue)
        broker = Broker(tmp, f"max_queued_messages {args.mosquitto_queue}\n")
        broker.start()
        nodes = [f"{broker.host}:{broker.port}"]
        broker_pids = [broker.proc.pid] if broker.proc else []
        protocol = "5"
    operator_node = nodes[-1]
    repo = OperatorRepository.init(tmp / "repo")
    repo_log = RepoLog(repo, free_port())
    mon = Monitor(int(operator_node.rpartition(":")[2]))
    workers: SimWorkers | None = None
    out: dict[str, Any] = {"broker": kind, "nodes": len(nodes), "devices": n}
    if kind == "nats":
        out["nats_mqtt"] = args.nats_mqtt
    if kind == "mosquitto":
        out["max_queued_messages"] = args.mosquitto_queue
    try:
        wait_for("the repository server", lambda: bool(_get(repo_log.url)), 10)
        devices = [
            {
                "id": f"sim-{i:05d}",
                "groups": ["fleet", f"g{i % 10}"],
                "nodes": nodes[i % len(nodes) :] + nodes[: i % len(nodes)],
            }
            for i in range(n)
        ]
        spec = {
            "prefix": PREFIX, "protocol": protocol, "metrics_s": args.sim_metrics_s,
            "batch_s": args.sim_batch_s, "rps": args.sim_rps, "repo_url": repo_log.url,
            "devices": devices, "check_threads": 4,
        }  # fmt: skip
        workers = SimWorkers(tmp, args, spec)
        cpu = CpuMeter({"broker": broker_pids, "devices": [p.pid for p in workers.procs]})
        before = cpu.read()
        t0 = time.monotonic()
        workers.send({"go": True})
        # connected: the devices have their CONNACK; seen: one dashboard has their status
        reached: dict[int, float] = {}
        seen_all: float | None = None
        deadline = t0 + args.timeout
        while time.monotonic() < deadline:
            connected = workers.report()["connected"]
            for pct in (50, 99, 100):
                if pct not in reached and connected >= math.ceil(n * pct / 100):
                    reached[pct] = time.monotonic() - t0
            if seen_all is None and len(mon.online) >= n:
                seen_all = time.monotonic() - t0
            if 100 in reached and seen_all is not None:
                break
            time.sleep(0.1)
        storm_cpu = CpuMeter.used(before, cpu.read())
        rep = workers.report()
        out["storm"] = {
            "t50_s": reached.get(50), "t99_s": reached.get(99), "t100_s": reached.get(100),
            "dashboard_saw_all_s": seen_all,
            "online_seen": len(mon.online), "connected": rep["connected"],
            "refused": rep["refused"], "lost": rep["lost"],
            "connects_per_s": n / reached[100] if 100 in reached else None,
            "cpu_s": storm_cpu,
        }  # fmt: skip
        time.sleep(2.0)
        # steady: metrics (QoS 0) and prediction batches (QoS 1), nothing else going on
        before, sent0 = cpu.read(), workers.report()["sent"]
        start = time.monotonic()
        time.sleep(args.steady_s)
        end = time.monotonic()
        used = CpuMeter.used(before, cpu.read())
        rep = workers.report()
        got = mon.window(start, end)
        span = end - start
        out["steady"] = {
            "seconds": round(span, 1),
            "published_per_s": (rep["sent"] - sent0) / span,
            "delivered_to_monitor_per_s": len(got) / span,
            "delivered_bytes_per_s": sum(m[2] for m in got) / span,
            "connected": rep["connected"], "lost": rep["lost"],
            "broker_cpu_percent": 100 * used["broker"] / span,
            "devices_cpu_percent": 100 * used["devices"] / span,
            "broker_cpu_us_per_msg": 1e6 * used["broker"] / max(1, rep["sent"] - sent0 + len(got)),
        }  # fmt: skip
        # a group poke (retained) reaching the devices, and the checks it asks for
        before = cpu.read()
        checked0 = rep["checked"]
        subscribed_at_poke = rep["subscribed"]  # devices whose subscriptions the broker acked
        poke_error = None
        asked = time.monotonic()
        try:
            pushed = mon.poke("fleet", push_payload())
        except MqttError as err:  # no PUBACK in time: count what arrives all the same
            pushed, poke_error = asked, str(err)
        arrivals: list[float] = []
        checked = 0
        deadline = pushed + args.timeout
        while time.monotonic() < deadline:
            time.sleep(0.25)
            rep = workers.report()
            arrivals += [t - pushed for _, t, _ in rep["pokes"]]
            checked = rep["checked"] - checked0
            if len(arrivals) >= n and checked >= n:
                break
        arrivals.sort()
        checks_done = time.monotonic() - pushed
        gets = repo_log.window(pushed, time.monotonic() + 1)
        used = CpuMeter.used(before, cpu.read())
        out["poke"] = {
            "reached": len(arrivals),
            "t50_s": percentile_time(arrivals, n, 50),
            "t99_s": percentile_time(arrivals, n, 99),
            "t100_s": percentile_time(arrivals, n, 100),
            "checks_done": checked,
            "checks_all_done_s": checks_done if checked >= n else None,
            "repo_requests": len(gets),
            "repo_requests_per_s": len(gets) / max(1e-9, checks_done),
            "repo_requests_peak_per_s": peak_per_s([g[0] for g in gets]),
            "check_errors": rep["check_errors"],
            "poke_error": poke_error,
            "subscribed_at_poke": subscribed_at_poke,
            "subscribed_at_end": rep["subscribed"],
            "subscribe_refused": rep["sub_failed"],
            "cpu_s": used,
        }
        # the operator's view: inferctl watch --json on another node (or the one broker)
        out["watch"] = [_watch_json(operator_node, wait) for wait in args.watch_wait_s]
    finally:
        if workers is not None:
            workers.stop()
        mon.close()
        repo_log.stop()
        if broker is not None:
            broker.stop()
        if cluster is not None:
            cluster.kill()
    return out


def scale_checks(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[Check]:
    rows: list[Check] = []

    def s(x: float | None) -> str:
        return "never" if x is None else f"{x:.2f} s"

    for r in runs:
        who = f"{r['devices']} sim devices, {r['broker']} x{r['nodes']}"
        st, sd, pk = r["storm"], r["steady"], r["poke"]
        if "max_queued_messages" in r:
            who += f", max_queued_messages {r['max_queued_messages']}"
        if r.get("nats_mqtt"):
            who += f", mqtt {{{r['nats_mqtt']}}}"
        rows += [
            info(
                f"connect storm ({who})",
                f"connected 50 % {s(st['t50_s'])}, 99 % {s(st['t99_s'])}, 100 %"
                f" {s(st['t100_s'])}; one dashboard saw all {s(st['dashboard_saw_all_s'])}",
                f"broker CPU {st['cpu_s']['broker']:.1f} s,"
                f" devices' {st['cpu_s']['devices']:.0f} s",
            ),
            info(
                f"steady broker load ({who})",
                f"{sd['published_per_s']:.0f} msgs/s in, {sd['delivered_to_monitor_per_s']:.0f}"
                f" msgs/s to one dashboard, broker {sd['broker_cpu_percent']:.0f} % of a core",
                f"metrics every {args.sim_metrics_s:g} s, predictions every"
                f" {args.sim_batch_s:g} s per device",
            ),
            gated(
                f"group poke reaches 99 % of devices ({who})",
                f"within {args.timeout:g} s",
                f"50 % {s(pk['t50_s'])}, 99 % {s(pk['t99_s'])}, 100 % {s(pk['t100_s'])}",
                f"{pk['repo_requests']} repository GETs,"
                f" peak {pk['repo_requests_peak_per_s']:.0f}/s",
                pk["t99_s"] is not None,
            ),
        ]
        rows += [
            info(
                f"inferctl watch --json keeps up ({who})",
                f"{w.get('online', 0)} of {r['devices']} online after --wait {w.get('wait_s')} s"
                f" ({w.get('wall_s')} s wall)",
                "retained statuses, one per device",
            )
            for w in r["watch"]
        ]
    return rows


def record_scale(results: dict[str, Any], rows: list[Check]) -> None:
    """Merge the rows into bench/results.json and results.md (as bench.peers does)."""
    from bench import run

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["broker"], r["devices"], r.get("max_queued_messages"), r.get("nats_mqtt"))

    def merge(earlier: dict[str, Any] | None) -> dict[str, Any]:
        # runs with other settings (broker, fleet size, queue limit) stay: each run adds its rows
        new_keys = {key(r) for r in results["runs"]}
        kept = [r for r in (earlier or {}).get("runs", []) if key(r) not in new_keys]
        return {**results, "runs": kept + results["runs"]}

    run.merge_into_results("fleet-scale", rows, merge, same_names_only=True)


def main_scale(args: argparse.Namespace) -> int:
    runs = []
    for kind in args.brokers:
        tmp = Path(tempfile.mkdtemp(prefix=f"inferd-fleet-{kind}-"))
        try:
            runs.append(run_scale(args, tmp, kind))
        finally:
            if not os.environ.get("INFERD_BENCH_KEEP"):
                shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(runs[-1], indent=2), file=sys.stderr, flush=True)
    rows = scale_checks(runs, args)
    results = {"runs": runs, "procs": args.procs}
    record_scale(results, rows)
    return report(results, rows, args.json)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--procs", type=int, default=4, help="worker processes")
    parser.add_argument("--rps", type=float, default=1.0, help="predictions/s per agent")
    parser.add_argument("--idle-s", type=float, default=20.0, help="idle measurement window")
    parser.add_argument("--trial-s", type=float, default=2.0, help="agents' trial window")
    parser.add_argument("--timeout", type=float, default=60.0, help="per wave / stage")
    parser.add_argument("--fail-ratio", type=float, default=0.1, help="agents failing v4")
    parser.add_argument(
        "--stages",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10, 50, 100],
        help="rollout percentages, e.g. 10,50,100",
    )
    parser.add_argument("--halt-ratio", type=float, default=0.05)
    parser.add_argument("--min-attempted", type=int, default=5)
    parser.add_argument("--after-halt-s", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    scale = parser.add_argument_group("scale (--devices N: lightweight simulated devices)")
    scale.add_argument("--devices", type=int, help="simulated devices (bench._fleet_sim)")
    scale.add_argument(
        "--brokers", type=lambda t: t.split(","), default=["mosquitto", "nats"],
        help="mosquitto (one, private) and/or nats (a private 3-node cluster)",
    )  # fmt: skip
    scale.add_argument("--sim-metrics-s", type=float, default=10.0, help="metrics period")
    scale.add_argument("--sim-batch-s", type=float, default=10.0, help="predictions period")
    scale.add_argument("--sim-rps", type=float, default=0.2, help="requests/s per device")
    scale.add_argument("--steady-s", type=float, default=20.0, help="steady-load window")
    scale.add_argument(
        "--watch-wait-s", type=lambda t: [float(x) for x in t.split(",")], default=[1.0, 5.0],
        help="inferctl watch --wait, one run each",
    )  # fmt: skip
    scale.add_argument(
        "--mosquitto-queue", type=int, default=0, help="max_queued_messages (0: no limit)"
    )
    scale.add_argument(
        "--nats-mqtt", default="", help="more of NATS's mqtt block: consumer_replicas: 1, ..."
    )
    scale.add_argument("--sim-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.sim_worker:
        from bench import _fleet_sim

        return _fleet_sim.main(json.loads(Path(args.sim_worker).read_text()))
    if args.devices:
        return main_scale(args)
    tmp = Path(tempfile.mkdtemp(prefix="inferd-fleet-"))
    try:
        results = run(args, tmp)
    finally:
        if not os.environ.get("INFERD_BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
    if not args.json:
        print(json.dumps(results, indent=2))
    return report(results, checks(results, args), args.json)


if __name__ == "__main__":
    sys.exit(main())
