"""Steps that nothing else would redo wait out a bus outage (pure: no server needed)."""

from __future__ import annotations

import nats.js.errors
import pytest

from valkyrie.runtime.jobops import through_outages


async def test_an_unavailable_bus_is_waited_out() -> None:
    calls = 0

    async def step() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise nats.js.errors.NoStreamResponseError()  # a stream leader election
        return "stored"

    assert await through_outages(step) == "stored"
    assert calls == 3


async def test_other_errors_are_not_retried() -> None:
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        raise nats.js.errors.BadRequestError()

    with pytest.raises(nats.js.errors.BadRequestError):
        await through_outages(step)
    assert calls == 1
