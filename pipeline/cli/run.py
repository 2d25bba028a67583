"""`dreamfocus run INPUT OUTPUT`: the effect over a whole photo library with Ray Data."""

from __future__ import annotations

import argparse
import json

from ..errors import BadInputError
from ..job import JobConfig, run_job
from .options import (add_config_option, add_effect_options, add_model_options, add_output_options,
                      params_from_args)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "run", help="process a whole photo library (resumable)",
        description="Process every photo under INPUT into OUTPUT/images, with a Parquet manifest in "
                    "OUTPUT/manifest. Rerunning the same command skips what is done.")
    parser.add_argument("input", help="folder or fsspec URI (s3://bucket/photos, gs://..., ...)")
    parser.add_argument("output", help="folder or fsspec URI; must not be INPUT or inside it")
    parser.add_argument("--storage-options", type=json.loads, default={}, metavar="JSON",
                        help='fsspec options for INPUT and OUTPUT, e.g. \'{"anon": false}\'')
    parser.add_argument("--address", default=None,
                        help="Ray cluster: 'auto' or ray://host:port (default: an embedded local Ray)")
    job = parser.add_argument_group("job")
    job.add_argument("--limit", type=int, default=None, help="process at most N photos this run")
    job.add_argument("--dry-run", action="store_true", help="say what would be done and why, do nothing")
    job.add_argument("--force", action="store_true", help="reprocess everything")
    job.add_argument("--retry-failed", action="store_true", help="retry photos whose last attempt failed")
    job.add_argument("--save-intermediates", action="store_true", help="also write OUTPUT/intermediates")
    job.add_argument("--commit-every", type=int, default=1000, metavar="N",
                     help="write a manifest part every N photos (what a crash can lose is redone on rerun)")
    job.add_argument("--model-batch-size", type=int, default=4, help="photos per model call")
    job.add_argument("--saliency-actors", type=int, default=None, help="saliency model actors (default: one per GPU, else 1)")
    job.add_argument("--depth-actors", type=int, default=None, help="depth model actors (default: one per GPU, else 1)")
    job.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per model actor (default: 1 with GPUs, else 0)")
    job.add_argument("--cpus-per-actor", type=float, default=0.0,
                     help="CPUs reserved per model actor (default 0: actors share cores with the CPU stages)")
    job.add_argument("--cpu-workers", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    add_effect_options(parser)
    add_output_options(parser)
    add_model_options(parser)
    add_config_option(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise BadInputError("--limit must be >= 0")
    config = JobConfig(
        input=args.input, output=args.output, params=params_from_args(args),
        storage_options=args.storage_options or {},
        saliency_model=args.saliency_model, depth_model=args.depth_model,
        saliency_weights=args.saliency_weights, depth_weights=args.depth_weights, device=args.device,
        format=args.format or "jpeg", quality=args.quality, max_megapixels=args.max_megapixels,
        model_batch_size=args.model_batch_size, saliency_actors=args.saliency_actors,
        depth_actors=args.depth_actors, gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
        cpu_workers=args.cpu_workers, address=args.address, limit=args.limit, dry_run=args.dry_run,
        force=args.force, retry_failed=args.retry_failed, save_intermediates=args.save_intermediates,
        manifest_rows_per_part=args.commit_every,
    )
    summary = run_job(config)
    for line in summary.lines():
        print(line)
    return 1 if summary.counts.get("failed") else 0
