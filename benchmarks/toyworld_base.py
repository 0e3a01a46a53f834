"""Evaluate a toy-world base model: held-out flow-matching loss and whether its samples do what the prompt says.

    python -m benchmarks.toyworld_base [--pipeline PIPELINE [OTHER ...]] [--gif docs/toyworld_base_samples.gif]

Several pipelines are measured side by side on the same prompts, seeds and noise (e.g. a new base against the one it
replaces); the GIF shows the first.

Prompts come from held-out toy-world scenes (the test seed range, never trained on). Colour, direction and falling
are read back from the generated pixels with ``lit_videoalign.data.toyworld.prompt_agreement``; the trajectory error
is the distance of the tracked ball from the true physics continued from its first frames
(``benchmarks.toyworld_alignment.trajectory_error``); the zoo's ``newton``, ``physics_learned`` and ``quality`` score
the same videos. Every measure is also taken on the real videos of those scenes, the ceiling.

With ``--first_frame_image`` (an image-to-video base such as ``builtin:toyworld-i2v``) every sample is conditioned on
its scene's first frame (the held-out loss on each clip's own), and two more measures say whether the start is kept:
the first-frame error (mean absolute pixel difference of frame 0 from the given image) and the colour drift (mean
over frames of the distance between the ball's mean colour and its colour in the given image, the drift users report
in image-to-video RL).
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
from lit_videoalign.data.toyworld import BACKGROUND, TEST_SEED_OFFSET, ToyWorld, ToyWorldDataset
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.video_io import video_grid, write_gif

GIF_PROMPTS = ["a red ball falls and bounces", "a blue ball moves left and bounces", "a green ball moves right",
               "a yellow ball falls", "a white ball moves right and bounces"]


REWARDS = ("newton", "physics_learned", "quality")


def colour_drift(videos: torch.Tensor, images: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Per video ``(n,)``: the mean over frames of the Euclidean RGB distance between the foreground's mean colour
    and the foreground's mean colour in the given image ``(n, c, h, w)`` (NaN where either shows no foreground)."""
    background = torch.tensor(BACKGROUND).view(1, 1, 3, 1, 1)

    def mean_colour(x: torch.Tensor) -> torch.Tensor:  # (n, t, c, h, w) -> (n, t, c)
        mask = ((x - background).abs().sum(2, keepdim=True) > threshold).float()
        return (x * mask).sum((3, 4)) / mask.sum((3, 4))

    reference = mean_colour(images[:, None])  # (n, 1, c)
    return (mean_colour(videos) - reference).norm(dim=2).nanmean(1)


@torch.no_grad()
def measures(videos: torch.Tensor, prompts: list[str], rewards: dict,
             images: torch.Tensor | None = None) -> dict[str, float]:
    """Prompt agreement rates, mean trajectory error (px, over videos where a ball is found) and mean rewards; given
    the conditioning ``images``, the first-frame error and the colour drift too."""
    out = {k: v for k, v in agreement_rates(videos, prompts).items() if k != "all"}
    if images is not None:
        out["first_frame_error"] = (videos[:, 0] - images).abs().mean().item()
        drift = colour_drift(videos, images)
        out["colour_drift"] = drift[~drift.isnan()].mean().item()
    error = trajectory_error(videos)
    found = error[~error.isnan()]
    out["trajectory_error_px"] = found.mean().item() if len(found) else float("nan")
    out["ball_found"] = len(found) / len(error)
    for name, values in reward_scores(videos, prompts, rewards).items():
        out[name] = torch.tensor(values).mean().item()
    return out


