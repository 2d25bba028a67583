"""Planning: the job's configuration, output naming, and the plan (each input's fate) decided
from the listing and the manifest without reading any image."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ..backend import RENDER_BACKENDS
from ..errors import BadInputError, BrokenLinkError, DreamfocusError, PairedFileSkipped
from ..manifest import FAILED, MANIFEST_DIR, OK, SKIPPED, FolderResume, ResumeIndex, listing_status
from ..models import DEPTH, SALIENCY, default_model
from ..params import EffectParams
from ..photo import RenderSettings
from ..photo_io import OUTPUT_EXTENSIONS, PHOTO_EXTENSIONS
from ..raw_io import is_raw
from ..storage import LISTING_PREFETCH, SourceFile, Storage, is_inside, safe_relpath

log = logging.getLogger(__name__)

IMAGES_DIR, INTERMEDIATES_DIR = "images", "intermediates"
RUNNERS = ("auto", "local", "ray")


def _option(default, help: str, group: str, **argparse):
    """A config field that is also a command-line flag and a YAML key, all of the same name."""
    metadata = {"help": help, "group": group, "argparse": argparse}
    if isinstance(default, dict):  # a fresh dict for each config
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class JobConfig:
    """Everything a library job needs. Each field with help is a `dreamfocus run` flag of the
    same name (dashes for underscores) and a key of a --config YAML file."""

    input: str
    output: str
    params: EffectParams = field(default_factory=EffectParams)
    storage_options: dict = _option(
        {},
        "fsspec options for INPUT and OUTPUT, e.g. '{\"anon\": false}'",
        "locations",
        type=json.loads,
        metavar="JSON",
    )
    address: str | None = _option(
        None, "Ray cluster: 'auto', host:port or ray://host:port (default: an embedded local Ray)", "locations"
    )
    runner: str = _option(
        "auto",
        "what runs the stages: local (threads in this process: no start-up, this machine only), ray "
        "(Ray Data: worker processes, clusters, GPUs), auto (local for a job on this machine without a GPU, "
        "else ray)",
        "locations",
        choices=RUNNERS,
    )
    # models
    saliency_model: str | None = _option(None, "salient-object model name (see `models list`)", "models")
    depth_model: str | None = _option(None, "depth model name (see `models list`)", "models")
    saliency_weights: str | None = _option(None, "path or URI of saliency weights", "models")
    depth_weights: str | None = _option(None, "path or URI of depth weights", "models")
    weights_from: str | None = _option(
        None,
        "folder or bucket holding every model's weights, as `dreamfocus models fetch --to URI` wrote "
        "them: used instead of the cache, registry and hub, checked against the sha256s listed there",
        "models",
        metavar="URI",
    )
    device: str | None = _option(
        None,
        "cpu or cuda: where the models and the torch render backend run (default: cuda where there is a GPU)",
        "models",
    )
    runtime: str = _option(
        "auto",
        "what runs the salient-object model: auto (torch on a GPU; on the CPU openvino-int8 where OpenVINO "
        "and NNCF are installed, else onnxruntime), onnxruntime, openvino, openvino-int8 or torch",
        "models",
    )
    render_backend: str = _option(
        "auto",
        "where decode, effect and encode run: numpy (CPU processes, OpenCV), torch (on --device, each photo kept "
        "there from bytes to bytes), auto (torch where --device is a GPU, else numpy)",
        "models",
        choices=RENDER_BACKENDS,
    )
    # output
    format: str = _option("jpeg", "output format", "output", choices=sorted(OUTPUT_EXTENSIONS))
    quality: int = _option(92, "JPEG/WebP quality 1..100", "output")
    max_megapixels: float = _option(
        200.0, "refuse photos declaring more pixels than this (decompression bombs)", "output"
    )
    # job
    limit: int | None = _option(None, "process at most N photos this run", "job", metavar="N")
    prefer_raw: bool = _option(
        False,
        "of a RAW + JPEG pair (same name, same folder, as cameras write them) process the RAW and leave "
        "the JPEG alone (default: the JPEG is processed and the RAW left alone)",
        "job",
    )
    dry_run: bool = _option(False, "say what would be done and why, do nothing", "job")
    force: bool = _option(False, "reprocess everything", "job")
    retry_failed: bool = _option(False, "retry photos whose last attempt failed", "job")
    save_intermediates: bool = _option(False, "also write OUTPUT/intermediates", "job")
    commit_every: int = _option(
        1000, "write a manifest part every N photos (what a crash can lose is redone on rerun)", "job", metavar="N"
    )
    commit_seconds: float = _option(30.0, "and at least every S seconds while photos finish", "job", metavar="S")
    model_batch_size: int | None = _option(
        None, "photos per model call (default: 16 on a GPU, 4 on CPUs through Ray, 2 with the local runner)", "job"
    )
    device_batch_bytes: int | None = _option(
        None,
        "decoded pixel bytes (width x height x 3) per batch on the device with the torch render backend; "
        "larger batches go in parts, four in flight at once (default: from the device's free memory)",
        "job",
        metavar="BYTES",
    )
    model_actors: int | None = _option(
        None, "model actors, each holding both models (default: one per GPU, else 1)", "job"
    )
    gpus_per_actor: float | None = _option(
        None, "GPUs per model actor (default: 1 where the cluster has GPUs, else 0; 0.5 packs two per GPU)", "job"
    )
    # Model actors reserve no CPU by default: on a GPU they mostly wait for it, and on a CPU-only
    # machine a reservation would idle cores whenever the models are quicker than the CPU stages.
    cpus_per_actor: float = _option(
        0.0, "CPUs reserved per model actor (default 0: actors share cores with the CPU stages)", "job"
    )
    cpu_workers: int | None = _option(
        None, "CPUs of the embedded local Ray, or the local runner's finishing threads (default: all)", "job"
    )

    def __post_init__(self) -> None:
        self.saliency_model = self.saliency_model or default_model(SALIENCY)
        self.depth_model = self.depth_model or default_model(DEPTH)
        self.storage_options = self.storage_options or {}
        problems = []
        if self.format not in OUTPUT_EXTENSIONS:
            problems.append(f"unknown output format {self.format!r}; choose {', '.join(OUTPUT_EXTENSIONS)}")
        if not 1 <= self.quality <= 100:
            problems.append("quality must be within 1..100")
        for name in ("limit", "model_batch_size", "device_batch_bytes", "model_actors", "commit_every", "cpu_workers"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "limit" else 1):
                problems.append(f"{name.replace('_', '-')} must be >= {0 if name == 'limit' else 1}")
        if self.commit_seconds <= 0:
            problems.append("commit-seconds must be > 0")
        if self.render_backend not in RENDER_BACKENDS:
            problems.append(f"unknown render backend {self.render_backend!r}; choose {', '.join(RENDER_BACKENDS)}")
        if self.runner not in RUNNERS:
            problems.append(f"unknown runner {self.runner!r}; choose {', '.join(RUNNERS)}")
        elif self.runner == "local" and self.address:
            problems.append("the local runner runs in this process: it takes no --address (use --runner ray)")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            problems.append("gpus-per-actor must be >= 0")
        if problems:
            raise BadInputError("; ".join(problems))

    def render_settings(self) -> RenderSettings:
        """How this job's photos are rendered and written, on whichever path."""
        return RenderSettings(
            self.params,
            self.format,
            self.quality,
            self.max_megapixels,
            self.save_intermediates,
            self.device_batch_bytes,
        )

    def job_hash(self) -> str:
        """What decides how an output looks: effect parameters, models and encoding."""
        what = {
            "params": self.params.digest(),
            "saliency": self.saliency_model,
            "depth": self.depth_model,
            "format": self.format,
            "quality": self.quality,
        }
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def config_fields(*groups: str) -> list[dataclasses.Field]:
    """The JobConfig fields of the given option groups, in declaration order."""
    return [f for f in dataclasses.fields(JobConfig) if f.metadata.get("group") in groups]


