"""The hand-off from intake to a dispatcher running in the same process."""

from __future__ import annotations

from typing import Protocol

from schemas import JobRecord

__all__ = ["LocalPlacer"]


class LocalPlacer(Protocol):
    """A dispatcher that can place a job the moment intake has recorded it.

    Going through the ``job.queued`` event costs a stream round trip and a consumer delivery before
    placement even starts; a dispatcher in the same process can start at once. It declines (returns
    ``False``) whenever that could put the job ahead of others: jobs already waiting, no free
    runner, a delayed start. The job then takes the usual way.
    """

    async def place_now(self, record: JobRecord, revision: int) -> bool:
        """Place and announce a just-queued job; ``True`` when it was dispatched.

        On ``True`` the placer has also emitted the job's ``queued`` event (before ``dispatched``).
        """
        ...
