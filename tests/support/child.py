"""Code run in a fresh Python, for what a test's own process cannot show: a process that dies,
memory a process holds, what ``inferd run``'s main loop does."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) with this interpreter from the checkout's root; output captured,
    the exit code left to the caller."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
