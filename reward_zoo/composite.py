"""``CompositeReward``: a weighted sum of several rewards, itself a ``RewardModel``.

Rewards live on different scales (a physics score in (0, 1], a learned logit, a motion magnitude), so each
sub-reward's ``"overall"`` can be normalised within the batch before weighting: ``"zscore"`` (mean 0, std 1) or
``"rank"`` (in [0, 1]). Pairing a consistency reward with a dynamics reward here is what keeps a policy from
"winning" by generating frozen videos.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lit_videoalign.errors import shorten
from reward_zoo.base import RewardModel
from reward_zoo.registry import reward_class

NORMALIZATIONS = ("none", "zscore", "rank")


def reward_spec(reward: RewardModel) -> dict[str, Any]:
    """The JSON form of a reward, in jsonargparse's ``class_path`` / ``init_args`` layout."""
    cls = type(reward)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": reward.config}


def reward_from_spec(spec: dict[str, Any]) -> RewardModel:
    """Build a reward from ``{"class_path": ..., "init_args": {...}}`` (the class must already be imported)."""
    if not isinstance(spec, dict) or "class_path" not in spec or not set(spec) <= {"class_path", "init_args"}:
        raise ValueError(f"a reward spec must be {{'class_path': ..., 'init_args': {{...}}}}, got {shorten(spec)}")
    return reward_class(spec["class_path"])(**spec.get("init_args", {}))


def zscore(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``(x - mean) / (std + eps)`` over the batch (population std; a batch of one gives 0)."""
    return (x - x.mean()) / (x.std(unbiased=False) + eps)


def batch_rank(x: Tensor) -> Tensor:
    """Rank of each element within the batch scaled to [0, 1]; ties share their average rank; one element -> 0.5."""
    n = x.shape[0]
    if n == 1:
        return torch.full_like(x, 0.5)
    below = (x[None, :] < x[:, None]).sum(1)  # (b,) elements strictly smaller
    ties = (x[None, :] == x[:, None]).sum(1) - 1  # (b,) other elements equal
    return (below + 0.5 * ties).to(x.dtype) / (n - 1)


class CompositeReward(RewardModel):
    """Weighted sum of sub-rewards' normalised ``"overall"`` scores.

    The output holds every sub-reward score as ``"{name}/{dimension}"`` (its ``"overall"`` included) plus
    ``"overall"`` = sum over names of ``weights[name] * normalize(scores[name][score_keys[name]])`` (``score_keys``
    default ``"overall"``).

    Args:
        rewards: name -> reward, or name -> ``{"class_path": ..., "init_args": {...}}`` (the form stored in
            ``config.json`` and written in YAML). Names must not contain ``"."`` or ``"/"``.
        weights: name -> weight; exactly the keys of ``rewards``.
        normalize: ``"none"``, ``"zscore"`` (within the batch) or ``"rank"`` (within the batch, in [0, 1];
            not differentiable).
        score_keys: name -> the dimension of that reward that enters the sum (default ``"overall"``), e.g.
            ``{"quality": "visual"}`` to reward one head of a multi-head reward alone.
    """

    license = "apache-2.0"
    family = "composite"

    def __init__(self, rewards: dict[str, RewardModel | dict], weights: dict[str, float],
                 normalize: str = "none", score_keys: dict[str, str] | None = None) -> None:
        super().__init__()
        if not rewards:
            raise ValueError("CompositeReward needs at least one reward, got an empty dict")
        bad_names = [n for n in rewards if not isinstance(n, str) or not n or "." in n or "/" in n]
        if bad_names:
            raise ValueError(f"reward names must be non-empty strings without '.' or '/', got {bad_names}")
        if set(weights) != set(rewards):
            raise ValueError(f"weights keys {sorted(weights)} must equal rewards keys {sorted(rewards)}")
        bad_weights = {n: w for n, w in weights.items()
                       if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w)}
        if bad_weights:
            raise ValueError(f"weights must be finite numbers, got {bad_weights}")
        if not any(weights.values()):
            raise ValueError(f"weights are all zero ({weights}), so the composite would score every video 0; give at "
                             "least one reward a non-zero weight")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.rewards = nn.ModuleDict({n: r if isinstance(r, RewardModel) else reward_from_spec(r)
                                      for n, r in rewards.items()})
        self.weights = {n: float(w) for n, w in weights.items()}
        self.normalize = normalize
        score_keys = dict(score_keys or {})
        unknown = sorted(set(score_keys) - set(rewards))
        if unknown:
            raise ValueError(f"score_keys names rewards {unknown} that are not in rewards {sorted(rewards)}")
        for n, key in score_keys.items():
            valid = (*self.rewards[n].dimensions, "overall")
            if key not in valid:
                raise ValueError(f"score_keys[{n!r}] is {key!r}, but reward {n!r} scores only {list(valid)}")
        self.score_keys = {n: score_keys.get(n, "overall") for n in rewards}

    @classmethod
    def _encode_init_arg(cls, name: str, value: Any) -> Any:
        """Sub-rewards go to ``config.json`` as ``class_path`` / ``init_args`` specs."""
        if name == "rewards" and isinstance(value, dict):
            return {n: reward_spec(r) if isinstance(r, RewardModel) else r for n, r in value.items()}
        return value

    @property
    def dimensions(self) -> tuple[str, ...]:
        return tuple(f"{n}/{d}" for n, r in self.rewards.items() for d in (*r.dimensions, "overall"))

    @property
    def differentiable(self) -> bool:
        return self.normalize != "rank" and all(r.differentiable for r in self.rewards.values())

    @property
    def requires_prompts(self) -> bool:
        return any(r.requires_prompts for r in self.rewards.values())

    @property
    def requires_references(self) -> bool:
        return any(r.requires_references for r in self.rewards.values())

    @property
    def min_frames(self) -> int:
        return max(r.min_frames for r in self.rewards.values())

    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        overall = torch.zeros(videos.shape[0], device=videos.device)
        for name, reward in self.rewards.items():
            scores = reward(videos, prompts, references, fps)  # each sub-reward checks its inputs and scores
            out.update({f"{name}/{dim}": value for dim, value in scores.items()})
            score = scores[self.score_keys[name]].float()
            if self.normalize == "zscore":
                score = zscore(score)
            elif self.normalize == "rank":
                score = batch_rank(score)
            overall = overall + self.weights[name] * score
        out["overall"] = overall
        return out


def default_toyworld_composite() -> CompositeReward:
    """The default toy-world composite: physics (``newton``), learned quality and motion, z-scored within the batch.

    ``dynamic_degree`` is in it because physics and consistency scores alone can be maximised by a frozen or empty
    video; with it, a frozen copy of a video never beats the original.
    """
    from reward_zoo.registry import create_reward

    return CompositeReward(
        {"newton": create_reward("newton"), "quality": create_reward("quality", pretrained=True),
         "motion": create_reward("dynamic_degree")},
        {"newton": 1.0, "quality": 1.0, "motion": 0.5},
        normalize="zscore",
    ).eval()
