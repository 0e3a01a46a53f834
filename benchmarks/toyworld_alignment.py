"""Aligned models against the base on the toy world: rewards, trajectory error against true physics, diversity, NFE.

    python -m benchmarks.toyworld_alignment \
        --model dpo=configs/toyworld/dpo.yaml:outputs/exp/dpo1/pipeline@10 \
        --model dmd=configs/toyworld/dmd.yaml:outputs/dmd/pipeline@17

A model is ``NAME=CONFIG[:WEIGHTS][@CPU_MINUTES]``: ``NAME=CONFIG[:WEIGHTS]`` is built as
``benchmarks.toyworld_distill.load_student`` builds it (the model its training config builds, with a ``.ckpt``, a
``.safetensors`` state dict or a ``PipelineExport`` folder loaded) and samples with its own config's steps and
guidance; ``CPU_MINUTES`` is the training cost the caller recorded, shown as is ("-" when absent or ``@-``). The
base row is always there: ``--base`` (default the shipped base) with ``--base_steps`` Euler steps and guidance
``--base_guidance``.

Prompts are held-out single-ball toy-world scenes (the test seed range, never trained on); prompt ``i`` is sampled
from seed ``i`` by every model, so every difference to the base is paired. Measured per model:

- the held-out rewards ``physics_learned`` (pretrained), ``newton`` (verifiable), ``quality`` (pretrained) and
  ``identity`` (pretrained; every frame against the first frame);
- ``prompt_agreement`` rates: colour, direction, falling, all three;
- trajectory error against true physics (:func:`trajectory_error`): the ball is tracked with the soft colour masks of
  ``newton``, its position and velocity are fitted on the first ``--fit_frames`` frames under the toy world's known
  gravity, and the toy world's own simulator carries that state forward (gravity, floor bounces, side walls); the
  error is the mean distance in pixels between tracked and simulated centres over the remaining frames;
- sample diversity (:func:`diversity`): the mean pairwise RMS pixel distance (frames downsampled 2x) between videos
  of one prompt from ``--diversity_seeds`` seeds, over the first ``--diversity_prompts`` prompts;
- NFE per video (denoiser evaluations, both guidance branches counted) and wall seconds per video.

Real videos of the same scenes are the ceiling row; their diversity is that of real videos sharing each prompt (the
toy world draws position, size, speed and bounciness freely for one prompt). Writes ``OUTPUT.json``, ``OUTPUT.md`` and
``OUTPUT.png`` for ``--output OUTPUT``. The measures are :mod:`benchmarks.toyworld_eval`'s.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks import add_output_argument, output_path, write_result
from benchmarks.toyworld_eval import (  # noqa: F401  (track, diversity, add_*, paired, ...: their old home)
    AGREEMENT,
    DIVERSITY_SEED_OFFSET,
    LOGIT_REWARDS,
    RESTITUTIONS,
    add_diversity,
    add_trajectory,
    diversity,
    diversity_videos,
    evaluate,
    fmt,
    held_out_scenes,
    load_rewards,
    load_student,
    machine,
    paired,
    parse_model,
    same_prompt_scenes,
    score,
    track,
    trajectory_error,
    versions,
)
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import ToyWorld
from lit_videoalign.objectives.sft import SFT

REWARDS = ("physics_learned", "newton", "quality", "identity")


# -- report -----------------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    rows, base = result["rows"], result["rows"][result["base_row"]]
    n = result["num_prompts"]
    lines = [
        "# Toy-world alignment: aligned models against the base",
        "",
        f"{result['date']}; torch {result['versions']['torch']}, diffusers {result['versions']['diffusers']}, "
        f"lightning {result['versions']['lightning']}; {result['machine']}.",
        "",
        f"`{result['command']}`",
        "",
        f"{n} held-out single-ball prompts (test seeds), one video each, the same seed for every model; each model "
        "samples with its own steps and guidance. Means ± standard error. `physics_learned` and `quality` are "
        "logits, `newton` and `identity` (every frame against the first) are in (0, 1]: higher is better. "
        f"`traj. err.` is the mean distance in pixels between the tracked ball and the toy world's true physics "
        f"started from the ball's fitted state on its first {result['fit_frames']} frames (lower is better; "
        "`tracked` is the share of videos with a ball to track). `diversity` is the mean pairwise RMS pixel distance "
        f"between {result['diversity_seeds']} videos of one prompt, over {result['diversity_prompts']} prompts (the "
        "real row: real videos sharing the prompt). NFE counts denoiser evaluations per video (guidance doubles "
        "them); train CPU-min is the training cost reported for the model.",
        "",
        "| model | steps | guidance | train CPU-min | NFE / video | s / video | physics_learned | newton | quality | "
        "identity | traj. err. (px) | tracked | diversity | colour | direction | falls | all |",
        "|" + "---|" * 17,
    ]
    for name, r in rows.items():
        cells = [name, str(r.get("steps", "-")), f"{r['guidance']:g}" if "guidance" in r else "-",
                 f"{r['cpu_minutes']:g}" if r.get("cpu_minutes") is not None else "-",
                 f"{r['nfe_per_video']:.0f}" if "nfe_per_video" in r else "-",
                 f"{r['seconds_per_video']:.3f}" if "seconds_per_video" in r else "-"]
        cells += [fmt(r[k], r[f"{k}_sem"]) for k in REWARDS]
        cells += [fmt(r["trajectory_error"], r["trajectory_error_sem"], 2), f"{100 * r['tracked']:.0f}%",
                  fmt(r.get("diversity"), r.get("diversity_sem"))]
        cells += [f"{100 * r[k]:.0f}%" for k in AGREEMENT]
        lines.append("| " + " | ".join(cells) + " |")
    keys = [*REWARDS, "trajectory_error"]
    lines += ["", "Paired change against the base (same prompt and seed), mean ± standard error; for the logits, the "
              "reward's own Bradley-Terry probability that the model's video beats the base's is in brackets (0.5: "
              "no difference):", "", "| model | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, r in rows.items():
        if name == result["base_row"]:
            continue
        cells = []
        for k in keys:
            diff, se = paired(r, base, k)
            cell = f"{diff:+.3f} ± {se:.3f}" if math.isfinite(diff) else "-"
            if k in LOGIT_REWARDS:
                p = torch.sigmoid(torch.tensor(r[f"{k}_per_video"]) - torch.tensor(base[f"{k}_per_video"]))
                cell += f" [{p.mean().item():.2f}]"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.get("plot"):
        lines += ["", f"![toy-world alignment]({Path(result['plot']).name})"]
    return "\n".join(lines) + "\n"


PANELS = (("physics_learned", "physics_learned (logit) ↑"), ("newton", "newton ↑"), ("quality", "quality (logit) ↑"),
          ("identity", "identity ↑"), ("trajectory_error", "trajectory error (px) ↓"),
          ("diversity", "diversity (RMS distance)"), ("all", "prompt agreement, all three ↑"),
          ("nfe_per_video", "NFE / video ↓"))


def plot(result: dict, path: Path) -> None:
    """One panel per measure, one bar per model (± standard error); the base's value dashed, real videos dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["rows"])
    base = result["rows"][result["base_row"]]
    real = result["rows"].get("real videos (ceiling)", {})
    n = result["num_prompts"]
    colours = ["tab:grey" if name == result["base_row"] else "tab:green" if name.startswith("real") else "tab:blue"
               for name in names]
    fig, axes = plt.subplots(2, 4, figsize=(16, 2.2 + 0.32 * len(names) * 2), sharey=True)
    for ax, (key, title) in zip(axes.flat, PANELS):
        values, errors = [], []
        for name in names:
            r = result["rows"][name]
            v = r.get(key, float("nan"))
            se = r.get(f"{key}_sem", math.sqrt(max(v * (1 - v), 0.0) / n) if key in AGREEMENT else 0.0)
            values.append(v if v is not None and math.isfinite(v) else 0.0)
            errors.append(se if se is not None and math.isfinite(se) else 0.0)
        ys = range(len(names))
        ax.barh(ys, values, xerr=errors, color=colours, capsize=2)
        if key in base and math.isfinite(base[key]):
            ax.axvline(base[key], color="tab:grey", ls="--", lw=0.8)
        if key in real and real[key] is not None and math.isfinite(real[key]):
            ax.axvline(real[key], color="tab:green", ls=":", lw=0.8)
        ax.set_yticks(list(ys), names, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    axes.flat[0].invert_yaxis()  # the base on top (the y axis is shared)
    fig.suptitle(f"Toy world: aligned models vs the base on {n} held-out prompts (error bars: standard error; dashed: "
                 "base; dotted: real videos)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=CONFIG[:WEIGHTS][@CPU_MINUTES]; repeatable")
    parser.add_argument("--base", default="builtin:toyworld-base")
    parser.add_argument("--base_steps", type=int, default=20)
    parser.add_argument("--base_guidance", type=float, default=2.0)
    parser.add_argument("--num_prompts", type=int, default=32)
    parser.add_argument("--diversity_prompts", type=int, default=8)
    parser.add_argument("--diversity_seeds", type=int, default=4)
    parser.add_argument("--fit_frames", type=int, default=4, help="frames the trajectory's initial state is fitted on")
    parser.add_argument("--batch_size", type=int, default=16)
    add_output_argument(parser, "benchmarks/results/toyworld_alignment")
    args = parser.parse_args(argv)
    if args.diversity_prompts > args.num_prompts or args.diversity_seeds < 2:
        parser.error("need --diversity_prompts <= --num_prompts and --diversity_seeds >= 2")
    specs = [parse_model(spec) for spec in args.model]

    rewards = load_rewards(REWARDS)  # identity: every frame against the first
    scenes = held_out_scenes(args.num_prompts)
    prompts, seeds = [s.prompt for s in scenes], list(range(args.num_prompts))
    d, k = args.diversity_prompts, args.diversity_seeds

    base_row = f"base ({args.base_steps} steps)"
    rows = {}
    for spec, minutes in [(None, None), *specs]:  # one model in memory at a time
        if spec is None:
            name, model = base_row, SFT(DiffusersVideoBackbone(args.base, max_sequence_length=24),
                                        num_inference_steps=args.base_steps, guidance_scale=args.base_guidance).eval()
        else:
            name, model = load_student(spec)
        row, videos = evaluate(model, prompts, seeds, rewards, args.batch_size, return_videos=True)
        add_trajectory(row, videos, args.fit_frames)
        div = diversity_videos(model, prompts[:d], k, args.batch_size)
        add_diversity(row, div)
        row.update(steps=int(model.hparams.num_inference_steps), guidance=float(model.hparams.guidance_scale),
                   cpu_minutes=minutes)
        if name != base_row:
            name = f"{name} ({row['steps']} steps)"
        rows[name] = row
        print({name: {key: v for key, v in row.items() if not key.endswith(("_per_video", "_per_prompt"))}}, flush=True)
        del model, videos, div

    real = score(torch.stack([s.video for s in scenes]), prompts, rewards)
    add_trajectory(real, torch.stack([s.video for s in scenes]), args.fit_frames)
    same = same_prompt_scenes(ToyWorld(max_balls=1), prompts[:d], k)
    if same:
        add_diversity(real, list(same.values()))
        real["diversity_prompts"] = len(same)
    rows["real videos (ceiling)"] = real

    out = output_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python -m benchmarks.toyworld_alignment", *map(shlex.quote, argv)]),
        "versions": versions("torch", "diffusers", "lightning"),
        "machine": machine(),
        "num_prompts": args.num_prompts, "diversity_prompts": d, "diversity_seeds": k, "fit_frames": args.fit_frames,
        "base": args.base, "base_row": base_row, "models": args.model, "rows": rows,
        "plot": str(out.with_name(f"{out.name}.png")),
    }
    plot(result, out.with_name(f"{out.name}.png"))
    return write_result(result, out, markdown)


if __name__ == "__main__":
    main()
