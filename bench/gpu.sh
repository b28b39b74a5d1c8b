#!/usr/bin/env bash
# One GPU, under 8 minutes: mtdpo vs TRL tokens/s and MFU (Gemma-2-2B-sized random model, bf16, seq 2048).
# A machine without trl/datasets gets them from wheels carried in .wheels/ (pip download --no-deps ...).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".wheels/*.whl" > /dev/null; then python3 -m pip install --no-deps --quiet .wheels/*.whl; fi
python3 -c "import torch, transformers, trl, datasets, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)"
python3 -c "import flash_attn" 2>/dev/null && echo "flash-attn present (mtdpo uses sdpa here for a like-for-like run)" || echo "flash-attn absent: sdpa"
PYTHONPATH="$PWD" python3 bench/gpu.py --out "${OUT:-bench/results}" "$@"
