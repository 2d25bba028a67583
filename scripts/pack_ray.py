"""Ray for a GPU machine that has none and takes at most 64 MiB a call: one xz-packed archive.

    python scripts/pack_ray.py [--from-python PY | --python-version 3.12] [--out .gpu-pack]
                               [--weights] [--part-mib 26]

The archive (``OUT/ray-cpXY.tar.xz``) holds Ray with its Ray Data dependencies, without what
the job never uses: the dashboard's web build, Serve, Tune, RLlib, Train, the LLM libraries,
the Java jars, tests and bytecode; native libraries lose their debug symbols. Packages the
GPU machine has already (torch, NumPy, PyArrow, Pillow, ...) are left out, and
``scripts/gpu_check.sh`` drops anything else it finds installed there.

Where the packages come from:

- ``--from-python PY`` (the default: this project's ``.venv``): the installed files of that
  interpreter's distributions; the archive imports on that Python version only;
- ``--python-version 3.12``: wheels for that CPython on Linux x86_64, by ``pip download`` (the
  machine running this script needs the package index, the GPU machine does not).

``--weights`` also packs the cached IS-Net weights (``$DREAMFOCUS_CACHE``), split into parts of
at most ``--part-mib`` MiB, for calls after the first (the GPU machine keeps what earlier calls
left there; see README, "The GPU render path").
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = ROOT / ".venv" / "bin" / "python"
if not DEFAULT_PYTHON.exists():  # a worktree of the project uses the main checkout's environment
    DEFAULT_PYTHON = Path("/work/main/.venv/bin/python")

# Installed on the GPU machine already (and far too large to carry).
PROVIDED = {"numpy", "pyarrow", "torch", "torchvision", "pillow", "opencv-python", "opencv-python-headless"}
PROVIDED |= {"onnxruntime", "onnxruntime-gpu", "typing-extensions", "setuptools", "pip", "wheel"}
# What the job imports beyond Ray that a bare GPU machine may lack (photo_io's HEIC and RAW codecs).
JOB_EXTRAS = ("pillow-heif", "rawpy", "fsspec", "pyyaml")
# Parts of the ray package the job never imports.
TRIMMED = ("serve", "tune", "rllib", "train", "llm", "jars", "dashboard/client", "tests")
NATIVE_SUFFIXES = (".so",)


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


_INSTALLED = r"""
import importlib.metadata as m, json, re, sys
wanted, seen, files = ["ray", *sys.argv[1:]], set(), {}
extras = {"ray": {"data"}}
while wanted:
    name = wanted.pop()
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        continue
    seen.add(key)
    try:
        dist = m.distribution(name)
    except m.PackageNotFoundError:
        continue
    files[key] = [str(dist.locate_file(f)) for f in dist.files or []]
    for req in dist.requires or []:
        spec, _, marker = req.partition(";")
        if "extra ==" in marker and not any(f'extra == "{e}"' in marker for e in extras.get(key, ())):
            continue
        wanted.append(re.split(r"[\s<>=!~\[(]", spec.strip(), maxsplit=1)[0])
