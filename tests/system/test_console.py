"""``inferctl console`` end to end in a real headless Chromium: three real agents on a private
broker, a signed repository, and a staged rollout that the console advances by itself and halts
on the device where the candidate fails validation; the page shows it all with no console error.

Screenshots are kept in the test's tmp dir and copied to ``build/artifacts/console-*.png``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from telemetry.broker import BrokerOptions
from telemetry.payloads import (
    HostFacts,
    Metrics,
    ModelMetrics,
    SpoolMetrics,
    Status,
    SystemMetrics,
    utc_now,
)
from telemetry.quality.drift import compute_reference
from telemetry.shares import ALL
from tests.support.broker import Broker, publisher
from tests.support.chromium import CHROMIUM, Browser, Page
from tests.support.daemon import DaemonProc, start_daemon
from tests.support.fleet import ids_by_bucket
from tests.support.models import classifier
from tests.support.net import free_port
from tests.support.signer import Signer
from tests.support.tuf_repo import TufRepo
from tests.support.waits import wait_until
from updater.meta import Rollout
from updater.operator.console.app import ConsoleApp, ConsoleSettings
from updater.operator.console.rollouts import Policy
from updater.operator.repository import OperatorRepository

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "build" / "artifacts"
PREFIX = "inferd-console-test"

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium: apt-get install -y chromium chromium-driver",
)


def _agent(tmp: Path, name: str, model: Path, broker: Broker, tuf: TufRepo) -> DaemonProc:
    (tmp / name).mkdir()
    return start_daemon(
        tmp / name,
        {
            "device_id": name,
            "groups": ["fleet"],
            "models": [{"name": "classifier", "path": str(model)}],
            "mqtt": {
                "enabled": True,
                "host": broker.host,
                "port": broker.port,
                "topic_prefix": PREFIX,
            },
            "telemetry": {"metrics_interval_s": 1},
            "quality": {"publish_interval_s": 1, "drift_window": 20},
            "updates": {
                "repository_url": tuf.url,
                "trusted_root": str(tuf.trusted_root),
                "poll_interval_s": 3600,  # only the console's pokes make them look
                "check_on_start": False,
                "trial_window_s": 0.5,
                "validation_runs": 3,
            },
        },
    )


class Traffic:
    """A few requests per second to each agent, each followed by its label, so the page has
    latency, throughput and quality to show."""

    def __init__(self, agents: list[DaemonProc], features: dict[str, int]) -> None:
        self.agents, self.features = agents, features
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-console-traffic")
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stop.wait(0.1):
            i += 1
            for a in self.agents:
                n = self.features[a.config["device_id"]]
                x = self.inputs(i, n)
                with contextlib.suppress(OSError):
                    a.infer("classifier", [{"name": "x", "shape": [1, n], "datatype": "FP32",
                                            "data": x}], id=f"r{i}")  # fmt: skip
                    a.request("POST", "/v2/models/classifier/feedback",
                              {"id": f"r{i}", "label": i % 3})  # fmt: skip

    @staticmethod
    def inputs(i: int, n: int) -> list[float]:
        """Request ``i``'s ``n`` features: each of 0.0 ... 0.9 once in every 10 requests."""
        return [((i * 7 + k) % 10) / 10 for k in range(n)]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path, width=1400, height=1500)
    yield b
    b.close()


