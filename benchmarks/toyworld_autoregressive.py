"""Causal students against their bidirectional teacher on the toy world, at the trained length and streamed past it.

    python -m benchmarks.toyworld_autoregressive \
        --student self_forcing=configs/toyworld/self_forcing.yaml:outputs/self_forcing/last.ckpt \
        --student teacher_forcing=configs/toyworld/self_forcing.yaml:outputs/teacher_forcing/last.ckpt

A student is ``NAME=CONFIG:WEIGHTS`` (:func:`benchmarks.toyworld_eval.load_student`), a causal
:class:`~lit_videoalign.objectives.self_forcing.SelfForcing` module. The teacher is the shipped bidirectional base
sampled with ``--teacher_steps`` Euler steps and guidance 2, as it was trained to be used; at 2x and 4x the trained
length it denoises the whole longer clip at once (its RoPE table reaches that far), the students stream it chunk by
chunk with a rolling KV window of ``--window_chunks`` chunks (the trained context) and ``--sink_chunks`` sink chunks.

On ``--num_prompts`` held-out single-ball prompts (test seeds, one video each, the same seed for every model):

- the trajectory error against the toy world's true physics, for as long as the video runs (the start fitted on the
  first frames, then simulated; :func:`benchmarks.toyworld_eval.trajectory_error`), at 1x, 2x and 4x the trained
  length, with paired 95 % intervals against the teacher, and its growth from 1x to 4x per model;
- the held-out rewards (``physics_learned``, ``newton``, ``quality``) of the last trained-length window of each video
  (at 1x, the whole video), which is what a viewer of the stream's end sees;
- frames per second and time to first frame on this CPU (one video: a stream's latency; and frames per second of
  ``--throughput_batch`` videos at once: throughput), ``--threads`` torch threads, best of ``--timing_repeats``.

Writes ``OUTPUT.json``, ``OUTPUT.md``, ``OUTPUT.png`` (mean tracking error per frame index over the longest videos, the
error-over-length curve) and ``OUTPUT.gif`` (the longest videos of the first prompts, one row per model) for
``--output OUTPUT``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from benchmarks import write_result
from benchmarks.toyworld_eval import (
    evaluate_length,
    held_out_scenes,
    load_rewards,
    load_student,
    machine,
    paired_ci95,
    trajectory_curve,
)
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.video_io import video_grid, write_gif

ROOT = Path(__file__).resolve().parent.parent
REWARDS = ("physics_learned", "newton", "quality")
TRAINED_FRAMES = 16
GIF_VIDEOS = 2  # held-out prompts per model in the GIF of the longest videos


def teacher(steps: int, guidance: float) -> SFT:
    """The shipped bidirectional base as it samples: ``steps`` Euler steps with classifier-free guidance."""
    backbone = DiffusersVideoBackbone("builtin:toyworld-base", max_sequence_length=24)
    return SFT(backbone, num_inference_steps=steps, guidance_scale=guidance).eval()


@torch.no_grad()
def sample(model, prompts: list[str], seeds: list[int], frames: int, window: int | None, sink: int) -> torch.Tensor:
    """Videos ``(b, frames, 3, 32, 32)``: a causal student streams them, the teacher denoises the whole clip."""
    noise = model.initial_noise(seeds, num_frames=frames)
    cond = model.backbone.encode_prompts(prompts)
    if hasattr(model, "stream_latents"):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        latents = torch.cat(list(model.stream_latents(noise, cond, generator=gens, window_chunks=window,
                                                      sink_chunks=sink)), dim=2)
    else:
        latents = model.sample_latents(noise, cond, sampler="euler")
    return model.backbone.decode_latents(latents)


def timing(model, frames: int, window: int | None, sink: int, repeats: int, batch: int = 1) -> dict:
    """Frames per second and time to first frame (s) of ``batch`` videos of ``frames`` frames at once, best of
    ``repeats``: one video is a stream's latency, a batch its throughput."""
    best_total, best_first = math.inf, math.inf
    cond = model.backbone.encode_prompts(["a red ball falls"] * batch)
    for _ in range(repeats):
        noise = model.initial_noise(list(range(batch)), num_frames=frames)
        start = time.perf_counter()
        with torch.no_grad():
            if hasattr(model, "stream_latents"):
                first = None
                for chunk in model.stream_latents(noise, cond, window_chunks=window, sink_chunks=sink):
                    model.backbone.decode_latents(chunk)
                    first = first or time.perf_counter() - start
            else:
                model.backbone.decode_latents(model.sample_latents(noise, cond, sampler="euler"))
                first = None
        total = time.perf_counter() - start
        best_total = min(best_total, total)
        best_first = min(best_first, first if first is not None else total)  # a bidirectional model: all at once
    return {"fps": batch * frames / best_total, "time_to_first_frame_s": best_first, "seconds_per_video": best_total,
            "videos": batch}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    models = {"teacher": teacher(args.teacher_steps, args.teacher_guidance)}
    for spec in args.student:
        name, model = load_student(spec)
        models[name] = model
    scenes = held_out_scenes(args.num_prompts)
    prompts, seeds = [s.prompt for s in scenes], list(range(args.num_prompts))
    rewards = load_rewards(REWARDS)
    rows: dict[str, dict] = {}
    curves: dict[str, list[float]] = {}
    clips: list[torch.Tensor] = []  # per model, its first GIF_VIDEOS longest videos: one GIF row each
    for name, model in models.items():
        rows[name] = {}
        for factor in args.lengths:
            frames = TRAINED_FRAMES * factor
            videos = torch.cat([sample(model, prompts[i:i + args.batch_size], seeds[i:i + args.batch_size], frames,
                                       args.window_chunks, args.sink_chunks)
                                for i in range(0, len(prompts), args.batch_size)])
            rows[name][f"{factor}x"] = evaluate_length(videos, prompts, rewards, TRAINED_FRAMES, args.fit_frames)
            if factor == max(args.lengths):
                curves[name] = trajectory_curve(videos, args.fit_frames)
                clips.append(videos[:GIF_VIDEOS])
        rows[name]["timing"] = timing(model, TRAINED_FRAMES, args.window_chunks, args.sink_chunks,
                                      args.timing_repeats)
        rows[name]["throughput"] = timing(model, TRAINED_FRAMES, args.window_chunks, args.sink_chunks,
                                          args.timing_repeats, args.throughput_batch)
        print(f"{name}: " + ", ".join(f"{k} traj {v['trajectory_error']:.2f}" for k, v in rows[name].items()
                                      if k not in ("timing", "throughput")), flush=True)
    for name, row in rows.items():
        for length, cells in row.items():
            if length not in ("timing", "throughput") and name != "teacher":
                cells["trajectory_error_vs_teacher"] = paired_ci95(cells, rows["teacher"][length], "trajectory_error")
        lengths = [k for k in row if k not in ("timing", "throughput")]
        row["growth"] = row[lengths[-1]]["trajectory_error"] - row[lengths[0]]["trajectory_error"]
        row["speedup_vs_teacher"] = row["timing"]["fps"] / rows["teacher"]["timing"]["fps"]
        row["throughput_speedup_vs_teacher"] = row["throughput"]["fps"] / rows["teacher"]["throughput"]["fps"]
    gif = Path(args.output).with_suffix(".gif")
    gif.parent.mkdir(parents=True, exist_ok=True)
    write_gif(video_grid(torch.cat(clips), ncols=GIF_VIDEOS), gif, upscale=2)
    return {"command": "python -m benchmarks.toyworld_autoregressive " + " ".join(args.argv), "rows": rows,
            "gif": str(gif), "gif_rows": list(models),
            "curves": curves, "lengths": [f"{f}x" for f in args.lengths], "num_videos": len(prompts),
            "machine": machine(), "window_chunks": args.window_chunks, "sink_chunks": args.sink_chunks,
            "teacher_steps": args.teacher_steps, "threads": args.threads, "throughput_batch": args.throughput_batch}


