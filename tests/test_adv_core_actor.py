"""Adversarial review of the actor runtime: settings, and what reaches a mailbox."""

from __future__ import annotations

import pytest

from pforge_async import InvalidInput

from ._actors import RecordingActor


@pytest.mark.parametrize("size", [float("nan"), float("inf"), "5", True, 2.5, None])
def test_a_mailbox_size_that_is_not_a_whole_number_is_refused(size: object) -> None:
    # NaN was a bare ValueError from anyio, "5" a bare TypeError, and inf made the mailbox unbounded:
    # a flood of callers then queued without any backpressure, memory growing without end.
    with pytest.raises(InvalidInput, match="mailbox_size"):
        RecordingActor(mailbox_size=size)  # type: ignore[arg-type]


@pytest.mark.parametrize("batch", [float("nan"), float("inf"), "5", True, 2.5, None])
def test_a_batch_size_that_is_not_a_whole_number_is_refused(batch: object) -> None:
    with pytest.raises(InvalidInput, match="max_batch"):
        RecordingActor(max_batch=batch)  # type: ignore[arg-type]
