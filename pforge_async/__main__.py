"""``python -m pforge_async``: the ``pforge`` command."""

from __future__ import annotations

import sys

from .cli.app import main

sys.exit(main())