def _console(
    tmp: Path, broker: Broker, tuf: TufRepo, *extra: str
) -> tuple[subprocess.Popen[str], str]:
    """A console process (``extra`` arguments override the defaults) and its URL."""
    tmp.mkdir(parents=True, exist_ok=True)
    log = (tmp / "console.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "updater.inferctl", "console",
         "--repo", str(tuf.repo.path), "--listen", f"127.0.0.1:{free_port()}",
         "--broker", f"{broker.host}:{broker.port}", "--prefix", PREFIX,
         "--soak", "3", "--steps", "50,100", "--halt-ratio", "0.2", "--min-attempted", "1",
         "--plot-bucket", "2", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    log.close()
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("inferd console: http://"), (tmp / "console.log").read_text()
    return proc, line.split(": ", 1)[1].strip()


def _shot(page: Page, tmp: Path, name: str) -> Path:
    path = page.screenshot(tmp / f"console-{name}.png")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    kept = shutil.copy(path, ARTIFACTS / path.name)
    print(f"screenshot: {path} (copied to {kept})")
    return path


def _charts_follow_the_window(page: Page) -> None:
    """The chart is as wide as its box, narrower and wider again with the window."""
    canvas = "document.querySelector('#charts canvas').width"
    box = "document.querySelector('#charts').clientWidth"
    same = f"{canvas} === {box} && {box}"
    wide = page.wait_for(same, 10, "the chart as wide as its box")
    assert wide > 1200, wide  # 1400 px window
    page.set_viewport(700, 1500)
    narrow = page.wait_for(f"{same} < 700 && {box}", 10, "the chart following a narrow window")
    assert 500 < narrow < 700, narrow
    page.set_viewport(1400, 1500)
    assert page.wait_for(f"{same} > 1200 && {box}", 10, "the chart following it back") == wide


def _card(page: Page, attr: str) -> str:
    return f"document.querySelector('[data-slot=\"classifier\"]')?.getAttribute('{attr}')"


@needs_chromium
@pytest.mark.timeout(180)
def test_the_page_shows_three_agents_and_a_rollout_that_halts_by_itself(
    tmp_path: Path, broker: Broker, tuf_repo: TufRepo, browser: Browser
) -> None:
    healthy = ids_by_bucket("classifier", "2", 5000, n=2)  # in at 50 %
    (failing,) = ids_by_bucket("classifier", "2", 5000, above=True)  # in at 100 % only
    v1 = classifier(tmp_path / "v1.onnx", seed=0)
    v1_wide = classifier(tmp_path / "v1-wide.onnx", n_features=5, seed=0)  # v2 will not fit it
    # drift references beside the models: v1's from other inputs than the traffic's (drift),
    # the wide one's from the traffic's own (none)
    rng = np.random.default_rng(0)
    (tmp_path / "v1.ref.json").write_bytes(
        compute_reference({"x": rng.normal(2.0, 0.5, (1000, 4)).astype(np.float32)}).to_json()
    )
    (tmp_path / "v1-wide.ref.json").write_bytes(
        compute_reference({"x": np.array([Traffic.inputs(i, 5) for i in range(1000)])}).to_json()
    )
    agents = [_agent(tmp_path, n, v1, broker, tuf_repo) for n in healthy]
    agents.append(_agent(tmp_path, failing, v1_wide, broker, tuf_repo))
    traffic = Traffic(agents, {**dict.fromkeys(healthy, 4), failing: 5})
    console, url = _console(tmp_path, broker, tuf_repo)
    try:
        page = browser.page()
        page.navigate(url)
        rows = "[...document.querySelectorAll('#devices tr[data-device]')]"
        online = f"{rows}.filter(r => r.querySelector('.pill.ok')).map(r => r.dataset.device)"
        shown = page.wait_for(f"{online}.length === 3 && {online}", 30, "three agents online")
        assert sorted(shown) == sorted([*healthy, failing])
        page.wait_for("document.querySelectorAll('#charts .uplot').length === 1", 30, "a chart")
        _charts_follow_the_window(page)
        page.wait_for(
            "[...document.querySelectorAll('#devices td.num')].some(td => td.textContent !== '-')",
            30,
            "latency figures",
        )
        assert page.evaluate("document.querySelector('#conn').textContent") == "broker connected"
        quality = "[...document.querySelectorAll('#quality tbody tr')]"
        page.wait_for(
            f"{quality}.length === 3 && "
            f"{quality}.every(r => /\\d\\.\\d{{3}} \\/ /.test(r.innerText))",
            30,
            "accuracy / F1 of three devices",
        )
        psi = (
            f"Object.fromEntries({quality}.filter(r => r.cells[2].textContent === '1')"
            ".map(r => [r.cells[0].textContent, r.cells[6].textContent]))"
        )
        shown = page.wait_for(
            f"Object.values({psi}).filter(t => t !== '-').length === 3 && {psi}",
            30,
            "the drift of three devices",
        )
        for device in healthy:
            assert shown[device].endswith(" drifted"), shown  # PSI over 0.2
            assert float(shown[device].split()[0]) > 0.2, shown
        assert float(shown[failing]) < 0.2, shown  # its own inputs: no drift
        page.wait_for(
            "document.querySelector('#events').innerText.includes('drift: PSI')",
            10,
            "the drift event",
        )
        _shot(page, tmp_path, "fleet")

        # published staged at 0 %: the console takes it to 50 % and, healthy, to 100 %, where
        # the wide device fails validation and the console halts the rollout
        tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2", groups=("fleet",),
                         rollout=Rollout(shares={ALL: 0}))  # fmt: skip
        page.wait_for(f"{_card(page, 'data-state')} === 'halted'", 90, "the halt on the page")
        meta = tuf_repo.repo.model("classifier")[2]
        assert meta.rollout is not None and meta.rollout.halted is not None
        assert "1 of 3 devices failed (33.3% > 20.0%)" in meta.rollout.halted
        card = page.evaluate("document.querySelector('[data-slot=\"classifier\"]').innerText")
        assert "HALTED: 1 of 3 devices failed" in card
        assert failing in card  # named among the failures, with the reason
        decisions = page.evaluate(
            "[...document.querySelectorAll('[data-slot=\"classifier\"] .decisions li')]"
            ".map(li => li.dataset.action)"
        )
        assert decisions == ["halt", "advance", "advance"]  # 0 -> 50 % -> 100 %, halted
        events = page.evaluate("document.querySelector('#events').innerText")
        assert "advance classifier 2" in events and "halt classifier 2" in events
        versions = page.evaluate(
            f"Object.fromEntries({rows}.map(r => [r.dataset.device, "
            "r.querySelector('.version').textContent]))"
        )
        assert versions == {**dict.fromkeys(healthy, "2"), failing: "1"}
        page.wait_for(
            f"{rows}.some(r => r.dataset.device === '{failing}' "
            "&& r.innerText.includes('failed 2'))",
            10,
            "the failing device's last update outcome",
        )
        _shot(page, tmp_path, "halted")

        # the operator resumes from the page; the failed device does not retry this version
        page.evaluate("document.querySelector('[data-slot=\"classifier\"] button.resume').click()")
        page.wait_for(f"{_card(page, 'data-state')} === 'complete'", 20, "the resume")
        resumed = tuf_repo.repo.model("classifier")[2].rollout
        assert resumed == Rollout(shares={ALL: 10_000})
        assert page.errors == [], page.errors
    finally:
        traffic.close()
        console.terminate()
        console.communicate(timeout=20)
        for a in agents:
            assert a.stop() == 0, a.stderr()
    assert console.returncode == 0, (tmp_path / "console.log").read_text()
    log = (tmp_path / "console.log").read_text()
    assert "Traceback" not in log, log


