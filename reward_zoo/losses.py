"""Pairwise preference losses for training reward models: Bradley-Terry and its Rao-Kupper extension with ties.

Bradley-Terry: P(a > b) = sigmoid(r_a - r_b). Rao-Kupper (1967) adds a tie threshold ``log k`` (``k > 1``):
P(a > b) = sigmoid(d - log k), P(b > a) = sigmoid(-d - log k), P(tie) = the rest, with d = r_a - r_b. The tie
probability simplifies to (k^2 - 1) * sigmoid(d - log k) * sigmoid(-d - log k), which is what the tied term uses.
Used for video preference data with ties by VideoAlign / VideoReward (arXiv 2501.13918).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair(r_a: Tensor, r_b: Tensor, names: tuple[str, str]) -> None:
    if r_a.shape != r_b.shape or r_a.ndim != 1:
        raise ValueError(f"{names[0]} and {names[1]} must be 1-D tensors of the same shape [N], got "
                         f"{tuple(r_a.shape)} and {tuple(r_b.shape)}")


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Mean negative log-likelihood that each chosen video beats its rejected one: mean(-logsigmoid(r_c - r_r)).

    Args:
        r_chosen: rewards of the preferred videos, ``[N]``.
        r_rejected: rewards of the other videos, ``[N]``.
    """
    _check_pair(r_chosen, r_rejected, ("r_chosen", "r_rejected"))
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def bradley_terry_ties_loss(r_a: Tensor, r_b: Tensor, tie: Tensor, k: float = 5.0) -> Tensor:
    """Rao-Kupper negative log-likelihood for pairs where ``a`` is preferred or the pair is tied.

    With ``d = r_a - r_b``: untied pairs cost ``-logsigmoid(d - log k)``; tied pairs cost
    ``-logsigmoid(d - log k) - logsigmoid(-d - log k) - log(k**2 - 1)``. Mean over pairs.

    Args:
        r_a: rewards of the first video of each pair (the preferred one when not tied), ``[N]``.
        r_b: rewards of the second video, ``[N]``.
        tie: bool ``[N]``, True where annotators rated the pair equal.
        k: tie strength, ``> 1``; larger ``k`` makes ties likelier at equal rewards.
    """
    _check_pair(r_a, r_b, ("r_a", "r_b"))
    if not isinstance(tie, Tensor) or tie.dtype != torch.bool or tie.shape != r_a.shape:
        raise ValueError(f"tie must be a bool tensor of shape {tuple(r_a.shape)}, got "
                         f"{getattr(tie, 'dtype', type(tie).__name__)} {tuple(getattr(tie, 'shape', ()))}")
    if not k > 1.0:
        raise ValueError(f"k must be greater than 1 (the tie threshold is log k > 0), got {k}")
    d = r_a - r_b
    log_k = math.log(k)
    win = -F.logsigmoid(d - log_k)
    tied = win - F.logsigmoid(-d - log_k) - math.log(k**2 - 1)
    return torch.where(tie, tied, win).mean()
