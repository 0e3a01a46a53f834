"""``PipelineExport``: write the trained backbone as a diffusers pipeline folder (safetensors) when training ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class PipelineExport(L.Callback):
    """Save ``pl_module.backbone`` with ``save_pretrained`` (LoRA merged) to ``dirpath``.

    The folder is written beside its destination and renamed into place, so an interrupted export never leaves a
    half-written pipeline, and it loads back with ``DiffusersVideoBackbone(dirpath)``.

    Args:
        dirpath: destination folder.
        every_n_train_steps: also export during training every this many steps (0: only at the end).
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 0) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.dirpath, self.every_n_train_steps = Path(dirpath), every_n_train_steps

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            pl_module.backbone.save_pretrained(self.dirpath)
            rank_zero_info(f"PipelineExport: wrote pipeline at step {trainer.global_step} to {self.dirpath}")
        trainer.strategy.barrier()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and trainer.global_step > 0:
            self._export(trainer, pl_module)

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module)
