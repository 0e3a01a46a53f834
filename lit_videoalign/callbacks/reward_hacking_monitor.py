"""``RewardHackingMonitor``: catch a policy that exploits its reward (Goodhart's law; Skalse et al., arXiv 2209.13085).

Two symptoms are watched at every :class:`~lit_videoalign.callbacks.video_sample_logger.VideoSampleLogger` round:

- **divergence**: over the last ``window`` rounds the training reward rose while a held-out gold reward (one training
  never optimises, logged by :class:`~lit_videoalign.callbacks.reward_evaluation.RewardEvaluation`) fell. The change
  of a metric across the window is its least-squares slope against the round index times ``window - 1``, which is
  less jumpy than first-versus-last.
- **diversity collapse**: the mean pairwise feature distance of the round's videos (fixed prompts and seeds) fell
  below ``diversity_threshold`` times its value at the first round: different seeds now give the same video.

On an alarm it warns, and with ``action="stop"`` ends training (``trainer.should_stop``), or with
``action="restore"`` first puts back the trainable weights of the round with the best mean gold reward.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lit_videoalign.callbacks.video_sample_logger import VideoSamples, log_scalars

ACTIONS = ("warn", "stop", "restore")


# -- pure functions -------------------------------------------------------------------------------------------------
def window_change(values: Sequence[float]) -> float:
    """Change across a window: the least-squares slope of ``values`` against ``0 .. n-1``, times ``n - 1``."""
    n = len(values)
    if n < 2:
        raise ValueError(f"window_change needs at least 2 values, got {n}")
    x = torch.arange(n, dtype=torch.float64)
    y = torch.as_tensor(values, dtype=torch.float64)
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum() * (n - 1))


def detect_divergence(train: Sequence[float], gold: Mapping[str, Sequence[float]], window: int,
                      train_tolerance: float = 0.0, gold_tolerance: float = 0.0) -> list[str]:
    """Gold metrics that fell (by more than ``gold_tolerance``) over the last ``window`` values while the training
    reward rose (by more than ``train_tolerance``); empty when healthy or when fewer than ``window`` values exist."""
    if window < 2:
        raise ValueError(f"window must be at least 2, got {window}")
    if len(train) < window or window_change(train[-window:]) <= train_tolerance:
        return []
    return [name for name, values in gold.items()
            if len(values) >= window and window_change(values[-window:]) < -gold_tolerance]


def video_features(videos: Tensor, size: int = 8) -> Tensor:
    """Cheap appearance-and-motion features: every frame average-pooled to ``size`` x ``size``, flattened.

    ``[B, T, C, H, W]`` -> ``[B, T * C * size * size]``.
    """
    if videos.ndim != 5:
        raise ValueError(f"videos must have shape [B, T, C, H, W], got shape {tuple(videos.shape)}")
    b, t = videos.shape[:2]
    return F.adaptive_avg_pool2d(videos.flatten(0, 1).float(), size).reshape(b, -1)  # (b, t * c * s * s)


def mean_pairwise_distance(features: Tensor) -> Tensor:
    """Mean over pairs ``i < j`` of the RMS difference ``||f_i - f_j|| / sqrt(D)`` of features ``[N, D]``."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape [N, D] with N >= 2, got shape {tuple(features.shape)}")
    n, d = features.shape
    dist = torch.cdist(features.double()[None], features.double()[None])[0] / math.sqrt(d)  # (n, n)
    return dist.triu(diagonal=1).sum() / (n * (n - 1) / 2)