@dataclass
class PlanItem:
    source: SourceFile
    output_relpath: str
    reason: str  # why it is (re)processed
    attempt: int
    error: DreamfocusError | None = None  # set when the listing decides its row: an unsafe name, a pair's other half


@dataclass
class OtherFile:
    """A file under INPUT that is no photo (a video, a sidecar, a document): listed, not processed."""

    source: SourceFile

    @property
    def extension(self) -> str:
        return os.path.splitext(self.source.relpath)[1].lower() or "(none)"


def output_relpath(relpath: str, fmt: str, keep_extension: bool = False) -> str:
    """images/<relpath with the output extension>; keep_extension gives x.png -> x.png.jpg."""
    stem, ext = os.path.splitext(safe_relpath(relpath))
    if keep_extension:
        stem += ext.lower()
    return f"{stem}{OUTPUT_EXTENSIONS[fmt]}"


def check_locations(config: JobConfig) -> tuple[Storage, Storage]:
    inputs = Storage(config.input, config.storage_options)
    output = Storage(config.output, config.storage_options)
    if is_inside(output.uri, inputs.uri):
        raise BadInputError(f"{config.output}: OUTPUT must not be INPUT or inside it ({config.input})")
    if not inputs.exists(""):
        raise BadInputError(f"{config.input}: input folder not found")
    return inputs, output


