"""Identity-preserving image-to-video alignment on the toy world: DiffusionNFT and online DPO from the I2V base.

    python -m benchmarks.toyworld_i2v_alignment --methods nft_i2v dpo_i2v --minutes 10 --eval_every 5 --jobs 2

Each method trains from ``builtin:toyworld-i2v`` with its config (``configs/toyworld/nft_i2v.yaml``: newton + quality
+ identity, z-scored; ``dpo_i2v.yaml``: newton + identity), every prompt with its scene's first frame, the identity
reward scoring every frame against that conditioning image. Training and evaluation are
:mod:`benchmarks.toyworld_rl`'s with ``--first_frame_image``: one torch thread, weights kept every ``--eval_every``
training CPU-minutes up to ``--minutes``, then ``--num_prompts`` held-out prompts each sampled from its held-out
scene's first frame with seed ``i`` by every model. Measured per video and paired against the I2V base (20 Euler steps,
guidance 2; NFT samples CFG-free at 20 steps as it trains, DPO at 20 steps with guidance 2) with 95 % intervals:
``identity`` against the conditioning image (trained on), ``physics_learned`` (never optimised), trajectory error
against the true physics, strict ``newton``, ``quality``, the colour drift (mean over frames of the ball's colour
distance from the image's: the failure users report in I2V GRPO) and the first-frame error; diversity per prompt
(``--diversity_prompts`` x ``--diversity_seeds``, each prompt's videos from its one image).

Writes ``OUTPUT.{json,md,png}`` and a GIF (``--gif``, default ``docs/toyworld_i2v_alignment.gif``): for the first
``--gif_prompts`` held-out prompts, the reference image, the base's video and each method's last weights' video side by
side, the same prompt, image and seed as in the table. ``--quick`` is a seconds-long smoke run that measures nothing.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch

from benchmarks import toyworld_rl, write_result

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("nft_i2v", "dpo_i2v")
BASE_METHOD = "dpo_i2v"  # its config at 20 Euler steps with guidance 2, untrained: the I2V base as toyworld_rl samples
# --quick: each method at its tiniest (one prompt, two rollouts / candidates of two steps), as toyworld_rl variants
QUICK = {"nft_i2v": "--model.init_args.group_size=2,--model.init_args.micro_batch_size=2,"
                    "--model.init_args.num_sampling_steps=2,--model.init_args.num_inference_steps=2,"
                    "--model.init_args.updates_per_epoch=1,--data.init_args.batch_size=1",
         "dpo_i2v": "--model.init_args.num_candidates=2,--model.init_args.candidate_steps=2,"
                    "--model.init_args.pairs_per_step=1,--model.init_args.min_gap=0.0,"
                    "--model.init_args.num_inference_steps=2,--data.init_args.batch_size=1"}
# (key, column, lower is better): the table's columns, paired against the base
COLUMNS = (("identity", "identity", False), ("physics_learned", "physics_learned", False),
           ("trajectory_error", "traj. err. (px)", True), ("newton", "newton (strict)", False),
           ("colour_drift", "colour drift", True), ("first_frame_error", "first-frame err.", True),
           ("quality", "quality", False))


def sample_gif(output: Path, methods: list[str], seed: int, n: int, path: Path, base_method: str = BASE_METHOD) -> Path:
    """Rows: held-out prompt ``i``; columns: its conditioning image (held for every frame), the I2V base's video and
    each method's video from its last kept weights (``OUTPUT_runs/METHOD_seedSEED.safetensors``), seed ``i``."""
    from safetensors.torch import load_file

    from benchmarks.toyworld_eval import generate, held_out_images, held_out_scenes
    from lit_videoalign.video_io import video_grid, write_gif

    runs = output.parent / f"{output.name}_runs"
    prompts, images, seeds = [s.prompt for s in held_out_scenes(n)], held_out_images(n), list(range(n))
    columns = []
    for method in [toyworld_rl.BASE, *methods]:
        model = toyworld_rl.build(method, seed, runs / f"{method}_seed{seed}", base_method)[0]
        if method != toyworld_rl.BASE:
            weights = runs / f"{method}_seed{seed}.safetensors"
            if not weights.is_file():
                raise SystemExit(f"error: no weights at {weights}; run without --merge_only first")
            named = dict(model.named_parameters())
            for name, value in load_file(weights).items():
                named[name].data.copy_(value)
        columns.append(generate(model.eval(), prompts, seeds, images=images))
    columns.insert(0, images[:, None].expand_as(columns[0]))
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # prompt-major: one row a prompt
    return write_gif(video_grid(tiles, ncols=len(columns)), path, upscale=3)


def cell(point: dict, key: str) -> str:
    mean, half = point[key], point[f"{key}_ci95"]
    return f"{mean:+.3f} ({mean - half:+.3f} to {mean + half:+.3f})"


