"""Adversarial parts shared by DMD2 (Yin et al., arXiv 2405.14867) and phased consistency (PCM, arXiv 2405.18407).

A small classifier head on a diffusion transformer's last-block token features tells real samples from a student's,
with the logistic (non-saturating) GAN losses. DMD2 puts it on its trained critic; PCM on the frozen teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


# -- pure losses -------------------------------------------------------------------------------------------------------
def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN loss of the generator: ``mean(softplus(-D(fake)))``."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Logistic GAN loss of the classifier: ``mean(softplus(-D(real))) + mean(softplus(D(fake)))``."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def feature_width(denoiser: nn.Module) -> int:
    """Width of a diffusers transformer's block features, ``num_attention_heads * attention_head_dim``."""
    config = getattr(denoiser, "config", {})
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    if heads is None or head_dim is None:
        raise ValueError("cannot read the feature width from the denoiser config (num_attention_heads x "
                         "attention_head_dim); give the width explicitly")
    return int(heads) * int(head_dim)


# -- the head ----------------------------------------------------------------------------------------------------------
class GANHead(nn.Module):
    """A classifier on token features (DMD2: the critic's, PCM: the teacher's): per-token MLP logits, averaged.

    Args:
        dim: width of the features (the transformer's hidden size).
        hidden: width of the MLP.
    """

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        """``[B, N, D]`` token features -> ``[B]`` logits."""
        if features.ndim != 3:
            raise ValueError(f"GAN features must be [B, tokens, dim], got shape {tuple(features.shape)}")
        return self.net(features.float()).squeeze(-1).mean(1)


class LastBlockFeatures:
    """Reads a transformer's last block output (``[B, tokens, dim]``) during the forward passes it is asked to.

    Args:
        model: the transformer to tap.
        block_classes: its block classes (the backbone's ``block_classes``).
        role: what the model is, for the error message.
    """

    def __init__(self, model: nn.Module, block_classes: tuple[type, ...], role: str = "model") -> None:
        blocks = [m for m in model.modules() if isinstance(m, block_classes)]
        if not blocks:
            raise ValueError(f"no transformer block of {block_classes} in the {role} to read features from")
        self._capture, self._features = False, None
        blocks[-1].register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output) -> None:
        if self._capture:
            self._features = output[0] if isinstance(output, (tuple, list)) else output

    def read(self, forward: Callable[[], Any]) -> tuple[Any, Tensor]:
        """Run ``forward()`` and return its result with the last block's output during it."""
        self._capture, self._features = True, None
        try:
            result = forward()
        finally:
            self._capture = False
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("the feature hook did not fire during the forward pass")
        return result, features
