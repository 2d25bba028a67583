"""Contact sheets for a folder of photos: what the effect decided on each, to judge by eye.

    python scripts/contact_sheets.py PHOTOS OUT [--preset default] [--depth-model NAME]
        [--maps-cache DIR] [--width 1000] [--format jpeg|png]

One sheet per photo, OUT/<photo stem>.<ext>: the photo and the result side by side on top;
below, the salient-object mask, the depth the effect used, and alpha (white keeps the photo,
black shows the painted background). Its caption says whether the photo was rendered or left
as it is and why, and the foreground share. OUT/index.md lists every photo with that decision
and its sheet.

The models run once per photo: with --maps-cache their maps are kept as .npy files and read
back on the next run, so the effect's decisions can be retuned over the whole folder in seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from pipeline.effect import Rendering
from pipeline.models import DEPTH, SALIENCY, default_model, model_class
from pipeline.params import PRESETS, effect_params
from pipeline.photo import Finished, RenderSettings, SceneMaps, SceneModels, prepare, render_on_host
from pipeline.photo_io import IMAGE_EXTENSIONS, decode_photo

CAPTION_HEIGHT = 44
GAP = 4


def cached_maps(
    models: SceneModels, data: bytes, source: str, cache: Path | None, key: str, max_megapixels: float
) -> SceneMaps:
    """Both maps of a photo: from the cache when it has them, else from the models (then cached)."""
    paths = None
    if cache is not None:
        paths = cache / f"{key}.saliency.npy", cache / f"{key}.depth.npy"
        if all(p.is_file() for p in paths):
            return SceneMaps(np.load(paths[0]), np.load(paths[1]))
    maps = models.predict([prepare(data, source, max_megapixels)])[0]
    if paths is not None:
        cache.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        np.save(paths[0], maps.saliency)
        np.save(paths[1], maps.depth)
    return maps


def panel(values: np.ndarray, width: int, height: int) -> np.ndarray:
    """An RGB uint8 panel of a photo (uint8 RGB) or a 0..1 map, resized to width x height."""
    if values.dtype != np.uint8:
        values = np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
    if values.ndim == 2:
        values = cv2.cvtColor(values, cv2.COLOR_GRAY2RGB)
    return cv2.resize(values, (width, height), interpolation=cv2.INTER_AREA)


def mask_panel(r: Rendering) -> np.ndarray:
    """The model's mask in grey, what the extension added to it in blue."""
    saliency = r.fg if r.saliency is None else r.saliency
    gray = np.round(np.clip(saliency, 0.0, 1.0) * 255).astype(np.uint8)
    rgb = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    rgb[(r.fg - saliency) > 0.5] = (70, 140, 255)
    return rgb


def decision(done: Finished) -> str:
    return f"left as it is ({done.left_alone})" if done.left_alone else "rendered"


def sheet(photo: np.ndarray, done: Finished, name: str, width: int) -> np.ndarray:
    """Photo | result on top, mask | depth | alpha below, a caption above both."""
    r = done.rendering
    h, w = photo.shape[:2]
    top_w = (width - GAP) // 2
    top_h = max(1, round(top_w * h / w))
    low_w = (width - 2 * GAP) // 3
    low_h = max(1, round(low_w * h / w))
    canvas = np.full((CAPTION_HEIGHT + top_h + GAP + low_h, width, 3), 255, np.uint8)
    result = cv2.cvtColor(cv2.imdecode(np.frombuffer(done.encoded, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    y = CAPTION_HEIGHT
    canvas[y : y + top_h, :top_w] = panel(photo, top_w, top_h)
    canvas[y : y + top_h, top_w + GAP : 2 * top_w + GAP] = panel(result, top_w, top_h)
    y += top_h + GAP
    for i, values in enumerate((mask_panel(r), r.depth, r.alpha)):
        x = i * (low_w + GAP)
        canvas[y : y + low_h, x : x + low_w] = panel(values, low_w, low_h)
    lines = [
        f"{name}  {w}x{h}  {decision(done)}",
        f"fg {r.fg_fraction:.1%} (mask level {r.subject_confidence:.2f})  background detail {r.background_detail:.2f}  "
        f"start {r.start:.2f} stop {r.stop:.2f}   [photo | result / mask (+extension) | depth | alpha]",
    ]
    for i, line in enumerate(lines):
        cv2.putText(canvas, line, (6, 17 + 20 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="folder of photos")
    parser.add_argument("out", type=Path, help="folder for the sheets and index.md")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--saliency-model", default=default_model(SALIENCY))
    parser.add_argument("--depth-model", default=default_model(DEPTH))
    parser.add_argument("--maps-cache", type=Path, help="keep the models' maps here and reuse them")
    parser.add_argument("--width", type=int, default=1000, help="sheet width in pixels")
    parser.add_argument("--format", choices=("jpeg", "png"), default="jpeg")
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality of the sheets")
    parser.add_argument("--max-megapixels", type=float, default=200.0)
    args = parser.parse_args(argv)

    params = effect_params(args.preset)
    models = SceneModels(args.saliency_model, args.depth_model, batch_size=1)
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not photos:
        print(f"{args.photos}: no photos", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    ext = ".jpg" if args.format == "jpeg" else ".png"
    rows = ["| photo | decision | fg | sheet |", "|---|---|---|---|"]
    for path in photos:
        data = path.read_bytes()
        key = f"{path.stem}.{args.saliency_model}.{args.depth_model}"
        maps = cached_maps(models, data, str(path), args.maps_cache, key, args.max_megapixels)
        maps.depth_measured = model_class(args.depth_model).measures_depth  # cached maps do not say
        done = render_on_host(data, str(path), maps, RenderSettings(params, max_megapixels=args.max_megapixels))
        photo = decode_photo(data, str(path), args.max_megapixels).pixels
        canvas = cv2.cvtColor(sheet(photo, done, path.name, args.width), cv2.COLOR_RGB2BGR)
        flags = [cv2.IMWRITE_JPEG_QUALITY, args.quality] if args.format == "jpeg" else []
        cv2.imwrite(str(args.out / f"{path.stem}{ext}"), canvas, flags)
        detail = f"{done.left_alone}: {done.reason}" if done.left_alone else decision(done)
        sheet_name = f"{path.stem}{ext}"
        rows.append(f"| {path.name} | {detail} | {done.rendering.fg_fraction:.1%} | [{sheet_name}]({sheet_name}) |")
        print(f"{path.name}: {detail}", flush=True)
    used = ", ".join(models.describe()) or f"{args.saliency_model}, {args.depth_model} (maps from the cache)"
    header = [f"# Contact sheets: {args.photos.name}", "", f"Preset {args.preset}; models: {used}.", ""]
    (args.out / "index.md").write_text("\n".join(header + rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
