#!/usr/bin/env bash
# The paper's iterative round, twice, on the tiny model on CPU: M-DPO, then M-KTO (docs/ITERATIVE.md).
#
#   rollouts of the current model (graded) -> mtdpo pairs -> mtdpo preprocess -> mtdpo train -> next round
#
# The bundled rollouts stand for the models' generations: mtdpo/assets/rollouts.jsonl for the SFT
# model's (round 1), mtdpo/assets/rollouts-round2.jsonl for the round-1 model's (round 2; docs/ITERATIVE.md
# shows how to generate and grade real ones). Each command prints what it kept and why.
#
# Settings (environment): MTDPO, PYTHON (the commands), OUT (caches), RUNS (models), ROUND1, ROUND2
# (rollouts), TRAIN_ARGS (extra `mtdpo train` flags, e.g. "--max-steps 1" for a smoke test).
set -euo pipefail
MTDPO=${MTDPO:-mtdpo}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-data_cache/iterate}
RUNS=${RUNS:-runs/iterate}
ROUND1=${ROUND1:-mtdpo/assets/rollouts.jsonl}
ROUND2=${ROUND2:-mtdpo/assets/rollouts-round2.jsonl}
TRAIN_ARGS=${TRAIN_ARGS:-}
mkdir -p "$OUT" "$RUNS"
step() { printf '\n== %s\n' "$*"; }
train() { $MTDPO train --config configs/iterate.yaml $TRAIN_ARGS "$@"; }

step "the start: the SFT model (here the tiny random model, saved so later rounds can name it)"
$PYTHON scripts/save_start_model.py "$RUNS/sft"

# ── M-DPO ──────────────────────────────────────────────────────────────────────
step "M-DPO round 1: pairs from the SFT model's graded rollouts ($ROUND1)"
$MTDPO pairs "$ROUND1" --out "$OUT/round1.pairs.jsonl" --overwrite
step "M-DPO round 1: tokenize and mask once"
$MTDPO preprocess "$OUT/round1.pairs.jsonl" --out "$OUT/round1" --overwrite
step "M-DPO round 1: train from the SFT model, which is also the reference"
train --data "$OUT/round1" --model "$RUNS/sft" --output-dir "$RUNS/round1"

step "M-DPO round 2: pairs from the round-1 model's graded rollouts ($ROUND2)"
$MTDPO pairs "$ROUND2" --out "$OUT/round2.pairs.jsonl" --overwrite
step "M-DPO round 2: tokenize and mask once"
$MTDPO preprocess "$OUT/round2.pairs.jsonl" --out "$OUT/round2" --overwrite
step "M-DPO round 2: train from the round-1 model, reference = the round-1 model (updated every round)"
train --data "$OUT/round2" --model "$RUNS/round1" --output-dir "$RUNS/round2"
step "M-DPO round 2, KL-regularized: the same start, reference = the SFT model (fixed)"
train --data "$OUT/round2" --model "$RUNS/round1" --ref-model "$RUNS/sft" --output-dir "$RUNS/round2-fixed-reference"

# ── M-KTO ──────────────────────────────────────────────────────────────────────
step "M-KTO round 1: unpaired rows (desirable = correct) from the same rollouts"
$MTDPO pairs "$ROUND1" --kto --out "$OUT/round1.kto.jsonl" --overwrite
step "M-KTO round 1: shuffle, so that each row's KL partner (its neighbour) answers another problem"
$PYTHON scripts/shuffle_rows.py "$OUT/round1.kto.jsonl" "$OUT/round1.kto.shuffled.jsonl"
step "M-KTO round 1: tokenize and mask once (a KTO cache)"
$MTDPO preprocess "$OUT/round1.kto.shuffled.jsonl" --out "$OUT/round1-kto" --overwrite
step "M-KTO round 1: train from the SFT model, which is also the reference"
train --loss-type kto --data "$OUT/round1-kto" --model "$RUNS/sft" --output-dir "$RUNS/round1-kto"

step "M-KTO round 2: unpaired rows from the round-1 model's rollouts ($ROUND2)"
$MTDPO pairs "$ROUND2" --kto --out "$OUT/round2.kto.jsonl" --overwrite
$PYTHON scripts/shuffle_rows.py "$OUT/round2.kto.jsonl" "$OUT/round2.kto.shuffled.jsonl"
$MTDPO preprocess "$OUT/round2.kto.shuffled.jsonl" --out "$OUT/round2-kto" --overwrite
step "M-KTO round 2: train from the round-1 KTO model, reference = that model"
train --loss-type kto --data "$OUT/round2-kto" --model "$RUNS/round1-kto" --output-dir "$RUNS/round2-kto"

step "done: models in $RUNS (round1, round2, round2-fixed-reference, round1-kto, round2-kto), caches in $OUT"
