#!/usr/bin/env bash
# The GPU runs of docs/results.md ("GPU") in one timed script, for a CUDA machine:
#   1. the GPU tables (`python -m experiments.benchmark gpu --quick`) on a quiet machine;
#   2. pixel SAC study runs trained side by side on the GPU, their settings read from the studies' sweep specs
#      (experiments/sweeps/, as experiments/scripts/reproduce_results.sh reads them on the CPU), with
#      `pytest -m gpu` beside them; TRAIN_UNTIL seconds after the start every run gets SIGTERM, which writes a
#      checkpoint at its step (RESUME=1 continues them to their budgets);
#   3. each run evaluated (EVAL_ARGS, default: 10 episodes with the state probe); the run folders and logs (no
#      replay) packed into $OUT/gpu-runs.tgz beside session.log, bench-gpu.md and pytest-gpu.log.
# Usage: OUT=/some/dir bash experiments/scripts/gpu_session.sh
#   GPU_RUNS: run names from the specs in GPU_SPECS (default: pixels-drq pixels-drq-cup pixels-drq512 study1-see
#   study2-fuse study2-fuse-cup study2-fuse-drq study2-fuse-drq-cup); by default the DrQ-recipe runs that are still missing: NatureCNN at
#   DrQ's paper batch (512, seed 0) and ball_in_cup-catch from pixels, NatureCNN and the best Perceiver (seed 0; 25k agent
#   steps each: TRAIN_UNTIL=540 REPLAY=true PROBE_LIMIT=0, then RESUME=1 on the still-warm machine);
#   BENCH_LIMIT=0 / PROBE_LIMIT=0 / GPU_TESTS=0 skip the tables / the evaluations / `pytest -m gpu`; EVAL_ARGS
#   replaces the evaluation flags (e.g. "--episodes 10 --reliance" for the black-frame test);
#   REPLAY=true keeps the replay in the checkpoints (for RESUME=1 on the same machine); MODELS=1 packs the model
#   checkpoints too, as 15 MiB parts gpu-runs.tgz.part-aa, -ab, ... (`cat gpu-runs.tgz.part-* | tar xz`).
#   PY, RUNS, TRAIN_UNTIL, DEVICE are overridable.
# Measured on an H200 (2026-11-26): the quick tables take ≈ 250 s; six pixel SAC runs side by side make 12-19 agent
# steps/s each (one alone 25.7; three NatureCNN runs 28 each, 100k frames in 475 s). 2026-12-04: three DrQ-recipe
# CNN runs (drq-cnn, cnn) side by side reached 100k frames in 375 s, one alone in ≈ 190 s (66 agent steps/s).
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
PY=${PY:-python3}
OUT=${OUT:?set OUT to the folder that collects the results}
RUNS=${RUNS:-runs/gpu}
TRAIN_UNTIL=${TRAIN_UNTIL:-430}
BENCH_LIMIT=${BENCH_LIMIT:-190}
PROBE_LIMIT=${PROBE_LIMIT:-180}
EVAL_ARGS=${EVAL_ARGS:---episodes 10 --probe-state}
GPU_TESTS=${GPU_TESTS:-1}
REPLAY=${REPLAY:-false}
RESUME=${RESUME:-0}
MODELS=${MODELS:-0}
export MUJOCO_GL=${MUJOCO_GL:-egl} PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RUNS"
log() { echo "[$((SECONDS - start)) s] $*" | tee -a "$OUT/session.log"; }

# The study runs: each spec's experiments.train commands (fp32 as on the CPU), on the GPU, no replay snapshot in
# the checkpoints unless REPLAY=true.
on_gpu="--device ${DEVICE:-cuda} --checkpoint-replay-buffer $REPLAY --progress-bar false --eval-video false"
declare -A commands=()
specs=()
for spec in ${GPU_SPECS:-pixels-drq pixels-drq-cup pixels-drq512 study1-see study2-fuse study2-fuse-cup study2-fuse-drq study2-fuse-drq-cup}; do
  specs+=("experiments/sweeps/$spec.yaml")
