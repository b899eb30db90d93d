"""``python -m updater.inferctl``: the same as the ``inferctl`` console script."""

from __future__ import annotations

import sys

from updater.inferctl.main import main

sys.exit(main())