@needs_chromium
@pytest.mark.timeout(60)
def test_with_a_token_the_browser_signs_in_once(
    tmp_path: Path, broker: Broker, tuf_repo: TufRepo, browser: Browser
) -> None:
    token = tmp_path / "token"
    token.write_text("e3b0c44298fc1c149afbf4c8996fb924\n")
    token.chmod(0o600)
    console, url = _console(tmp_path, broker, tuf_repo, "--token-file", str(token))
    try:
        page = browser.page()
        page.navigate(url)
        page.wait_for("document.querySelector('#login') !== null", 10, "the sign-in form")
        assert page.evaluate("document.querySelector('#rollouts')") is None  # nothing else

        def sign_in(value: str) -> None:
            page.evaluate(f"document.querySelector('#token').value = {value!r}")
            page.evaluate("document.querySelector('#login').requestSubmit()")

        sign_in("not-the-token-at-all")
        page.wait_for("document.querySelector('#login-error').textContent === 'wrong token'", 10)
        assert len(page.errors) == 1 and "401" in page.errors[0], page.errors  # the refusal
        page.errors.clear()
        sign_in(token.read_text().strip())
        page.wait_for("document.querySelector('#rollouts') !== null", 10, "the console")
        page.wait_for("document.body.dataset.generation !== undefined", 10, "the live state")
        page.navigate(url)  # the cookie keeps it signed in
        page.wait_for("document.querySelector('#rollouts') !== null", 10, "the console again")
        page.wait_for("document.querySelector('#conn').textContent === 'broker connected'", 10)
        assert page.errors == [], page.errors
    finally:
        console.terminate()
        console.communicate(timeout=20)
    assert console.returncode == 0, (tmp_path / "console.log").read_text()


# -- two consoles on one broker ----------------------------------------------------------------


def _watching_console(broker: Broker, tuf_repo: TufRepo, client_id: str) -> ConsoleApp:
    """A console on a free port that only watches (its policy drives no rollout)."""
    opts = BrokerOptions(host=broker.host, port=broker.port, client_id=client_id)
    return ConsoleApp(
        ConsoleSettings(
            broker=opts,
            repo=str(tuf_repo.repo.path),
            listen="127.0.0.1:0",
            prefix=PREFIX,
            policy=Policy(drive=False),
        )
    )


