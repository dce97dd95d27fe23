"""The hand-off from intake to a dispatcher running in the same process."""

from __future__ import annotations

from typing import Protocol

from schemas import JobRecord

__all__ = ["LocalPlacer"]


class LocalPlacer(Protocol):
    """A dispatcher that can place a job the moment intake has accepted it.

    Going through the ``job.queued`` event costs a stored record, a stored event and a consumer
    delivery before placement even starts; a dispatcher in the same process can start at once and
    store the record already dispatched. It declines (returns ``False``) whenever that could put
    the job ahead of others: jobs already waiting, no free runner, a delayed start. The job then
    takes the usual way.
    """

    async def place_new(self, record: JobRecord) -> bool:
        """Place and store a just-accepted job; ``True`` when it was dispatched.

        On ``True`` the record exists (dispatched) and the placer has emitted the job's ``queued``
        and ``dispatched`` events. On ``False`` nothing was stored.
        """
        ...
