#!/usr/bin/env bash
# What a lent GPU machine is for, in one timed script (docs/results.md "GPU session"):
#   1. the GPU tables (`python -m experiments.benchmark gpu --quick`) on a quiet machine;
#   2. pixel SAC runs of studies 1 and 2 trained side by side on the GPU (the runs this 2-core CPU cannot finish),
#      with `pytest -m gpu` beside them; at TRAIN_UNTIL seconds after the start every run gets SIGTERM, which
#      writes a checkpoint at its step (continue it with `--resume RUN --total-steps 12500`);
#   3. each run evaluated with the state probe (10 episodes), then the run folders and logs (no replay) packed into
#      $OUT/gpu-runs.tgz (with session.log, bench-gpu.md and pytest-gpu.log beside it: a handful of files).
# Usage: OUT=/some/dir bash experiments/scripts/gpu_session.sh
#   (PY, RUNS, TRAIN_UNTIL, BENCH_LIMIT, PROBE_LIMIT, GPU_RUNS, DEVICE overridable)
#   BENCH_LIMIT=0 / PROBE_LIMIT=0 / GPU_TESTS=0 skip the tables / the probes / `pytest -m gpu`.
#   REPLAY=true keeps the replay in the checkpoints, and RESUME=1 continues the runs in $RUNS to their budgets
#   (100k frames): a second call on the still-warm machine finishes what the first one's deadline cut.
#   GPU_RUNS defaults to the runs not done yet (the flags table below); a ball_in_cup run has 25k agent steps,
#   twice a cartpole run's, so at ≈ 28 steps/s it needs two calls (REPLAY=true, then RESUME=1).
#   MODELS=1 brings the model checkpoints back too (NatureCNN ones are 30 MB, 23 MB packed): the archive is then
#   split into 15 MiB parts, gpu-runs.tgz.part-aa, -ab, ... (`cat gpu-runs.tgz.part-* | tar xz`). The device
#   returns 64 MiB per call at most: two NatureCNN models per call; a second call fetches the rest.
# Measured on an H200 (2026-11-26): the quick tables need ≈ 250 s (the 190 s limit cut the last two rows), and the
# six default runs side by side make 12-19 agent steps/s each in the learning phase (a lone Perceiver run: 25.7),
# 30k-42k of 100k frames in 240 s: six need ≈ 17 min to reach 100k frames, one alone ≈ 8 min.
# On an H200 (2026-11-26): three NatureCNN runs side by side made 28 agent steps/s each and reached 100k frames in 475 s:
#   GPU_RUNS="study1-pixels-cnn-s1 study2-robot-cnn-s0 study2-robot-cnn-s1" BENCH_LIMIT=0 GPU_TESTS=0 \
#   PROBE_LIMIT=0 REPLAY=true MODELS=1 TRAIN_UNTIL=510 OUT=... bash experiments/scripts/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
PY=${PY:-python3}
OUT=${OUT:?set OUT to the folder that collects the results}
RUNS=${RUNS:-runs/gpu}
TRAIN_UNTIL=${TRAIN_UNTIL:-430}
BENCH_LIMIT=${BENCH_LIMIT:-190}
PROBE_LIMIT=${PROBE_LIMIT:-75}
GPU_TESTS=${GPU_TESTS:-1}
REPLAY=${REPLAY:-false}
RESUME=${RESUME:-0}
MODELS=${MODELS:-0}
export MUJOCO_GL=${MUJOCO_GL:-egl} PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RUNS"
log() { echo "[$((SECONDS - start)) s] $*" | tee -a "$OUT/session.log"; }

# Study runs, the flags of experiments/scripts/reproduce_results.sh ("see", "fuse", "fuse-cup"), fp32 as on the CPU; no
# replay snapshot in the checkpoints unless REPLAY=true (the GPU machine is given back; its disk is not kept).
source experiments/scripts/study_flags.sh  # sac100k, cup100k, leanp
on_gpu="--device ${DEVICE:-cuda} --checkpoint-replay-buffer $REPLAY --run-dir $RUNS --progress-bar false --eval-video false"
leanp="$leanp dtype=float32"
declare -A flags=(
  # done on the H200 (docs/results.md), kept to repeat them
  [study1-pixels-cnn-s0]="$sac100k --policy-type sb3 --modalities pixels --seed 0"
  [study1-pixels-cnn-s1]="$sac100k --policy-type sb3 --modalities pixels --seed 1"
  [study2-robot-cnn-s0]="$sac100k --policy-type sb3 --proprio robot --seed 0"
  [study2-robot-cnn-s1]="$sac100k --policy-type sb3 --proprio robot --seed 1"
  [study1-pixels-perceiver-decode-s1]="$sac100k $leanp --modalities pixels --aux-state-weight 1 --seed 1"
  [study2-robot-perceiver-s1]="$sac100k $leanp --proprio robot --seed 1"
  # not done yet: the NatureCNN agents' third seeds and study 2 on ball_in_cup-catch (25k agent steps each)
  [study1-pixels-cnn-s2]="$sac100k --policy-type sb3 --modalities pixels --seed 2"
  [study2-robot-cnn-s2]="$sac100k --policy-type sb3 --proprio robot --seed 2"
  [study2-cup-cnn-s0]="$cup100k --policy-type sb3 --seed 0"
  [study2-cup-cnn-s1]="$cup100k --policy-type sb3 --seed 1"
  [study2-cup-perceiver-decode-s1]="$cup100k $leanp --aux-state-weight 1 --seed 1"
)
names=${GPU_RUNS:-study2-cup-cnn-s0 study2-cup-cnn-s1 study2-cup-perceiver-decode-s1 study1-pixels-cnn-s2 study2-robot-cnn-s2}
for name in $names; do
  [[ -v "flags[$name]" ]] || { echo "unknown run '$name' in GPU_RUNS; valid: ${!flags[*]}" >&2; exit 2; }
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
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=2 $PY -m experiments.train ${flags[$name]} $on_gpu --run-name "$name" > "$RUNS/$name.log" 2>&1 &
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
    timeout "$PROBE_LIMIT" $PY -m experiments.evaluate "$RUNS/$name" --episodes 10 --probe-state > "$RUNS/$name.probe.log" 2>&1 &
  done
  wait
  log "probes done"
fi
if ((MODELS)); then
  tar czf - --exclude='replay*' --exclude='*.mp4' "$RUNS" | split -b 15M - "$OUT/gpu-runs.tgz.part-"
  log "packed $(du -ch "$OUT"/gpu-runs.tgz.part-* | tail -1 | cut -f1) in $(ls "$OUT"/gpu-runs.tgz.part-* | wc -l) parts"
else
  tar czf "$OUT/gpu-runs.tgz" --exclude='replay*' --exclude='*.mp4' \
    $(for name in $names; do [[ $name == *cnn* ]] && echo "--exclude=$RUNS/$name/checkpoints"; done) "$RUNS"
  log "packed $(du -h "$OUT/gpu-runs.tgz" | cut -f1)"
fi
