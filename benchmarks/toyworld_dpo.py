"""Evaluate a DPO-trained toy-world model against its base: held-out physics score, win rate and before/after GIFs.

    python -m benchmarks.toyworld_dpo --pipeline outputs/dpo/pipeline            # a PipelineExport folder
    python -m benchmarks.toyworld_dpo --ckpt outputs/dpo/.../last.ckpt            # or a LoRA/full checkpoint

Prompts come from held-out toy-world scenes (the test seed range, never used for training pairs), one ball each.
The base and the trained model sample every video from the same seed (paired comparison); every video has its own
seed, so ``num_prompts x seeds_per_prompt`` videos are that many independent noise draws. Scores:

- ``physics_learned`` (the shipped learned physics reward, ``reward_zoo/pretrained/physics_learned``): the held-out
  physics score. It ranks neither the offline pairs (those are ground truth against corruptions) nor the online ones
  (ranked by ``newton``), so it is not the training signal of either config;
- trajectory agreement with the prompt (``lit_videoalign.data.toyworld.prompt_agreement``: colour, direction, and
  whether the ball accelerates downwards), read back from the pixels;
- trajectory error against the toy world's true physics
  (:func:`benchmarks.toyworld_eval.trajectory_error`, pixels, lower is better): a physics score no reward ranks;
- ``newton`` as well, labelled as the online config's training reward.

The win rate counts, per (prompt, seed), the trained model's ``physics_learned`` score above the base's
(ties count half). Writes ``OUTPUT.json``, ``OUTPUT.md`` and a GIF grid ``OUTPUT_samples.gif`` (rows: prompts;
columns: the real scene, base, trained) for ``--output OUTPUT``. The measures are :mod:`benchmarks.toyworld_eval`'s.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import add_output_argument, output_path, write_result
from benchmarks.toyworld_eval import (
    agreement_rates,
    bootstrap_ci,
    generate,
    held_out_scenes,
    load_reward,
    reward_scores,
    trajectory_error,
)
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.backbones.fingerprint import check_fingerprint
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.video_io import video_grid, write_gif


def sampler(backbone: DiffusersVideoBackbone, args: argparse.Namespace, **lora) -> SFT:
    """An AlignmentModule used only for its sampler (the objective does not matter for generation)."""
    return SFT(backbone, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, **lora)


def load_trained(args: argparse.Namespace) -> SFT:
    """The trained model from a pipeline folder, or from a Lightning checkpoint on top of the base."""
    if args.pipeline:
        return sampler(DiffusersVideoBackbone(args.pipeline, max_sequence_length=24), args)
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)  # never unpickles objects
    if "state_dict" not in ckpt:
        raise ValueError(f"{args.ckpt} is not a Lightning checkpoint (no 'state_dict')")
    hp = ckpt.get("hyper_parameters", {})
    lora = {k: hp.get(k) for k in ("lora_rank", "lora_alpha", "lora_target_modules")}
    model = sampler(DiffusersVideoBackbone(args.base, max_sequence_length=24), args, **lora)
    # A LoRA checkpoint holds only what trains: the frozen base is the one just loaded, if its fingerprint matches.
    check_fingerprint(ckpt.get("frozen_base_fingerprint"), model.base_fingerprint(), args.ckpt)
    state = {k[len("backbone."):]: v for k, v in {**model.frozen_state_dict(), **ckpt["state_dict"]}.items()
             if k.startswith("backbone.")}
    model.backbone.load_state_dict(state, strict=True)
    return model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", help="trained pipeline folder (PipelineExport)")
    source.add_argument("--ckpt", help="trained Lightning checkpoint (LoRA or full), loaded onto --base")
    parser.add_argument("--base", default="builtin:toyworld-base")
    parser.add_argument("--num_prompts", type=int, default=48)
    parser.add_argument("--seeds_per_prompt", type=int, default=2)
    parser.add_argument("--num_inference_steps", type=int, default=40)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--gif_prompts", type=int, default=6, help="rows of the GIF grid")
    parser.add_argument("--threads", type=int, default=None)
    add_output_argument(parser, "benchmarks/results/toyworld_dpo")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    scenes = held_out_scenes(args.num_prompts)
    prompts = [s.prompt for s in scenes for _ in range(args.seeds_per_prompt)]
    seeds = list(range(len(prompts)))  # one noise draw per video (a shared seed list would repeat the same noises)
    models = {"base": sampler(DiffusersVideoBackbone(args.base, max_sequence_length=24), args),
              "trained": load_trained(args)}
    rewards = {"physics_learned": load_reward("physics_learned"), "newton": load_reward("newton")}

    videos, seconds = {}, {}
    for name, model in models.items():
        start = time.perf_counter()
        videos[name] = generate(model, prompts, seeds, batch_size=16)
        seconds[name] = time.perf_counter() - start
    scores = {k: reward_scores(v, prompts, rewards) for k, v in videos.items()}
    physics = {k: torch.tensor(s["physics_learned"]) for k, s in scores.items()}  # (n,)
    newton_scores = {k: torch.tensor(s["newton"]) for k, s in scores.items()}
    trajectory = {k: trajectory_error(v) for k, v in videos.items()}  # (n,) pixels, NaN when no ball
    diff = physics["trained"] - physics["base"]
    wins, ties = int((diff > 0).sum()), int((diff == 0).sum())
    both = torch.isfinite(trajectory["base"]) & torch.isfinite(trajectory["trained"])
    traj_diff = (trajectory["trained"] - trajectory["base"])[both]  # negative: closer to the true physics
    result = {
        "trained": args.pipeline or args.ckpt, "base": args.base,
        "num_prompts": args.num_prompts, "seeds_per_prompt": args.seeds_per_prompt, "num_videos": len(prompts),
        "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
        "held_out_physics": {k: float(v.mean()) for k, v in physics.items()},
        "held_out_physics_diff": float(diff.mean()), "held_out_physics_diff_ci95": bootstrap_ci(diff),
        "win_rate_vs_base": (wins + 0.5 * ties) / len(prompts), "wins": wins, "ties": ties,
        "losses": len(prompts) - wins - ties,
        "trajectory_agreement": {k: agreement_rates(v, prompts) for k, v in videos.items()},
        "trajectory_error_px": {k: float(v[both].mean()) for k, v in trajectory.items()},
        "trajectory_error_diff": float(traj_diff.mean()), "trajectory_error_diff_ci95": bootstrap_ci(traj_diff),
        "trajectory_win_rate_vs_base": float((traj_diff < 0).float().mean()), "trajectory_pairs": int(both.sum()),
        "real_videos_agreement": agreement_rates(torch.stack([s.video for s in scenes]), [s.prompt for s in scenes]),
        "newton_training_reward_of_online_config": {k: float(v.mean()) for k, v in newton_scores.items()},
        "sampling_seconds": seconds,
    }
    out = output_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)

    rows = min(args.gif_prompts, args.num_prompts)
    tiles = []
    for i in range(rows):
        j = i * args.seeds_per_prompt  # the first seed of prompt i
        tiles += [scenes[i].video, videos["base"][j], videos["trained"][j]]
    gif = write_gif(video_grid(torch.stack(tiles), ncols=3), out.with_name(f"{out.name}_samples.gif"), upscale=3)
    result["gif"] = str(gif)

    ta = result["trajectory_agreement"]
    md = [f"# Toy-world DPO: `{result['trained']}` against `{args.base}`", "",
          f"{len(prompts)} videos: {args.num_prompts} held-out one-ball prompts (test seeds) x "
          f"{args.seeds_per_prompt} seeds, {args.num_inference_steps} Euler steps, guidance {args.guidance_scale}; "
          "one seed per video, the same for base and trained.", "",
          "| metric | base | trained |", "|---|---|---|",
          f"| held-out physics score (`physics_learned`, mean logit) | {result['held_out_physics']['base']:.3f} | "
          f"{result['held_out_physics']['trained']:.3f} |"]
    for k in ("colour", "direction", "falls", "all"):
        md.append(f"| trajectory agreement: {k} | {ta['base'][k]:.0%} | {ta['trained'][k]:.0%} |")
    te = result["trajectory_error_px"]
    md.append(f"| trajectory error against true physics (px, lower is better) | {te['base']:.2f} | "
              f"{te['trained']:.2f} |")
    nt = result["newton_training_reward_of_online_config"]
    md += [f"| `newton` (training reward of dpo_online) | {nt['base']:.3f} | {nt['trained']:.3f} |", "",
           f"Win rate against the base on the held-out physics score: **{result['win_rate_vs_base']:.0%}** "
           f"({wins} wins, {ties} ties, {result['losses']} losses); mean paired difference "
           f"{result['held_out_physics_diff']:+.3f} (95 % bootstrap CI {result['held_out_physics_diff_ci95'][0]:+.3f}"
           f" to {result['held_out_physics_diff_ci95'][1]:+.3f}).", "",
           f"Trajectory error: the trained model is closer to the true physics in "
           f"**{result['trajectory_win_rate_vs_base']:.0%}** of {result['trajectory_pairs']} paired videos; mean "
           f"change {result['trajectory_error_diff']:+.2f} px (95 % bootstrap CI "
           f"{result['trajectory_error_diff_ci95'][0]:+.2f} to {result['trajectory_error_diff_ci95'][1]:+.2f}).", "",
           f"Samples: `{gif.name}` (rows: prompts; columns: real scene, base, trained)."]
    return write_result(result, out, lambda _: "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
