"""Evaluate a toy-world base model: held-out flow-matching loss and whether its samples do what the prompt says.

    python -m benchmarks.toyworld_base [--pipeline PIPELINE [OTHER ...]] [--gif docs/toyworld_base_samples.gif]

Several pipelines are measured side by side on the same prompts, seeds and noise (e.g. a new base against the one it
replaces); the GIF shows the first.

Prompts come from held-out toy-world scenes (the test seed range, never trained on). Colour, direction and falling
are read back from the generated pixels with ``lit_videoalign.data.toyworld.prompt_agreement``; the trajectory error
is the distance of the tracked ball from the true physics continued from its first frames
(``benchmarks.toyworld_alignment.trajectory_error``); the zoo's ``newton``, ``physics_learned`` and ``quality`` score
the same videos. Every measure is also taken on the real videos of those scenes, the ceiling.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import add_output_argument, output_path, write_result
from benchmarks.toyworld_eval import (
    SAMPLER,
    agreement_rates,
    generate,
    held_out_scenes,
    load_rewards,
    reward_scores,
    trajectory_error,
)
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import TEST_SEED_OFFSET, ToyWorld, ToyWorldDataset
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.video_io import video_grid, write_gif

GIF_PROMPTS = ["a red ball falls and bounces", "a blue ball moves left and bounces", "a green ball moves right",
               "a yellow ball falls", "a white ball moves right and bounces"]


REWARDS = ("newton", "physics_learned", "quality")


@torch.no_grad()
def measures(videos: torch.Tensor, prompts: list[str], rewards: dict) -> dict[str, float]:
    """Prompt agreement rates, mean trajectory error (px, over videos where a ball is found) and mean rewards."""
    out = {k: v for k, v in agreement_rates(videos, prompts).items() if k != "all"}
    error = trajectory_error(videos)
    found = error[~error.isnan()]
    out["trajectory_error_px"] = found.mean().item() if len(found) else float("nan")
    out["ball_found"] = len(found) / len(error)
    for name, values in reward_scores(videos, prompts, rewards).items():
        out[name] = torch.tensor(values).mean().item()
    return out


def evaluate(pipeline: str, prompts: list[str], rewards: dict, num_inference_steps: int,
             guidance_scale: float) -> tuple[dict, SFT]:
    """Held-out loss (fixed noise) and the measures of one pipeline's samples (seed ``i`` for prompt ``i``)."""
    model = SFT(DiffusersVideoBackbone(pipeline, max_sequence_length=24),
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    # Held-out flow-matching loss on the two-ball-inclusive test split, fixed noise per batch.
    held_out = ToyWorldDataset(ToyWorld(), 64, TEST_SEED_OFFSET)
    losses = []
    with torch.no_grad():
        for start in range(0, len(held_out), 16):
            items = [held_out[i] for i in range(start, start + 16)]
            batch = {"video": torch.stack([x["video"] for x in items]), "prompt": [x["prompt"] for x in items]}
            losses.append(model.loss(batch, generator=torch.Generator().manual_seed(start), dropout=0.0).item())
    start = time.perf_counter()
    samples = generate(model, prompts, list(range(len(prompts))), batch_size=16)
    seconds = time.perf_counter() - start
    row = {"pipeline": pipeline, "held_out_loss": sum(losses) / len(losses), **measures(samples, prompts, rewards),
           "sampling_seconds_per_video": seconds / len(prompts)}
    return row, model


COLUMNS = [("held_out_loss", "held-out loss", "{:.4f}"), ("colour", "colour", "{:.0%}"),
           ("direction", "direction", "{:.0%}"), ("falls", "falls", "{:.0%}"),
           ("trajectory_error_px", "trajectory error (px)", "{:.2f}"), ("newton", "newton", "{:.3f}"),
           ("physics_learned", "physics_learned", "{:+.2f}"), ("quality", "quality", "{:+.2f}"),
           ("sampling_seconds_per_video", "s / video", "{:.2f}")]


def markdown(result: dict) -> str:
    lines = ["# Toy-world base: held-out loss and samples\n",
             f"{result['num_videos']} held-out one-ball prompts (test seeds), seed i for prompt i, "
             f"{result['num_inference_steps']} Euler steps, guidance {result['guidance_scale']}; held-out loss on 64 "
             f"test scenes (one or two balls) with fixed noise; agreement rates read back from the pixels; trajectory "
             f"error over videos where a ball is found; rewards are means. {result['torch_threads']} torch threads.\n",
             "| model | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in [*result["models"], {"pipeline": "real videos (ceiling)", **result["real_videos"]}]:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in COLUMNS]
        lines.append(f"| {row['pipeline']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", nargs="+", default=["builtin:toyworld-base"])
    parser.add_argument("--num_videos", type=int, default=48)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--num_inference_steps", type=int, default=40)
    parser.add_argument("--gif", default=None, help="also write a GIF of the first pipeline's samples (a row a prompt)")
    add_output_argument(parser, "benchmarks/results/toyworld_base")
    args = parser.parse_args(argv)

    scenes = held_out_scenes(args.num_videos)
    prompts = [s.prompt for s in scenes]
    rewards = load_rewards(REWARDS)
    rows, first = [], None
    for pipeline in args.pipeline:
        row, model = evaluate(pipeline, prompts, rewards, args.num_inference_steps, args.guidance_scale)
        rows.append(row)
        first = first or model
    result = {"models": rows, "real_videos": measures(torch.stack([s.video for s in scenes]), prompts, rewards),
              "num_videos": len(prompts), "guidance_scale": args.guidance_scale,
              "num_inference_steps": args.num_inference_steps, "torch_threads": torch.get_num_threads()}
    write_result(result, output_path(args), markdown)
    if args.gif:
        videos = first.generate(GIF_PROMPTS, seeds=list(range(len(GIF_PROMPTS))), sampler=SAMPLER)
        print(f"wrote {write_gif(video_grid(videos, ncols=1), args.gif, upscale=3)}")
    return result


if __name__ == "__main__":
    main()
