"""``PushToHub``: publish the trained LoRA adapter (or the merged pipeline) to the Hugging Face Hub with a model card.

The folder is staged locally (``local_dir``), then sent in one commit with ``huggingface_hub.HfApi.upload_folder``.
The model card records the base model, the objective and its paper, the hyperparameters, the training and evaluation
rewards, the final metrics and the last grid of fixed-seed samples as a GIF (from a
:class:`~lit_videoalign.callbacks.video_sample_logger.VideoSampleLogger`, when there is one).

The token is read the usual ``huggingface_hub`` way (``HF_TOKEN`` or ``hf auth login``); keep it out of YAML files.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_videoalign.callbacks.adapter_export import save_adapter

WHAT = ("auto", "adapter", "pipeline")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not Path(name).exists()


def _objective_paper(pl_module: L.LightningModule) -> str:
    """The first docstring line of the objective's file (it names the method and its arXiv id)."""
    doc = sys.modules[type(pl_module).__module__].__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _flat_hparams(pl_module: L.LightningModule) -> dict[str, Any]:
    out = {}
    for key, value in dict(pl_module.hparams).items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
            out[key] = list(value)
    return out


def _final_metrics(trainer: L.Trainer) -> dict[str, float]:
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            continue
        if math.isfinite(number):
            metrics[key] = number
    return dict(sorted(metrics.items()))


def model_card(pl_module: L.LightningModule, trainer: L.Trainer, repo_id: str, what: str, license: str | None = None,
               sample_prompts: list[str] | None = None, has_samples: bool = False) -> str:
    """The README.md of a pushed model: YAML metadata, then what it is, how to load it, how it was trained."""
    from huggingface_hub import ModelCardData

    from lit_videoalign.callbacks.reward_evaluation import RewardEvaluation

    backbone = pl_module.backbone
    base = str(backbone.pretrained_model_name_or_path)
    objective = type(pl_module).__name__
    pipeline = backbone.model_index.get("_class_name", "WanPipeline")
    tags = ["lit-videoalign", "text-to-video", "video-generation", objective.lower()]
    if what == "adapter":
        tags.append("lora")
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-video", license=license, tags=tags,
                         base_model=base if _is_hub_id(base) else None)
    kind = "LoRA adapter" if what == "adapter" else "text-to-video pipeline"
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"A {kind} post-trained from `{base}` with the `{objective}` objective of lit-videoalign.", ""]
    paper = _objective_paper(pl_module)
    if paper:
        lines += [f"Method: {paper}", ""]
    lines += ["## Use", "", "```python"]
    if what == "adapter":
        if _is_hub_id(base):
            lines += ["import diffusers", "", f'pipe = diffusers.{pipeline}.from_pretrained("{base}")',
                      f'pipe.load_lora_weights("{repo_id}")', "", "# or with lit-videoalign:"]
        lines += ["from huggingface_hub import snapshot_download",
                  "from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone",
                  "from lit_videoalign.callbacks.adapter_export import load_adapter", "",
                  f'backbone = DiffusersVideoBackbone("{base}")',
                  f'load_adapter(backbone, snapshot_download("{repo_id}"))']
    else:
        lines += ["from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone", "",
                  f'backbone = DiffusersVideoBackbone("{repo_id}")']
    lines += ["```", "", "## Training", "",
              f"Objective `{type(pl_module).__module__}.{objective}`; optimizer steps: {trainer.global_step}.", "",
              "| hyperparameter | value |", "|---|---|"]
    lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in _flat_hparams(pl_module).items()]
    lines += ["", "## Rewards", ""]
    reward = getattr(pl_module, "reward", None)
    if reward is not None and hasattr(reward, "config"):
        spec = {"class_path": f"{type(reward).__module__}.{type(reward).__qualname__}", "init_args": reward.config}
        lines += ["Training reward:", "", "```json", json.dumps(spec, indent=2), "```", ""]
    else:
        lines += ["The objective trains on data, not on a reward.", ""]
    for cb in trainer.callbacks:
        if isinstance(cb, RewardEvaluation):
            lines.append(f"Evaluation rewards (`{cb.prefix}/`): {', '.join(f'`{n}`' for n in cb.rewards) or 'none'}; "
                         f"held-out gold rewards, never optimised (`{cb.gold_prefix}/`): "
                         f"{', '.join(f'`{n}`' for n in cb.gold_rewards) or 'none'}.")
            lines.append("")
    metrics = _final_metrics(trainer)
    lines += ["## Final metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.4g} |" for k, v in metrics.items())]
    else:
        lines.append("No metrics were logged.")
    if has_samples:
        lines += ["", "## Samples", "", "Fixed prompts and seeds, deterministic sampler, at the end of training:", "",
                  "![samples](samples.gif)", ""]
        if sample_prompts:
            lines += [f"{i}. {p}" for i, p in enumerate(sample_prompts, 1)]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