def make_plan(
    config: JobConfig, inputs: Storage, output: Storage, prefetch: int = LISTING_PREFETCH
) -> Iterator[PlanItem | OtherFile | str]:
    """Each input's fate, decided from the listing and the manifest without reading any image:
    a PlanItem to process (or whose row the listing decides), an OtherFile that is no photo, or
    the reason it is skipped.

    One folder at a time, in the listing's order: its files, its entries of the resume index,
    and (where it has photos done before) the listing of its outputs, which are made on threads
    `prefetch` folders ahead of the one being planned. Whatever `prefetch` is, the plan is the same.
    """
    job_hash = config.job_hash()
    manifest = Storage(f"{output.uri}/{MANIFEST_DIR}", config.storage_options)
    resume = ResumeIndex.load(manifest, set_aside_damaged=not config.dry_run)  # a dry run writes nothing
    images = Storage(f"{output.uri}/{IMAGES_DIR}", config.storage_options)
    ahead: deque[tuple[str, list[SourceFile], FolderResume, Future[set[str]] | None]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="dreamfocus-outputs") as pool:
        # A folder link into OUTPUT is not followed: each run would take the last one's outputs in.
        excluded = [output.uri] if output.is_local else []
        for folder, files in inputs.list_folders(None, prefetch, excluded):
            settled = resume.folder(folder)
            # "Is its output there?" matters only where a photo is done: one listing per such folder.
            outputs = pool.submit(images.names_in, folder) if settled.any_ok and not config.force else None
            ahead.append((folder, files, settled, outputs))
            if len(ahead) > prefetch:
                yield from _plan_folder(*ahead.popleft(), config, job_hash, inputs)
        while ahead:
            yield from _plan_folder(*ahead.popleft(), config, job_hash, inputs)


