#!/usr/bin/env bash
# Regenerate every picture and console output of the README tour from the outputs of `make demo`.
#
#   make demo                                   # data_cache/demo and runs/demo
#   (matplotlib for the two plots: in make's .venv; elsewhere pip install 'mtdpo[plot]')
#   scripts/make_readme_assets.sh               # needs Chromium for the screenshot (apt-get install -y chromium)
#
# Writes docs/images/{show-sample.png,stats.png,training-curves.png} and prints the text the
# README quotes (show-sample piped, the stats table); the tests check those two blocks.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1
if [ ! -d data_cache/demo ] || [ ! -f runs/demo/metrics.jsonl ]; then
    echo "data_cache/demo or runs/demo/metrics.jsonl is missing: run \`make demo\` first" >&2
    exit 2
fi
mkdir -p docs/images
page=$(mktemp --suffix=.html)
trap 'rm -f "$page"' EXIT

# 1. show-sample as a browser draws the --html page (the same colours as the terminal view)
"$BIN/mtdpo" show-sample data_cache/demo --index 3 --html "$page"
scripts/screenshot_html.sh "$page" docs/images/show-sample.png 1400,1150  # as in the README

# 2. stats: the table (quoted in the README) and the plot
"$BIN/mtdpo" stats data_cache/demo --plot docs/images/stats.png

# 3. training curves of runs/demo
"$BIN/mtdpo" plot runs/demo --out docs/images/training-curves.png

# 4. the piped show-sample text the README quotes
"$BIN/mtdpo" show-sample data_cache/demo --index 0 --side chosen | cat
