"""`dreamfocus status OUTPUT`: what the manifest says about a library run."""

from __future__ import annotations

import argparse
import json

from ..manifest import FAILED, MANIFEST_DIR, manifest_report
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
    report = manifest_report(
        Storage(f"{args.output.rstrip('/')}/{MANIFEST_DIR}", args.storage_options), top=args.errors
    )
    for line in report.lines():
        print(line)
    return 1 if report.latest_counts.get(FAILED) else 0