def evaluate(pipeline: str, prompts: list[str], rewards: dict, num_inference_steps: int,
             guidance_scale: float, images: torch.Tensor | None = None) -> tuple[dict, SFT]:
    """Held-out loss (fixed noise) and the measures of one pipeline's samples (seed ``i`` for prompt ``i``; with
    ``images``, image-to-video from image ``i``, and the loss on each clip conditioned on its own first frame)."""
    model = SFT(DiffusersVideoBackbone(pipeline, max_sequence_length=24),
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    # Held-out flow-matching loss on the two-ball-inclusive test split, fixed noise per batch.
    held_out = ToyWorldDataset(ToyWorld(), 64, TEST_SEED_OFFSET)
    losses = []
    with torch.no_grad():
        for start in range(0, len(held_out), 16):
            items = [held_out[i] for i in range(start, start + 16)]
            batch = {"video": torch.stack([x["video"] for x in items]), "prompt": [x["prompt"] for x in items]}
            if images is not None:
                batch["image"] = batch["video"][:, 0]
            losses.append(model.loss(batch, generator=torch.Generator().manual_seed(start), dropout=0.0).item())
    start = time.perf_counter()
    if images is None:
        samples = generate(model, prompts, list(range(len(prompts))), batch_size=16)
    else:
        samples = torch.cat([generate(model, prompts[i:i + 16], list(range(i, min(i + 16, len(prompts)))),
                                      images=images[i:i + 16]) for i in range(0, len(prompts), 16)])
    seconds = time.perf_counter() - start
    row = {"pipeline": pipeline, "held_out_loss": sum(losses) / len(losses),
           **measures(samples, prompts, rewards, images),
           "sampling_seconds_per_video": seconds / len(prompts)}
    return row, model


COLUMNS = [("held_out_loss", "held-out loss", "{:.4f}"), ("colour", "colour", "{:.0%}"),
           ("direction", "direction", "{:.0%}"), ("falls", "falls", "{:.0%}"),
           ("trajectory_error_px", "trajectory error (px)", "{:.2f}"), ("newton", "newton", "{:.3f}"),
           ("physics_learned", "physics_learned", "{:+.2f}"), ("quality", "quality", "{:+.2f}"),
           ("first_frame_error", "first-frame error", "{:.3f}"), ("colour_drift", "colour drift", "{:.3f}"),
           ("sampling_seconds_per_video", "s / video", "{:.2f}")]


def markdown(result: dict) -> str:
    lines = ["# Toy-world base: held-out loss and samples\n",
             f"{result['num_videos']} held-out one-ball prompts (test seeds), seed i for prompt i, "
             f"{result['num_inference_steps']} Euler steps, guidance {result['guidance_scale']}; held-out loss on 64 "
             f"test scenes (one or two balls) with fixed noise; agreement rates read back from the pixels; trajectory "
             f"error over videos where a ball is found; rewards are means. {result['torch_threads']} torch threads."
             + (" Image-to-video: each sample from its scene's first frame (first-frame error: mean |frame 0 - image|; "
                "colour drift: mean RGB distance of the ball's colour from the image's over frames)."
                if result.get("first_frame_image") else "") + "\n",
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
    parser.add_argument("--first_frame_image", action="store_true",
                        help="image-to-video: condition each sample on its held-out scene's first frame")
    add_output_argument(parser, "benchmarks/results/toyworld_base")
    args = parser.parse_args(argv)

    scenes = held_out_scenes(args.num_videos)
    prompts = [s.prompt for s in scenes]
    rewards = load_rewards(REWARDS)
    images = torch.stack([s.video[0] for s in scenes]) if args.first_frame_image else None
    rows, first = [], None
    for pipeline in args.pipeline:
        row, model = evaluate(pipeline, prompts, rewards, args.num_inference_steps, args.guidance_scale, images)
        rows.append(row)
        first = first or model
    real = torch.stack([s.video for s in scenes])
    result = {"models": rows, "real_videos": measures(real, prompts, rewards, images),
              "first_frame_image": args.first_frame_image,
              "num_videos": len(prompts), "guidance_scale": args.guidance_scale,
              "num_inference_steps": args.num_inference_steps, "torch_threads": torch.get_num_threads()}
    write_result(result, output_path(args), markdown)
    if args.gif:
        if images is None:
            videos = first.generate(GIF_PROMPTS, seeds=list(range(len(GIF_PROMPTS))), sampler=SAMPLER)
        else:  # the first held-out scenes, from their first frames
            n = len(GIF_PROMPTS)
            videos = first.generate(prompts[:n], seeds=list(range(n)), sampler=SAMPLER, images=images[:n])
        print(f"wrote {write_gif(video_grid(videos, ncols=1), args.gif, upscale=3)}")
    return result


if __name__ == "__main__":
    main()
