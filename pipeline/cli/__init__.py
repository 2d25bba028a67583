"""The `dreamfocus` command: one module per subcommand, each with add_parser() and run(args)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import BadInputError, DreamfocusError
from ..params import load_yaml_config

SUBCOMMANDS = ("render", "models", "run", "status", "review")
# What `dreamfocus --help` opens with: what the command does, for the person running it.
DESCRIPTION = (
    "Make the subject of an everyday, everything-in-focus photo stand out against a soft, painterly "
    "background, found by a salient-object model and a depth model: one photo (render), or a whole "
    "library on a laptop, a Ray cluster or cloud GPUs, resumable at any point (run, then status and review)."
)
EPILOG = "`dreamfocus COMMAND --help` lists a command's options."


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="dreamfocus", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    subparsers = {}
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        subparsers[name] = module.add_parser(sub)
        # also after the subcommand (`dreamfocus run IN OUT -v`); SUPPRESS keeps a -v given before it
        subparsers[name].add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details"
        )
        subparsers[name].set_defaults(handler=module.run)
    return parser, subparsers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse, then again with a --config file's values as defaults, so flags still win."""
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        config = load_yaml_config(args.config)
        unknown = sorted(set(config) - set(args.config_keys))
        if unknown:
            raise BadInputError(f"{args.config}: unknown option(s): {', '.join(unknown)}")
        subparsers[args.command].set_defaults(**config)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except DreamfocusError as exc:
        print(f"dreamfocus: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "dreamfocus: %(levelname)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except DreamfocusError as exc:
        print(f"dreamfocus: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dreamfocus: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
