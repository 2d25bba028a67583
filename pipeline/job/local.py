"""The local runner: the job's stages in this process, on threads, without Ray. On a machine
without a GPU the model is nearly all the work and one model instance already uses every core,
so Ray's worker processes add nothing there but their start-up (10 to 30 s) and memory.

    plan chunks (Planner) -> LocalFeed -> groups of one model batch
    -> read_stage (a thread) -> ModelStage (a thread, the model's own threads) -> finish_stage
       (a thread per core) -> manifest rows, in the plan's order

The stages are the Ray job's own functions on the same Arrow tables, so a photo's row is the
same whichever runner made it. While the model works on a group, the next group is read and
decoded and the previous ones are rendered and written; a few groups at most are in flight, so
memory stays bounded. A photo's failure is its row, as on Ray; an error of a stage itself (not
a photo's) ends the run, whose rows so far are committed: a rerun goes on from there.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa

WAIT_SECONDS = 0.25  # while the listing goes on, finished groups are handed on at least this often

Stage = Callable[[pa.Table], pa.Table]


class LocalFeed:
    """The plan's chunks as the Planner sends them, taken a group at a time."""

    def __init__(self) -> None:
        self._pending: pa.Table | None = None
        self._ended = False
        self._changed = threading.Condition()

    def add(self, table: pa.Table) -> None:
        with self._changed:
            self._pending = table if self._pending is None else pa.concat_tables([self._pending, table])
            self._changed.notify()

    def end(self) -> None:
        with self._changed:
            self._ended = True
            self._changed.notify()

    def take(self, rows: int, timeout: float) -> pa.Table | None:
        """The next `rows` photos (fewer only once the plan is done); None where they have not
        come within `timeout`; an empty table once the plan is done and every photo taken."""
        with self._changed:
            self._changed.wait_for(lambda: self._ended or self._planned() >= rows, timeout)
            if self._planned() < rows and not self._ended:
                return None
            if self._pending is None:
                return pa.table({})
            group, rest = self._pending.slice(0, rows), self._pending.slice(rows)
            self._pending = rest if rest.num_rows else None
            return group

    def _planned(self) -> int:
        return 0 if self._pending is None else self._pending.num_rows


def run_stages(
    feed: LocalFeed, group_size: int, read: Stage, load_model: Callable[[], Stage], finish: Stage, finishers: int
) -> Generator[pa.Table, None, None]:
    """Each group's manifest rows, in the plan's order, as the stages finish them. The model is
    loaded on its own thread while the first groups are read."""
    pools = [
        ThreadPoolExecutor(1, "dreamfocus-read"),
        ThreadPoolExecutor(1, "dreamfocus-model"),  # one model instance, groups in order
        ThreadPoolExecutor(finishers, "dreamfocus-finish"),
    ]
    readers, modeller, finishing = pools
    in_flight: collections.deque[Future[pa.Table]] = collections.deque()
    depth = finishers + 2  # one group read ahead, one in the model, the rest being finished
    model = modeller.submit(load_model)
    try:
        while True:
            group = feed.take(group_size, WAIT_SECONDS) if len(in_flight) < depth else None
            if group is not None and not group.num_rows:
                break
            if group is not None:
                read_done = readers.submit(read, group)
                model_done = modeller.submit(_after, read_done, lambda table: model.result()(table))
                in_flight.append(finishing.submit(_after, model_done, finish))
            while in_flight and (in_flight[0].done() or len(in_flight) >= depth):
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:  # also where the run stopped early: what has not started is dropped
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)


def _after(previous: Future[pa.Table], stage: Stage) -> pa.Table:
    return stage(previous.result())
