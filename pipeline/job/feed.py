"""The plan on its way into the running dataset while the listing goes on (Ray side).

    driver's planning thread --add(chunk refs)--> PlanFeed (an actor) --take--> PlanDatasource's
                                                                               read tasks, one at a time

Ray Data fixes a dataset's read tasks when it starts, and the blocks a read task yields leave it
merged up to Ray Data's target block size (128 MiB): one read task streaming the whole plan
would hand it on at its end. So the source is `pulls` read tasks run one after another, each
one block of what was planned since the last: the first takes what is there at once, the next
ones wait for a chunk's worth of rows or `seconds` with at least one group, and after
STEADY_PULLS both grow by GROWTH a pull, so the pulls outlast any listing (128 pulls: some
20 million photos, or a listing of about an hour and a half; past that, the last pull takes
the rest at the listing's end). Pulls left when the plan is done give nothing.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

import pyarrow as pa
import ray
from ray.data import Dataset, Datasource, ReadTask
from ray.data._internal.logical.interfaces import LogicalPlan
from ray.data._internal.logical.operators import StreamingRepartition
from ray.data.block import BlockMetadata

from .plan_feed import PlanFeed

PULLS = 128
STEADY_PULLS = 16
GROWTH = 1.06


def patience(pull: int, rows: int, seconds: float) -> tuple[float, float]:
    """The rows, and the seconds with at least one group, that the pull-th read task waits for."""
    if pull == 0:  # the dataset's start: the first photos go at once
        return 1, 0.0
    grow = GROWTH ** max(0, pull - STEADY_PULLS)
    return rows * grow, seconds * grow


def new_feed():
    """A PlanFeed actor (plan_feed.py: its process imports no more than it needs); it reserves no
    CPU (it waits, mostly)."""
    return ray.remote(PlanFeed).options(num_cpus=0, max_restarts=0).remote()


def _pull(feed, pull: int, last: bool, rows: float, seconds: float, granule: int) -> Iterator[pa.Table]:
    slices = ray.get(feed.take.remote(pull, last, rows, seconds, granule))
    if slices:
        tables = ray.get([ref for ref, _, _ in slices])
        yield pa.concat_tables([t.slice(start, stop - start) for t, (_, start, stop) in zip(tables, slices)])


class PlanDatasource(Datasource):
    """The photos to process, as the driver's planning thread adds their chunks to `feed`."""

    def __init__(self, feed, chunk_rows: int, seconds: float, pulls: int = PULLS, granule: int = 1) -> None:
        self.feed, self.chunk_rows, self.seconds, self.pulls, self.granule = feed, chunk_rows, seconds, pulls, granule

    def in_groups_of(self, granule: int) -> PlanDatasource:
        """This source, giving rows in whole groups of `granule` until the plan is done."""
        return PlanDatasource(self.feed, self.chunk_rows, self.seconds, self.pulls, granule)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def _read(self, pull: int) -> functools.partial:
        rows, seconds = patience(pull, self.chunk_rows, self.seconds)
        return functools.partial(_pull, self.feed, pull, pull == self.pulls - 1, rows, seconds, self.granule)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        unknown = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(self._read(pull), unknown) for pull in range(self.pulls)]

    def tables(self) -> Iterator[pa.Table]:
        """The pulls' blocks in the driver, until the plan is done (without Ray Data)."""
        for pull in itertools.count():
            tables = list(self._read(pull)())
            if not tables:
                return
            yield from tables


def plan_groups(source: PlanDatasource, group: int) -> Dataset:
    """The plan as a dataset of `group` rows a block. The streaming repartition that cuts the
    pulls into groups reserves no CPU: it lasts as long as the listing, and Ray Data reserves
    the CPUs of an operator that has not finished for it (on 2 CPUs, the finishing tasks would
    wait for the listing's end). Built as Dataset.repartition builds it, CPUs aside."""
    ds = ray.data.read_datasource(source, concurrency=1, num_cpus=0, override_num_blocks=source.pulls)
    op = StreamingRepartition(
        target_num_rows_per_block=group, input_dependencies=[ds._logical_plan.dag], ray_remote_args={"num_cpus": 0}
    )
    return Dataset._from_parent(ds, LogicalPlan(op, ds.context))
