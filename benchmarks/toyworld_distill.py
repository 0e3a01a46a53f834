"""Few-step students against their many-step teacher on the toy world: rewards, prompt agreement, NFE, wall time.

    python -m benchmarks.toyworld_distill \
        --student dmd=configs/toyworld/dmd.yaml:outputs/dmd/pipeline \
        --student consistency=configs/toyworld/consistency.yaml:outputs/consistency/pipeline

A student is ``NAME=CONFIG[:WEIGHTS]``: the model its training config builds, with ``WEIGHTS`` loaded (a ``.ckpt`` from
``videoalign fit`` or a ``.safetensors`` state dict) or, for a pipeline folder written by ``PipelineExport``, with the
backbone read from that folder; without ``WEIGHTS`` it is the undistilled base under the student's sampler. Each
student samples with its own few-step sampler (its config's steps and guidance). Reference rows: the teacher
(``--teacher``, default the shipped base, ``--teacher_steps`` Euler steps with guidance 2) and the same teacher cut to
the students' step count without distillation, with guidance (twice the students' NFE) and without (the same NFE).

Prompts come from held-out single-ball toy-world scenes (the test seed range, never trained on); prompt ``i`` is
sampled from seed ``i`` by every model. Measured per model: the held-out physics rewards (``physics_learned``,
pretrained, and the verifiable ``newton``), the learned ``quality`` reward, ``prompt_agreement`` rates (colour,
direction, falling, all three), NFE per video (denoiser evaluations, both guidance branches counted) and wall time per
video; the change of each reward relative to the teacher, in percent of the teacher's magnitude, is in the table.
Real videos of the same scenes give the ceiling. Writes ``OUTPUT.json``, ``OUTPUT.md`` and ``OUTPUT.gif`` (one row per
model, the same prompts and seeds) for ``--output OUTPUT``. The evaluation is :mod:`benchmarks.toyworld_eval`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks import add_output_argument, output_path, write_result
from benchmarks.toyworld_eval import (  # noqa: F401  (evaluate, load_student, NFECounter, score: their old home)
    AGREEMENT,
    LOGIT_REWARDS,
    SAMPLER,
    NFECounter,
    evaluate,
    held_out_scenes,
    load_rewards,
    load_student,
    machine,
    paired_ci95,
    relative,
    score,
)
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.video_io import video_grid, write_gif

REWARDS = ("physics_learned", "newton", "quality")
GIF_PROMPTS = ["a red ball falls and bounces", "a blue ball moves left and bounces", "a green ball moves right",
               "a yellow ball falls", "a white ball moves right and bounces"]


def preference(row: dict, teacher: dict, key: str) -> float:
    """The reward's own Bradley-Terry probability that a row's video beats the teacher's, averaged over prompts.

    ``sigmoid(r_row - r_teacher)`` per prompt and seed: learned rewards are logits defined up to a shift, so a percent
    of the teacher's value means little, while their differences are exactly what they were trained on. 0.5 means the
    reward cannot tell the two apart; "within 5 %" of the teacher reads as at least 0.45.
    """
    diff = torch.tensor(row[f"{key}_per_video"]) - torch.tensor(teacher[f"{key}_per_video"])  # (b,)
    return torch.sigmoid(diff).mean().item()


def markdown(result: dict) -> str:
    teacher = result["rows"][result["teacher_row"]]
    lines = [
        "# Toy-world distillation: 4-step students vs the 40-step teacher",
        "",
        f"{result['num_videos']} held-out single-ball prompts (test seeds), one video each, the same seed for every "
        f"model. Rewards are means (± standard error); Δ is the paired change against the teacher (± 95 % interval) "
        f"and, in brackets, in percent of the teacher's magnitude (higher is better for all three); P(≻T) is "
        f"the learned reward's own Bradley-Terry probability that the row's video beats the teacher's for the same "
        f"prompt and seed, averaged (0.5: the reward cannot tell them apart). Wall time on {result['machine']}.",
        "",
        "| model | NFE / video | s / video | physics_learned | Δ | P(≻T) | newton | Δ | quality | Δ | P(≻T) | colour | "
        "direction | falls | all |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        cells = [name, f"{r['nfe_per_video']:.0f}" if "nfe_per_video" in r else "-",
                 f"{r['seconds_per_video']:.3f}" if "seconds_per_video" in r else "-"]
        for key in REWARDS:
            change, half = paired_ci95(r, teacher, key) if f"{key}_per_video" in r else (float("nan"),) * 2
            cells += [f"{r[key]:.3f} ± {r[f'{key}_sem']:.3f}",
                      f"{change:+.3f} ± {half:.3f} ({relative(r[key], teacher[key]):+.0f}%)"]
            if key in LOGIT_REWARDS:
                cells.append(f"{preference(r, teacher, key):.2f}")
        cells += [f"{100 * r[k]:.0f}%" for k in AGREEMENT]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("gif"):
        lines += ["", f"Samples (rows: {', '.join(result['gif_rows'])}; columns: {', '.join(GIF_PROMPTS)}):", "",
                  f"![samples]({Path(result['gif']).name})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", action="append", default=[], help="NAME=CONFIG[:WEIGHTS]; repeatable")
    parser.add_argument("--teacher", default="builtin:toyworld-base")
    parser.add_argument("--teacher_steps", type=int, default=40)
    parser.add_argument("--guidance_scale", type=float, default=2.0, help="the teacher's guidance")
    parser.add_argument("--num_videos", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=16)
    add_output_argument(parser, "benchmarks/results/toyworld_distill")
    parser.add_argument("--name", default=None, help="deprecated, with --out DIR: the output files' stem")
    parser.add_argument("--no_gif", action="store_true")
    args = parser.parse_args(argv)

    students = [load_student(spec) for spec in args.student]
    steps = sorted({int(m.hparams.num_inference_steps) for _, m in students}) or [4]
    teacher = SFT(DiffusersVideoBackbone(args.teacher, max_sequence_length=24),
                  num_inference_steps=args.teacher_steps, guidance_scale=args.guidance_scale).eval()
    rewards = load_rewards(REWARDS)
    scenes = held_out_scenes(args.num_videos)
    prompts, seeds = [s.prompt for s in scenes], list(range(args.num_videos))

    teacher_row = f"teacher ({args.teacher_steps} steps)"
    models = [(teacher_row, teacher, {})]
    for k in steps:  # the undistilled teacher at the students' step count, with and without guidance
        models += [(f"teacher, {k} steps, guidance {args.guidance_scale:g}", teacher, {"num_inference_steps": k}),
                   (f"teacher, {k} steps, no guidance", teacher, {"num_inference_steps": k, "guidance_scale": 1.0})]
    models += [(f"{name} ({m.hparams.num_inference_steps} steps)", m, {}) for name, m in students]
    rows = {}
    for row, model, kwargs in models:
        rows[row] = evaluate(model, prompts, seeds, rewards, args.batch_size, **kwargs)
        print(json.dumps({row: rows[row]}), flush=True)
    rows["real videos (ceiling)"] = score(torch.stack([s.video for s in scenes]), prompts, rewards)

    result = {"num_videos": args.num_videos, "teacher": args.teacher, "teacher_row": teacher_row,
              "students": args.student, "machine": machine(), "rows": rows}
    out = output_path(args, args.name)
    if not args.no_gif:
        gif_seeds = list(range(len(GIF_PROMPTS)))
        clips = [model.generate(GIF_PROMPTS, seeds=gif_seeds, sampler=SAMPLER, **kwargs) for _, model, kwargs in models]
        out.parent.mkdir(parents=True, exist_ok=True)
        result["gif"] = str(write_gif(video_grid(torch.cat(clips), ncols=len(GIF_PROMPTS)),
                                      out.with_name(f"{out.name}.gif"), upscale=3))
        result["gif_rows"] = [row for row, _, _ in models]
    return write_result(result, out, markdown)


if __name__ == "__main__":
    main()
