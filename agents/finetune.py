"""Starting an algorithm from another run's policy (transfer); what trains is the policy's `finetune` argument."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from perceiver_policy.finetuning import load_source_weights


def transfer_weights(model, source_state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy a source policy's weights into `model.policy` where names and shapes agree (see
    `perceiver_policy.finetuning.load_source_weights`). SAC's target critic is then set to the loaded critic,
    not the source's lagging target, so the first TD targets come from the weights being fine-tuned."""
    report = load_source_weights(model.policy, source_state)
    policy = model.policy
    if hasattr(policy, "critic_target") and hasattr(policy, "critic"):
        policy.critic_target.load_state_dict(policy.critic.state_dict())
    return report
