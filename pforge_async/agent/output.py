"""Tool output as a record keeps it: a bounded preview, the size and SHA-256 of the whole, and the
git blob id under which the whole is kept when the preview is not all of it."""

from __future__ import annotations

import hashlib

from ..cas.objects import BLOB, hash_object
from ..errors import InvalidInput
from .records import ToolOutput

__all__ = ["DEFAULT_MAX_OUTPUT", "output_bytes", "tool_output"]

#: bytes of a tool's output a record holds by default; the rest is in the blob store
DEFAULT_MAX_OUTPUT = 16 << 10


def output_bytes(output: str | bytes) -> bytes:
    """The bytes an output's size and hash are taken over: UTF-8 for text."""
    if isinstance(output, str):
        try:
            return output.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"tool output has a lone surrogate at {exc.start} (not encodable as UTF-8)") from exc
    if isinstance(output, (bytes, bytearray, memoryview)):
        return bytes(output)
    raise InvalidInput(f"tool output must be str or bytes, got {type(output).__name__}")


def tool_output(output: str | bytes, limit: int, *, keeps_blobs: bool) -> tuple[ToolOutput, bytes | None]:
    """The record of ``output`` and, when it was truncated and ``keeps_blobs``, the bytes to store as a
    blob (under the ``oid`` the record names). Text is cut at a character boundary."""
    data = output_bytes(output)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) <= limit:
        if isinstance(output, str):
            return ToolOutput(len(data), digest, text=output), None
        return ToolOutput(len(data), digest, data=data), None
    oid = hash_object(BLOB, data).hex() if keeps_blobs else None
    if isinstance(output, str):
        preview = ToolOutput(len(data), digest, text=data[:limit].decode("utf-8", "ignore"), truncated=True, oid=oid)
    else:
        preview = ToolOutput(len(data), digest, data=data[:limit], truncated=True, oid=oid)
    return preview, data if keeps_blobs else None
