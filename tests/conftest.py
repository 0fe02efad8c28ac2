from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    # aiosqlite and aiofiles are asyncio-only.
    return "asyncio"
