"""Planning, resume and manifest writing at library scale (a benchmark).

    python scripts/bench_scale.py [--photos 1000000] [--folders 1000] [--s3-keys 100000 --s3-prefixes 100]

The library is generated, not stored: an fsspec filesystem (`scalelib://`) serves the listings
of --photos photos in --folders folders (and, once they are "done", the listings of their
outputs), while the manifest it is given is written to a real local folder. Each phase runs in
a fresh process, so its peak memory (ru_maxrss) is its own:

  - plan, first run: every photo is new;
  - manifest rows: the rows of every photo, made as the finishing tasks make them (manifest_rows,
    a group of GROUP_SIZE at a time: the workers' share), then committed and counted by the
    driver's RowTally (the driver's share), in parts of commit-every rows;
  - plan, rerun, all done: nothing to process;
  - plan, rerun, 1% changed: exactly those photos are planned.

With --s3-keys, the same listing and first-run plan on moto's S3 server on loopback, with
--s3-keys keys under --s3-prefixes prefixes, listed one folder at a time (prefetch 1) and with
folders listed ahead on threads (the default), side by side.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MTIME = 1_700_000_000.0


class GeneratedLibrary(AbstractFileSystem):
    """in/fNNNNN/pNNNNNNN.jpg for `photos` photos in `folders` folders; out/images/... mirrors
    them where `done`; the rest of out/ is the local folder `state`. A photo whose number is a
    multiple of 1/changed has another mtime (a replaced file)."""

    protocol = "scalelib"
    root_marker = ""

    def __init__(self, photos: int, folders: int, state: str, done: bool = False, changed: float = 0.0, **kw):
        super().__init__(**kw)
        self.photos, self.folders, self.state, self.done = photos, folders, state, done
        self.every_changed = round(1 / changed) if changed else 0
        self.per_folder = -(-photos // folders)
        self.local = LocalFileSystem()

    # -- the generated part

    def _folder_of(self, path: str) -> tuple[str, int] | None:
        """("in" or "out/images", folder number or -1 for the top) of a generated folder path."""
        for top in ("in", "out/images"):
            if top == "out/images" and not self.done:
                continue
            if path == top:
                return top, -1
            if path.startswith(top + "/f") and "/" not in path[len(top) + 1 :]:
                return top, int(path[len(top) + 2 :])
        return None

    def _photo_info(self, top: str, i: int) -> dict:
        folder = i // self.per_folder
        changed = self.every_changed and i % self.every_changed == 0 and top == "in"
        return {
            "name": f"{top}/f{folder:05d}/p{i:07d}.jpg",
            "size": 1000,
            "type": "file",
            "mtime": MTIME + (1 if changed else 0),
        }

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path).rstrip("/")
        where = self._folder_of(path)
        if where is not None:
            top, folder = where
            if folder < 0:
                entries = [{"name": f"{top}/f{f:05d}", "size": 0, "type": "directory"} for f in range(self.folders)]
            else:
                first = folder * self.per_folder
                entries = [self._photo_info(top, i) for i in range(first, min(first + self.per_folder, self.photos))]
        elif path == "out" or path.startswith("out/"):
            local = self._local(path)
            entries = [
                {**info, "name": "out" + info["name"][len(self.state) :]} for info in self.local.ls(local, detail=True)
            ]
            if path == "out" and self.done:
                entries.append({"name": "out/images", "size": 0, "type": "directory"})
        else:
            raise FileNotFoundError(path)
        return entries if detail else [e["name"] for e in entries]

    def info(self, path, **kwargs):
        path = self._strip_protocol(path).rstrip("/")
        if path in ("in", "out") or self._folder_of(path) is not None:
            return {"name": path, "size": 0, "type": "directory"}
        if path.startswith("out/"):
            info = self.local.info(self._local(path))
            return {**info, "name": path}
        raise FileNotFoundError(path)

    # -- the local part (the manifest)

    def _local(self, path: str) -> str:
        return self.state + path[len("out") :]

    def cat_file(self, path, start=None, end=None, **kwargs):
        return self.local.cat_file(self._local(self._strip_protocol(path)), start, end)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        local = self._local(self._strip_protocol(path))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        Path(local).write_bytes(value)

    def rm_file(self, path):
        self.local.rm_file(self._local(self._strip_protocol(path)))

    def makedirs(self, path, exist_ok=False):
        self.local.makedirs(self._local(self._strip_protocol(path)), exist_ok=True)


def _config(root: str, options: dict):
    from pipeline.job.plan import JobConfig

    return JobConfig(
        input=f"{root}in",
        output=f"{root}out",
        storage_options=options,
        saliency_model="trivial-saliency",
        depth_model="trivial-depth",
    )


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan_phase(root: str, options: dict, prefetch: int | None) -> dict:
    """Run the plan; how long, what it decided, and the process's peak memory."""
    from pipeline.job.plan import PlanItem, check_locations, make_plan
    from pipeline.storage import LISTING_PREFETCH

    _register()
    config = _config(root, options)
    started = time.perf_counter()
    inputs, output = check_locations(config)
    decided: dict[str, int] = {}
    for item in make_plan(config, inputs, output, prefetch=prefetch or LISTING_PREFETCH):
        what = f"to process ({item.reason})" if isinstance(item, PlanItem) else str(item)
        decided[what] = decided.get(what, 0) + 1
    return {"seconds": time.perf_counter() - started, "decided": decided, "peak_mib": _peak_mib()}


