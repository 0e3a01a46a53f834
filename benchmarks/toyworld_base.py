"""Evaluate a toy-world base model: held-out flow-matching loss and whether its samples do what the prompt says.

    python -m benchmarks.toyworld_base [--pipeline builtin:toyworld-base] [--gif docs/toyworld_base_samples.gif]

Prompts come from held-out toy-world scenes (the test seed range, never trained on). Colour, direction and falling
are read back from the generated pixels with ``lit_videoalign.data.toyworld.prompt_agreement``; the same measure on
the real videos of those scenes is reported beside it as the ceiling.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import TEST_SEED_OFFSET, ToyWorld, ToyWorldDataset, prompt_agreement
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.video_io import video_grid, write_gif

GIF_PROMPTS = ["a red ball falls and bounces", "a blue ball moves left and bounces", "a green ball moves right",
               "a yellow ball falls", "a white ball moves right and bounces"]


def rates(videos: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    agree = [prompt_agreement(v, p) for v, p in zip(videos, prompts)]
    return {k: sum(a[k] for a in agree) / len(agree) for k in ("colour", "direction", "falls")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="builtin:toyworld-base")
    parser.add_argument("--num_videos", type=int, default=48)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--num_inference_steps", type=int, default=40)
    parser.add_argument("--gif", default=None, help="also write a GIF of samples (one row per prompt)")
    args = parser.parse_args(argv)

    model = SFT(DiffusersVideoBackbone(args.pipeline, max_sequence_length=24),
                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    world = ToyWorld(max_balls=1)
    scenes = [world.example(TEST_SEED_OFFSET + i) for i in range(args.num_videos)]
    prompts = [s.prompt for s in scenes]

    # Held-out flow-matching loss on the two-ball-inclusive test split, fixed noise per batch.
    held_out = ToyWorldDataset(ToyWorld(), 64, TEST_SEED_OFFSET)
    losses = []
    with torch.no_grad():
        for start in range(0, len(held_out), 16):
            items = [held_out[i] for i in range(start, start + 16)]
            batch = {"video": torch.stack([x["video"] for x in items]), "prompt": [x["prompt"] for x in items]}
            losses.append(model.loss(batch, generator=torch.Generator().manual_seed(start), dropout=0.0).item())

    start = time.perf_counter()
    samples = torch.cat([model.generate(prompts[i:i + 16], seeds=list(range(i, min(i + 16, len(prompts)))))
                         for i in range(0, len(prompts), 16)])
    seconds = time.perf_counter() - start
    result = {
        "pipeline": args.pipeline,
        "held_out_loss": sum(losses) / len(losses),
        "samples": rates(samples, prompts),
        "real_videos": rates(torch.stack([s.video for s in scenes]), prompts),
        "num_videos": len(prompts),
        "guidance_scale": args.guidance_scale,
        "num_inference_steps": args.num_inference_steps,
        "sampling_seconds_per_video": seconds / len(prompts),
    }
    print(json.dumps(result, indent=2))
    if args.gif:
        videos = model.generate(GIF_PROMPTS, seeds=list(range(len(GIF_PROMPTS))))
        print(f"wrote {write_gif(video_grid(videos, ncols=1), args.gif, upscale=3)}")
    return result


if __name__ == "__main__":
    main()
