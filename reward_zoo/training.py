"""Reward-model training from preference pairs with per-dimension labels and ties, as in VideoReward (arXiv 2501.13918).

``RewardTraining`` trains any learned ``RewardModel`` on batches of pairs ``{"video_a", "video_b", "prompt",
"labels": {dim: +1 / -1 / 0}}`` (the config names the data module by class path, e.g. the suite's
``lit_videoalign.data.toyworld_pairs.ToyWorldPairsDataModule``; the zoo imports no data code): each trained reward
dimension is read from one label dimension and fitted with Bradley-Terry (ties skipped) or Bradley-Terry-with-ties
(Rao-Kupper; ties are data). Evaluation follows VideoReward's protocol:

- **accuracy without ties** (``acc``): over pairs with a strict preference, how often ``sign(r_a - r_b)`` matches;
- **accuracy with ties** (``acc_ties``): three-way accuracy over all pairs, predicting a tie when
  ``|r_a - r_b| < threshold``. The threshold is chosen by *tie calibration* (Deutsch et al. 2023, arXiv 2305.14324,
  as VideoReward does): the value maximising the three-way accuracy on the validation pairs. Test pairs are scored
  with the validation threshold, so test figures stay held out. With the ties loss, accuracy at the model's own
  Rao-Kupper boundary ``|d| = log k`` (``acc_ties_rk``) is logged too.

``ExportReward`` writes the trained reward in the Hub layout (``config.json``, ``model.safetensors``, ``README.md``)
with a model card holding the measured validation and test accuracies.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch
from huggingface_hub import ModelCard
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from lit_videoalign.video_io import make_shareable
from reward_zoo.base import RewardModel, load_weights
from reward_zoo.losses import bradley_terry_loss, bradley_terry_ties_loss
from reward_zoo.toyworld import PAIR_DIMENSIONS

LOSSES = ("bt", "bt_ties")


# -- pure metrics -----------------------------------------------------------------------------------------------
def _check_scores(r_a: Tensor, r_b: Tensor, labels: Tensor) -> None:
    if r_a.ndim != 1 or r_a.shape != r_b.shape or labels.shape != r_a.shape:
        raise ValueError(f"r_a, r_b and labels must be 1-D tensors of the same length, got shapes "
                         f"{tuple(r_a.shape)}, {tuple(r_b.shape)} and {tuple(labels.shape)}")
    if not ((labels == 1) | (labels == -1) | (labels == 0)).all():
        raise ValueError(f"labels must be +1 (a better), -1 (b better) or 0 (tie), got values "
                         f"{sorted(set(labels.tolist()))}")


def pairwise_accuracy(r_a: Tensor, r_b: Tensor, labels: Tensor) -> float:
    """Fraction of strictly preferred pairs (``labels != 0``) where ``sign(r_a - r_b) == labels``; NaN if none.

    A score tie (``r_a == r_b``) on a strict pair counts as wrong.
    """
    _check_scores(r_a, r_b, labels)
    strict = labels != 0
    if not strict.any():
        return float("nan")
    return (torch.sign(r_a - r_b)[strict] == labels[strict]).float().mean().item()


def tie_accuracy(r_a: Tensor, r_b: Tensor, labels: Tensor, threshold: float) -> float:
    """Three-way accuracy over all pairs: the prediction is 0 (tie) where ``|r_a - r_b| < threshold``, else the sign."""
    _check_scores(r_a, r_b, labels)
    if not threshold >= 0:
        raise ValueError(f"threshold must be non-negative, got {threshold}")
    if len(labels) == 0:
        return float("nan")
    d = r_a - r_b
    predicted = torch.where(d.abs() < threshold, torch.zeros_like(d), torch.sign(d))
    return (predicted == labels).float().mean().item()


def calibrate_tie_threshold(r_a: Tensor, r_b: Tensor, labels: Tensor) -> tuple[float, float]:
    """Tie calibration: the threshold maximising :func:`tie_accuracy` on these pairs, and that accuracy.

    Candidates are 0 (never predict a tie), the midpoints between consecutive distinct ``|r_a - r_b|`` and one
    above the largest (always predict a tie); the smallest best threshold wins. ``O(n log n)``.
    """
    _check_scores(r_a, r_b, labels)
    n = len(labels)
    if n == 0:
        return 0.0, float("nan")
    d = (r_a - r_b).double()
    gap, order = d.abs().sort()
    is_tie = (labels[order] == 0).double()
    right = (torch.sign(d[order]) == labels[order]).double()  # correct if *not* predicted a tie
    # predicting a tie for the first i pairs (by |d|): ties among them + right calls among the rest
    ties_below = torch.cat([torch.zeros(1, dtype=torch.float64), is_tie.cumsum(0)])
    right_above = torch.cat([right.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
    correct = ties_below + right_above  # (n + 1,)
    valid = torch.ones(n + 1, dtype=torch.bool)  # a threshold can only split between distinct gaps
    valid[1:n] = gap[1:] > gap[:-1]
    correct = torch.where(valid, correct, torch.full_like(correct, -1.0))
    i = int(correct.argmax())
    if i == 0:
        threshold = 0.0
    elif i == n:
        threshold = gap[-1].item() * 1.01 + 1e-12
    else:
        threshold = (gap[i - 1].item() + gap[i].item()) / 2
    return threshold, correct[i].item() / n


# -- the LightningModule ------------------------------------------------------------------------------------------
def _default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


class RewardTraining(L.LightningModule):
    """Train a learned reward from preference pairs labelled per dimension, with or without ties.

    Batches are dicts with ``video_a`` and ``video_b`` (``[B, T, C, H, W]``), ``labels`` (``{label_dim: Tensor[B]}``
    of +1 / -1 / 0), optionally ``prompt`` (list of B strings, given to both videos) and ``reference`` (``[B, C, H,
    W]``). Both videos go through the reward in one batch.

    Args:
        reward: the reward to train (all its parameters with ``requires_grad``).
        loss: ``"bt"`` (Bradley-Terry; tied pairs are skipped) or ``"bt_ties"`` (Rao-Kupper; ties are fitted).
        tie_k: the ties loss's ``k > 1``: ties are predicted for ``|scale * (r_a - r_b)| < log k``.
        dimensions: reward dimension -> label dimension to train it on (``{"mean": "identity"}``); a list means
            the same names on both sides; None trains every reward dimension named like a toy-world label dimension
            (:data:`reward_zoo.toyworld.PAIR_DIMENSIONS`).
        score_scale: scores are multiplied by this before the loss; raise it for bounded rewards (a cosine
            similarity in [-1, 1] cannot reach a confident logit difference otherwise).
        tie_threshold: fixed ``|r_a - r_b|`` (raw scores) below which accuracy-with-ties predicts a tie; None
            calibrates it on the validation pairs (tie calibration, see the module docstring).
        init_weights: start from these weights (strictly loaded): a checkpoint folder, a ``.safetensors`` file, or
            a registered name whose weights ship (``"quality"``), e.g. to validate or fine-tune a shipped reward.
        optimizer: callable ``params -> Optimizer`` (LightningCLI fills it from ``optimizer:`` in the YAML).
        lr_scheduler: optional callable ``optimizer -> LRScheduler``, stepped every training step.
    """

    def __init__(
        self,
        reward: RewardModel,
        loss: str = "bt_ties",
        tie_k: float = 5.0,
        dimensions: dict[str, str] | list[str] | None = None,
        score_scale: float = 1.0,
        tie_threshold: float | None = None,
        init_weights: str | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(reward, RewardModel):
            raise TypeError(f"reward must be a reward_zoo RewardModel, got {type(reward).__name__}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
        if not tie_k > 1:
            raise ValueError(f"tie_k must be greater than 1, got {tie_k}")
        if not score_scale > 0:
            raise ValueError(f"score_scale must be positive, got {score_scale}")
        if tie_threshold is not None and not tie_threshold >= 0:
            raise ValueError(f"tie_threshold must be non-negative or None, got {tie_threshold}")
        outputs = (*reward.dimensions, "overall")
        if dimensions is None:
            dimensions = {d: d for d in reward.dimensions if d in PAIR_DIMENSIONS}
            if not dimensions:
                raise ValueError(f"{type(reward).__name__} has dimensions {list(reward.dimensions)}, none named "
                                 f"like a label dimension {list(PAIR_DIMENSIONS)}; pass dimensions="
                                 f"{{reward_dim: label_dim}}")
        elif isinstance(dimensions, (list, tuple)):
            dimensions = {d: d for d in dimensions}
        if not dimensions or not isinstance(dimensions, dict):
            raise ValueError(f"dimensions must be a non-empty dict {{reward_dim: label_dim}} or list, got "
                             f"{dimensions!r}")
        unknown = [d for d in dimensions if d not in outputs]
        if unknown:
            raise ValueError(f"dimensions names {unknown[0]!r}, which {type(reward).__name__} does not output; "
                             f"expected some of {list(outputs)}")
        self.save_hyperparameters(ignore=["reward", "optimizer", "lr_scheduler"])
        if init_weights is not None:
            load_weights(reward, _weights_file(init_weights))
        self.reward = reward
        self.loss_name, self.tie_k, self.score_scale = loss, tie_k, score_scale
        self.dimensions: dict[str, str] = dict(dimensions)
        self.optimizer_fn, self.lr_scheduler_fn = optimizer, lr_scheduler
        self.fixed_tie_threshold = tie_threshold
        self.tie_thresholds: dict[str, float] = {}  # per reward dimension, set by validation
        self.metrics: dict[str, dict] = {}  # last evaluation per stage ("val", "test")
        self._buffers: dict[str, dict[str, list]] = {}

    # -- optimisation ---------------------------------------------------------------------------------------------
    @override
    def configure_optimizers(self):
        params = [p for p in self.reward.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{type(self.reward).__name__} has no trainable parameters; RewardTraining trains "
                               f"learned rewards only")
        optimizer = self.optimizer_fn(params)
        if self.lr_scheduler_fn is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler_fn(optimizer),
                                                          "interval": "step"}}

    # -- scoring --------------------------------------------------------------------------------------------------
    def score_pairs(self, batch: dict) -> dict[str, tuple[Tensor, Tensor]]:
        """Scores ``(r_a, r_b)`` (raw, each ``[B]``) of every trained reward dimension for a batch of pairs."""
        for key in ("video_a", "video_b", "labels"):
            if key not in batch:
                raise KeyError(f"a preference-pair batch needs {key!r}; got keys {sorted(batch)}")
        a, b = batch["video_a"], batch["video_b"]  # (n, t, c, h, w) each
        if a.shape != b.shape:
            raise ValueError(f"video_a and video_b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        missing = [label for label in self.dimensions.values() if label not in batch["labels"]]
        if missing:
            raise KeyError(f"the batch has no label dimension {missing[0]!r}; it has {sorted(batch['labels'])}")
        n = a.shape[0]
        prompts = batch.get("prompt")
        prompts = None if prompts is None else list(prompts) * 2
        references = batch.get("reference")
        references = None if references is None else torch.cat([references, references])
        scores = self.reward(torch.cat([a, b]), prompts, references)  # {dim: (2n,)}
        return {dim: (scores[dim][:n], scores[dim][n:]) for dim in self.dimensions}

    def pair_loss(self, r_a: Tensor, r_b: Tensor, labels: Tensor) -> Tensor | None:
        """The preference loss of one dimension (None when ``"bt"`` finds no strict pair in the batch)."""
        r_a, r_b = r_a * self.score_scale, r_b * self.score_scale
        if self.loss_name == "bt":
            strict = labels != 0
            if not strict.any():
                return None
            better = labels[strict] > 0
            r_a, r_b = r_a[strict], r_b[strict]
            return bradley_terry_loss(torch.where(better, r_a, r_b), torch.where(better, r_b, r_a))
        first = labels >= 0  # ties keep their order (the ties term is symmetric)
        return bradley_terry_ties_loss(torch.where(first, r_a, r_b), torch.where(first, r_b, r_a), labels == 0,
                                       k=self.tie_k)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        scored = self.score_pairs(batch)
        n = batch["video_a"].shape[0]
        losses = {}
        for dim, (r_a, r_b) in scored.items():
            loss = self.pair_loss(r_a, r_b, batch["labels"][self.dimensions[dim]].to(r_a.device))
            if loss is not None:
                losses[dim] = loss
                self.log(f"train/loss/{dim}", loss, batch_size=n)
        if not losses:
            return None  # only tied pairs under plain BT: nothing to learn from this batch
        total = torch.stack(list(losses.values())).mean()
        self.log("train/loss", total, prog_bar=True, batch_size=n)
        return total

    # -- evaluation -----------------------------------------------------------------------------------------------
    def _collect(self, stage: str, batch: dict) -> None:
        """Score a batch and keep the scores, labels and corruption kinds for the epoch-end summary."""
        scored = self.score_pairs(batch)
        store = self._buffers.setdefault(stage, defaultdict(list))
        n = batch["video_a"].shape[0]
        for dim, (r_a, r_b) in scored.items():
            store[f"{dim}/a"].append(r_a.detach().float().cpu())
            store[f"{dim}/b"].append(r_b.detach().float().cpu())
            store[f"{dim}/label"].append(batch["labels"][self.dimensions[dim]].detach().cpu().long())
            loss = self.pair_loss(r_a, r_b, batch["labels"][self.dimensions[dim]].to(r_a.device))
            store[f"{dim}/loss"].append((0.0 if loss is None else loss.item()) * n)
        store["kind_a"].extend(batch.get("kind_a", ["?"] * n))
        store["kind_b"].extend(batch.get("kind_b", ["?"] * n))

    def _summarise(self, stage: str) -> dict:
        """Per-dimension accuracies of the collected pairs; validation calibrates the tie thresholds."""
        store = self._buffers.pop(stage, None)
        if not store:
            return {}
        kinds = list(zip(store["kind_a"], store["kind_b"]))
        summary: dict = {"pairs": len(kinds), "dimensions": {}}
        for dim, label_dim in self.dimensions.items():
            r_a, r_b = torch.cat(store[f"{dim}/a"]), torch.cat(store[f"{dim}/b"])
            labels = torch.cat(store[f"{dim}/label"])
            if self.fixed_tie_threshold is not None:
                threshold = self.fixed_tie_threshold
            elif stage == "val" or dim not in self.tie_thresholds:
                if stage != "val":
                    rank_zero_warn(f"no validation tie threshold for {dim!r}: calibrating it on the {stage} pairs "
                                   f"themselves, so {stage}/acc_ties/{dim} is optimistic; validate first")
                threshold, _ = calibrate_tie_threshold(r_a, r_b, labels)
                self.tie_thresholds[dim] = threshold
            else:
                threshold = self.tie_thresholds[dim]
            entry = {
                "label": label_dim,
                "acc": pairwise_accuracy(r_a, r_b, labels),
                "acc_ties": tie_accuracy(r_a, r_b, labels, threshold),
                "tie_threshold": threshold,
                "strict_pairs": int((labels != 0).sum()),
                "tied_pairs": int((labels == 0).sum()),
                "loss": sum(store[f"{dim}/loss"]) / len(labels),
                "by_corruption": _accuracy_by_corruption(r_a, r_b, labels, kinds),
            }
            if self.loss_name == "bt_ties":
                entry["acc_ties_rk"] = tie_accuracy(r_a, r_b, labels, math.log(self.tie_k) / self.score_scale)
            summary["dimensions"][dim] = entry
        self.metrics[stage] = summary
        return summary

    def _log_summary(self, stage: str, summary: dict) -> None:
        if not summary:
            return
        accs = []
        for dim, entry in summary["dimensions"].items():
            for key in ("acc", "acc_ties", "acc_ties_rk", "tie_threshold", "loss"):
                if key in entry and not math.isnan(entry[key]):
                    self.log(f"{stage}/{key}/{dim}", entry[key])
            if not math.isnan(entry["acc"]):
                accs.append(entry["acc"])
        if accs:
            self.log(f"{stage}/acc", sum(accs) / len(accs), prog_bar=True)

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._collect("val", batch)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_summary("val", self._summarise("val"))

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._collect("test", batch)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_summary("test", self._summarise("test"))

    @torch.no_grad()
    def evaluate(self, dataloader: Iterable[dict], stage: str = "test") -> dict:
        """Score every pair of ``dataloader`` outside a Trainer loop and return the summary (as in the model card).

        ``stage="val"`` calibrates (and stores) the tie thresholds; any other stage uses the stored ones.
        """
        was_training = self.training
        self.eval()
        self._buffers.pop(stage, None)
        try:
            for batch in dataloader:
                batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                batch["labels"] = {k: v.to(self.device) for k, v in batch["labels"].items()}
                self._collect(stage, batch)
            return self._summarise(stage)
        finally:
            self.train(was_training)

    # -- export ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, dirpath: str | os.PathLike, name: str | None = None, data_description: str = "",
                        training_description: str = "") -> Path:
        """Write the reward in the Hub layout with a model card reporting ``self.metrics`` (validation and test).

        The folder is written beside ``dirpath`` and renamed into place, so an interrupted export never leaves a
        half-written checkpoint; an existing folder is replaced.
        """
        dirpath = Path(dirpath)
        name = name or dirpath.name
        dirpath.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dirpath.name}.", dir=dirpath.parent))
        try:
            was_training = self.reward.training
            self.reward.eval()
            self.reward.save_pretrained(tmp)
            self.reward.train(was_training)
            card = self.reward.generate_model_card(metrics=self.metrics, name=name)  # metrics: model-index
            text = model_card_text(self.reward, name, self.metrics, data_description, training_description)
            ModelCard(f"---\n{card.data.to_yaml()}\n---\n\n{text}").save(tmp / "README.md")
            (tmp / "metrics.json").write_text(json.dumps(self.metrics, indent=2, sort_keys=True) + "\n")
            for file in [*tmp.iterdir(), tmp]:  # mkdtemp's folder is private: the modes open()/mkdir() would give
                make_shareable(file)
            if dirpath.exists():
                shutil.rmtree(dirpath)
            os.replace(tmp, dirpath)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return dirpath


def _weights_file(source: str) -> Path:
    """The ``model.safetensors`` of a folder, a ``.safetensors`` file, or a registered name's shipped weights."""
    from reward_zoo.registry import PRETRAINED_DIR

    path = Path(source)
    if path.is_dir():
        path = path / "model.safetensors"
    elif not path.is_file() and "/" not in source:
        path = PRETRAINED_DIR / source / "model.safetensors"
    if not path.is_file() or path.suffix != ".safetensors":
        raise FileNotFoundError(f"init_weights {source!r}: no safetensors weights found (looked for {path}); pass a "
                                f"checkpoint folder, a .safetensors file or the name of a reward whose weights ship")
    return path