def _plan_folder(
    folder: str,
    files: list[SourceFile],
    settled: FolderResume,
    outputs: Future[set[str]] | None,
    config: JobConfig,
    job_hash: str,
    inputs: Storage,
) -> Iterator[PlanItem | OtherFile | str]:
    """The plan of one folder's files (pairs and output names are decided within a folder)."""
    photos, broken = [], []
    for source in files:
        is_photo = os.path.splitext(source.relpath)[1].lower() in PHOTO_EXTENSIONS
        if is_photo and source.broken:  # its own failed row, and no half of a pair
            broken.append(source)
        elif is_photo:
            photos.append(source)
        else:
            if source.broken:
                log.warning("%s: %s", inputs.uri_of(source.relpath), source.broken)
            yield OtherFile(source)
    existing = outputs.result() if outputs is not None else set()
    # Pairs need a RAW: most folders have none, and are spared the pairing.
    partners = pair_partners(photos) if any(is_raw(p.relpath) for p in photos) else {}
    claimed: set[str] = set()  # outputs given out in this folder: x.jpg and x.png must not share one
    for source in broken:
        yield _planned(source, config, settled, job_hash, existing, claimed)
    for source in photos:
        partner = partners.get(source.relpath)
        if partner is not None and is_raw(source.relpath) != config.prefer_raw:
            yield _paired(source, partner, config, settled, job_hash)
        else:
            yield _planned(source, config, settled, job_hash, existing, claimed)


def pair_partners(photos: list[SourceFile]) -> dict[str, str]:
    """relpath -> its pair's other half, for each RAW of one folder that has a non-RAW photo of
    the same name (letter case aside), and for that photo."""
    by_stem: dict[str, list[str]] = {}
    for source in photos:
        by_stem.setdefault(os.path.splitext(source.relpath)[0].lower(), []).append(source.relpath)
    partners = {}
    for relpaths in by_stem.values():
        raws = [r for r in relpaths if is_raw(r)]
        others = [r for r in relpaths if not is_raw(r)]
        if raws and others:
            for r in raws:
                partners[r] = others[0]
            for o in others:
                partners[o] = raws[0]
    return partners


def _paired(
    source: SourceFile, partner: str, config: JobConfig, settled: FolderResume, job_hash: str
) -> PlanItem | str:
    """The half of a pair that is not processed: one `skipped` row, once."""
    name = posixpath.basename(source.relpath)
    if settled.latest_is(name, source.fingerprint, job_hash, listing_status(SKIPPED, PairedFileSkipped.kind)):
        return "skipped before (the other half of a RAW + JPEG pair)"
    processed = posixpath.basename(partner)
    option = (
        "--prefer-raw processes the RAW instead" if not config.prefer_raw else "without --prefer-raw it is processed"
    )
    error = PairedFileSkipped(f"{source.relpath}: left alone, its pair {processed} is processed ({option})")
    return PlanItem(source, "", "the other half of a RAW + JPEG pair", settled.attempts_of(name) + 1, error)


def _planned(
    source: SourceFile,
    config: JobConfig,
    settled: FolderResume,
    job_hash: str,
    existing: set[str],
    claimed: set[str],
) -> PlanItem | str:
    """A photo to process and why, or the reason it is skipped."""
    error = None
    try:
        if source.broken:  # no output of its own: it claims no name
            raise BrokenLinkError(f"{source.relpath}: {source.broken}")
        target = output_relpath(source.relpath, config.format)
        if target.lower() in claimed:  # the listing is sorted: the same file wins each run
            target = output_relpath(source.relpath, config.format, keep_extension=True)
        claimed.add(target.lower())
    except BadInputError as exc:
        target, error = "", exc
    name = posixpath.basename(source.relpath)
    attempts = settled.attempts_of(name)
    same = (name, source.fingerprint, job_hash)
    if config.force:
        reason = "forced"
    elif settled.latest_is(*same, OK) and posixpath.basename(target) in existing:
        return "done"
    elif settled.latest_is(*same, SKIPPED):
        return "skipped before (not an image, or left as it is)"
    elif settled.latest_is(*same, FAILED) and not config.retry_failed:
        return "failed before (use --retry-failed)"
    elif settled.latest_is(*same, OK):
        reason = "output missing"
    elif settled.latest_is(*same, FAILED):
        reason = "retrying failure"
    elif settled.latest_is(*same, listing_status(SKIPPED, PairedFileSkipped.kind)):
        reason = "no longer left alone for its pair"
    elif attempts:
        reason = "changed photo or parameters, or a failure not of its own making"
    else:
        reason = "new"
    return PlanItem(source, target, reason, attempts + 1, error)
