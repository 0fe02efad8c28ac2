"""Deterministic idempotency keys for agent and pipeline writers.

A key is a versioned prefix and length-prefixed, typed parts: ``pforge-agent:v1|s5:hello|i2:42|``.
The lengths make the encoding unambiguous, so two different inputs never give the same key
(``("a|b",)`` and ``("a", "b")`` differ, and so do ``1`` and ``"1"``). A key longer than the store
accepts is shortened to the prefix and the SHA-256 of the whole encoding.
"""

from __future__ import annotations

import hashlib

from ..errors import InvalidInput
from .rules import MAX_KEY

__all__ = ["agent_key", "attractor_key", "idempotency_key"]


def idempotency_key(namespace: str, *parts: str | int) -> str:
    if not namespace or not namespace.isidentifier():
        raise InvalidInput(f"key namespace must be an identifier, got {namespace!r}")
    prefix = f"pforge-{namespace}:v1|"
    encoded = []
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (str, int)):
            raise InvalidInput(f"key parts must be str or int, got {type(part).__name__} {part!r}")
        kind = "s" if isinstance(part, str) else "i"
        text = str(part)
        encoded.append(f"{kind}{len(text)}:{text}|")
    key = prefix + "".join(encoded)
    if len(key) > MAX_KEY:
        key = prefix + "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return key


def agent_key(*parts: str | int) -> str:
    """A key under ``pforge-agent:v1``, for agent session writers."""
    return idempotency_key("agent", *parts)


def attractor_key(*parts: str | int) -> str:
    """A key under ``pforge-attractor:v1``, for pipeline (attractor) writers."""
    return idempotency_key("attractor", *parts)
