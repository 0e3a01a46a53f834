"""Streaming generation (``videoalign generate --stream``): a causal student's chunks decoded and written as they are
produced, for videos longer than the model was trained on.

A causal student (:class:`~lit_videoalign.objectives.self_forcing.SelfForcing`) generates chunk by chunk against a
KV cache of its earlier chunks (``stream_latents``); with a rolling window of the last ``kv_window_chunks`` chunks,
``sink_chunks`` of them the first ones (a frame sink, LongLive), the cache stays bounded however long the video. Each
chunk is decoded and encoded into its MP4 as soon as it is finished, so the file grows while the stream runs, under a
progress bar in chunks per second.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from lit_videoalign.backbones.base import VideoBackbone
from lit_videoalign.errors import UsageError
from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.video_io import MANIFEST, StreamingMP4Writer, atomic_path


def check_stream_request(model: AlignmentModule, num_frames: int | None = None, window_chunks: int | None = None,
                         sink_chunks: int | None = None) -> tuple[int, ...]:
    """Refuse, in one line, a model that cannot stream (a bidirectional one, without ``stream_latents``), a length
    that is not a whole number of chunks, a KV window smaller than one chunk and a frame sink that fills the window;
    before anything is loaded or written.

    Args:
        num_frames: pixel frames of the streamed video (default: the model's trained ``num_frames``).
        window_chunks, sink_chunks: the KV window and frame sink (default: the model's).

    Returns:
        The latent shape ``(c, t', h', w')`` of one streamed video.
    """
    from lit_videoalign.objectives.self_forcing import check_streaming

    if not hasattr(model, "stream_latents"):
        raise UsageError(f"--stream needs a causal student (e.g. SelfForcing) that generates chunk by chunk; "
                         f"{type(model).__name__} is bidirectional: it denoises the whole clip at once")
    hp = model.hparams
    frames = hp.num_frames if num_frames is None else num_frames
    if frames < 1:
        raise UsageError(f"--num_frames must be positive, got {frames}")
    window = hp.kv_window_chunks if window_chunks is None else window_chunks
    sink = hp.sink_chunks if sink_chunks is None else sink_chunks
    try:
        shape = model.backbone.latent_shape(frames, hp.height, hp.width)  # (c, t', h', w')
        try:
            check_streaming(shape[1], hp.chunk_frames, None, 0)
        except ValueError as err:
            raise ValueError(f"--num_frames {frames}: {err}") from None
        check_streaming(shape[1], hp.chunk_frames, window, sink)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return shape


def decode_stream(backbone: VideoBackbone, chunks: Iterable[Tensor]) -> Iterator[Tensor]:
    """The new pixel frames ``(b, t, c, h, w)`` in ``[0, 1]`` of each latent chunk ``(b, c, t', h', w')``.

    Pixel-space backbones (the toy world) decode a chunk on its own. With a VAE, every chunk decodes all the latents
    so far and yields only the frames not yielded yet: the Wan VAE is causal in time (a frame depends on its own and
    earlier latent frames only), so this is exactly the whole video's decoding, frame for frame. It costs time
    quadratic in the length, as diffusers' decoder keeps its causal cache to itself within one call.
    """
    latents, emitted = None, 0
    for chunk in chunks:
        if backbone.pixel_space:
            yield backbone.decode_latents(chunk)  # (b, t, c, h, w)
            continue
        latents = chunk if latents is None else torch.cat([latents, chunk], dim=2)  # (b, c, t', h', w')
        video = backbone.decode_latents(latents)  # (b, t, c, h, w)
        yield video[:, emitted:]
        emitted = video.shape[1]


def stream_videos(model: AlignmentModule, prompts: Sequence[str], seeds: Sequence[int],
                  output_dir: str | os.PathLike, *, num_frames: int | None = None, window_chunks: int | None = None,
                  sink_chunks: int | None = None, num_inference_steps: int | None = None, batch_size: int = 8,
                  fps: int | None = None, description: str = "streaming") -> list[Path]:
    """Stream videos of ``num_frames`` frames from a causal student into ``output_dir``: one MP4 per prompt and seed,
    each growing (under a temporary name) chunk by chunk, then renamed, with ``metadata.jsonl``, once every video is
    done; a failed run leaves nothing behind. Seeds draw the noise on CPU as ``generate`` does (the same seed and
    length give the same video on every device).

    Args:
        num_frames: pixel frames per video, any whole number of chunks (default: the model's trained length).
        window_chunks: chunks kept in the KV cache (default: the model's ``kv_window_chunks``; None there: all).
        sink_chunks: first chunks kept in the window for good (default: the model's).
        num_inference_steps: denoising steps per chunk (default: the model's).
        batch_size: videos streamed at once.
        fps: frames per second of the files (default: the backbone's).

    Returns:
        The written MP4s (the manifest is not among them).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lit_videoalign.callbacks.video_sample_logger import slug, viewing_upscale
    from lit_videoalign.schedules.samplers import seeded_noise

    if batch_size < 1:
        raise UsageError(f"batch_size must be positive, got {batch_size}")
    if not prompts:
        raise UsageError("no prompts given; expected at least one")
    if len(seeds) != len(prompts):
        raise UsageError(f"got {len(seeds)} seeds for {len(prompts)} prompts; expected one seed per prompt")
    shape = check_stream_request(model, num_frames, window_chunks, sink_chunks)  # (c, t', h', w')
    hp = model.hparams
    chunks_per_video = shape[1] // hp.chunk_frames
    file_fps = fps or round(model.backbone.fps or 8)
    upscale = viewing_upscale(hp.height, hp.width)  # tiny videos are viewed bigger
    out = Path(output_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    writers, entries = [], []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} chunks/s"), TimeElapsedColumn())
    was_training = model.training
    model.eval()
    start, first_frame, frames_out = time.perf_counter(), None, 0
    try:
        with torch.no_grad(), Progress(*columns) as progress:
            total = -(-len(prompts) // batch_size) * chunks_per_video
            task = progress.add_task(description, total=total, rate="-")
            plain = not progress.console.is_terminal  # log files get one line per chunk instead of a live bar
            for at in range(0, len(prompts), batch_size):
                batch, batch_seeds = list(prompts[at:at + batch_size]), list(seeds[at:at + batch_size])
                stems = [f"{at + i:04d}_seed{s}_{slug(p)}" for i, (p, s) in enumerate(zip(batch, batch_seeds))]
                batch_writers = [StreamingMP4Writer(out / f"{stem}.mp4", fps=file_fps, upscale=upscale)
                                 for stem in stems]
                writers += batch_writers
                cond = model.backbone.encode_prompts(batch)
                noise, generators = seeded_noise(shape, batch_seeds, model.device)  # (b, c, t', h', w')
                chunks = model.stream_latents(noise, cond, num_inference_steps=num_inference_steps,
                                              generator=generators, window_chunks=window_chunks,
                                              sink_chunks=sink_chunks)
                for video in decode_stream(model.backbone, chunks):  # (b, t, c, h, w) new frames
                    video = video.float().cpu()
                    for writer, frames in zip(batch_writers, video):
                        writer.write(frames)
                    frames_out += video.shape[0] * video.shape[1]
                    if first_frame is None:
                        first_frame = time.perf_counter() - start
                    done = progress.tasks[task].completed + 1
                    rate = done / (time.perf_counter() - start)
                    progress.update(task, advance=1, rate=f"{rate:.2f}")
                    if plain:
                        print(f"{description}: chunk {done}/{total}, {rate:.2f} chunks/s", flush=True)
                for writer in batch_writers:
                    writer.close()  # complete, still under its temporary name
                entries += [{"file_name": f"{stem}.mp4", "prompt": p, "seed": int(s), "upscale": upscale}
                            for stem, p, s in zip(stems, batch, batch_seeds)]
        written = [writer.commit() for writer in writers]
        with atomic_path(out / MANIFEST) as tmp:
            tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
    except BaseException:
        for writer in writers:
            writer.discard()
        if created:
            try:
                out.rmdir()  # only if nothing else appeared in it meanwhile
            except OSError:
                pass
        raise
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - start
    print(f"streamed {len(written)} video{'s' * (len(written) != 1)} of {frames_out // len(written)} frames: "
          f"first frame after {first_frame:.2f} s, {frames_out / elapsed:.1f} frames/s, {total / elapsed:.2f} "
          "chunks/s")
    return written
