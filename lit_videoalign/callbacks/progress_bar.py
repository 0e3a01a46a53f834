"""``VideoAlignProgressBar``: Lightning's ``RichProgressBar`` showing the objective's key metrics compactly.

Objectives mark their key metrics with ``self.log(..., prog_bar=True)`` (SFT: ``train/loss``; GRPO:
``train/reward/overall``; validation: ``val/...``); this bar shows exactly those, with four significant digits and
without Lightning's ``v_num``. ``videoalign fit`` adds it unless ``--trainer.enable_progress_bar=false`` or the config
names another progress bar.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from typing_extensions import override


class VideoAlignProgressBar(RichProgressBar):
    """A ``RichProgressBar`` with metrics in ``.4g`` format and no ``v_num``.

    Args:
        refresh_rate: batches between refreshes.
        leave: keep finished epoch bars on screen.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave,
                         theme=RichProgressBarTheme(metrics="bold", metrics_format=".4g"))

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