def manifest_phase(root: str, options: dict, group_size: int, chunk: int = 100_000) -> dict:
    """Every photo's manifest row made (as the workers make them) and committed (as the driver
    does), timed apart: `chunk` rows are made, then committed, and so on, so that what the
    workers would hold is never all in this process at once."""
    import io

    import pyarrow as pa

    from pipeline.job.console import Progress
    from pipeline.job.driver import RowTally, RunFaults
    from pipeline.job.plan import MANIFEST_DIR, PlanItem, check_locations, make_plan
    from pipeline.manifest import ManifestWriter, manifest_rows, new_run_id
    from pipeline.storage import Storage

    _register()
    config = _config(root, options)
    inputs, output = check_locations(config)
    run_id, job_hash = new_run_id(), config.job_hash()
    manifest = Storage(f"{output.uri}/{MANIFEST_DIR}", options)
    writer = ManifestWriter(manifest, run_id, config.commit_every, config.commit_seconds)
    tally = RowTally(writer, Progress(0, io.StringIO()), output.uri, RunFaults())
    made = committed = 0.0
    rows = 0

    def group_table(group: list[PlanItem]) -> pa.Table:
        n = len(group)
        return pa.table(
            {
                "relpath": [it.source.relpath for it in group],
                "source_size": pa.array([it.source.size for it in group], pa.int64()),
                "source_fingerprint": [it.source.fingerprint for it in group],
                "output_uri": [f"{output.uri}/images/{it.output_relpath}" for it in group],
                "status": ["ok"] * n,
                "attempt": pa.array([it.attempt for it in group], pa.int32()),
                "width": pa.array([4000] * n, pa.int32()),
                "height": pa.array([3000] * n, pa.int32()),
                "render_path": ["numpy"] * n,
                "seconds_saliency": pa.array([0.5] * n, pa.float32()),
            }
        )

    def commit(items: list[PlanItem]) -> None:
        nonlocal made, committed, rows
        started = time.perf_counter()
        groups = [group_table(items[i : i + group_size]) for i in range(0, len(items), group_size)]
        tables = [
            manifest_rows(g, source_root=inputs.uri, preset="default", job_hash=job_hash, run_id=run_id) for g in groups
        ]
        made += time.perf_counter() - started
        started = time.perf_counter()
        with writer.committing():
            for table in tables:
                tally.add(table)
        committed += time.perf_counter() - started
        rows += len(items)

    items: list[PlanItem] = []
    for item in make_plan(config, inputs, output):
        if isinstance(item, PlanItem):
            items.append(item)
            if len(items) == chunk:
                commit(items)
                items = []
    commit(items)
    return {
        "rows": rows,
        "made_per_s": rows / made,
        "committed_per_s": rows / committed,
        "parts": writer.parts,
        "counts": tally.counts,
        "peak_mib": _peak_mib(),
    }


