"""A running daemon keeps what it made at start out of the cyclic garbage collector's full
collections (:func:`agent.daemon.freeze_startup_objects`), which otherwise walked every module,
model and component again with all request threads stopped."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.support.child import run_python


def test_run_freezes_what_start_made_before_it_says_ready(
    tmp_path: Path, model_factory: Callable[..., Path]
) -> None:
    code = f"""
        import gc, os, signal, threading
        from agent.app import build_daemon
        from agent.config import parse_config

        config = parse_config(
            {{
                "device_id": "gc",
                "state_dir": {str(tmp_path / "state")!r},
                "models": [{{"name": "clf", "path": {str(model_factory("classifier"))!r}}}],
                "api": {{"listen": "127.0.0.1:0"}},
                "mqtt": {{"enabled": False}},
            }},
            environ={{}},
        )
        daemon = build_daemon(config)
        seen = []

        def at_ready(status):
            seen.append(gc.get_freeze_count())
            os.kill(os.getpid(), signal.SIGTERM)

        daemon.notifier.ready = at_ready
        assert gc.get_freeze_count() == 0
        daemon.run()
        print(seen[0])
        """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    frozen = int(proc.stdout.strip().splitlines()[-1])
    # the imported modules alone (numpy, onnxruntime, msgspec) are some 45,000 objects
    assert frozen > 20_000, frozen
