"""``AdapterExport``: save the trained LoRA adapter in the diffusers/peft format (``pytorch_lora_weights.safetensors``).

The file is written by the diffusers pipeline class's own ``save_lora_weights`` (``WanPipeline``, ``LTXPipeline``,
``HunyuanVideoPipeline`` from ``model_index.json``): peft ``lora_A``/``lora_B`` tensors under ``transformer.`` keys,
with the peft ``LoraConfig`` (rank, alpha, targets) in the safetensors metadata. It loads with

    pipe = WanPipeline.from_pretrained(base); pipe.load_lora_weights(dirpath)          # diffusers
    backbone.denoiser.load_lora_adapter(dirpath, prefix="transformer")                  # a bare transformer
    load_adapter(backbone, dirpath)                                                     # a lit-videoalign backbone
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_videoalign.video_io import atomic_dir

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def pipeline_class(backbone: Any) -> type:
    """The diffusers pipeline class named in the backbone's ``model_index.json``; it must save LoRA weights."""
    import diffusers

    name = backbone.model_index.get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "save_lora_weights"):
        raise ValueError(f"pipeline class {name!r} of {backbone.pretrained_model_name_or_path} has no diffusers LoRA "
                         "loader (save_lora_weights); AdapterExport supports Wan, LTX-Video and HunyuanVideo pipelines")
    return cls


def save_adapter(backbone: Any, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write the backbone's LoRA adapter to the folder ``path`` (atomically: the folder appears whole or not at all).

    Args:
        backbone: a :class:`~lit_videoalign.backbones.diffusers.DiffusersVideoBackbone` with a LoRA adapter.
        path: destination folder; replaced if it exists.
        adapter_name: the peft adapter to save.
    """
    from peft.utils import get_peft_model_state_dict

    configs = getattr(backbone.denoiser, "peft_config", {}) or {}
    if adapter_name not in configs:
        raise ValueError(f"the denoiser has no LoRA adapter {adapter_name!r} (adapters: {sorted(configs)}); set "
                         "model.init_args.lora_rank, or export full weights with PipelineExport")
    cls = pipeline_class(backbone)
    path = Path(path)
    with atomic_dir(path) as tmp:
        for folder, denoiser in _adapted_experts(backbone).items():
            metadata = denoiser.peft_config[adapter_name].to_dict()
            metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}
            layers = {k: v.detach().cpu().contiguous() for k, v in
                      get_peft_model_state_dict(denoiser, adapter_name=adapter_name).items()}
            cls.save_lora_weights(tmp / folder, transformer_lora_layers=layers,
                                  transformer_lora_adapter_metadata=metadata, weight_name=WEIGHT_NAME,
                                  safe_serialization=True)
    return path


def _adapted_experts(backbone: Any) -> dict[str, Any]:
    """Subfolder -> the transformer whose adapter goes there: ``""`` for one transformer; for Wan 2.2 A14B one
    subfolder per trained expert, ``high_noise/`` and ``low_noise/``, each its own diffusers LoRA file (load the
    low-noise one with ``pipe.load_lora_weights(path / "low_noise", load_into_transformer_2=True)``)."""
    from lit_videoalign.backbones.experts import TwoExpertDenoiser

    denoiser = backbone.denoiser
    if not isinstance(denoiser, TwoExpertDenoiser):
        return {"": denoiser}
    return {name: denoiser.expert(name) for name in denoiser.trained}


def load_adapter(backbone: Any, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Load an adapter written by :func:`save_adapter` (or any diffusers LoRA for the family) into a backbone that
    has none yet, through diffusers' ``load_lora_adapter``; the adapter stays frozen."""
    path = Path(path)
    if not (path / WEIGHT_NAME).is_file() and not any((path / n / WEIGHT_NAME).is_file() for n in ("high_noise",
                                                                                                   "low_noise")):
        raise FileNotFoundError(f"no {WEIGHT_NAME} in {path}")
    if adapter_name in (getattr(backbone.denoiser, "peft_config", {}) or {}):
        raise ValueError(f"the backbone already has an adapter {adapter_name!r}; load into a fresh backbone")
    from lit_videoalign.backbones.experts import TwoExpertDenoiser

    denoiser = backbone.denoiser
    targets = {"": denoiser} if not isinstance(denoiser, TwoExpertDenoiser) else \
        {name: denoiser.expert(name) for name in denoiser.trained if (path / name / WEIGHT_NAME).is_file()}
    if not targets:
        raise FileNotFoundError(f"no {WEIGHT_NAME} in {path}/high_noise or {path}/low_noise for the trained experts "
                                f"{list(denoiser.trained)}")
    for folder, model in targets.items():
        model.load_lora_adapter(str(path / folder), prefix="transformer", adapter_name=adapter_name,
                                weight_name=WEIGHT_NAME)


class AdapterExport(L.Callback):
    """Save ``pl_module.backbone``'s LoRA adapter to ``dirpath`` when training ends (and every N steps).

    Args:
        dirpath: destination folder (it holds ``pytorch_lora_weights.safetensors``).
        every_n_train_steps: also export during training every this many steps (0: only at the end).
        adapter_name: the peft adapter to save.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 0, adapter_name: str = "default") -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.dirpath, self.every_n_train_steps, self.adapter_name = Path(dirpath), every_n_train_steps, adapter_name
        self.exports: list[int] = []  # steps exported at, resumed from checkpoints

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=str(self.dirpath))

    def output_paths(self, trainer: L.Trainer) -> dict[str, str]:
        return {"LoRA adapter": str(self.dirpath)}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        configs = getattr(pl_module.backbone.denoiser, "peft_config", {}) or {}
        if self.adapter_name not in configs:
            raise ValueError(f"AdapterExport needs a LoRA adapter {self.adapter_name!r} on the denoiser, found "
                             f"{sorted(configs)}; set model.init_args.lora_rank, or use PipelineExport for full "
                             "weights")
        pipeline_class(pl_module.backbone)

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            save_adapter(pl_module.backbone, self.dirpath, self.adapter_name)
            rank_zero_info(f"AdapterExport: wrote the LoRA adapter at step {trainer.global_step} to {self.dirpath}")
        self.exports.append(trainer.global_step)
        trainer.strategy.barrier()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n, step = self.every_n_train_steps, trainer.global_step
        if n and step > 0 and step % n == 0 and (not self.exports or self.exports[-1] != step):
            self.export(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"exports": list(self.exports)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.exports = list(state_dict["exports"])
