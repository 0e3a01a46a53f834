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
Real videos of the same scenes give the ceiling. Writes ``NAME.json``, ``NAME.md`` and ``NAME.gif`` (one row per model,
the same prompts and seeds) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks import mean_se
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import TEST_SEED_OFFSET, ToyWorld, prompt_agreement
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.video_io import video_grid, write_gif
from reward_zoo import create_reward

REWARDS = ("physics_learned", "newton", "quality")
LOGIT_REWARDS = ("physics_learned", "quality")  # Bradley-Terry logits: compared by preference probability
AGREEMENT = ("colour", "direction", "falls", "all")
GIF_PROMPTS = ["a red ball falls and bounces", "a blue ball moves left and bounces", "a green ball moves right",
               "a yellow ball falls", "a white ball moves right and bounces"]


def load_student(spec: str):
    """Build a student from ``NAME=CONFIG[:WEIGHTS]`` (see the module docstring); returns ``(name, model)``."""
    from lit_videoalign.cli import VideoAlignCLI, load_weights

    if "=" not in spec:
        raise ValueError(f"a model must be given as NAME=CONFIG[:WEIGHTS], got {spec!r}")
    name, rest = spec.split("=", 1)
    config, _, weights = rest.partition(":")
    if not Path(config).is_file():
        raise FileNotFoundError(f"student config not found: {config}")
    args = ["--config", config, "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    if weights and Path(weights).is_dir():
        args.append(f"--model.init_args.backbone.init_args.pretrained_model_name_or_path={weights}")
    cli = VideoAlignCLI(args=args, run=False)
    model = cli.model
    if weights and not Path(weights).is_dir():
        load_weights(model, weights)
    return name, model.eval()


class NFECounter:
    """Counts denoiser evaluations per video: every forward call adds its batch size (guidance doubles it)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.samples = 0
        denoisers = [m for m in model.modules() if m.__class__.__name__.endswith("Transformer3DModel")]
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in denoisers]

    def _hook(self, module, args, kwargs, output) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.samples += hidden.shape[0]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def evaluate(model, prompts: list[str], seeds: list[int], rewards: dict, batch_size: int, return_videos: bool = False,
             **gen_kwargs) -> dict | tuple[dict, torch.Tensor]:
    """Sample every prompt with its seed and measure rewards, agreement, NFE and wall time; with ``return_videos``,
    returns ``(measures, videos)`` so callers can measure more on the same samples."""
    counter = NFECounter(model)
    start = time.perf_counter()
    videos = torch.cat([model.generate(prompts[i:i + batch_size], seeds=seeds[i:i + batch_size], **gen_kwargs)
                        for i in range(0, len(prompts), batch_size)])
    seconds = time.perf_counter() - start
    counter.remove()
    out = score(videos, prompts, rewards)
    out.update(nfe_per_video=counter.samples / len(prompts), seconds_per_video=seconds / len(prompts))
    return (out, videos) if return_videos else out


@torch.no_grad()
def score(videos: torch.Tensor, prompts: list[str], rewards: dict) -> dict:
    out = {}
    for name, reward in rewards.items():
        values = reward(videos, prompts)["overall"].float()  # (b,)
        out[f"{name}_per_video"] = values.tolist()
        out[name] = values.mean().item()
        out[f"{name}_sem"] = (values.std() / math.sqrt(len(values))).item()
    agree = [prompt_agreement(v, p) for v, p in zip(videos, prompts)]
    for key in AGREEMENT[:-1]:
        out[key] = sum(a[key] for a in agree) / len(agree)
    out["all"] = sum(all(a.values()) for a in agree) / len(agree)
    return out


def relative(value: float, reference: float) -> float:
    """Change in percent of the reference's magnitude (rewards can be negative logits)."""
    return 100.0 * (value - reference) / max(abs(reference), 1e-8)


def paired_change(row: dict, teacher: dict, key: str) -> tuple[float, float]:
    """Mean per-prompt change against the teacher (same prompt and seed) and its 95 % half-width (normal approx.)."""
    mean, se = mean_se([a - b for a, b in zip(row[f"{key}_per_video"], teacher[f"{key}_per_video"])])
    return mean, 1.96 * se


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
            change, half = paired_change(r, teacher, key) if f"{key}_per_video" in r else (float("nan"),) * 2
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
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="toyworld_distill", help="stem of the output files")
    parser.add_argument("--no_gif", action="store_true")
    args = parser.parse_args(argv)

    students = [load_student(spec) for spec in args.student]
    steps = sorted({int(m.hparams.num_inference_steps) for _, m in students}) or [4]
    teacher = SFT(DiffusersVideoBackbone(args.teacher, max_sequence_length=24),
                  num_inference_steps=args.teacher_steps, guidance_scale=args.guidance_scale).eval()
    rewards = {"physics_learned": create_reward("physics_learned", pretrained=True).eval(),
               "newton": create_reward("newton").eval(), "quality": create_reward("quality", pretrained=True).eval()}
    world = ToyWorld(max_balls=1)
    scenes = [world.example(TEST_SEED_OFFSET + i) for i in range(args.num_videos)]
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
              "students": args.student, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
              f"{torch.get_num_threads()} torch threads", "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_gif:
        gif_seeds = list(range(len(GIF_PROMPTS)))
        clips = [model.generate(GIF_PROMPTS, seeds=gif_seeds, **kwargs) for _, model, kwargs in models]
        result["gif"] = str(write_gif(video_grid(torch.cat(clips), ncols=len(GIF_PROMPTS)), out / f"{args.name}.gif",
                                      upscale=3))
        result["gif_rows"] = [row for row, _, _ in models]
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
