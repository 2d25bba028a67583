"""`dreamfocus render PHOTO -o OUT`: the effect on one photo."""

from __future__ import annotations

import argparse
import os

import fsspec
import numpy as np

from ..errors import BadInputError
from ..job.plan import render_backend_for
from ..models.base import default_device
from ..photo import NUMPY_PATH, Finished, SceneModels, finish, prepare
from ..photo_io import OUTPUT_EXTENSIONS, read_depth, read_mask
from ..storage import Storage
from .options import add_config_fields, add_config_option, add_effect_options, params_from_args


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "render",
        help="apply the effect to one photo",
        description="Apply the effect to one photo. With --mask and --depth no model runs.",
    )
    parser.add_argument("photo", help="the photo (path or fsspec URI)")
    parser.add_argument("-o", "--output", required=True, help="where to write the result (.jpg, .png, .webp)")
    parser.add_argument("--mask", help="salient-object mask: an 8- or 16-bit image, any size")
    parser.add_argument("--depth", help="depth (nearer is larger): .npy, 16-bit PNG or float TIFF, any size")
    parser.add_argument(
        "--save-intermediates",
        metavar="DIR",
        help="also write PNGs of the steps here: background, saliency (the salient-object mask: the model's, "
        "or --mask), subject (the mask kept crisp: saliency extended to the whole object), depth16, alpha",
    )
    add_effect_options(parser)
    add_config_fields(parser, "output", "models", format=None)  # the format: from the output's name
    add_config_option(parser)
    return parser


def read_input(path: str) -> bytes:
    try:
        with fsspec.open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise BadInputError(f"{path}: is a directory, not a file") from None
    except PermissionError:
        raise BadInputError(f"{path}: permission denied") from None


def output_format(output: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    ext = os.path.splitext(output)[1].lower()
    for name, known in OUTPUT_EXTENSIONS.items():
        if ext in (known, "." + name):
            return name
    raise BadInputError(
        f"{output}: cannot tell the output format from the extension {ext or '(none)'}; "
        "use .jpg, .png or .webp, or pass --format"
    )


def run(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    fmt = output_format(args.output, args.format)
    data = read_input(args.photo)
    saliency = read_mask(read_input(args.mask), args.mask) if args.mask else None
    depth = read_depth(read_input(args.depth), args.depth) if args.depth else None
    device = args.device or default_device()
    models: SceneModels | None = None
    done: Finished | None = None
    path = NUMPY_PATH

    if render_backend_for(args.render_backend, device) == "torch":
        from ..device_render import finish_on_device, render_path

        if saliency is None and depth is None:  # the models run on the device too
            models = _models(args, device)
            given: dict = {"models": models}
        else:
            saliency, depth, models = _maps(args, data, device, saliency, depth)
            given = {"maps": [(saliency, depth)]}
        found = finish_on_device(
            [data],
            params,
            device,
            fmt=fmt,
            quality=args.quality,
            max_megapixels=args.max_megapixels,
            intermediates=bool(args.save_intermediates),
            depth_measured=_depth_measured(args, models),
            **given,
        )[0]
        if isinstance(found, str):
            path = f"{NUMPY_PATH} ({found})"
        else:
            done, path = found, render_path(device)
    if done is None:
        saliency, depth, models = _maps(args, data, device, saliency, depth, models)
        done = finish(
            data,
            args.photo,
            saliency,
            depth,
            params,
            fmt,
            args.quality,
            args.max_megapixels,
            intermediates=bool(args.save_intermediates),
            depth_measured=_depth_measured(args, models),
        )
    folder, name = os.path.split(os.path.abspath(args.output))
    Storage(folder).write_atomic(name, done.encoded)
    if args.save_intermediates:
        stem = os.path.splitext(os.path.basename(args.photo))[0]
        target = Storage(os.path.abspath(args.save_intermediates))
        for kind, png in done.intermediates.items():
            target.write_atomic(f"{stem}.{kind}.png", png)

    if done.left_alone:
        print(f"{args.output}: {done.reason}")
    used = f" models: {', '.join(models.describe())};" if models is not None else ""
    print(
        f"{args.output}: {done.width}x{done.height}, preset {params.preset}, render path {path};{used} "
        f"crisp in front of depth {done.rendering.start:.3f}, background behind {done.rendering.stop:.3f}"
    )
    return 0


def _depth_measured(args: argparse.Namespace, models: SceneModels | None) -> bool:
    """Whether the depth map is a measurement (a file given, or a depth model's) rather than the
    weight-free ground prior (see effect.render)."""
    return args.depth is not None or models is None or models.depth.measures_depth


def _models(args: argparse.Namespace, device: str) -> SceneModels:
    names = (args.saliency_model, args.depth_model)
    weights = (args.saliency_weights, args.depth_weights)
    if args.weights_from:  # the models and weights a library job would run, from that copy
        names, weights = _from_copy(args)
    return SceneModels(*names, *weights, device, batch_size=1, runtime=args.runtime)


def _maps(
    args: argparse.Namespace,
    data: bytes,
    device: str,
    saliency: np.ndarray | None,
    depth: np.ndarray | None,
    models: SceneModels | None = None,
) -> tuple[np.ndarray, np.ndarray, SceneModels | None]:
    """Both maps on the host: those given, the others from the models on the photo's model copy."""
    if saliency is not None and depth is not None:
        return saliency, depth, models
    models = models or _models(args, device)
    maps = models.predict(
        [prepare(data, args.photo, args.max_megapixels)],
        saliency=None if saliency is None else [saliency],
        depth=None if depth is None else [depth],
    )[0]
    return maps.saliency, maps.depth, models


def _from_copy(args: argparse.Namespace) -> tuple[tuple[str, str], tuple[str | None, str | None]]:
    from ..models import DEPTH, SALIENCY
    from ..models.weights import WeightsCopy, job_models

    resolved = job_models(
        args.saliency_model, args.depth_model, args.saliency_weights, args.depth_weights, WeightsCopy(args.weights_from)
    )
    paths = tuple(None if resolved[t].path is None else str(resolved[t].path) for t in (SALIENCY, DEPTH))
    return (resolved[SALIENCY].name, resolved[DEPTH].name), (paths[0], paths[1])
