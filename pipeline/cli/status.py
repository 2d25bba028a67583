"""`dreamfocus status OUTPUT`: what the manifest says about a library run."""

from __future__ import annotations

import argparse
import json

from ..errors import OutputBusyError, OutputError
from ..job.lease import Lease
from ..manifest import COMPACT_MIN_PARTS, FAILED, MANIFEST_DIR, compact_manifest, manifest_report, new_run_id
from ..storage import Storage


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "status",
        help="counts, errors and throughput of a library run",
        description="Summarise OUTPUT/manifest. Exits 1 when any input's latest attempt failed.",
    )
    parser.add_argument("output", help="the OUTPUT folder or URI of `dreamfocus run`")
    parser.add_argument("--storage-options", type=json.loads, default={}, metavar="JSON")
    parser.add_argument("--errors", type=int, default=5, help="how many error kinds and examples to list")
    return parser


def run(args: argparse.Namespace) -> int:
    output = Storage(args.output, args.storage_options)
    manifest = Storage(f"{output.uri}/{MANIFEST_DIR}", args.storage_options)
    _compact_when_idle(output, manifest)
    report = manifest_report(manifest, top=args.errors)
    for line in report.lines():
        print(line)
    return 1 if report.latest_counts.get(FAILED) else 0


def _compact_when_idle(output: Storage, manifest: Storage) -> None:
    """Merge many small parts into one, but only while no job writes OUTPUT (its lease is
    free) and where OUTPUT can be written; otherwise the status is read as it is."""
    try:
        if len(list(manifest.list_files(frozenset({".parquet"})))) < COMPACT_MIN_PARTS:
            return
    except FileNotFoundError:
        return
    try:
        lease = Lease(output, f"status-{new_run_id()}").acquire()
    except (OutputBusyError, OutputError):
        return
    try:
        merged = compact_manifest(manifest)
        if merged:
            print(f"merged {merged} manifest parts into one")
    finally:
        lease.release()
