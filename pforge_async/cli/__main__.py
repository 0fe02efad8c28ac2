"""``python -m pforge_async.cli``: the ``pforge`` command."""

from __future__ import annotations

import sys

from .app import main

sys.exit(main())
