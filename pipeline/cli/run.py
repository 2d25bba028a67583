"""`dreamfocus run INPUT OUTPUT`: the effect over a whole photo library with Ray Data."""

from __future__ import annotations

import argparse

from ..job import run_job
from .options import add_config_fields, add_config_option, add_effect_options, config_from_args


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "run",
        help="process a whole photo library (resumable)",
        description="Process every photo under INPUT into OUTPUT/images, with a Parquet manifest in "
        "OUTPUT/manifest. Rerunning the same command skips what is done.",
    )
    parser.add_argument("input", help="folder or fsspec URI (s3://bucket/photos, gs://..., ...)")
    parser.add_argument("output", help="folder or fsspec URI; must not be INPUT or inside it")
    add_config_fields(parser, "locations", "job")
    add_effect_options(parser)
    add_config_fields(parser, "output", "models")
    add_config_option(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    summary = run_job(config_from_args(args))
    for line in summary.lines():
        print(line)
    return 1 if summary.counts.get("failed") else 0
