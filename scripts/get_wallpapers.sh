#!/bin/sh
# 24 real photos none of IS-Net's int8 graphs is calibrated on, for scripts/bench_runtimes.py
# --photos: the photographs among Debian's mate-backgrounds and plasma-workspace-wallpapers
# (flowers, grass, leaves, water, boats, a kite, a pier; several with no clear subject), each
# scaled to a long side of 1280 px.
#
#   scripts/get_wallpapers.sh [DIR]        (default DIR: .cache/wallpapers)
#
# Needs apt-get and dpkg (any Debian-based machine) and network to the machine's apt sources;
# no root. A second run finds the photos and returns at once.
set -eu

DIR=${1:-.cache/wallpapers}
PHOTOS="Aqua Blinds BytheWater ColdRipple ColorfulCups DarkestHour Dune EveningGlow FallenLeaf
FreshFlower Garden GreenMeadow Grey Kite LadyBird OneStandsOut Path RainDrops Storm TwoWings
Volna Wood YellowFlower summer_1am"
missing=0
for name in $PHOTOS; do [ -f "$DIR/$name.jpg" ] || missing=1; done
if [ "$missing" = 0 ]; then
    exit 0
fi
mkdir -p "$DIR"
WORK=$(mktemp -d)
chmod 755 "$WORK" # apt-get downloads as its own user
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && apt-get download mate-backgrounds plasma-workspace-wallpapers >/dev/null)
for deb in "$WORK"/*.deb; do dpkg -x "$deb" "$WORK/x"; done
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" - "$WORK/x" "$DIR" $PHOTOS <<'PY'
import sys
from pathlib import Path

import cv2

unpacked, dest, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
for name in names:
    # mate's photos are one file each; plasma's are one folder of sizes each: take the largest
    found = sorted(unpacked.glob(f"usr/share/backgrounds/mate/*/{name}.jpg")) or sorted(
        unpacked.glob(f"usr/share/wallpapers/{name}/contents/images/*.jpg"), key=lambda p: p.stat().st_size
    )
    if not found:
        sys.exit(f"get_wallpapers: {name} is not in the packages")
    image = cv2.imread(str(found[-1]))
    scale = 1280 / max(image.shape[:2])
    image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(dest / f"{name}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
print(f"{len(names)} photos in {dest}")
PY