def _accuracy_by_corruption(r_a: Tensor, r_b: Tensor, labels: Tensor, kinds: list[tuple[str, str]]) -> dict:
    """Accuracy on strict pairs grouped by the corruption of the worse video (``"?"`` when kinds are unknown)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (label, (kind_a, kind_b)) in enumerate(zip(labels.tolist(), kinds)):
        if label != 0:
            groups[kind_b if label > 0 else kind_a].append(i)
    out = {}
    for kind, idx in sorted(groups.items()):
        idx_t = torch.tensor(idx)
        out[kind] = {"acc": pairwise_accuracy(r_a[idx_t], r_b[idx_t], labels[idx_t]), "pairs": len(idx)}
    return out


def model_card_text(reward: RewardModel, name: str, metrics: dict, data_description: str = "",
                    training_description: str = "") -> str:
    """The markdown body of a trained reward's model card: what it scores, how it was trained, how well it does."""
    cls = type(reward)
    lines = [f"# {name}", "",
             f"`{cls.__module__}.{cls.__qualname__}`, a learned reward of the `reward_zoo` (lit-videoalign).",
             (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "", "",
             "```python", "from reward_zoo import create_reward", "",
             f'reward = create_reward("{name}", pretrained=True)  # offline: the weights ship with the package',
             "scores = reward(videos)  # videos: [B, T, C, H, W] float in [0, 1]"
             + ("; pass prompts=[...]" if cls.requires_prompts else ""),
             "```", "",
             "## Dimensions", "",
             f"`{'`, `'.join(cls.dimensions)}` and `overall`; differentiable: {cls.differentiable}. "
             f"Frames: at least {cls.min_frames}.", ""]
    if data_description:
        lines += ["## Training data", "", data_description, ""]
    if training_description:
        lines += ["## Training", "", training_description, ""]
    for stage, title in (("test", "Held-out accuracy (test split)"), ("val", "Validation accuracy")):
        summary = metrics.get(stage)
        if not summary:
            continue
        where = "calibrated on the validation split" if stage == "test" else "calibrated on these pairs"
        lines += [f"## {title}", "",
                  f"{summary['pairs']} toy-world pairs from seeds never used for training. *acc*: pairwise accuracy "
                  "over pairs with a strict preference; *acc w/ ties*: three-way accuracy over all pairs, a tie "
                  f"predicted when |r_a - r_b| < tie threshold (raw score units, {where}).", "",
                  "| dimension | label | acc (no ties) | acc w/ ties | tie threshold | strict pairs | tied pairs |",
                  "|---|---|---|---|---|---|---|"]
        for dim, e in summary["dimensions"].items():
            lines.append(f"| {dim} | {e['label']} | {e['acc']:.3f} | {e['acc_ties']:.3f} | {e['tie_threshold']:.4g} "
                         f"| {e['strict_pairs']} | {e['tied_pairs']} |")
        lines.append("")
        if stage == "test":
            lines += ["Accuracy without ties by the corruption of the worse video:", "",
                      "| dimension | corruption | acc | pairs |", "|---|---|---|---|"]
            for dim, e in summary["dimensions"].items():
                for kind, k in e["by_corruption"].items():
                    lines.append(f"| {dim} | {kind} | {k['acc']:.3f} | {k['pairs']} |")
            lines.append("")
    lines += ["## Licence", "", f"{cls.license or 'unspecified'} (code and weights). Trained only on procedurally "
              "generated toy-world videos: it knows the toy world, not real footage.", ""]
    return "\n".join(lines)


class ExportReward(L.Callback):
    """At the end of ``fit``, evaluate on the validation and test splits and write the reward in the Hub layout.

    The datamodule's ``val_dataloader`` calibrates the tie thresholds, its ``test_dataloader`` (if any) gives the
    held-out figures, and its ``describe()`` (if any) the training-data paragraph of the model card.

    Args:
        dirpath: destination folder (e.g. ``reward_zoo/pretrained/quality``); replaced if it exists.
        name: the reward's name in the model card (default: the folder name).
    """

    def __init__(self, dirpath: str, name: str | None = None) -> None:
        self.dirpath, self.name = Path(dirpath), name
        self._started: tuple[float, float] | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = (time.perf_counter(), time.process_time())

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, RewardTraining):
            raise TypeError(f"ExportReward works with RewardTraining, got {type(pl_module).__name__}")
        took = None if self._started is None else (time.perf_counter() - self._started[0],
                                                   time.process_time() - self._started[1])
        if trainer.is_global_zero:
            dm = trainer.datamodule
            if dm is None:
                raise ValueError("ExportReward needs a datamodule with val_dataloader (and test_dataloader)")
            pl_module.evaluate(dm.val_dataloader(), "val")
            if is_overridden("test_dataloader", dm):
                pl_module.evaluate(dm.test_dataloader(), "test")
            dims = ", ".join(f"`{r}` from label `{lab}`" for r, lab in pl_module.dimensions.items())
            training = (f"`reward_zoo.training.RewardTraining`, loss `{pl_module.loss_name}`"
                        + (f" (k = {pl_module.tie_k})" if pl_module.loss_name == "bt_ties" else "")
                        + f", score scale {pl_module.score_scale}, {trainer.global_step} optimizer steps; "
                        f"trained dimensions: {dims}.")
            if took is not None:
                wall, cpu = took
                training += (f" Training took {wall / 60:.1f} min wall clock, {cpu / 60:.1f} min CPU time "
                             f"({torch.get_num_threads()} torch threads, {trainer.accelerator.__class__.__name__}).")
            if Path(sys.argv[0]).name == "reward-zoo":
                training += f"\n\nCommand: `reward-zoo {' '.join(sys.argv[1:])}`"
            describe = getattr(dm, "describe", None)
            pl_module.save_pretrained(self.dirpath, self.name, describe() if callable(describe) else "", training)
            rank_zero_info(f"ExportReward: wrote {self.dirpath} ({_headline(pl_module.metrics)})")
        trainer.strategy.barrier()


def _headline(metrics: dict) -> str:
    stage = "test" if "test" in metrics else "val"
    dims = metrics.get(stage, {}).get("dimensions", {})
    return f"{stage}: " + ", ".join(f"{d} acc {e['acc']:.3f} / w/ ties {e['acc_ties']:.3f}" for d, e in dims.items())