def markdown(result: dict) -> str:
    s = result["summary"]
    b = s["base"]
    lines = [
        "# Identity-preserving image-to-video alignment on the toy world",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{result['num_prompts']} held-out prompts, each sampled from its held-out scene's first frame with the same "
        f"seed by every model; each change is paired against the I2V base `builtin:toyworld-i2v` (20 Euler steps, "
        f"guidance 2: identity {b['identity']:.3f}, physics_learned {b['physics_learned']:+.3f}, trajectory error "
        f"{b['trajectory_error']:.2f} px, newton {b['newton']:.3f}, colour drift {b['colour_drift']:.3f}, first-frame "
        f"error {b['first_frame_error']:.4f}, quality {b['quality']:+.3f}, diversity {b['diversity']:.4f}); 95 % "
        f"intervals (normal approximation). Identity: the `identity` reward against the conditioning image (trained "
        f"on); physics_learned: never optimised; colour drift: mean over frames of the ball's RGB distance from its "
        f"colour in the image; trajectory error, colour drift and first-frame error: lower is better. Diversity: mean "
        f"pairwise distance of {result['diversity_seeds']} videos per prompt over {result['diversity_prompts']} "
        f"prompts (each from its one image), change paired per prompt. CPU-minutes: training only, one torch thread.",
        "",
        "| method | sampler (steps, CFG) | CPU-min | steps | " + " | ".join(c[1] for c in COLUMNS) + " | diversity |",
        "|---|---|---|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for run in s["runs"]:
        sampler = f"{run['sampler']['steps']}, {run['sampler']['guidance']:g}"
        for p in run["points"]:
            div = f"{p['diversity_change_pct']:+.1f} %"
            if math.isfinite(p.get("diversity_change_pct_ci95", float("nan"))):
                half = p["diversity_change_pct_ci95"]
                div += f" ({p['diversity_change_pct'] - half:+.1f} to {p['diversity_change_pct'] + half:+.1f})"
            lines.append(f"| {run['method']} (seed {run['seed']}) | {sampler} | {p['cpu_minutes']:.1f} | {p['step']} "
                         "| " + " | ".join(cell(p, k) for k, _, _ in COLUMNS) + f" | {div} |")
    lines += ["", "## Last kept weights against the base", ""]
    lines += [f"- {line}" for line in result["findings"]]
    if result.get("gif"):
        lines += ["", f"Samples (`{result['gif']}`): each row a held-out prompt; reference image, I2V base, "
                      + ", ".join(result["methods"]) + "."]
    return "\n".join(lines) + "\n"


def findings(summary: dict) -> list[str]:
    """Per run, which measures of its last kept weights moved beyond their 95 % interval, and which way."""
    out = []
    for run in summary["runs"]:
        p = run["points"][-1]
        better, worse = [], []
        for key, name, lower in COLUMNS:
            if abs(p[key]) > p[f"{key}_ci95"]:
                (better if (p[key] < 0) == lower else worse).append(f"{name} {p[key]:+.3f}")
        out.append(f"{run['method']} seed {run['seed']} after {p['cpu_minutes']:.1f} CPU-min ({p['step']} steps): "
                   f"better: {', '.join(better) or 'none'}; worse: {', '.join(worse) or 'none'}; the rest within "
                   f"their intervals; diversity {p['diversity_change_pct']:+.1f} %")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training CPU-minutes per run")
    parser.add_argument("--eval_every", type=float, default=5.0, help="training CPU-minutes between kept weights")
    parser.add_argument("--num_prompts", type=int, default=48)
    parser.add_argument("--diversity_prompts", type=int, default=8)
    parser.add_argument("--diversity_seeds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--gif", default=None, help="the samples GIF (default docs/toyworld_i2v_alignment.gif; with "
                                                    "--quick, OUTPUT.gif)")
    parser.add_argument("--gif_prompts", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run that measures nothing")
    parser.add_argument("--merge_only", action="store_true", help="only build the table and GIF from the runs on disk")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "toyworld_i2v_alignment"))
    args = parser.parse_args(argv)
    if args.quick:  # about one training step, two prompts: checks that everything runs, measures nothing
        args.minutes = args.eval_every = 0.01
        args.num_prompts, args.diversity_prompts, args.diversity_seeds, args.gif_prompts = 2, 1, 2, 1
    if args.minutes <= 0 or args.eval_every <= 0 or args.num_prompts < 2 or args.gif_prompts < 1:
        raise SystemExit("error: --minutes and --eval_every must be positive, --num_prompts >= 2, --gif_prompts >= 1")
    methods, base_method = args.methods, BASE_METHOD
    if args.quick:
        methods, base_method = [f"{m}_quick" for m in methods], f"{BASE_METHOD}_quick"
    rl_args = ["--methods", *methods, "--base_method", base_method, "--first_frame_image", "--save_weights",
               "--seeds", *map(str, args.seeds), "--default_minutes", str(args.minutes),
               "--default_eval_every", str(args.eval_every), "--num_prompts", str(args.num_prompts),
               "--diversity_prompts", str(args.diversity_prompts), "--diversity_seeds", str(args.diversity_seeds),
               "--batch_size", str(min(16, args.num_prompts)), "--threads", str(args.threads), "--jobs", str(args.jobs),
               "--output", args.output]
    if args.quick:
        rl_args += ["--variant", *[f"{m}_quick={m}:{QUICK[m]}" for m in METHODS]]
    torch.set_num_threads(args.threads)
    result = toyworld_rl.main(rl_args + (["--merge_only"] if args.merge_only else []))
    made_by = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--merge_only"]  # the runs' command
    result.update(command="python -m benchmarks.toyworld_i2v_alignment " + shlex.join(made_by),
                  methods=methods, findings=findings(result["summary"]))
    gif = Path(args.gif) if args.gif else (Path(args.output).with_suffix(".gif") if args.quick
                                           else ROOT / "docs" / "toyworld_i2v_alignment.gif")
    gif = sample_gif(Path(args.output), methods, args.seeds[0], args.gif_prompts, gif, base_method)
    result["gif"] = str(gif.resolve().relative_to(ROOT)) if gif.resolve().is_relative_to(ROOT) else str(gif)
    return write_result(result, args.output, markdown)


if __name__ == "__main__":
    main()
