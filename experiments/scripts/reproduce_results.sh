#!/usr/bin/env bash
# Reproduces the learning runs of docs/results.md on a CPU machine, JOBS runs at a time (one torch thread each).
# Usage: bash experiments/scripts/reproduce_results.sh [STUDY[,STUDY...]|all]   (studies: `valid` below; an unknown
#   name exits 2 and lists them)
#   (RUNS=runs/results JOBS=2 by default; SEEDS="0 1 2" replaces the seeds of the studies' sweep specs)
# On a CUDA machine, experiments/scripts/gpu_session.sh runs the GPU tables, `pytest -m gpu` and study 1/2 runs to a
# deadline (the H200 runs in docs/results.md came from it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/results}
JOBS=${JOBS:-2}
what=",${1:-all},"
# The studies whose settings live in sweep specs only (experiments/sweeps/): study -> its specs, run in this order.
# experiments.sweep --print-commands prints each spec's experiments.train commands (no Ray); SEEDS replaces seeds.
#   see: study 1, pixels only (ours, ours + state decoding, SB3 SAC + NatureCNN)
#   fuse: study 2, the camera for the world (the pole), joint sensors for the body (the cart): --proprio robot
#   fuse-cup: study 2 on ball_in_cup-catch (the ball only in the image)
#   fuse-drq: study 2 under DrQ's recipe (the conv-token Perceiver with an online target and its variants, NatureCNN + MLP)
#   remember: study 3, no velocities, no camera (--proprio positions): Perceiver, LSTM and MLP over the same histories
#   drq: pixels under DrQ's recipe, every encoder on one recipe
#   drq-cup: pixels under DrQ's recipe on ball_in_cup-catch (NatureCNN, DrQ's encoder, the best Perceiver)
#   fuse-drq-cup: study 2 under DrQ's recipe on ball_in_cup-catch (the best Perceiver, NatureCNN + MLP)
#   drq512: cartpole-swingup pixels under DrQ's recipe at its paper's batch (512): the CNNs and the best Perceiver
#   latents: latency control, one policy with nested latents against fixed-k policies
#   multitask: one SAC generalist over four domains against single-task Perceivers and MLPs
spec_studies="see:study1-see fuse:study2-fuse fuse-cup:study2-fuse-cup fuse-drq:study2-fuse-drq \
  remember:study3-remember drq:pixels-drq drq-cup:pixels-drq-cup fuse-drq-cup:study2-fuse-drq-cup \
  drq512:pixels-drq512 latents:latent-scaling,latent-scaling-walker multitask:multitask-states"
