"""``VideoSampleLogger``: videos from fixed prompts and seeds every N steps, as MP4/GIF files and TensorBoard videos.

The same prompts and seeds are sampled at every round, by default with the pipeline's own diffusers scheduler (the
videos a user of the model would see; ``sampler="euler"`` for the Euler ODE), so the videos of one seed show how
training changes the model. Each round is also handed to the other callbacks that implement
``on_video_samples(trainer, pl_module, samples)`` (:class:`~lit_videoalign.callbacks.reward_evaluation.
RewardEvaluation` scores them, :class:`~lit_videoalign.callbacks.reward_hacking_monitor.RewardHackingMonitor` checks
them), in the order of their ``video_samples_order`` attribute, so the videos are generated once per round whatever
the order of the callback list.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lit_videoalign.schedules.samplers import SAMPLERS
from lit_videoalign.video_io import video_grid, write_gif, write_mp4

# Single-ball toy-world prompts, each twice with different seeds (so diversity within a prompt is visible).
DEFAULT_PROMPTS = ("a red ball falls", "a blue ball moves left", "a green ball moves right", "a yellow ball falls")


@dataclass
class VideoSamples:
    """One sampling round, handed to ``on_video_samples`` hooks.

    Attributes:
        step: ``trainer.global_step`` when the videos were generated.
        prompts: one prompt per video.
        seeds: one seed per video.
        videos: ``[B, T, C, H, W]`` in ``[0, 1]``, on CPU.
        files: written MP4 (and GIF) files, empty on ranks other than zero.
        grid_gif: the GIF of all videos tiled, or None if GIFs are off.
        metrics: scalars computed on these videos by hooks (``"gold/newton/overall"`` -> value); later hooks read
            what earlier ones wrote.
    """

    step: int
    prompts: list[str]
    seeds: list[int]
    videos: Tensor
    files: list[Path] = field(default_factory=list)
    grid_gif: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def slug(text: str, max_len: int = 60) -> str:
    """A file-name-safe version of a prompt: alphanumerics kept, anything else ``_``."""
    return "".join(c if c.isalnum() else "_" for c in text)[:max_len]


def viewing_upscale(height: int, width: int) -> int:
    """Nearest-neighbour factor for writing a video: tiny videos are viewed 4x bigger; H.264 needs even sizes."""
    return 4 if min(height, width) < 128 else (2 if height % 2 or width % 2 else 1)


def log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write scalars to every logger at ``step`` and expose them in ``trainer.callback_metrics``.

    Callbacks log this way rather than with ``pl_module.log`` because sampling rounds need not fall on
    ``log_every_n_steps`` (whose other steps ``self.log`` would drop) and also run in ``on_train_start``, where
    ``self.log`` is not allowed. ``callback_metrics`` lets ``ModelCheckpoint``/``EarlyStopping`` monitor them.
    """
    if not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)
    trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})


def tensorboard_experiments(trainer: L.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of every ``TensorBoardLogger`` of the trainer."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def add_video_summary(experiment: Any, tag: str, video: Tensor, step: int, fps: int, gif_bytes: bytes) -> None:
    """Write a TensorBoard video summary: an image summary holding an animated GIF (what ``add_video`` writes).

    ``SummaryWriter.add_video`` encodes the GIF with ``moviepy.editor`` (moviepy < 2), and without it only prints a
    message and writes nothing; so it is used where that import works, and otherwise the same summary is written
    with the GIF encoded by Pillow.
    """
    try:
        from moviepy import editor  # noqa: F401
    except ImportError:
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        with Image.open(io.BytesIO(gif_bytes)) as gif:
            w, h = gif.size
        image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif_bytes)
        experiment._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    else:
        experiment.add_video(tag, video[None], global_step=step, fps=fps)  # (1, t, c, h, w)


