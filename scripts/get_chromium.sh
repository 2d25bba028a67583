#!/bin/sh
# Headless Chromium from Debian's packages, unpacked into a cache folder, without root.
#
#   scripts/get_chromium.sh [CACHE]        (default CACHE: .cache/chromium)
#
# Leaves CACHE/chromium, a wrapper that runs the unpacked chromium-headless-shell with the
# unpacked libraries and fonts. Needs apt-get and dpkg-deb (any Debian-based machine) and
# network to the machine's apt sources. apt runs on a private copy of its state (package lists,
# downloads) inside CACHE, so neither root nor `apt-get update` of the machine is needed; the
# packages are checked against the machine's apt keyring as a normal install would be. Only
# what the machine lacks is fetched: `apt-get -s install` against the machine's installed
# packages names it. A second run finds the wrapper and returns at once; with DREAMFOCUS_CHROMIUM
# set (a Chromium or Chrome of the user's, which the tests then use) it does nothing.
set -eu

CACHE=${1:-.cache/chromium}
WRAPPER="$CACHE/chromium"
if [ -n "${DREAMFOCUS_CHROMIUM:-}" ]; then
    exit 0 # a browser of the user's choosing: the tests use it
fi
if [ -x "$WRAPPER" ] && "$WRAPPER" --version >/dev/null 2>&1; then
    exit 0
fi
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
    # Not a Debian-based machine: the browser test skips, saying why, unless DREAMFOCUS_CHROMIUM
    # names a browser.
    echo "get_chromium: no apt-get and dpkg-deb here; set DREAMFOCUS_CHROMIUM to run the browser test" >&2
    exit 0
}

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
APT="$CACHE/apt"
ROOT="$CACHE/root"
mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$APT/debs"
set -- -q -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT" -o "Dir::Cache::archives=$APT/archives" \
    -o Debug::NoLocking=1 -o APT::Sandbox::User="$(id -un)"
apt-get "$@" update >"$APT/update.log" 2>&1 || {
    cat "$APT/update.log" >&2
    exit 1
}
# Fonts, so that a screenshot shows text; the rest is whatever chromium-headless-shell needs
# and the machine lacks.
PACKAGES=$(apt-get "$@" -s install --no-install-recommends chromium-headless-shell fonts-dejavu-core |
    awk '/^Inst /{print $2}')
(cd "$APT/debs" && apt-get "$@" download $PACKAGES >"$APT/download.log" 2>&1) || {
    cat "$APT/download.log" >&2
    exit 1
}
rm -rf "$ROOT"
for deb in "$APT/debs"/*.deb; do
    dpkg-deb -x "$deb" "$ROOT"
done
rm -rf "$APT" "$ROOT/usr/share/doc" "$ROOT/usr/share/man" "$ROOT/usr/share/locale"

LIBS=$(find "$ROOT" -name '*.so*' -printf '%h\n' | sort -u | tr '\n' ':')
cat >"$CACHE/fonts.conf" <<EOF
<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "urn:fontconfig:fonts.dtd">
<fontconfig>
  <dir>$ROOT/usr/share/fonts</dir>
  <dir>/usr/share/fonts</dir>
  <cachedir>$CACHE/fontconfig</cachedir>
</fontconfig>
EOF
cat >"$WRAPPER" <<EOF
#!/bin/sh
export LD_LIBRARY_PATH="$LIBS\${LD_LIBRARY_PATH:-}"
export FONTCONFIG_FILE="$CACHE/fonts.conf"
exec "$ROOT/usr/lib/chromium/chromium-headless-shell" "\$@"
EOF
chmod +x "$WRAPPER"
"$WRAPPER" --version