print(json.dumps({"version": "%d%d" % sys.version_info[:2], "files": files}))
"""


def stage_installed(python: Path, stage: Path) -> tuple[str, list[str]]:
    """Copy the installed files of ray[data]'s distributions and JOB_EXTRAS' (PROVIDED left out) into stage."""
    found = json.loads(
        subprocess.run([str(python), "-c", _INSTALLED, *JOB_EXTRAS], check=True, capture_output=True).stdout
    )
    names = []
    for key, paths in sorted(found["files"].items()):
        if key in PROVIDED:
            continue
        names.append(key)
        for path in map(Path, paths):
            site = next((p for p in path.parents if p.name in ("site-packages", "dist-packages")), None)
            if site is None or not path.is_file() or "__pycache__" in path.parts:
                continue  # console scripts and the like live outside site-packages
            target = stage / path.relative_to(site)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return found["version"], names


def stage_wheels(python_version: str, stage: Path, version: str) -> tuple[str, list[str]]:
    """Wheels of ray[data] (at ``version``) and JOB_EXTRAS for that CPython on Linux x86_64, unpacked into stage."""
    abi = python_version.replace(".", "")
    with tempfile.TemporaryDirectory(prefix="wheels-") as wheels:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
        command += ["--python-version", python_version, "--implementation", "cp", "--abi", f"cp{abi}"]
        command += ["--abi", "abi3", "--abi", "none"]
        for platform in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "any"):
            command += ["--platform", platform]
        subprocess.run([*command, "-d", wheels, f"ray[data]=={version}", *JOB_EXTRAS], check=True)
        names = []
        for wheel in sorted(Path(wheels).glob("*.whl")):
            key = canonical(wheel.name.split("-")[0])
            if key in PROVIDED:
                continue
            names.append(key)
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(stage)
    return abi, names


def trim(stage: Path) -> None:
    for part in TRIMMED:
        shutil.rmtree(stage / "ray" / part, ignore_errors=True)
    for folder in [p for p in stage.rglob("__pycache__") if p.is_dir()]:
        shutil.rmtree(folder, ignore_errors=True)
    strip = shutil.which("strip")
    for path in stage.rglob("*"):
        native = path.suffix in NATIVE_SUFFIXES or ".so." in path.name or path.parent.name in ("raylet", "gcs")
        if strip and path.is_file() and native:
            subprocess.run([strip, "--strip-debug", str(path)], check=False, capture_output=True)


def pack(stage: Path, archive: Path) -> None:
    with lzma.open(archive, "wb", preset=9) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for path in sorted(stage.iterdir()):
            tar.add(path, arcname=path.name)


def split_weights(out: Path, part_mib: int) -> list[Path]:
    """The cached IS-Net weights as parts of at most part_mib MiB: weights.part-00, -01, ..."""
    from pipeline.models.isnet import ISNet

    weights = ISNet.local_weights()
    if weights is None:
        raise SystemExit(f"no IS-Net weights cached; `dreamfocus models fetch {ISNet.name}` first")
    for old in out.glob("weights.part-*"):
        old.unlink()
    parts, size = [], part_mib * 2**20
    with open(weights, "rb") as src:  # ONNX weights barely compress: plain parts of the file
        for k in range(1_000):
            chunk = src.read(size)
            if not chunk:
                break
            part = out / f"weights.part-{k:02d}"
            part.write_bytes(chunk)
            parts.append(part)
    (out / "weights.json").write_text(json.dumps({"file": ISNet.cache_name, "parts": len(parts)}))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-python", type=Path, default=DEFAULT_PYTHON, help="pack this interpreter's Ray")
    parser.add_argument("--python-version", help="pack wheels for this CPython instead, e.g. 3.12")
    parser.add_argument("--ray-version", help="with --python-version: default, the --from-python's Ray")
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-pack")
    parser.add_argument("--weights", action="store_true", help="also the cached IS-Net weights, in parts")
    parser.add_argument("--part-mib", type=int, default=26)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ray-pack-") as tmp:
        stage = Path(tmp) / "site"
        stage.mkdir()
        if args.python_version:
            version = (
                args.ray_version
                or subprocess.run(
                    [str(args.from_python), "-c", "import importlib.metadata as m; print(m.version('ray'))"],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.strip()
            )
            abi, names = stage_wheels(args.python_version, stage, version)
        else:
            abi, names = stage_installed(args.from_python, stage)
        unpacked = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
        trim(stage)
        trimmed = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
        archive = args.out / f"ray-cp{abi}.tar.xz"
        pack(stage, archive)
    print(f"packed: {', '.join(names)}")
    print(
        f"{archive}: {archive.stat().st_size / 2**20:.1f} MiB "
        f"(installed {unpacked / 2**20:.0f} MiB, trimmed {trimmed / 2**20:.0f} MiB; a call carries at most 64 MiB)"
    )
    if args.weights:
        sys.path.insert(0, str(ROOT))
        for part in split_weights(args.out, args.part_mib):
            print(f"{part}: {part.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
