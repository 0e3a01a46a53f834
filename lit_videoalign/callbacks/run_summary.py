"""``RunSummary``: at the end of ``fit``, a table of where every output went and the final key metrics.

Rows come from the loggers (log folders), the checkpoint callback (best and last checkpoints), ``PipelineExport`` and
every callback with an ``output_paths(trainer) -> {label: path}`` method (``VideoSampleLogger``, ``AdapterExport``,
``PushToHub``). ``videoalign fit`` adds it by default.
"""

from __future__ import annotations

import math

import lightning as L
from typing_extensions import override


def run_outputs(trainer: L.Trainer) -> list[tuple[str, str]]:
    """``(what, where)`` for every output of the run, in a stable order."""
    from lit_videoalign.callbacks.pipeline_export import PipelineExport

    rows: list[tuple[str, str]] = []
    for logger in trainer.loggers:
        where = getattr(logger, "log_dir", None) or logger.save_dir
        if where:
            rows.append((f"{type(logger).__name__} logs", str(where)))
    ckpt = trainer.checkpoint_callback
    if ckpt is not None:
        if getattr(ckpt, "best_model_path", ""):
            rows.append(("best checkpoint", ckpt.best_model_path))
        if getattr(ckpt, "last_model_path", "") and ckpt.last_model_path != getattr(ckpt, "best_model_path", ""):
            rows.append(("last checkpoint", ckpt.last_model_path))
        if not getattr(ckpt, "best_model_path", "") and getattr(ckpt, "dirpath", None):
            rows.append(("checkpoints", str(ckpt.dirpath)))
    for cb in trainer.callbacks:
        if isinstance(cb, PipelineExport):
            rows.append(("pipeline (LoRA merged)", str(cb.dirpath)))
        output_paths = getattr(cb, "output_paths", None)
        if callable(output_paths):
            rows += list(output_paths(trainer).items())
    return rows


def key_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The progress-bar metrics (the objective's key ones) as floats."""
    out = {}
    for key, value in trainer.progress_bar_metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if key != "v_num" and math.isfinite(number):
            out[key] = number
    return out


class RunSummary(L.Callback):
    """Print the outputs and final key metrics of a run with rich when ``fit`` ends (rank zero only)."""

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{type(pl_module).__name__}: {trainer.global_step} steps", show_lines=False)
        table.add_column("output")
        table.add_column("where", overflow="fold")
        for what, where in run_outputs(trainer):
            table.add_row(what, where)
        for key, value in key_metrics(trainer).items():
            table.add_row(key, f"{value:.4g}")
        console = Console()
        if not console.is_terminal:  # log files and pipes: full paths on one line, not folded at 80 columns
            console = Console(width=200)
        console.print(table)
