"""`dreamfocus render PHOTO -o OUT`: the effect on one photo."""

from __future__ import annotations

import argparse
import os

import fsspec

from ..effect import render
from ..errors import BadInputError
from ..job import soft_background_reason
from ..models import DEPTH, SALIENCY, load_model
from ..photo_io import OUTPUT_EXTENSIONS, decode_photo, encode_photo, read_depth, read_mask
from ..process import intermediate_pngs, model_copy
from ..storage import Storage
from .options import (add_config_option, add_effect_options, add_model_options, add_output_options,
                      params_from_args)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser("render", help="apply the effect to one photo",
                            description="Apply the effect to one photo. With --mask and --depth no model runs.")
    parser.add_argument("photo", help="the photo (path or fsspec URI)")
    parser.add_argument("-o", "--output", required=True, help="where to write the result (.jpg, .png, .webp)")
    parser.add_argument("--mask", help="salient-object mask: an 8- or 16-bit image, any size")
    parser.add_argument("--depth", help="depth (nearer is larger): .npy, 16-bit PNG or float TIFF, any size")
    parser.add_argument("--save-intermediates", metavar="DIR",
                        help="also write background, mask, depth (16-bit) and alpha PNGs here")
    add_effect_options(parser)
    add_output_options(parser)
    add_model_options(parser)
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
    raise BadInputError(f"{output}: cannot tell the output format from the extension {ext or '(none)'}; "
                        "use .jpg, .png or .webp, or pass --format")


def run(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    fmt = output_format(args.output, args.format)
    photo = decode_photo(read_input(args.photo), args.photo, args.max_megapixels)
    pixels = photo.pixels
    fg = read_mask(read_input(args.mask), args.mask) if args.mask else None
    depth = read_depth(read_input(args.depth), args.depth) if args.depth else None

    used = []
    if fg is None or depth is None:
        small = model_copy(pixels)
        if fg is None:
            model = load_model(SALIENCY, args.saliency_model, args.saliency_weights, args.device)
            fg = model.predict([small])[0]
            used.append(f"{model.name} {model.version}")
        if depth is None:
            model = load_model(DEPTH, args.depth_model, args.depth_weights, args.device)
            depth = model.predict([small], saliency=[fg])[0]
            used.append(f"{model.name} {model.version}")

    result = render(pixels, fg, depth, params)
    data = encode_photo(result.image, fmt, args.quality, photo.exif)
    folder, name = os.path.split(os.path.abspath(args.output))
    Storage(folder).write_atomic(name, data)

    if args.save_intermediates:
        stem = os.path.splitext(os.path.basename(args.photo))[0]
        target = Storage(os.path.abspath(args.save_intermediates))
        for kind, png in intermediate_pngs(result, *pixels.shape[:2]).items():
            target.write_atomic(f"{stem}.{kind}.png", png)

    if result.left_alone:
        print(f"{args.output}: {soft_background_reason(result, params)}")
    models = f" models: {', '.join(used)};" if used else ""
    print(f"{args.output}: {pixels.shape[1]}x{pixels.shape[0]}, preset {params.preset};{models} "
          f"crisp in front of depth {result.start:.3f}, background behind {result.stop:.3f}")
    return 0