done
while IFS= read -r line; do  # every spec's commands from one process
  commands[${line##*--run-name }]="$line"
done < <($PY -m experiments.sweep "${specs[@]}" --print-commands --run-dir "$RUNS")
names=${GPU_RUNS:-drq512-swingup-cnn-s0 drq128-cup-cnn-s0 drq128-cup-perceiver-conv-online-queries-enc-lr0.3-s0}
for name in $names; do
  [[ -v "commands[$name]" ]] || { echo "unknown run '$name' in GPU_RUNS; valid: ${!commands[*]}" >&2; exit 2; }
done
log "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
$PY -c "import torch, mujoco, stable_baselines3, dm_control; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'mujoco', mujoco.__version__, 'sb3', stable_baselines3.__version__)" 2>&1 | tee -a "$OUT/session.log"

if ((BENCH_LIMIT > 0)); then
  log "GPU tables (limit ${BENCH_LIMIT} s)"
  timeout "$BENCH_LIMIT" $PY -m experiments.benchmark gpu --quick > "$OUT/bench-gpu.md" 2> "$OUT/bench-gpu.err"
  log "GPU tables rc=$?"
fi

pids=()
for name in $names; do
  if ((RESUME)); then
    OMP_NUM_THREADS=2 $PY -m experiments.train --resume "$RUNS/$name" >> "$RUNS/$name.log" 2>&1 &
  else
    # exec: the background job is the training process itself, so SIGTERM below reaches it
    eval "OMP_NUM_THREADS=2 exec $PY -m ${commands[$name]} $on_gpu" > "$RUNS/$name.log" 2>&1 &
  fi
  pids+=($!)
done
log "started ${#pids[@]} runs (resume=$RESUME): $names"
if ((GPU_TESTS)); then
  timeout 240 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_policies.py > "$OUT/pytest-gpu.log" 2>&1
  log "pytest -m gpu rc=$? ($(tail -1 "$OUT/pytest-gpu.log"))"
fi
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> "$OUT/session.log" 2>&1

alive() { for pid in "${pids[@]}"; do kill -0 "$pid" 2> /dev/null && return 0; done; return 1; }
while ((SECONDS - start < TRAIN_UNTIL)) && alive; do
  sleep 5
  ((SECONDS % 60 < 5)) && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> "$OUT/session.log" 2>&1
done
for pid in "${pids[@]}"; do kill -0 "$pid" 2> /dev/null && kill -TERM "$pid"; done
for pid in "${pids[@]}"; do wait "$pid"; done
last_step() { grep -oE "(stopped by SIGTERM at step|steps +:) [0-9]+" "$RUNS/$1.log" | tail -1 | grep -oE "[0-9]+$"; }
log "runs ended at agent step: $(for name in $names; do echo -n "$name:$(last_step "$name") "; done)"

if ((PROBE_LIMIT > 0)); then
  for name in $names; do
    timeout "$PROBE_LIMIT" $PY -m experiments.evaluate "$RUNS/$name" $EVAL_ARGS > "$RUNS/$name.probe.log" 2>&1 &
  done
  wait
  log "evaluations done ($EVAL_ARGS)"
fi
if ((MODELS)); then
  tar czf - --exclude='replay*' --exclude='*.mp4' "$RUNS" | split -b 15M - "$OUT/gpu-runs.tgz.part-"
  log "packed $(du -ch "$OUT"/gpu-runs.tgz.part-* | tail -1 | cut -f1) in $(ls "$OUT"/gpu-runs.tgz.part-* | wc -l) parts"
else
  tar czf "$OUT/gpu-runs.tgz" --exclude='replay*' --exclude='*.mp4' \
    $(for name in $names; do [[ $name == *cnn* ]] && echo "--exclude=$RUNS/$name/checkpoints"; done) "$RUNS"
  log "packed $(du -h "$OUT/gpu-runs.tgz" | cut -f1)"
fi
