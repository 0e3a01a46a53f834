"""The reward-model zoo: physics, temporal, identity, quality, text-alignment and aesthetic rewards for videos.

Every reward is a ``RewardModel``: ``reward(videos [B, T, C, H, W] in [0, 1], prompts, references)`` returns
``{dimension: Tensor[B]}`` with an ``"overall"`` entry. Build one by name with ``create_reward("newton")``, list
them with ``list_rewards("physics")``, combine them with ``CompositeReward``. See ``DESIGN.md`` section 4.4.
"""

from reward_zoo.base import RewardModel, load_weights
from reward_zoo.composite import CompositeReward
from reward_zoo.losses import bradley_terry_loss, bradley_terry_ties_loss
from reward_zoo.registry import (
    create_reward,
    get_reward_class,
    is_reward,
    list_rewards,
    load_reward,
    register_reward,
    reward_info,
)

__all__ = [
    "CompositeReward",
    "RewardModel",
    "bradley_terry_loss",
    "bradley_terry_ties_loss",
    "create_reward",
    "get_reward_class",
    "is_reward",
    "list_rewards",
    "load_reward",
    "load_weights",
    "register_reward",
    "reward_info",
]
