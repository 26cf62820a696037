"""The baselines a Perceiver run is compared with, built from SB3 / sb3-contrib parts.

- ``sb3``: SB3's own algorithm with ``MultiInputPolicy`` (CombinedExtractor: NatureCNN for images, flatten for
  vectors and histories, then an MLP), the frame-stacking baseline SB3's maintainers advise for partial
  observability;
- ``lstm``: sb3-contrib's ``RecurrentPPO`` with ``MultiInputLstmPolicy``, the recurrent policy of the
  POMDP literature, on the same Dict observations.

Both read the observation keys only: the privileged ``state`` (for losses and probes) is never an input.
"""

from __future__ import annotations

from gymnasium import spaces
from stable_baselines3.common.torch_layers import CombinedExtractor

from perceiver_policy.modalities import STATE_KEY


class ObservationExtractor(CombinedExtractor):
    """SB3's `CombinedExtractor` over the observation keys, the privileged `state` excluded (its forward reads
    only the keys it built an extractor for)."""

    def __init__(
        self, observation_space: spaces.Dict, cnn_output_dim: int = 256, normalized_image: bool = False
    ):
        kept = {k: v for k, v in observation_space.spaces.items() if k != STATE_KEY}
        super().__init__(spaces.Dict(kept), cnn_output_dim=cnn_output_dim, normalized_image=normalized_image)
