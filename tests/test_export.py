"""Exported actors (ONNX via onnxruntime, TorchScript) act exactly as `predict(deterministic=True)`."""

import numpy as np
import pytest
import torch

import agents
import envs
from perceiver_policy.export import DeterministicActor, _bf16_modules, export_onnx, export_torchscript

TINY = {"num_latents": 8, "latent_dim": 32, "fourier_bands": 4}


@pytest.mark.parametrize(
    "algorithm,policy_type,center",
    [
        ("ppo", "perceiver", "none"),
        ("sac", "perceiver", "none"),
        ("sac", "sb3", None),
        ("ppo", "perceiver", "reference"),  # the reference observation is exported with the weights
        ("sac", "perceiver", "reference"),
        ("sac", "perceiver-conv", "none"),  # conv tokens: the first layer's border correction, exported
        ("sac", "perceiver-conv-centred", "none"),  # the running mean frame, exported with the weights
        ("sac", "perceiver-keypoints", "none"),  # the spatial softmax
    ],
)
def test_exported_actor_equals_predict(tmp_path, algorithm, policy_type, center):
    onnxruntime = pytest.importorskip("onnxruntime")
    venv = envs.make_vec_env("cartpole-balance", n_envs=2, image_size=48, action_repeat=4, seed=0)
    extra = (
        {"n_steps": 16}
        if algorithm == "ppo"
        else {"learning_starts": 16, "batch_size": 16, "buffer_size": 200}
    )
    perceiver = None
    if policy_type.startswith("perceiver"):
        perceiver = {
            "perceiver": TINY,
            "perceiver-conv": {**TINY, "pixel_tokenizer": "conv"},
            "perceiver-conv-centred": {**TINY, "pixel_tokenizer": "conv", "image_centering": "running"},
            "perceiver-keypoints": {**TINY, "pixel_tokenizer": "keypoints", "keypoints": 8},
        }[policy_type]
        policy_type = "perceiver"
    kwargs = {"center_features": center} if center else None
    model = agents.make_agent(
        algorithm,
        venv,
        device="cpu",
        policy_type=policy_type,
        perceiver=perceiver,
        policy_kwargs=kwargs,
        **extra,
    )
    model.learn(48)
    if "image_centering" in (perceiver or {}):
        assert int(model.policy.encoder.adapters["pixels"].mean_count) > 0  # the updates moved the mean frame
    actor = DeterministicActor(model.policy)
    session = onnxruntime.InferenceSession(str(export_onnx(actor, tmp_path / "actor.onnx")))
    scripted = torch.jit.load(str(export_torchscript(actor, tmp_path / "actor.pt")))
    obs = venv.reset()
    for _ in range(5):
        expected, _ = model.predict(obs, deterministic=True)
        assert obs["pixels"].dtype == np.uint8  # fed as the env gives them
        onnx_action = session.run(None, {k: obs[k] for k in actor.input_names})[0]
        script_action = scripted(*[torch.as_tensor(obs[k]) for k in actor.input_names]).detach().numpy()
        np.testing.assert_allclose(onnx_action, expected, atol=1e-5)
        np.testing.assert_allclose(script_action, expected, atol=1e-5)
        obs, *_ = venv.step(expected)
    one = {key: value[:1] for key, value in obs.items()}  # traced at batch 2: the batch axis stays dynamic
    expected, _ = model.predict(one, deterministic=True)
    np.testing.assert_allclose(
        session.run(None, {k: one[k] for k in actor.input_names})[0], expected, atol=1e-5
    )
    venv.close()


def test_recurrent_policies_are_refused():
    venv = envs.make_vec_env("cartpole-balance", n_envs=1, modalities=("proprio",))
    model = agents.make_agent("ppo", venv, policy_type="lstm", device="cpu", n_steps=16)
    with pytest.raises(ValueError, match="recurrent"):
        DeterministicActor(model.policy)


@pytest.mark.parametrize(
    "policy_type,options",
    [
        ("cnn", {"policy_kwargs": {"conv_dtype": "bfloat16", "hidden_dim": 32}}),
        ("perceiver", {"perceiver": {**TINY, "dtype": "bfloat16"}, "policy_kwargs": {"hidden_dim": 32}}),
    ],
)
def test_a_bf16_policy_exports_in_float32(tmp_path, policy_type, options):
    """ONNX Runtime's CPU Conv has no bf16 kernel: a policy trained under bf16 autocast is exported in float32,
    and acts as the same weights computed in float32 do; the trained policy keeps its precision."""
    onnxruntime = pytest.importorskip("onnxruntime")
    venv = envs.make_vec_env("cartpole-balance", n_envs=1, image_size=48, action_repeat=4, seed=0)
    model = agents.make_agent(
        "sac", venv, device="cpu", policy_type=policy_type, recipe="drq", learning_starts=16, batch_size=16,
        buffer_size=200, **options,
    )  # fmt: skip
    model.learn(24)
    actor = DeterministicActor(model.policy)
    session = onnxruntime.InferenceSession(str(export_onnx(actor, tmp_path / "actor.onnx")))
    scripted = torch.jit.load(str(export_torchscript(actor, tmp_path / "actor.pt")))
    assert _bf16_modules(model.policy) and not _bf16_modules(actor.policy)  # the trained policy keeps bf16
    obs = venv.reset()
    tensors = [torch.as_tensor(obs[k]) for k in actor.input_names]
    with torch.no_grad():
        float32 = actor(*tensors).numpy()
    np.testing.assert_allclose(
        session.run(None, {k: obs[k] for k in actor.input_names})[0], float32, atol=1e-5
    )
    np.testing.assert_allclose(scripted(*tensors).detach().numpy(), float32, atol=1e-5)
    expected, _ = model.predict(obs, deterministic=True)  # bf16: the same action up to bf16's rounding
    np.testing.assert_allclose(float32, expected, atol=0.05)
    venv.close()
