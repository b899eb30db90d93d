"""Another signer in its own process: holds a repository's signing lock until told to go on.

``python -m tests.support.signer REPO SLOT SHARES_JSON`` takes the lock (the one
``inferctl rollout`` and the console take), prints ``held``, waits for a line on stdin, signs
``SHARES_JSON`` as SLOT's newest version's rollout, prints ``signed`` and exits (releasing it).
:class:`Signer` runs it from a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Signer:
    """The process, started and holding the lock once constructed."""

    def __init__(self, repo: Path, slot: str, shares: dict[str, int]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.signer", str(repo), slot, json.dumps(shares)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        line = self.proc.stdout.readline()
        assert line == "held\n", f"the signer did not take the lock: {line!r}"

    def sign_and_release(self, timeout: float = 30) -> None:
        assert self.proc.stdin is not None
        out, _ = self.proc.communicate("go\n", timeout=timeout)
        assert self.proc.returncode == 0 and out == "signed\n", out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    from updater.meta import Rollout
    from updater.operator.repository import OperatorRepository
    from updater.operator.signing_lock import signing_lock

    repo = OperatorRepository(sys.argv[1])
    with signing_lock(repo.path):
        sys.stdout.write("held\n")
        sys.stdout.flush()
        sys.stdin.readline()
        repo.set_rollout(sys.argv[2], None, Rollout(shares=json.loads(sys.argv[3])))
    sys.stdout.write("signed\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
