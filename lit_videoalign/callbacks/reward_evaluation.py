"""``RewardEvaluation``: score the fixed-seed samples of every round with zoo rewards, plus held-out gold rewards.

The *evaluation* rewards are usually the training signal (or its parts), scored on deterministic samples of fixed
prompts so their curve is comparable across steps; the samples are the logger's, drawn with the pipeline's own
diffusers scheduler unless it was given ``sampler="euler"``, so the curve measures the model as deployed. The
*gold* rewards are rewards training never optimises; when the training reward climbs and the gold ones fall, the
policy is exploiting its reward (see
:class:`~lit_videoalign.callbacks.reward_hacking_monitor.RewardHackingMonitor`). A gold reward that is also part of
the module's training reward is refused.
"""

from __future__ import annotations

import json
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_videoalign.callbacks.video_sample_logger import VideoSampleLogger, VideoSamples, log_scalars
from lit_videoalign.evaluation import DEFAULT_EVAL_REWARDS, DEFAULT_GOLD_REWARDS, build_rewards, score_videos
from reward_zoo.base import RewardModel


def _signature(reward: Any) -> tuple[str, str]:
    cls = type(reward)
    return f"{cls.__module__}.{cls.__qualname__}", json.dumps(reward.config, sort_keys=True)


def training_reward_parts(pl_module: L.LightningModule) -> list[Any]:
    """The module's training reward (``pl_module.reward``) and, for a composite, each of its sub-rewards."""
    reward = getattr(pl_module, "reward", None)
    if reward is None:
        return []
    parts = [reward]
    sub = getattr(reward, "rewards", None)
    if isinstance(sub, torch.nn.ModuleDict):
        parts += list(sub.values())
    return parts


class RewardEvaluation(L.Callback):
    """Score every :class:`VideoSampleLogger` round with evaluation and gold rewards and log each dimension.

    Logged scalars (means over the round's videos, at the round's step): ``{prefix}/{reward}/{dimension}`` for the
    evaluation rewards and ``{gold_prefix}/{reward}/{dimension}`` for the gold ones (``overall`` included). Per-video
    scores go to ``scores.json`` in the round's sample folder. The rewards are kept outside the LightningModule, so
    no optimizer ever sees them; they are moved to the module's device when fitting starts.

    Args:
        rewards: evaluation rewards: a list of registered names, ``hf-hub:org/repo`` ids or folders (shipped weights
            are loaded when they exist), or a dict ``name -> RewardModel``; default ``newton``, ``quality``,
            ``dynamic_degree`` (the toy world's usual training signals).
        gold_rewards: held-out rewards in the same forms; default ``physics_learned``, ``subject_consistency``,
            ``flicker``. None of them may be part of the module's training reward.
        prefix: metric prefix of the evaluation rewards.
        gold_prefix: metric prefix of the gold rewards.
        batch_size: videos scored at once.
    """

    video_samples_order = 0  # before consumers of its metrics (the hacking monitor)

    def __init__(
        self,
        rewards: dict[str, RewardModel] | list[str] | None = None,
        gold_rewards: dict[str, RewardModel] | list[str] | None = None,
        prefix: str = "eval",
        gold_prefix: str = "gold",
        batch_size: int = 16,
    ) -> None:
        if not prefix or not gold_prefix or prefix == gold_prefix:
            raise ValueError(f"prefix and gold_prefix must be different non-empty strings, got {prefix!r} and "
                             f"{gold_prefix!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.rewards = build_rewards(rewards, DEFAULT_EVAL_REWARDS)
        self.gold_rewards = build_rewards(gold_rewards, DEFAULT_GOLD_REWARDS)
        if not self.rewards and not self.gold_rewards:
            raise ValueError("RewardEvaluation needs at least one reward or gold reward")
        self.prefix, self.gold_prefix, self.batch_size = prefix, gold_prefix, batch_size
        self.history: list[dict[str, float]] = []  # one entry per round: {"step": ..., metric: value}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, gold_prefix=self.gold_prefix)

    @property
    def gold_metric_names(self) -> list[str]:
        """The ``overall`` metric of every gold reward (what the hacking monitor watches by default)."""
        return [f"{self.gold_prefix}/{name}/overall" for name in self.gold_rewards]

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not any(isinstance(cb, VideoSampleLogger) for cb in trainer.callbacks):
            raise ValueError("RewardEvaluation scores the rounds of a VideoSampleLogger; add "
                             "lit_videoalign.callbacks.video_sample_logger.VideoSampleLogger to trainer.callbacks")
        trained = {_signature(r) for r in training_reward_parts(pl_module)}
        for name, reward in self.gold_rewards.items():
            if _signature(reward) in trained or any(reward is r for r in training_reward_parts(pl_module)):
                raise ValueError(f"gold reward {name!r} is part of the module's training reward; gold rewards must be "
                                 "held out (pass gold_rewards that training does not optimise)")
        for reward in (*self.rewards.values(), *self.gold_rewards.values()):
            reward.to(pl_module.device)

    def score(self, samples: VideoSamples, fps: float | None = None) -> dict[str, float]:
        """Mean scores of a round, keyed by metric name; per-video rows are returned in ``self.last_rows``. ``fps`` is
        the generator's frame rate, for rewards that sample frames by time."""
        metrics: dict[str, float] = {}
        rows: list[dict[str, float]] = [{} for _ in samples.prompts]
        self.last_rationales: list[dict[str, list[str]]] = [{} for _ in samples.prompts]  # judges' reasoning
        for prefix, rewards in ((self.prefix, self.rewards), (self.gold_prefix, self.gold_rewards)):
            if not rewards:
                continue
            scored = score_videos(rewards, samples.videos, samples.prompts, batch_size=self.batch_size, fps=fps,
                                  rationales=self.last_rationales)
            for row, scores in zip(rows, scored):
                row.update({f"{prefix}/{k}": v for k, v in scores.items()})
        for key in rows[0]:
            metrics[key] = sum(r[key] for r in rows) / len(rows)
        self.last_rows = rows
        return metrics

    def on_video_samples(self, trainer: L.Trainer, pl_module: L.LightningModule, samples: VideoSamples) -> None:
        """Called by :class:`VideoSampleLogger` after each round: score, log, record."""
        metrics = self.score(samples, fps=pl_module.backbone.fps)  # the generator's frame rate
        samples.metrics.update(metrics)
        log_scalars(trainer, metrics, samples.step)
        self.history.append({"step": samples.step, **metrics})
        if trainer.is_global_zero and samples.files:
            per_video = [{"prompt": p, "seed": s, **row, **({"rationales": why} if why else {})}
                         for p, s, row, why in zip(samples.prompts, samples.seeds, self.last_rows,
                                                   self.last_rationales)]
            (samples.files[0].parent / "scores.json").write_text(json.dumps(per_video, indent=2) + "\n")
        shown = {k: round(v, 4) for k, v in metrics.items() if k.endswith("/overall")}
        rank_zero_info(f"RewardEvaluation at step {samples.step}: {shown}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict["history"]]
