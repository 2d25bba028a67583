"""`dreamfocus status OUTPUT`: what the manifest says about a library run."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from ..errors import OutputBusyError, OutputError
from ..job.lease import Lease
from ..manifest import (
    COMPACT_MIN_PARTS,
    FAILED,
    MANIFEST_DIR,
    OTHER_FILES,
    compact_manifest,
    manifest_report,
    new_run_id,
    part_names,
    read_other_files,
)
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
    parser.add_argument(
        "--other-files",
        action="store_true",
        help="list the files of INPUT that are no photos (videos, sidecars, documents), as the last run found them",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    output = Storage(args.output, args.storage_options)
    if args.other_files:
        return list_other_files(output)
    manifest = Storage(f"{output.uri}/{MANIFEST_DIR}", args.storage_options)
    _compact_when_idle(output, manifest)
    report = manifest_report(manifest, top=args.errors)
    for line in report.lines():
        print(line)
    return 1 if report.latest_counts.get(FAILED) else 0


def _compact_when_idle(output: Storage, manifest: Storage) -> None:
    """Merge many small parts into one, but only while no job writes OUTPUT (its lease is
    free) and where OUTPUT can be written; otherwise the status is read as it is."""
    if len(part_names(manifest)) < COMPACT_MIN_PARTS:
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


def list_other_files(output: Storage) -> int:
    """Counts by extension, then one path per line (relative to INPUT)."""
    table = read_other_files(output)
    if not table.num_rows:
        print(f"no other files listed in {output.uri_of(OTHER_FILES)}")
        return 0
    counts = Counter(table.column("extension").to_pylist())
    by_count = ", ".join(f"{n} {ext}" for ext, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    print(f"{table.num_rows} files that are no photos, not processed: {by_count}")
    for relpath in table.column("relpath").to_pylist():
        print(f"  {relpath}")
    return 0