def _in_fresh_process(phase, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(phase, args)


def _register() -> None:
    import fsspec

    fsspec.register_implementation("scalelib", GeneratedLibrary, clobber=True)


def generated(photos: int, folders: int) -> None:
    state = tempfile.mkdtemp(prefix="bench-scale-")
    base = {"photos": photos, "folders": folders, "state": state}
    print(f"generated library: {photos:,} photos in {folders:,} folders; manifest in {state}")
    first = _in_fresh_process(plan_phase, "scalelib://", base, None)
    print(f"  plan, first run:        {first['seconds']:7.1f} s  peak {first['peak_mib']:5.0f} MiB  {first['decided']}")
    from pipeline.job.driver import GROUP_SIZE

    rows = _in_fresh_process(manifest_phase, "scalelib://", base, GROUP_SIZE)
    print(
        f"  manifest rows:          {rows['rows']:,} rows, made {rows['made_per_s']:,.0f} rows/s (workers' share, "
        f"one core), committed and counted {rows['committed_per_s']:,.0f} rows/s (the driver's share), "
        f"{rows['parts']} parts, peak {rows['peak_mib']:.0f} MiB"
    )
    done = _in_fresh_process(plan_phase, "scalelib://", {**base, "done": True}, None)
    print(f"  plan, rerun, all done:  {done['seconds']:7.1f} s  peak {done['peak_mib']:5.0f} MiB  {done['decided']}")
    changed = _in_fresh_process(plan_phase, "scalelib://", {**base, "done": True, "changed": 0.01}, None)
    print(
        f"  plan, rerun, 1% changed:{changed['seconds']:7.1f} s  peak {changed['peak_mib']:5.0f} MiB  "
        f"{changed['decided']}"
    )


def s3(keys: int, prefixes: int) -> None:
    """Listing and first-run plan on moto's S3 server, one folder at a time and folders ahead."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="library")
    per_prefix = -(-keys // prefixes)
    started = time.perf_counter()
    names = [f"in/p{i // per_prefix:03d}/photo{i:07d}.jpg" for i in range(keys)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: client.put_object(Bucket="library", Key=name, Body=b"x"), names))
    uploaded = time.perf_counter() - started
    print(f"moto S3 on loopback: {keys:,} keys under {prefixes} prefixes (uploaded in {uploaded:.0f} s)")
    options = {"client_kwargs": {"endpoint_url": endpoint}}
    from pipeline.storage import LISTING_PREFETCH, Storage

    store = Storage("s3://library/in", options)
    for prefetch in (1, LISTING_PREFETCH):
        started = time.perf_counter()
        listed = sum(len(files) for _, files in store.list_folders(None, prefetch))
        listing = time.perf_counter() - started
        plan = plan_phase("s3://library/", options, prefetch)
        print(
            f"  prefetch {prefetch:2d}: listing {listed:,} keys {listing:6.1f} s; "
            f"plan, first run {plan['seconds']:6.1f} s (peak {plan['peak_mib']:.0f} MiB)"
        )
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=1_000_000)
    parser.add_argument("--folders", type=int, default=1000)
    parser.add_argument("--s3-keys", type=int, default=0, help="also list this many keys on moto's S3 server")
    parser.add_argument("--s3-prefixes", type=int, default=100)
    args = parser.parse_args()
    _register()
    if args.photos:
        generated(args.photos, args.folders)
    if args.s3_keys:
        s3(args.s3_keys, args.s3_prefixes)


if __name__ == "__main__":
    multiprocessing.set_start_method("spawn", force=True)
    main()
