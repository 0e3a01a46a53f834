"""Generating videos for the ``generate`` and ``evaluate`` subcommands, as plain functions usable without the CLI:
prompts and seeds from arguments or a file, batched generation into an atomically written folder with its
``metadata.jsonl``, and the inference-time alignment samplers (best-of-N, noise search, reward guidance)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lit_videoalign.errors import UsageError
from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.schedules.samplers import SAMPLERS
from lit_videoalign.video_io import MANIFEST

PREVIEWS = "previews"  # subfolder of a generate folder holding the GIF previews its manifest names


def check_sampler_name(sampler: str) -> None:
    """Refuse a ``--sampler`` other than ``pipeline`` or ``euler``."""
    if sampler not in SAMPLERS:
        raise UsageError(f"--sampler must be one of {list(SAMPLERS)}, got {sampler!r}")


def resolve_prompts(prompts: list[str] | None, prompts_file: str | None,
                    seeds: list[int] | None) -> tuple[list[str], list[int]]:
    """Prompts from arguments and/or a file, and one seed per prompt (default ``0 .. n-1``)."""
    from lit_videoalign.data.prompts import read_prompt_file

    prompts = list(prompts or [])
    if prompts_file is not None:
        prompts += read_prompt_file(prompts_file)
    if not prompts:
        raise UsageError("no prompts given; pass --prompts P [P ...] or --prompts_file FILE")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise UsageError(f"got {len(seeds)} seeds for {len(prompts)} prompts; expected one seed per prompt")
    return prompts, seeds


def generate_videos(model: AlignmentModule, prompts: list[str], seeds: list[int], output_dir: str | os.PathLike,
                    num_inference_steps: int | None = None, guidance_scale: float | None = None,
                    batch_size: int = 8, fps: int | None = None, gif: bool = True, description: str = "generating",
                    sampler: Callable | None = None, sampling: str = "pipeline",
                    images: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Path]]:
    """Generate in batches under a Rich progress bar; write MP4s and ``metadata.jsonl`` into ``output_dir``, and
    with ``gif`` a GIF preview of each under ``output_dir/previews/`` (named by the entry's ``preview``), so the
    folder's top level holds only the videos its manifest lists and any tool reading the folder sees those.

    ``sampler(model, prompts, seeds, images=)`` replaces ``model.generate`` (an inference-time alignment method).
    ``sampling`` is ``model.generate``'s sampler (``--sampler``): ``"pipeline"``, the backbone's diffusers scheduler, or
    ``"euler"``, the Euler ODE. ``images``: image-to-video, one conditioning image per prompt ``[B, 3, H, W]``
    (:func:`~lit_videoalign.data.video_folder.load_images`). ``fps``: the files' frame rate (default: the
    backbone's, so tools that read the files, such as rewards sampling by time, see the generator's rate).

    Returns:
        The videos ``[B, T, C, H, W]`` in ``[0, 1]`` on CPU, and the written files (MP4, then its GIF preview, per
        video; the manifest is not among them).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lit_videoalign.callbacks.video_sample_logger import slug, viewing_upscale
    from lit_videoalign.evaluation import write_manifest
    from lit_videoalign.video_io import write_gif, write_mp4

    if batch_size < 1:
        raise UsageError(f"batch_size must be positive, got {batch_size}")
    # the generator's rate unless given (a sampler may stand in for a model); whole rates: 8, 16, 24, 25 fps
    file_fps = fps or round((model.backbone.fps if model is not None else None) or 8)
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Files are written beside output_dir and moved in once all of them are: a failed run adds nothing to it.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    written, entries, chunks = [], [], []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns) as progress:
            task = progress.add_task(description, total=len(prompts))
            plain = not progress.console.is_terminal  # log files get one line per batch instead of a live bar
            for start in range(0, len(prompts), batch_size):
                chunk, chunk_seeds = prompts[start:start + batch_size], seeds[start:start + batch_size]
                chunk_images = None if images is None else images[start:start + batch_size].to(model.device)
                if sampler is not None:
                    videos = sampler(model, chunk, chunk_seeds, images=chunk_images).float().cpu()
                else:
                    videos = model.generate(chunk, chunk_seeds, num_inference_steps=num_inference_steps,
                                            guidance_scale=guidance_scale, sampler=sampling,
                                            images=chunk_images).float().cpu()
                chunks.append(videos)
                for i, (prompt, seed, video) in enumerate(zip(chunk, chunk_seeds, videos)):
                    stem = f"{start + i:04d}_seed{seed}_{slug(prompt)}"
                    upscale = viewing_upscale(*video.shape[-2:])  # tiny videos are viewed bigger
                    write_mp4(video, staging / f"{stem}.mp4", fps=file_fps, upscale=upscale)
                    written.append(out / f"{stem}.mp4")
                    entries.append({"file_name": f"{stem}.mp4", "prompt": prompt, "seed": int(seed),
                                    "upscale": upscale})
                    if gif:
                        entries[-1]["preview"] = f"{PREVIEWS}/{stem}.gif"
                        write_gif(video, staging / PREVIEWS / f"{stem}.gif", fps=file_fps)
                        written.append(out / PREVIEWS / f"{stem}.gif")
                progress.advance(task, len(chunk))
                if plain:
                    print(f"{description}: {start + len(chunk)}/{len(prompts)} videos", flush=True)
        write_manifest(staging, entries)
        out.mkdir(exist_ok=True)
        for file in sorted(staging.rglob("*"), key=lambda f: f.name == MANIFEST):  # the manifest last
            if file.is_file():
                (out / file.relative_to(staging)).parent.mkdir(exist_ok=True)
                os.replace(file, out / file.relative_to(staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return torch.cat(chunks), written


def inference_sampler(reward: str | None, best_of_n: int, noise_search_nfe: int | None, reward_guidance: float,
                      num_inference_steps: int | None, guidance_scale: float | None,
                      sampling: str = "pipeline") -> tuple[Callable | None, dict | None]:
    """The sampler ``generate`` uses for its inference-time options, and the log it fills (None, None when off).
    Best-of-N and noise search sample with ``sampling`` (``"pipeline"`` or ``"euler"``); reward guidance always with
    the Euler ODE, whose steps it differentiates."""
    chosen = [name for name, on in [("--best_of_n", best_of_n != 1), ("--noise_search_nfe", noise_search_nfe),
                                    ("--reward_guidance", reward_guidance != 0)] if on]
    if best_of_n < 1:
        raise UsageError(f"best_of_n must be at least 1, got {best_of_n}")
    if len(chosen) > 1:
        raise UsageError(f"choose one inference-time method, got {' and '.join(chosen)}")
    if not chosen:
        if reward is not None:
            raise UsageError("--reward is only used with --best_of_n, --noise_search_nfe or --reward_guidance")
        return None, None
    if reward is None:
        raise UsageError(f"{chosen[0]} needs --reward (a zoo reward name, hf-hub: id or folder)")
    from lit_videoalign import inference
    from lit_videoalign.evaluation import build_rewards

    judge = next(iter(build_rewards([reward]).values()))
    common = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    log = {"method": chosen[0].removeprefix("--"), "reward": reward, "scores": [], "nfe_per_video": None,
           "sampler": "euler" if reward_guidance else sampling}
    if reward_guidance:
        inference.require_differentiable(judge, "--reward_guidance")

    def sample(model: AlignmentModule, prompts: list[str], seeds: list[int],
               images: torch.Tensor | None = None) -> torch.Tensor:
        judge.to(model.device)
        if best_of_n != 1:
            result = inference.best_of_n(model, prompts, judge, best_of_n, seeds, sampler=sampling, images=images,
                                         **common)
        elif noise_search_nfe:
            result = inference.noise_search(model, prompts, judge, noise_search_nfe, seeds, sampler=sampling,
                                            images=images, **common)
        else:
            result = inference.reward_guided_sample(model, prompts, judge, seeds, scale=reward_guidance,
                                                    images=images, **common)
        log["scores"] += [float(x) for x in result.scores]
        log["nfe_per_video"] = result.nfe
        return result.videos

    return sample, log


def generate_set(model: AlignmentModule, name: str, prompts: list[str], seeds: list[int],
                 output_dir: str | os.PathLike, num_inference_steps: int | None, guidance_scale: float | None,
                 batch_size: int, sampling: str = "pipeline"):
    """Generate a :class:`~lit_videoalign.evaluation.VideoSet` (videos kept in memory, files written for viewing)."""
    from lit_videoalign.evaluation import VideoSet

    videos, files = generate_videos(model, prompts, seeds, output_dir, num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale, batch_size=batch_size, gif=False,
                                    description=f"generating {name}", sampling=sampling)
    return VideoSet(name=name, videos=videos, prompts=list(prompts), seeds=list(seeds),
                    files=[str(f) for f in files], fps=model.backbone.fps)
