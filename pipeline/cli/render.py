"""`dreamfocus render PHOTO -o OUT`: the effect on one photo."""

from __future__ import annotations

import argparse
import os

import numpy as np

from ..backend import NUMPY_PATH, device_results, model_device, render_backend_for, torch_path
from ..errors import BadInputError
from ..photo import Finished, RenderSettings, SceneMaps, SceneModels, prepare, render_on_host
from ..photo_io import OUTPUT_EXTENSIONS, read_depth, read_mask
from ..storage import Storage, read_file
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
    settings = RenderSettings(
        params_from_args(args),
        output_format(args.output, args.format),
        args.quality,
        args.max_megapixels,
        intermediates=bool(args.save_intermediates),
    )
    data = read_file(args.photo)
    saliency = read_mask(read_file(args.mask), args.mask) if args.mask else None
    depth = read_depth(read_file(args.depth), args.depth) if args.depth else None
    device = model_device(args.device)
    models: SceneModels | None = None
    maps: SceneMaps | None = None  # found on the host: the CPU path, should it be taken, needs no others
    done: Finished | None = None
    path = NUMPY_PATH

    if render_backend_for(args.render_backend, device) == "torch":
        if saliency is None and depth is None:  # the models run on the device too
            models = _models(args, device)
            found = device_results([data], settings, device, models=models)[0]
        else:
            maps, models = _maps(args, data, device, saliency, depth)
            found = device_results([data], settings, device, maps=[maps])[0]
        if isinstance(found, str):
            path = f"{NUMPY_PATH} ({found})"
        else:
            done, path = found, torch_path(device)
    if done is None:
        if maps is None:
            maps, models = _maps(args, data, device, saliency, depth, models)
        done = render_on_host(data, args.photo, maps, settings)
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
        f"{args.output}: {done.width}x{done.height}, preset {settings.params.preset}, render path {path};{used} "
        f"crisp in front of depth {done.rendering.start:.3f}, background behind {done.rendering.stop:.3f}"
    )
    return 0


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
) -> tuple[SceneMaps, SceneModels | None]:
    """Both maps on the host: those given, the others from the models on the photo's model copy."""
    if saliency is not None and depth is not None:
        return SceneMaps(saliency, depth), models
    models = models or _models(args, device)
    maps = models.predict(
        [prepare(data, args.photo, args.max_megapixels)],
        saliency=None if saliency is None else [saliency],
        depth=None if depth is None else [depth],
    )[0]
    return maps, models


def _from_copy(args: argparse.Namespace) -> tuple[tuple[str, str], tuple[str | None, str | None]]:
    from ..models import DEPTH, SALIENCY
    from ..models.weights import WeightsCopy, job_models

    resolved = job_models(
        args.saliency_model, args.depth_model, args.saliency_weights, args.depth_weights, WeightsCopy(args.weights_from)
    )
    paths = tuple(None if resolved[t].path is None else str(resolved[t].path) for t in (SALIENCY, DEPTH))
    return (resolved[SALIENCY].name, resolved[DEPTH].name), (paths[0], paths[1])