# -- the callback ---------------------------------------------------------------------------------------------------
class RewardHackingMonitor(L.Callback):
    """Warn (and optionally stop or roll back) when the training reward and the held-out gold rewards diverge, or
    when the diversity of the fixed-seed samples collapses.

    Needs a :class:`VideoSampleLogger` (it checks at each of its rounds). The training reward is read from
    ``trainer.callback_metrics`` after every training step and averaged between rounds (or taken from the round's
    own metrics when a :class:`RewardEvaluation` computes it there, e.g. ``"eval/newton/overall"``). Gold metrics come
    from the round's metrics. The full history is in :meth:`state_dict`, so a resumed run keeps its window and its
    initial diversity.

    Note that GRPO's ``train/reward/overall`` of a z-scored ``CompositeReward`` is 0 by construction; watch a
    sub-reward (``train/reward/newton/overall``) or an evaluation metric instead.

    Args:
        train_metric: the training reward metric.
        gold_metrics: gold metric names; default the ``overall`` of every gold reward of the ``RewardEvaluation``
            callbacks.
        window: rounds over which changes are measured.
        train_tolerance: the training reward must rise by more than this across the window.
        gold_tolerance: a gold metric must fall by more than this across the window.
        diversity_threshold: alarm when diversity < this fraction of the first round's; None disables the check.
        diversity_feature_size: side of the pooled frames the diversity features are made of.
        action: ``"warn"``, ``"stop"`` (end training) or ``"restore"`` (put back the weights of the round with the
            best mean gold reward, then end training).
    """

    video_samples_order = 10  # after RewardEvaluation has put the gold metrics into the round

    def __init__(
        self,
        train_metric: str = "train/reward/overall",
        gold_metrics: list[str] | None = None,
        window: int = 4,
        train_tolerance: float = 0.0,
        gold_tolerance: float = 0.0,
        diversity_threshold: float | None = 0.5,
        diversity_feature_size: int = 8,
        action: str = "warn",
    ) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2, got {window}")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if diversity_threshold is not None and not 0 < diversity_threshold < 1:
            raise ValueError(f"diversity_threshold must be in (0, 1) or None, got {diversity_threshold}")
        if train_tolerance < 0 or gold_tolerance < 0:
            raise ValueError(f"tolerances must be >= 0, got {train_tolerance} and {gold_tolerance}")
        self.train_metric, self.gold_metrics = train_metric, None if gold_metrics is None else list(gold_metrics)
        self.window, self.train_tolerance, self.gold_tolerance = window, train_tolerance, gold_tolerance
        self.diversity_threshold, self.diversity_feature_size = diversity_threshold, diversity_feature_size
        self.action = action
        self.history: list[dict[str, Any]] = []  # per round: step, train, gold, diversity, alarms
        self.initial_diversity: float | None = None
        self.best: dict[str, Any] | None = None  # {"step", "score", "weights"} (weights only for action="restore")
        self.stopped_at: int | None = None  # the step this monitor last ended a run at
        self._stopping = False  # set once it ends this run, so the final round does not fire again
        self._train_sum, self._train_count, self._accumulated_step = 0.0, 0, -1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(train_metric=self.train_metric, window=self.window)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lit_videoalign.callbacks.reward_evaluation import RewardEvaluation
        from lit_videoalign.callbacks.video_sample_logger import VideoSampleLogger

        if not any(isinstance(cb, VideoSampleLogger) for cb in trainer.callbacks):
            raise ValueError("RewardHackingMonitor checks the rounds of a VideoSampleLogger; add "
                             "lit_videoalign.callbacks.video_sample_logger.VideoSampleLogger to trainer.callbacks")
        if self.gold_metrics is None:
            self.gold_metrics = [m for cb in trainer.callbacks if isinstance(cb, RewardEvaluation)
                                 for m in cb.gold_metric_names]
            if not self.gold_metrics and self.diversity_threshold is None:
                raise ValueError("RewardHackingMonitor has nothing to watch: no gold metrics (add a RewardEvaluation "
                                 "with gold_rewards, or pass gold_metrics) and diversity_threshold is None")

    # -- observation --------------------------------------------------------------------------------------------
    def _accumulate(self, trainer: L.Trainer) -> None:
        """Add this step's training reward to the running mean, once per optimizer step."""
        if trainer.global_step == self._accumulated_step:
            return
        value = trainer.callback_metrics.get(self.train_metric)
        if value is not None and math.isfinite(float(value)):
            self._train_sum += float(value)
            self._train_count += 1
            self._accumulated_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._accumulate(trainer)

    def observe(self, step: int, train: float | None, gold: Mapping[str, float],
                diversity: float | None) -> list[str]:
        """Record one round and return its alarms (``"divergence:<gold metric>"``, ``"diversity"``)."""
        if diversity is not None and self.initial_diversity is None:
            self.initial_diversity = diversity
        self.history.append({"step": step, "train": train, "gold": dict(gold), "diversity": diversity, "alarms": []})
        rounds = [h for h in self.history if h["train"] is not None]
        gold_series = {name: [h["gold"][name] for h in rounds if name in h["gold"]] for name in gold}
        alarms = [f"divergence:{name}" for name in detect_divergence(
            [h["train"] for h in rounds], gold_series, self.window, self.train_tolerance, self.gold_tolerance)]
        if (self.diversity_threshold is not None and diversity is not None and self.initial_diversity
                and diversity < self.diversity_threshold * self.initial_diversity):
            alarms.append("diversity")
        self.history[-1]["alarms"] = alarms
        return alarms

    def _message(self, alarms: list[str]) -> str:
        h = self.history[-1]
        parts = []
        for alarm in alarms:
            if alarm == "diversity":
                parts.append(f"sample diversity fell to {h['diversity']:.4g} (< {self.diversity_threshold} x the "
                             f"initial {self.initial_diversity:.4g}): different seeds now give near-identical videos")
            else:
                name = alarm.split(":", 1)[1]
                rounds = [r for r in self.history if r["train"] is not None][-self.window:]
                train = window_change([r["train"] for r in rounds])
                gold = window_change([r["gold"][name] for r in rounds if name in r["gold"]])
                parts.append(f"{self.train_metric} rose by {train:+.4g} while held-out {name} changed by {gold:+.4g} "
                             f"over the last {self.window} rounds")
        what = {"warn": "Look at the samples; consider a KL penalty, a lower learning rate or an earlier checkpoint.",
                "stop": "Stopping training.",
                "restore": "Restoring the weights of the best gold round and stopping."}[self.action]
        return f"RewardHackingMonitor at step {h['step']}: possible reward hacking: {'; '.join(parts)}. {what}"

    def on_video_samples(self, trainer: L.Trainer, pl_module: L.LightningModule, samples: VideoSamples) -> None:
        """Called by :class:`VideoSampleLogger` after each round (after ``RewardEvaluation``)."""
        if self._stopping:
            return
        if samples.step > 0:  # the callback order must not matter: count this step's reward if not yet done
            self._accumulate(trainer)
        if self.train_metric in samples.metrics:
            train = samples.metrics[self.train_metric]
        elif self._train_count:
            train = self._train_sum / self._train_count
        else:
            train = None
        self._train_sum, self._train_count = 0.0, 0
        gold = {}
        for name in self.gold_metrics or []:
            value = samples.metrics.get(name, trainer.callback_metrics.get(name))
            if value is not None:
                gold[name] = float(value)
        diversity = None
        if self.diversity_threshold is not None and len(samples.videos) >= 2:
            features = video_features(samples.videos, self.diversity_feature_size)
            diversity = float(mean_pairwise_distance(features))
        alarms = self.observe(samples.step, train, gold, diversity)
        if self.action == "restore" and not alarms and gold:
            score = sum(gold.values()) / len(gold)
            if self.best is None or score > self.best["score"]:
                weights = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
                self.best = {"step": samples.step, "score": score, "weights": weights}
        metrics = {"monitor/alarm": float(bool(alarms))}
        if diversity is not None:
            metrics["monitor/diversity"] = diversity
            if self.initial_diversity:
                metrics["monitor/diversity_ratio"] = diversity / self.initial_diversity
        samples.metrics.update(metrics)
        log_scalars(trainer, metrics, samples.step)
        stop = bool(alarms) and self.action in ("stop", "restore")
        if alarms:
            rank_zero_warn(self._message(alarms))
        stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            if self.action == "restore":
                self.restore_best(pl_module)
            self.stopped_at, self._stopping = samples.step, True
            trainer.should_stop = True

    def restore_best(self, pl_module: L.LightningModule) -> None:
        """Copy the best round's trainable weights back into ``pl_module`` (no-op, with a warning, if none)."""
        if self.best is None:
            rank_zero_warn("RewardHackingMonitor: no round without alarms had gold metrics; weights left as they are")
            return
        params = dict(pl_module.named_parameters())
        with torch.no_grad():
            for name, value in self.best["weights"].items():
                params[name].copy_(value.to(params[name].device))
        self.history[-1]["restored_step"] = self.best["step"]

    # -- state --------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "initial_diversity": self.initial_diversity,
                "best": self.best, "stopped_at": self.stopped_at, "train_sum": self._train_sum,
                "train_count": self._train_count, "accumulated_step": self._accumulated_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict["history"]]
        self.initial_diversity = state_dict["initial_diversity"]
        self.best = state_dict["best"]
        self.stopped_at = state_dict["stopped_at"]
        self._train_sum, self._train_count = state_dict["train_sum"], state_dict["train_count"]
        self._accumulated_step = state_dict["accumulated_step"]