class PushToHub(L.Callback):
    """Upload the adapter (or full pipeline) with a generated model card when training ends.

    Args:
        repo_id: ``org/name`` of the model repository (created if missing).
        what: ``"adapter"`` (the LoRA in diffusers format), ``"pipeline"`` (the whole pipeline, LoRA merged) or
            ``"auto"`` (the adapter when there is one).
        private: create the repository as private.
        token: Hub token; default the one ``huggingface_hub`` finds (``HF_TOKEN`` or a stored login).
        local_dir: staging folder; default ``<default_root_dir>/hub/<name>``.
        commit_message: default ``"lit-videoalign: <objective> step <n>"``.
        license: licence id for the card metadata (e.g. the base model's).
        revision: branch to push to.
    """

    def __init__(self, repo_id: str, what: str = "auto", private: bool = False, token: str | None = None,
                 local_dir: str | None = None, commit_message: str | None = None, license: str | None = None,
                 revision: str | None = None) -> None:
        if not isinstance(repo_id, str) or not HUB_ID.match(repo_id):
            raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
        if what not in WHAT:
            raise ValueError(f"what must be one of {WHAT}, got {what!r}")
        self.repo_id, self.what, self.private, self.token = repo_id, what, private, token
        self._local_dir = None if local_dir is None else Path(local_dir)
        self.commit_message, self.license, self.revision = commit_message, license, revision
        self.pushes: list[dict[str, Any]] = []  # {"step", "commit", "url"} per push, resumed from checkpoints

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(repo_id=self.repo_id)

    def local_dir(self, trainer: L.Trainer) -> Path:
        return self._local_dir or Path(trainer.default_root_dir) / "hub" / self.repo_id.split("/")[-1]

    def output_paths(self, trainer: L.Trainer) -> dict[str, str]:
        url = self.pushes[-1]["url"] if self.pushes else f"(not pushed yet) {self.repo_id}"
        return {"Hub repository": url}

    def resolved_what(self, pl_module: L.LightningModule) -> str:
        if self.what != "auto":
            return self.what
        return "adapter" if pl_module.backbone.has_lora else "pipeline"

    def stage(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """Write the weights, the sample GIF and the model card into the local folder; returns it."""
        from lit_videoalign.callbacks.video_sample_logger import VideoSampleLogger

        folder = self.local_dir(trainer)
        what = self.resolved_what(pl_module)
        if what == "adapter":
            save_adapter(pl_module.backbone, folder)
        else:
            pl_module.backbone.save_pretrained(folder)
        samplers = [cb for cb in trainer.callbacks if isinstance(cb, VideoSampleLogger) and cb.latest is not None]
        latest = samplers[0].latest if samplers else None
        has_samples = latest is not None and latest.grid_gif is not None and latest.grid_gif.is_file()
        if has_samples:
            shutil.copyfile(latest.grid_gif, folder / "samples.gif")
        card = model_card(pl_module, trainer, self.repo_id, what, self.license,
                          sample_prompts=latest.prompts if has_samples else None, has_samples=has_samples)
        (folder / "README.md").write_text(card)
        return folder

    def push(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from huggingface_hub import HfApi

        if trainer.is_global_zero:
            folder = self.stage(trainer, pl_module)
            api = HfApi(token=self.token)
            url = api.create_repo(self.repo_id, private=self.private, exist_ok=True)
            message = self.commit_message or f"lit-videoalign: {type(pl_module).__name__} step {trainer.global_step}"
            info = api.upload_folder(repo_id=self.repo_id, folder_path=folder, commit_message=message,
                                     revision=self.revision)
            self.pushes.append({"step": trainer.global_step, "commit": info.oid, "url": str(url)})
            rank_zero_info(f"PushToHub: pushed {folder} to {url} (commit {info.oid})")
        trainer.strategy.barrier()

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.what == "adapter" and not pl_module.backbone.has_lora:
            raise ValueError("PushToHub(what='adapter') needs a LoRA adapter; set model.init_args.lora_rank or use "
                             "what='pipeline'")

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.push(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"pushes": [dict(p) for p in self.pushes]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pushes = [dict(p) for p in state_dict["pushes"]]

