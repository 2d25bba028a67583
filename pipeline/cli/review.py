"""`dreamfocus review OUTPUT`: a static page of every processed photo, before and after."""

from __future__ import annotations

import argparse
import json
import os

from ..review import build_review


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "review",
        help="write OUTPUT/review/index.html: every photo before and after, by status",
        description="Write a static page at OUTPUT/review/index.html with thumbnails beside it (relative "
        "links: it opens from a local folder or a bucket's static hosting). Rerunning it makes only "
        "the thumbnails that are missing.",
    )
    parser.add_argument("output", help="the OUTPUT folder or URI of `dreamfocus run`")
    parser.add_argument("--input", metavar="URI", help="where the input photos are now, if not where the run read them")
    parser.add_argument("--storage-options", type=json.loads, default={}, metavar="JSON")
    parser.add_argument(
        "--workers", type=int, default=min(16, 2 * (os.cpu_count() or 1)), help="thumbnails made at once"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    # What is to be done, then what was done: each its own line, in that order, on one stream
    # (flushed, so it shows before the thumbnails are made even when stdout is a pipe or a log).
    summary = build_review(
        args.output,
        args.storage_options,
        inputs_uri=args.input,
        workers=args.workers,
        progress=lambda line: print(line, flush=True),
    )
    for line in summary.lines():
        print(line)
    return 0
