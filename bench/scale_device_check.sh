#!/usr/bin/env bash
# One GPU machine, ~3 minutes (docs/SCALING.md): configs/accelerate/fsdp.yaml exactly as shipped
# (bf16, sync_module_states, cpu_ram_efficient_loading: the options accelerate cannot use on CPU
# ranks) trains and saves one model that loads; then preprocessing speed on an idle 16-core machine.
# A machine without trl/datasets gets them from wheels in .wheels/ (pip download --no-deps ...).
# DeepSpeed is not checked here: it ships no wheel, and the GPU image has none installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".wheels/*.whl" > /dev/null; then python3 -m pip install --no-deps --quiet .wheels/*.whl; fi
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/scale-check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m mtdpo preprocess mtdpo/assets/sample.jsonl --out /tmp/sample-cache --overwrite --quiet
accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 \
  -m mtdpo train --data /tmp/sample-cache --output-dir /tmp/fsdp-run --max-steps 4 --logging-steps 1 \
  --per-device-train-batch-size 4 --learning-rate 1e-4 --save-strategy no --report-to none
python3 - <<'EOF' | tee "$OUT/fsdp-gpu.txt"
import json, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained("/tmp/fsdp-run")
print("fsdp.yaml on", torch.cuda.get_device_name(), "-> model loads:", type(m).__name__, sum(p.numel() for p in m.parameters()), "parameters",
      {str(p.dtype) for p in m.parameters()})
print([round(json.loads(l)["loss"], 4) for l in open("/tmp/fsdp-run/metrics.jsonl") if '"loss"' in l])
EOF
python3 scripts/make_sample_data.py --n 100000 --seed 21 --out /tmp/100k.jsonl
echo "cpus: $(nproc), load: $(cat /proc/loadavg)" | tee -a "$OUT/preprocess-idle.txt"
for procs in 2 16; do
  rows=$([ "$procs" = 2 ] && echo 20000 || echo 100000)
  head -n "$rows" /tmp/100k.jsonl > /tmp/in.jsonl
  python3 -m mtdpo preprocess /tmp/in.jsonl --out /tmp/c-$procs --num-proc "$procs" --overwrite --quiet
  python3 -c "import json; s=json.load(open('/tmp/c-$procs/stats.json')); print('num-proc $procs:', s['rows'], 'rows in', s['seconds'], 's =', s['rows_per_second'], 'rows/s')" | tee -a "$OUT/preprocess-idle.txt"
done