def test_two_consoles_split_the_metrics_but_each_sees_every_device(
    broker: Broker, tuf_repo: TufRepo
) -> None:
    apps = [_watching_console(broker, tuf_repo, f"console-{i}") for i in range(2)]
    pub = publisher(broker)
    try:
        for app in apps:
            app.start()
        devices = [f"pi-{i}" for i in range(3)]
        for d in devices:
            pub.publish(f"{PREFIX}/{d}/status", _status(d), qos=1, retain=True).wait_for_publish(5)
        for app in apps:
            assert wait_until(lambda app=app: len(app.state.fleet.devices) == 3), (
                "three devices not seen"
            )

        def taken() -> list[int]:
            return [app.state.received["metrics"] for app in apps]

        def send(n: int) -> None:
            for i in range(n):
                m = _metrics(devices[i % 3])
                pub.publish(f"{PREFIX}/{devices[i % 3]}/metrics", m, qos=1).wait_for_publish(5)

        while min(taken()) == 0:  # until both shared subscriptions are live
            send(1)
            time.sleep(0.05)
        before = taken()
        send(40)
        assert wait_until(lambda: sum(taken()) - sum(before) == 40), "all 40 metrics not seen"
        split = [a - b for a, b in zip(taken(), before, strict=True)]
        assert min(split) >= 10, split  # each console took a share of the stream ...
        for app in apps:  # ... and still shows every device: status is not shared
            assert [d["device"] for d in app.snapshot()["devices"]] == devices
    finally:
        pub.disconnect()
        pub.loop_stop()
        for app in apps:
            app.stop()


@pytest.mark.timeout(60)
def test_the_console_rides_out_a_broker_restart(broker: Broker, tuf_repo: TufRepo) -> None:
    app = _watching_console(broker, tuf_repo, "console-restart")
    pub = None
    try:
        app.start()
        connected = lambda: app.snapshot()["console"]["connected"]  # noqa: E731
        assert connected()
        broker.stop()  # a broker without persistence: it comes back with nothing retained
        assert wait_until(lambda: not connected()), "the page saying the broker is gone not seen"
        broker.start()
        assert wait_until(connected, 30), "the reconnect not seen"
        pub = publisher(broker)
        pub.publish(f"{PREFIX}/pi-9/status", _status("pi-9"), qos=1, retain=True)
        assert wait_until(lambda: "pi-9" in app.state.fleet.devices), (
            "a status after the restart not seen"
        )
    finally:
        if pub is not None:
            pub.disconnect()
            pub.loop_stop()
        app.stop()


def _status(device: str) -> bytes:
    return msgspec.json.encode(
        Status(device=device, groups=["fleet"], agent_version="t", started_at=utc_now(),
               host=HostFacts(hostname=device, arch="x", os="Linux", python="3"), models=[])
    )  # fmt: skip


def _metrics(device: str) -> bytes:
    mm = ModelMetrics(count=1, errors=0, interval_count=1, interval_errors=0, rps=1.0,
                      p50_ms=1.0, p99_ms=2.0)  # fmt: skip
    spool = SpoolMetrics(queued_messages=0, queued_bytes=0, dropped_records=0,
                         dropped_records_total=0)  # fmt: skip
    return msgspec.json.encode(
        Metrics(device=device, interval_s=1, models={"classifier": mm}, system=SystemMetrics(),
                spool=spool)
    )  # fmt: skip


# -- one signer at a time ------------------------------------------------------------------------


def _after_the_other_signer(repo: Path, shares: dict[str, int], *command: str) -> str:
    """Run ``inferctl COMMAND`` while another process holds the signing lock: check that it
    waits, signing nothing, until that one has signed ``shares``; its output."""
    before = OperatorRepository(repo).timestamp().version
    other = Signer(repo, "classifier", shares)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "updater.inferctl", *command],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # until it says it waits (EOF: it did not wait)
            seen.append(line)
            if "waiting for" in line:
                break
        assert seen and "waiting for" in seen[-1] and ".signing.lock" in seen[-1], seen
        assert proc.poll() is None
        assert OperatorRepository(repo).timestamp().version == before  # nothing signed
        other.sign_and_release()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        other.close()
    assert OperatorRepository(repo).timestamp().version >= before + 2  # both signed
    return out


def test_inferctl_rollout_waits_for_another_signer_and_keeps_its_change(
    tmp_path: Path, tuf_repo: TufRepo
) -> None:
    """An operator's ``inferctl rollout`` while a console (here: another process holding the
    same lock) signs: it waits, then changes the shares as they are signed by then."""
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2", groups=("fleet",),
                     rollout=Rollout(shares={ALL: 0}))  # fmt: skip
    out = _after_the_other_signer(
        tuf_repo.repo.path, {ALL: 1000, "canary": 5000},
        "rollout", "classifier", "--repo", str(tuf_repo.repo.path), "--percent", "20",
        "--group", "kitchen", "--window", "0", "--no-poke",
    )  # fmt: skip
    signed = OperatorRepository(tuf_repo.repo.path).model("classifier")[2].rollout
    assert signed == Rollout(shares={ALL: 1000, "canary": 5000, "kitchen": 2000})
    assert "rollout 10 %" in out, out  # it read the other signer's shares under the lock


