"""The actor that holds the plan's chunks on their way into the dataset (feed.py). A module of
its own, importing only asyncio: the actor's process starts beside the model actors', and
Ray Data's imports would cost it seconds of CPU at the run's start."""

from __future__ import annotations

import asyncio


class PlanFeed:
    """One run of the dataset's share of the plan: chunk refs added by the driver as the listing
    goes, taken by the read tasks in slices of whole groups of `granule` rows, so that every
    group the dataset is given is full and goes at once (the rest of a chunk waits for the next
    pull, or the plan's end). A read task run again (Ray retries a task whose worker died) gets
    the slices its first run took."""

    def __init__(self) -> None:
        self._queued: list[list] = []  # [ObjectRef of a chunk table, first row not taken, rows]
        self._rows = 0
        self._added = 0
        self._chunks: int | None = None  # how many chunks there are, once the plan is done
        self._given: dict[int, list] = {}
        self._changed = asyncio.Condition()

    async def add(self, refs: list, rows: list[int]) -> None:
        async with self._changed:
            self._queued += [[ref, 0, n] for ref, n in zip(refs, rows)]
            self._rows += sum(rows)
            self._added += len(refs)
            self._changed.notify_all()

    async def end(self, chunks: int) -> None:
        """The plan is done: `chunks` chunks in all (counted, as calls may arrive out of order)."""
        async with self._changed:
            self._chunks = chunks
            self._changed.notify_all()

    def _ended(self) -> bool:
        return self._chunks is not None and self._added >= self._chunks

    async def take(self, pull: int, last: bool, rows: float, seconds: float, granule: int) -> list:
        """[(chunk ref, start, stop)] of whole groups once `rows` rows are queued, or `seconds`
        have passed with a group, or the plan is done (the last pull: once it is done); [] only
        where the plan is done and everything was taken."""
        if pull in self._given:
            return self._given[pull]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        async with self._changed:
            while not self._ended():
                whole = self._rows - self._rows % granule
                if not last and whole and (whole >= rows or loop.time() >= deadline):
                    break
                timeout = None if last or not whole else deadline - loop.time()
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout)
                except TimeoutError:
                    pass
            taken = self._take(self._rows if self._ended() else self._rows - self._rows % granule)
        self._given[pull] = taken
        return taken

    def _take(self, rows: int) -> list:
        taken = []
        self._rows -= rows
        while rows:
            ref, start, stop = self._queued[0]
            n = min(rows, stop - start)
            taken.append((ref, start, start + n))
            rows -= n
            if start + n == stop:
                self._queued.pop(0)
            else:
                self._queued[0][1] = start + n
        return taken
