"""The content-addressed store: git's SHA-256 object format, refs, workspace snapshot and restore."""

from __future__ import annotations

from .objects import EMPTY_TREE, NULL_OID, Commit, TreeEntry
from .store import Cas, FsckReport

__all__ = ["EMPTY_TREE", "NULL_OID", "Cas", "Commit", "FsckReport", "TreeEntry"]
