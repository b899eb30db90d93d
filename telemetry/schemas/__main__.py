"""``python -m telemetry.schemas``: regenerate the JSON Schema files from the payload types."""

from __future__ import annotations

import sys

from telemetry.schemas import write

if __name__ == "__main__":
    for path in write():
        sys.stdout.write(f"wrote {path}\n")
