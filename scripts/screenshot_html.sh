#!/usr/bin/env bash
# Render a local HTML file (e.g. `mtdpo show-sample --html pair.html`) or SVG to a PNG with
# headless Chromium, offline: no network, a throw-away profile.
#
#   scripts/screenshot_html.sh PAGE.html OUT.png [WIDTH,HEIGHT]     (default 1400,900)
#
# Needs Chromium (Debian: apt-get update && apt-get install -y chromium); CHROMIUM=path overrides.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 PAGE.html OUT.png [WIDTH,HEIGHT]" >&2
    exit 2
fi
page=$(realpath "$1")
out=$(realpath -m "$2")
size=${3:-1400,900}
chromium=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
if [ -z "$chromium" ]; then
    echo "chromium not found: apt-get install -y chromium (or set CHROMIUM=/path/to/chrome)" >&2
    exit 3
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
rm -f "$out"
"$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" --screenshot="$out" --window-size="$size" \
    "file://$page" >/dev/null 2>&1 || true
if [ ! -s "$out" ]; then
    echo "chromium wrote no screenshot to $out" >&2
    exit 1
fi
echo "wrote $out"
