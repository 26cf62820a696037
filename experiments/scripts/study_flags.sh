# The training flags of the pixel SAC studies (docs/results.md, studies 1 and 2), sourced by
# experiments/scripts/reproduce_results.sh (CPU) and experiments/scripts/gpu_session.sh (CUDA), so both run one protocol.
# Pixel SAC runs at 100k frames of cartpole-swingup (action repeat 8 -> 12.5k agent steps): the replay holds the
# whole run (12.5k transitions), DrQ's initial temperature 0.1, the CPU-sized Perceiver, batch 128.
sac100k="--preset cartpole-swingup-pixels --recipe sb3 --total-frames 100000 --eval-freq 1250 --checkpoint-freq 1250 --keep-checkpoints 1"
sac100k="$sac100k --algo batch_size=128 learning_starts=1000 buffer_size=12500 ent_coef=auto_0.1"
leanp="--perceiver num_latents=32 latent_dim=64 self_attn_layers=1 patch_size=12"
# Study 2's second task, ball_in_cup-catch at 100k frames (PlaNet action repeat 4 -> 25k agent steps): the ball
# only in the image, the cup's position and velocity as proprioception; otherwise the cartpole protocol above.
cup100k="--preset ball_in_cup-catch-pixels --recipe sb3 --proprio robot --total-frames 100000 --eval-freq 2500 --checkpoint-freq 2500"
cup100k="$cup100k --keep-checkpoints 1 --algo batch_size=128 learning_starts=1000 buffer_size=25000 ent_coef=auto_0.1"