def test_publishing_and_refreshing_wait_for_another_signer(
    tmp_path: Path, tuf_repo: TufRepo
) -> None:
    """``inferctl model add`` and ``repo refresh`` (cron) sign targets, snapshot and timestamp
    too: while a console signs a rollout they wait, so neither signs over the other."""
    repo = tuf_repo.repo.path
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2", groups=("fleet",),
                     rollout=Rollout(shares={ALL: 0}))  # fmt: skip
    _after_the_other_signer(
        repo, {ALL: 1000},
        "model", "add", str(repo), str(classifier(tmp_path / "v3.onnx", seed=3)),
        "--name", "other", "--version", "3",
    )  # fmt: skip
    now = OperatorRepository(repo)
    assert now.model("classifier")[2].rollout == Rollout(shares={ALL: 1000})
    assert now.model("other")[2].version == "3"
    _after_the_other_signer(repo, {ALL: 5000}, "repo", "refresh", str(repo))
    assert OperatorRepository(repo).model("classifier")[2].rollout == Rollout(shares={ALL: 5000})


# -- a restarted console -----------------------------------------------------------------------


def _api(url: str, path: str, post: bool = False) -> Any:
    req = urllib.request.Request(
        url.rstrip("/") + path,
        data=b"{}" if post else None,
        headers={"Content-Type": "application/json"} if post else {},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def _rollout(url: str) -> dict[str, Any]:
    (row,) = _api(url, "/api/state")["rollouts"]
    return dict(row)


def _stop(console: subprocess.Popen[str], log: Path) -> None:
    console.terminate()
    console.communicate(timeout=20)
    assert console.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.timeout(120)
def test_a_restarted_console_goes_on_with_the_soak_and_resumes_at_the_halted_share(
    tmp_path: Path, broker: Broker, tuf_repo: TufRepo
) -> None:
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2", groups=("fleet",),
                     rollout=Rollout(shares={ALL: 0}))  # fmt: skip
    policy = ("--soak", "8", "--steps", "10,50,100")
    first, url = _console(tmp_path / "first", broker, tuf_repo, *policy)
    try:
        assert wait_until(lambda: 0 < (_rollout(url)["soak_left_s"] or 0) <= 5, 15), (
            "3 s of the soak not seen"
        )
    finally:
        first.kill()  # a crash: nothing saved on the way out
        first.communicate(timeout=20)

    second, url = _console(tmp_path / "second", broker, tuf_repo, *policy)
    try:
        left = _rollout(url)["soak_left_s"]
        assert left is not None and left <= 5, left  # the soak goes on; 8 s again without memory
        assert wait_until(lambda: _shares(tuf_repo) == {ALL: 1000}, left + 5), (
            "the advance to 10 % not seen"
        )
        # the operator raises it to 30 % by hand; the console follows, then halts it on request
        done = subprocess.run(
            [sys.executable, "-m", "updater.inferctl", "rollout", "classifier",
             "--repo", str(tuf_repo.repo.path), "--percent", "30", "--window", "0",
             "--no-poke"],
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert wait_until(lambda: _rollout(url)["share_all"] == 3000), (
            "the console following 30 % not seen"
        )
        _api(url, "/api/rollouts/classifier/halt", post=True)
        assert _rollout(url)["state"] == "halted"
    finally:
        _stop(second, tmp_path / "second" / "console.log")

    third, url = _console(tmp_path / "third", broker, tuf_repo, *policy)
    try:
        row = _rollout(url)
        assert row["state"] == "halted" and row["halted_at"] == 3000
        assert [d["action"] for d in row["decisions"]] == ["halt", "advance"]
        answer = _api(url, "/api/rollouts/classifier/resume", post=True)
        assert "resumed by the operator at 30 %" in answer["message"], answer
        assert _shares(tuf_repo) == {ALL: 3000}  # where it was halted, not the first step
    finally:
        _stop(third, tmp_path / "third" / "console.log")


def _shares(tuf: TufRepo) -> dict[str, int] | None:
    r = OperatorRepository(tuf.repo.path).model("classifier")[2].rollout
    return None if r is None else dict(r.shares)
