#!/usr/bin/env bash
# One prepared command for a GPU machine without Ray: install the packed Ray, then run
# `dreamfocus run --render-backend torch` through a real local Ray on generated JPEGs, and print
# photos/s, the GPU's busy share and the device milliseconds per photo by stage.
#
#   scripts/gpu_check.sh [unpack|run|all]        (default: all)
#
# Settings (environment):
#   PYTHON=python3       the machine's Python (torch, torchvision, OpenCV, Pillow, PyArrow)
#   DEVICE=cuda          cpu: the same steps on a machine without a GPU
#   PHOTOS=300 SIZE=4000x3000 (12 MP)    WORK=/tmp/dreamfocus-gpu-check
#   PACK=.gpu-pack       what scripts/pack_ray.py wrote: ray-cpXY.tar.xz [, weights.part-NN]
#   EXTRA="..."          more flags for `dreamfocus run` (e.g. --model-batch-size 32: each
#                        actor call is four model batches, which overlap on the device)
#
# `unpack` alone suits a first call that carries the archive (and the first weights parts);
# a later call carries the other parts and runs `run` (ignored files stay on a warm machine).
set -euo pipefail

step=${1:-all}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
PHOTOS=${PHOTOS:-300}
SIZE=${SIZE:-4000x3000}
WORK=${WORK:-/tmp/dreamfocus-gpu-check}
PACK=${PACK:-$ROOT/.gpu-pack}
EXTRA=${EXTRA:-}
abi=$("$PYTHON" -c 'import sys; print("%d%d" % sys.version_info[:2])')
SITE=$PACK/site-cp$abi

unpack() {
    local archive=$PACK/ray-cp$abi.tar.xz
    if [[ -f $SITE/.unpacked ]]; then
        echo "ray: unpacked already in $SITE"
    elif [[ -f $archive ]]; then
        rm -rf "$SITE" && mkdir -p "$SITE"
        tar -xJf "$archive" -C "$SITE"
        # What this machine has installed already wins: only the missing packages stay.
        "$PYTHON" - "$SITE" <<'EOF'
import importlib.util, pathlib, shutil, sys
site = pathlib.Path(sys.argv[1])
def installed(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
def drop_installed(entry, prefix=""):
    name = prefix + entry.name.removesuffix(".py")
    if entry.is_dir() and not (entry / "__init__.py").exists():  # a namespace (google): its parts
        for part in sorted(entry.iterdir()):
            drop_installed(part, name + ".")
    elif installed(name):
        print(f"  {name}: installed here already, the packed one removed")
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
for entry in sorted(site.iterdir()):
    if not (entry.name.endswith((".dist-info", ".libs", ".pth")) or entry.name.startswith((".", "_"))):
        drop_installed(entry)
EOF
        touch "$SITE/.unpacked"
        echo "ray: unpacked $archive ($(du -sh "$SITE" | cut -f1)) into $SITE"
    elif ! "$PYTHON" -c 'import ray' 2>/dev/null; then
        echo "no Ray here and no $archive: run scripts/pack_ray.py --python-version $("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') first" >&2
        exit 2
    fi
    if [[ -f $PACK/weights.json ]]; then
        local file parts have
        file=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["file"])' "$PACK/weights.json")
        parts=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["parts"])' "$PACK/weights.json")
        have=$(find "$PACK" -maxdepth 1 -name 'weights.part-*' | wc -l)
        if [[ -f $WORK/cache/$file ]]; then
            echo "weights: $WORK/cache/$file"
        elif [[ $have -eq $parts ]]; then
            mkdir -p "$WORK/cache"
            cat "$PACK"/weights.part-* >"$WORK/cache/$file"
            echo "weights: joined $parts parts into $WORK/cache/$file"
        else
            echo "weights: $have of $parts parts here so far"
        fi
    fi
}

run() {
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    [[ -d $SITE ]] && export PYTHONPATH=$PYTHONPATH:$SITE
    [[ -d $WORK/cache ]] && export DREAMFOCUS_CACHE=$WORK/cache
    export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
    "$PYTHON" -c 'import os, ray, ray.data; print("ray", ray.__version__, "from", os.path.dirname(ray.__file__))'
    local models=()  # ${models[@]+...}: an empty array under set -u
    if ! "$PYTHON" -c 'import sys; from pipeline.models.isnet import ISNet; sys.exit(ISNet.local_weights() is None)'; then
        echo "no IS-Net weights here: trivial models stand in (the figures leave the models out)"
        models=(--saliency-model trivial-saliency --depth-model trivial-depth)
    fi
    "$PYTHON" "$ROOT/scripts/gpu_check.py" photos "$WORK/photos-$SIZE" --count "$PHOTOS" --size "$SIZE"
    rm -rf "$WORK/out"
    sampler=""  # global: the EXIT trap reads it
    rm -f "$WORK/gpu-samples.txt"
    if [[ $DEVICE == cuda* ]] && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 >"$WORK/gpu-samples.txt" &
        sampler=$!
        trap 'kill "$sampler" 2>/dev/null || true' EXIT # a failed run leaves no sampler behind
    fi
    # shellcheck disable=SC2086 # EXTRA is a list of flags
    "$PYTHON" -m pipeline.cli run "$WORK/photos-$SIZE" "$WORK/out" --runner ray --render-backend torch --device "$DEVICE" \
        --force ${models[@]+"${models[@]}"} $EXTRA 2>&1 | tee "$WORK/run.log" || echo "dreamfocus run failed (exit ${PIPESTATUS[0]})"
    if [[ -n $sampler ]]; then kill "$sampler"; fi
    "$PYTHON" "$ROOT/scripts/gpu_check.py" report "$WORK/out" --log "$WORK/run.log" --gpu-samples "$WORK/gpu-samples.txt"
    "$PYTHON" -m pipeline.cli status "$WORK/out"
}

case $step in
unpack) unpack ;;
run) run ;;
all) unpack && run ;;
*) echo "usage: $0 [unpack|run|all]" >&2 && exit 2 ;;
esac