valid="states pixels missing"
for entry in $spec_studies; do valid+=" ${entry%%:*}"; done
valid+=" multitask-transfer transfer all"
for item in ${1//,/ }; do
  [[ " $valid " == *" $item "* ]] || { echo "unknown study '$item'; valid: ${valid// /, }" >&2; exit 2; }
done
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MUJOCO_GL=${MUJOCO_GL:-egl}
common="--run-dir $RUNS --progress-bar false --eval-video false"
jobs=()

if [[ $what == *,states,* || $what == *,all,* ]]; then
  # PPO from proprio + action history, ours vs SB3 MultiInputPolicy (MLP), same hyper-parameters, 500k frames
  # (action repeat 4: 125k agent steps; per task, 3 seeds x 2 policies take about 50 minutes on 2 CPU cores).
  for task in cartpole-swingup:swingup walker-walk:walker; do
    for seed in 0 1 2; do
      for policy in perceiver sb3; do
        jobs+=("-m experiments.train --preset ${task%%:*}-states --action-repeat 4 --policy-type $policy --seed $seed \
          --run-name ${task##*:}-states-$policy-s$seed --eval-freq 12500 $common")
      done
    done
  done
fi
if [[ $what == *,pixels,* || $what == *,all,* ]]; then
  # SAC on 84-px pixels (CPU-sized Perceiver), cartpole-swingup, action repeat 8; FRAMES frames (100k in the
  # PlaNet protocol; the CPU run is cut to what fits and labelled as such in docs/results.md).
  frames=${FRAMES:-24000}
  lean="--perceiver num_latents=32 latent_dim=64 self_attn_layers=1 patch_size=12 --algo batch_size=128 learning_starts=1000 buffer_size=100000"
  for seed in 0 1; do
    jobs+=("-m experiments.train --preset cartpole-swingup-pixels --total-frames $frames $lean --eval-freq 1250 \
      --seed $seed --run-name swingup-pixels-proprio-s$seed $common")
    jobs+=("-m experiments.train --preset cartpole-swingup-pixels --total-frames $frames $lean --eval-freq 1250 \
      --seed $seed --modalities pixels --run-name swingup-pixelsonly-s$seed $common")
  done
  jobs+=("-m experiments.train --preset cartpole-swingup-pixels --total-frames $frames --policy-type sb3 \
    --algo batch_size=128 learning_starts=1000 buffer_size=100000 --eval-freq 1250 --modalities pixels \
    --run-name swingup-pixelsonly-cnn-s0 $common")
  # walker-walk, action repeat 2: WALKER_FRAMES frames (100k in the protocol; 20k took ~50 min per run here, two runs on 2 cores).
  for seed in 0 1; do
    jobs+=("-m experiments.train --preset walker-walk-pixels --total-frames ${WALKER_FRAMES:-20000} $lean \
      --eval-freq 1000 --seed $seed --run-name walker-pixels-proprio-s$seed $common")
  done
fi
if [[ $what == *,missing,* || $what == *,all,* ]]; then
  # The make-train demo with and without modality dropout, for the missing-modality evaluation.
  jobs+=("-m experiments.train --preset cartpole-balance-pixels --run-name balance-pixels-nodrop-s0 $common")
  jobs+=("-m experiments.train --preset cartpole-balance-pixels --env-modality-dropout 0.2 \
    --run-name balance-pixels-mdrop-s0 $common")
  # cartpole-swingup SAC with modality dropout, against swingup-pixels-proprio-s0 of the pixels stage at 24k frames
  jobs+=("-m experiments.train --preset cartpole-swingup-pixels --total-frames 24000 --perceiver num_latents=32 \
    latent_dim=64 self_attn_layers=1 patch_size=12 --algo batch_size=128 learning_starts=1000 buffer_size=100000 \
    --eval-freq 1250 --env-modality-dropout 0.2 --seed 0 --run-name swingup-pixels-proprio-mdrop-s0 $common")
fi

# --- The studies (docs/results.md): each study's settings live in its sweep spec only ----------------------------
spec_jobs() {
  local line
  while IFS= read -r line; do jobs+=("-m $line --progress-bar false"); done < <(
    $PY -m experiments.sweep "experiments/sweeps/$1.yaml" --print-commands --run-dir "$RUNS" ${SEEDS:+--seeds $SEEDS})
}
for entry in $spec_studies; do
  if [[ $what == *,${entry%%:*},* || $what == *,all,* ]]; then
    specs=${entry#*:}
    for spec in ${specs//,/ }; do spec_jobs "$spec"; done
  fi
done
# The generalist fine-tuned to ball_in_cup-catch against scratch: reads runs/results/mt-generalist-s0 (the spec's
# init_from), so it runs after the multitask stage has finished.
if [[ $what == *,multitask-transfer,* ]]; then
  if [[ ! -d runs/results/mt-generalist-s0/checkpoints ]]; then
    echo "multitask-transfer fine-tunes runs/results/mt-generalist-s0: run the multitask stage first" >&2
    exit 2
  fi
  spec_jobs multitask-transfer
fi

if [[ $what == *,transfer,* || $what == *,all,* ]]; then
  # Transfer from states (PPO, action repeat 4): cartpole-balance (200k frames) -> cartpole-swingup at 200k frames,
  # trained from scratch or from the balance policy with --finetune all | output-queries | lora. The source runs
  # first (the targets read its checkpoint), so this stage runs its jobs in order after the source.
  mkdir -p "$RUNS"
  states4="--action-repeat 4 --eval-every-frames 20000 --checkpoint-every-frames 20000 --total-frames 200000"
  $PY -m experiments.train --preset cartpole-balance-states $states4 --seed 0 --run-name transfer-balance-source-s0 \
    $common > /dev/null 2>>"$RUNS/errors.log" || test -d "$RUNS/transfer-balance-source-s0"
  for seed in ${SEEDS:-0 1}; do
    jobs+=("-m experiments.train --preset cartpole-swingup-states $states4 --seed $seed --run-name transfer-swingup-scratch-s$seed $common")
    for mode in all output-queries lora; do
      jobs+=("-m experiments.train --preset cartpole-swingup-states $states4 --seed $seed --init-from \
        $RUNS/transfer-balance-source-s0 --finetune $mode --run-name transfer-swingup-$mode-s$seed $common")
    done
  done
fi

mkdir -p "$RUNS"
export PY LOG="$RUNS/errors.log"
# one job per line, its quoting kept (eval): a spec's 'latent_scaling=[4, 8]' stays one argument
printf '%s\n' "${jobs[@]}" | xargs -d '\n' -P "$JOBS" -I{} \
  sh -c 'eval "$PY $1" > /dev/null 2>> "$LOG" || printf "FAILED: %s\n" "$1" >> "$LOG"' _ {}
echo "done; errors (if any) in $RUNS/errors.log"