def markdown(result: dict) -> str:
    lengths, rows = result["lengths"], result["rows"]
    lines = ["# Toy world, autoregressive: causal students vs the bidirectional teacher, streamed past 16 frames", "",
             f"{result['num_videos']} held-out single-ball prompts, one video each, the same seed for every model. "
             f"The teacher denoises the whole clip ({result['teacher_steps']} Euler steps, guidance 2); the students "
             f"stream 4-frame chunks with a KV window of {result['window_chunks']} chunks and {result['sink_chunks']} "
             "sink chunks. Trajectory error: mean distance (px) between the tracked ball and the true physics from "
             "its fitted start (lower is better), ± standard error, Δ against the teacher with a paired 95 % interval. "
             "Rewards are those of each video's last 16 frames. Growth: trajectory error at the longest minus the "
             f"trained length. Timing on {result['machine']}, 16-frame videos: fps and first frame of one video (a "
             "stream's latency), and fps of "
             f"{result['throughput_batch']} videos at once (throughput).", "",
             "| model | " + " | ".join(f"traj {k} | Δ vs teacher" for k in lengths) +
             f" | growth | physics_learned ({lengths[0]} / {lengths[-1]} end) | newton ({lengths[0]} / "
             f"{lengths[-1]} end) | fps | first frame (s) | speed-up | fps ({result['throughput_batch']} videos) | "
             "speed-up |",
             "|---|" + "---|---|" * len(lengths) + "---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        cells = []
        for k in lengths:
            c = row[k]
            delta = c.get("trajectory_error_vs_teacher")
            cells += [f"{c['trajectory_error']:.2f} ± {c['trajectory_error_sem']:.2f}",
                      "" if delta is None else
                      f"{delta[0]:+.2f} ({delta[0] - delta[1]:+.2f}..{delta[0] + delta[1]:+.2f})"]
        first, last = row[lengths[0]], row[lengths[-1]]
        t, tp = row["timing"], row["throughput"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['growth']:+.2f} | "
                     f"{first['physics_learned']:.2f} / {last['physics_learned']:.2f} | "
                     f"{first['newton']:.3f} / {last['newton']:.3f} | {t['fps']:.1f} | "
                     f"{t['time_to_first_frame_s']:.3f} | {row['speedup_vs_teacher']:.1f}x | {tp['fps']:.1f} | "
                     f"{row['throughput_speedup_vs_teacher']:.1f}x |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, curve in result["curves"].items():
        ax.plot(range(len(curve)), curve, label=name)
    for k in range(1, len(result["lengths"]) + 2):
        ax.axvline(TRAINED_FRAMES * k - 0.5, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("frame")
    ax.set_ylabel("tracking error vs true physics (px)")
    ax.set_title("error over length (trained: 16 frames)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", nargs="*", default=[], help="NAME=CONFIG:WEIGHTS of a causal student")
    parser.add_argument("--num_prompts", type=int, default=48)
    parser.add_argument("--lengths", nargs="+", type=int, default=[1, 2, 4], help="multiples of the trained length")
    parser.add_argument("--window_chunks", type=int, default=4)
    parser.add_argument("--sink_chunks", type=int, default=0)
    parser.add_argument("--teacher_steps", type=int, default=40)
    parser.add_argument("--teacher_guidance", type=float, default=2.0)
    parser.add_argument("--fit_frames", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing_repeats", type=int, default=3)
    parser.add_argument("--throughput_batch", type=int, default=16, help="videos at once for the throughput")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run that measures nothing")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "toyworld_autoregressive"))
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.num_prompts, args.lengths, args.teacher_steps, args.timing_repeats, args.batch_size = 2, [1, 2], 2, 1, 2
        args.throughput_batch = 2
    if sorted(args.lengths) != args.lengths or args.lengths[0] < 1:
        raise ValueError(f"--lengths must be increasing positive multiples of the trained length, got {args.lengths}")
    result = run(args)
    out = write_result(result, args.output, markdown)
    plot(result, Path(args.output).with_suffix(".png"))
    return out


if __name__ == "__main__":
    main()