class VideoSampleLogger(L.Callback):
    """Generate videos from fixed prompts and seeds every ``every_n_steps`` optimizer steps and log them.

    Files go to ``dirpath/step_000100/{index}_seed{seed}_{prompt}.mp4`` (and ``.gif``), with ``grid.gif`` tiling the
    round. With a ``TensorBoardLogger`` the grid is also logged as a TensorBoard video (tag ``samples``), which
    ``EventAccumulator(...).Images("samples")`` reads back as an animated GIF. Other callbacks receive every round
    through their ``on_video_samples`` hook.

    The number of rounds and the last sampled step are in :meth:`state_dict`, so a resumed run neither repeats a
    round nor restarts the count.

    Args:
        prompts: prompts to sample; default four single-ball toy-world prompts, each twice.
        seeds: one seed per prompt (default ``0 .. n-1``).
        every_n_steps: optimizer steps between rounds.
        num_inference_steps: sampler steps (default: the model's).
        guidance_scale: classifier-free guidance (default: the model's).
        sampler: ``"pipeline"`` (the backbone's diffusers scheduler) or ``"euler"`` (the Euler ODE); a few-step
            student always samples with its own sampler.
        batch_size: videos generated at once.
        dirpath: output folder; default ``<log_dir>/samples`` (the logger's version folder), or
            ``<default_root_dir>/samples`` without a logger.
        fps: frames per second of files and TensorBoard videos.
        save_mp4: write one MP4 per video.
        save_gif: write one GIF per video and a grid GIF per round.
        log_to_tensorboard: log the grid to every ``TensorBoardLogger``.
        sample_at_start: also sample before the first step (step 0), a baseline for later rounds.
        sample_at_end: also sample when training ends, unless the last step was just sampled.
        images: image-to-video models: conditioning image files, one per prompt or one for all (RGB; centre-cropped
            and resized to the model's frame size when sampled).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        seeds: list[int] | None = None,
        every_n_steps: int = 100,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str = "pipeline",
        batch_size: int = 8,
        dirpath: str | None = None,
        fps: int = 8,
        save_mp4: bool = True,
        save_gif: bool = True,
        log_to_tensorboard: bool = True,
        sample_at_start: bool = True,
        sample_at_end: bool = True,
        images: list[str] | None = None,
    ) -> None:
        prompts = [p for p in DEFAULT_PROMPTS for _ in range(2)] if prompts is None else list(prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
        seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; expected one seed per prompt")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if fps < 1:
            raise ValueError(f"fps must be at least 1, got {fps}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        if images is not None:
            if len(images) not in (1, len(prompts)):
                raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; expected one image per prompt, "
                                 "or one for all")
            missing = [str(i) for i in images if not Path(i).is_file()]
            if missing:
                raise FileNotFoundError(f"no image file {missing[0]!r} ({len(missing)} of {len(images)} missing)")
        self.prompts, self.seeds, self.sampler, self.images = prompts, seeds, sampler, images
        self.every_n_steps, self.batch_size = every_n_steps, batch_size
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self._dirpath = None if dirpath is None else Path(dirpath)
        self.fps, self.save_mp4, self.save_gif = fps, save_mp4, save_gif
        self.log_to_tensorboard = log_to_tensorboard
        self.sample_at_start, self.sample_at_end = sample_at_start, sample_at_end
        self.num_rounds = 0  # sampling rounds so far, resumed from checkpoints
        self.last_step: int | None = None
        self.latest: VideoSamples | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, dirpath=str(self._dirpath))

    def dirpath(self, trainer: L.Trainer) -> Path:
        """Where the files go (see ``dirpath`` in the class docstring)."""
        if self._dirpath is not None:
            return self._dirpath
        root = trainer.log_dir if trainer.loggers and trainer.log_dir else trainer.default_root_dir
        return Path(root) / "samples"

    def output_paths(self, trainer: L.Trainer) -> dict[str, str]:
        """For the end-of-run summary."""
        return {"video samples": str(self.dirpath(trainer))}

    # -- sampling -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, pl_module: L.LightningModule) -> Tensor:
        """All prompts and seeds (and images), in batches; ``[B, T, C, H, W]`` on CPU."""
        from lit_videoalign.data.video_folder import load_images

        hp = pl_module.hparams
        images = load_images(self.images, len(self.prompts), hp.height, hp.width)
        chunks = []
        for start in range(0, len(self.prompts), self.batch_size):
            end = start + self.batch_size
            chunks.append(pl_module.generate(self.prompts[start:end], self.seeds[start:end],
                                             num_inference_steps=self.num_inference_steps,
                                             guidance_scale=self.guidance_scale, sampler=self.sampler,
                                             images=None if images is None else images[start:end].to(pl_module.device)
                                             ).float().cpu())
        return torch.cat(chunks)

    def write_files(self, samples: VideoSamples, folder: Path, grid: bool) -> None:
        for i, (prompt, seed, video) in enumerate(zip(samples.prompts, samples.seeds, samples.videos)):
            stem = folder / f"{i:02d}_seed{seed}_{slug(prompt)}"
            if self.save_mp4:
                samples.files.append(write_mp4(video, stem.with_suffix(".mp4"), fps=self.fps,
                                               upscale=viewing_upscale(*video.shape[-2:])))
            if self.save_gif:
                samples.files.append(write_gif(video, stem.with_suffix(".gif"), fps=self.fps))
        if grid:
            tiled = video_grid(samples.videos, ncols=min(4, len(samples.videos)))
            samples.grid_gif = write_gif(tiled, folder / "grid.gif", fps=self.fps)

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> VideoSamples:
        """Run one round now: generate, write files and TensorBoard video, then call the ``on_video_samples`` hooks.

        Every rank generates (a sharded model needs all of them), rank zero writes.
        """
        step = trainer.global_step
        samples = VideoSamples(step=step, prompts=list(self.prompts), seeds=list(self.seeds),
                               videos=self.generate(pl_module))
        if trainer.is_global_zero:
            folder = self.dirpath(trainer) / f"step_{step:06d}"
            experiments = tensorboard_experiments(trainer) if self.log_to_tensorboard else []
            self.write_files(samples, folder, grid=self.save_gif or bool(experiments))
            if experiments:
                gif_bytes = samples.grid_gif.read_bytes()
                grid = video_grid(samples.videos, ncols=min(4, len(samples.videos)))
                for experiment in experiments:
                    add_video_summary(experiment, "samples", grid, step, self.fps, gif_bytes)
                    experiment.flush()
            if not self.save_gif and samples.grid_gif is not None:  # only made for TensorBoard
                os.unlink(samples.grid_gif)
                samples.grid_gif = None
            rank_zero_info(f"VideoSampleLogger: {len(samples.prompts)} videos at step {step} in {folder}")
        self.num_rounds += 1
        self.last_step = step
        self.latest = samples
        hooks = [cb for cb in trainer.callbacks if cb is not self and callable(getattr(cb, "on_video_samples", None))]
        for cb in sorted(hooks, key=lambda cb: getattr(cb, "video_samples_order", 0)):
            cb.on_video_samples(trainer, pl_module, samples)
        return samples

    def _due(self, step: int) -> bool:
        return step != self.last_step

    # -- hooks --------------------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.sample_at_start and self._due(trainer.global_step) and trainer.global_step == 0:
            self.sample(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and self._due(step):  # once per optimizer step
            self.sample(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.sample_at_end and self._due(trainer.global_step):
            self.sample(trainer, pl_module)

    # -- state --------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"num_rounds": self.num_rounds, "last_step": self.last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_rounds = int(state_dict["num_rounds"])
        self.last_step = state_dict["last_step"]

