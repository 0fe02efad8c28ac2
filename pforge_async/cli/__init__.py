"""The ``pforge`` command: look into, verify, export and tidy a store from the shell.

``pforge [--root PATH] [--json] COMMAND``; the store is ``./.pforge`` unless ``--root`` names
another. Commands that only read open the store read-only and never create one. One module per
group of commands: :mod:`.contexts` (sessions, contexts, log, show, tree), :mod:`.workspace` (diff,
cat-file, snapshot, restore), :mod:`.ledgers` (budget, memory), :mod:`.maintenance` (check, stats,
init), :mod:`.transfer` (export, import); :mod:`.app` holds what they share.
"""

from __future__ import annotations

from .app import main

__all__ = ["main"]
