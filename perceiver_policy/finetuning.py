"""Transfer a trained Perceiver policy to a new task: what trains, and how the source weights are brought over.

The encoder holds what is general (how to read the sensors); output queries and heads hold what is
task-specific. Three modes (`FINETUNE_MODES`):

- ``all``: every parameter trains (plain initialisation from the source);
- ``output-queries``: the encoder is frozen but for its task-specific parameters (`TASK_SPECIFIC`: a
  multi-task policy's task token and task stems); output queries, decoders and heads train;
- ``lora``: as ``output-queries``, plus low-rank adapters (peft's LoRA) on the encoder's attention and MLP Linear
  layers (`LORA_TARGETS`); `merge_lora` folds them back into plain Linear layers for deployment.

The mode is a policy constructor argument (``policy_kwargs={"finetune": {...}}``), so SB3's save / load round trip
rebuilds the same structure (LoRA layers included) and `--resume` works as for any run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

FINETUNE_MODES = ("all", "output-queries", "lora")
LORA_TARGETS = ("q", "kv", "qkv", "out", "mlp")
"""Linear layers of the encoder's attention blocks that can carry adapters: cross-attention q / kv / out,
self-attention qkv / out, and both MLP layers (mlp). The tokenisers (adapters' content / position projections)
are left out: the pixel path folds its weights and streaming caches them."""


TASK_SPECIFIC = ("adapters.task.", "task_stems.")
"""Encoder parameters (name prefixes) that describe one body rather than how to read sensors: the task token's
embedding and the per-task stems of a multi-task policy. They train in every mode: a generalist fine-tuned to a
new task would otherwise read that task through a frozen, randomly initialised embedding row."""


def check_finetune(spec: Mapping | None) -> dict:
    """Normalised {'mode', 'lora_rank', 'lora_alpha', 'lora_targets'}; errors name the bad value and the choices."""
    spec = dict(spec or {})
    unknown = sorted(set(spec) - {"mode", "lora_rank", "lora_alpha", "lora_targets"})
    if unknown:
        raise ValueError(
            f"unknown finetune settings {unknown}; valid keys: ['lora_alpha', 'lora_rank', 'lora_targets', 'mode']"
        )
    mode = spec.get("mode", "all")
    if mode not in FINETUNE_MODES:
        raise ValueError(f"unknown finetune mode {mode!r}; valid choices: {list(FINETUNE_MODES)}")
    rank = spec.get("lora_rank", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"lora_rank must be a positive integer, got {rank!r}")
    targets = tuple(spec.get("lora_targets") or LORA_TARGETS)
    bad = sorted(set(targets) - set(LORA_TARGETS))
    if bad:
        raise ValueError(f"unknown LoRA targets {bad}; valid choices: {list(LORA_TARGETS)}")
    alpha = float(spec.get("lora_alpha", 2 * rank))
    return {"mode": mode, "lora_rank": rank, "lora_alpha": alpha, "lora_targets": list(targets)}


def lora_target_names(encoder: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the encoder's attention / MLP Linear layers selected by `targets` (peft's `target_modules`)."""
    layers = "|".join(re.escape(t) if t != "mlp" else r"mlp\.\d+" for t in targets)
    pattern = re.compile(rf"(cross_attention|self_attention\.\d+)\.({layers})")
    return [
        name
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Linear) and pattern.fullmatch(name)
    ]


def apply_finetune(encoder: nn.Module, spec: Mapping | None) -> dict:
    """Freeze the encoder / inject LoRA adapters into it, in place, before the policy builds its optimizers.
    Returns the checked spec."""
    spec = check_finetune(spec)
    if spec["mode"] == "all":
        return spec
    encoder.requires_grad_(False)
    if spec["mode"] == "lora":
        try:  # imported on use: peft takes seconds to import
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as err:
            raise ValueError(
                "finetune mode 'lora' needs peft: pip install 'perceiver-rl[finetune]' (or pip install peft)"
            ) from err

        config = LoraConfig(
            r=spec["lora_rank"],
            lora_alpha=spec["lora_alpha"],
            lora_dropout=0.0,
            target_modules=lora_target_names(encoder, spec["lora_targets"]),
        )
        inject_adapter_in_model(config, encoder)  # adapters trainable, everything else in `encoder` frozen
    for name, parameter in encoder.named_parameters():
        if name.startswith(TASK_SPECIFIC):
            parameter.requires_grad_(True)
    return spec


def lora_parameter_names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters() if "lora_" in name]


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base Linear and put the plain Linear back (in place); returns module."""
    from peft.tuners.lora import LoraLayer

    for name, sub in list(module.named_modules()):
        if isinstance(sub, LoraLayer):
            sub.merge()
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(parent, name.rpartition(".")[2], sub.get_base_layer())
    return module


# Task-embedding tensors and the axis that indexes the task: the encoder's task token (a Linear of the one-hot
# index, (D, n_tasks)) and the actor's task query (an Embedding, (n_tasks, D)); the encoder's task stems,
# (n_tasks, W, D) each, are matched by name below.
TASK_EMBEDDINGS = {"adapters.task.content.weight": 1, "task_query.weight": 0}


def _extend_task_embedding(
    key: str, target: torch.Tensor | None, source: torch.Tensor
) -> torch.Tensor | None:
    """The target's task embedding with the source's tasks copied in, when the target indexes more tasks (a
    generalist fine-tuned to a task it was not trained on: that task's row stays freshly initialised)."""
    axis = next((a for suffix, a in TASK_EMBEDDINGS.items() if key.endswith(suffix)), None)
    if ".task_stems.weights." in f".{key}":  # (n_tasks, W, D): a new task's stem starts at zero (shared map)
        axis = 0
    if axis is None or target is None or target.shape == source.shape or target.dim() != source.dim():
        return None
    other = [d for d in range(target.dim()) if d != axis]
    if any(target.shape[d] != source.shape[d] for d in other) or target.shape[axis] < source.shape[axis]:
        return None
    out = target.clone()
    out.narrow(axis, 0, source.shape[axis]).copy_(source)
    return out


def load_source_weights(policy: nn.Module, source: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy a source policy's state dict into `policy` wherever names and shapes agree.

    LoRA-wrapped layers read the source's plain weights (`x.weight` -> `x.base_layer.weight`); tensors whose
    shape differs (an action head for another action space, an adapter for another sensor layout) keep their
    fresh initialisation. Returns {'loaded': [...], 'reinitialised': [...], 'unused': [...]} (target names)."""
    target = policy.state_dict()
    renamed = {}
    for key, value in source.items():
        if key not in target:
            stem, _, field = key.rpartition(".")
            key = f"{stem}.base_layer.{field}" if f"{stem}.base_layer.{field}" in target else key
        renamed[key] = value
    loaded = {k: v for k, v in renamed.items() if k in target and target[k].shape == v.shape}
    # A multi-task policy's task embeddings, given one more task: the known tasks' rows are copied.
    for key, value in renamed.items():
        extended = _extend_task_embedding(key, target.get(key), value)
        if extended is not None:
            loaded[key] = extended
    policy.load_state_dict(loaded, strict=False)
    fresh = [k for k in target if k not in loaded and "lora_" not in k]
    return {
        "loaded": sorted(loaded),
        "reinitialised": sorted(fresh),
        "unused": sorted(k for k in renamed if k not in loaded),
    }
