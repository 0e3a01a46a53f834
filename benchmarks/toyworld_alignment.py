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
toy world draws position, size, speed and bounciness freely for one prompt). Writes ``toyworld_alignment.json``,
``.md`` and ``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks import mean_se, write_result
from benchmarks.toyworld_distill import AGREEMENT, evaluate, load_student, score
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import TEST_SEED_OFFSET, Ball, Scene, ToyWorld, simulate
from lit_videoalign.objectives.sft import SFT
from reward_zoo import create_reward
from reward_zoo.physics import TOY_GRAVITY, NewtonReward

REWARDS = ("physics_learned", "newton", "quality", "identity")
LOGIT_REWARDS = ("physics_learned", "quality")  # Bradley-Terry logits: only differences mean anything
RESTITUTIONS = torch.linspace(0.6, 0.85, 6).tolist()  # the range ToyWorld.sample_scene draws a ball's bounciness from
DIVERSITY_SEED_OFFSET = 1_000_000  # sampling seeds of the diversity videos, apart from the per-prompt seeds 0..n-1
REAL_SCENE_OFFSET = TEST_SEED_OFFSET + 1_000_000  # real scenes searched for same-prompt diversity, apart from prompts
REAL_SCENE_SEARCH = 20_000  # seeds scanned at most for them


# -- trajectory error against true physics ----------------------------------------------------------------------------
@torch.no_grad()
def track(videos: Tensor, min_coverage: float = 0.2) -> tuple[Tensor, Tensor]:
    """Centre ``(b, t, 2)`` (x, y in pixels) and area ``(b, t)`` (pixels) of each video's ball, per frame.

    The soft per-colour coverage masks of ``newton`` (:meth:`NewtonReward.masks`); the ball is the palette colour with
    the largest mean area. Coverage below ``min_coverage`` is dropped, so faint noise spread over the background
    does not pull the centroid towards the middle of the frame (an anti-aliased disc loses a thin symmetric rim).
    """
    masks = NewtonReward().masks(videos.float())  # (b, t, k, h, w)
    masks = masks * (masks > min_coverage)
    b, t, k, h, w = masks.shape
    dominant = masks.sum((-2, -1)).mean(1).argmax(-1)  # (b,)
    mask = masks[torch.arange(b), :, dominant]  # (b, t, h, w)
    area = mask.sum((-2, -1))  # (b, t)
    xs = torch.arange(w, dtype=mask.dtype)
    ys = torch.arange(h, dtype=mask.dtype)
    cx = (mask.sum(-2) * xs).sum(-1) / area.clamp(min=1e-8)
    cy = (mask.sum(-1) * ys).sum(-1) / area.clamp(min=1e-8)
    return torch.stack([cx, cy], dim=-1), area


@torch.no_grad()
def trajectory_error(videos: Tensor, fit_frames: int = 4, restitutions: list[float] = RESTITUTIONS,
                     min_area: float = 2.0) -> Tensor:
    """Mean distance in pixels ``(b,)`` between each video's tracked ball and the true toy-world physics from its start.

    The initial state is the least-squares fit, on the first ``fit_frames`` frames, of ``x = x0 + vx s`` and
    ``y = y0 + vy s + g s^2 / 2`` with the toy world's gravity ``g`` (``TOY_GRAVITY`` frame heights per frame^2; one
    frame per time step) and the ball's radius from its median area; ``lit_videoalign.data.toyworld.simulate`` then
    carries it forward with floor bounces and elastic side walls. A scene's restitution is drawn per ball, so the
    error is the smallest over ``restitutions`` (the world's range). NaN where no ball is found (mean area below
    ``min_area`` pixels).
    """
    b, t, c, h, w = videos.shape
    if not 2 <= fit_frames < t:
        raise ValueError(f"fit_frames must be in [2, {t - 1}] for {t}-frame videos, got {fit_frames}")
    gravity = TOY_GRAVITY * h  # px / frame^2
    pos, area = track(videos)  # (b, t, 2), (b, t)
    s = torch.arange(fit_frames, dtype=torch.float64)
    design = torch.stack([torch.ones_like(s), s], dim=1)  # (k, 2)
    fit = pos[:, :fit_frames].double()
    fit[..., 1] -= 0.5 * gravity * s**2
    coef = torch.linalg.lstsq(design.expand(b, -1, -1), fit).solution  # (b, 2, 2): rows (start, velocity), cols (x, y)
    errors = []
    for i in range(b):
        if not area[i].mean() >= min_area:
            errors.append(float("nan"))
            continue
        r = math.sqrt(float(area[i].median()) / math.pi)
        (x0, y0), (vx, vy) = coef[i].tolist()
        x0, y0 = min(max(x0, r - 0.5), w - 0.5 - r), min(max(y0, r - 0.5), h - 0.5 - r)
        best = float("inf")
        for e in restitutions:
            scene = Scene((Ball("red", r, x0, y0, vx, vy, e),), gravity, t, h, w)
            true = simulate(scene).positions[:, 0]  # (t, 2)
            best = min(best, (true[fit_frames:] - pos[i, fit_frames:]).norm(dim=-1).mean().item())
        errors.append(best)
    return torch.tensor(errors)


# -- sample diversity -------------------------------------------------------------------------------------------------
def diversity(videos: Tensor, downsample: int = 2) -> float:
    """Mean pairwise RMS pixel distance between the videos ``(n, t, c, h, w)`` of one prompt (frames average-pooled by
    ``downsample``): 0 when all are identical."""
    n = videos.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least two videos, got {n}")
    small = F.avg_pool2d(videos.float().flatten(0, 1), downsample) if downsample > 1 else videos.float().flatten(0, 1)
    flat = small.reshape(n, -1)  # (n, t * c * h' * w')
    dist = torch.cdist(flat[None], flat[None])[0] / math.sqrt(flat.shape[1])  # (n, n)
    return (dist.sum() / (n * (n - 1))).item()


def same_prompt_scenes(world: ToyWorld, prompts: list[str], per_prompt: int) -> dict[str, Tensor]:
    """``per_prompt`` real videos ``(n, t, c, h, w)`` for each prompt, from other test-range seeds with that prompt."""
    found: dict[str, list[Tensor]] = {p: [] for p in prompts}
    for seed in range(REAL_SCENE_OFFSET, REAL_SCENE_OFFSET + REAL_SCENE_SEARCH):
        example = world.example(seed)
        if example.prompt in found and len(found[example.prompt]) < per_prompt:
            found[example.prompt].append(example.video)
            if all(len(v) == per_prompt for v in found.values()):
                break
    return {p: torch.stack(v) for p, v in found.items() if len(v) >= 2}


# -- measuring one model ----------------------------------------------------------------------------------------------
def add_trajectory(row: dict, videos: Tensor, fit_frames: int) -> None:
    err = trajectory_error(videos, fit_frames).tolist()
    row["trajectory_error_per_video"] = err
    row["trajectory_error"], row["trajectory_error_sem"] = mean_se(err)
    row["tracked"] = sum(math.isfinite(e) for e in err) / len(err)


def add_diversity(row: dict, groups: list[Tensor]) -> None:
    per_prompt = [diversity(g) for g in groups]
    row["diversity_per_prompt"] = per_prompt
    row["diversity"], row["diversity_sem"] = mean_se(per_prompt)


def paired(row: dict, base: dict, key: str) -> tuple[float, float]:
    """Mean paired difference to the base (same prompt, same seed) and its standard error."""
    a, b = row.get(f"{key}_per_video"), base.get(f"{key}_per_video")
    if a is None or b is None:
        return float("nan"), float("nan")
    return mean_se([x - y for x, y in zip(a, b)])


def parse_model(spec: str) -> tuple[str, float | None]:
    """Split ``NAME=CONFIG[:WEIGHTS][@CPU_MINUTES]`` into the ``load_student`` spec and the CPU-minutes (``@-`` or
    none: not known). An ``@`` followed by a path is part of the path."""
    head, at, tail = spec.rpartition("@")
    if not at or "/" in tail:
        return spec, None
    if tail == "-":
        return head, None
    try:
        return head, float(tail)
    except ValueError:
        raise ValueError(f"CPU_MINUTES after '@' must be a number or '-', got {tail!r} in {spec!r}") from None


def versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# -- report -----------------------------------------------------------------------------------------------------------
def fmt(value: float | None, se: float | None = None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) else "")


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
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.diversity_prompts > args.num_prompts or args.diversity_seeds < 2:
        parser.error("need --diversity_prompts <= --num_prompts and --diversity_seeds >= 2")
    specs = [parse_model(spec) for spec in args.model]

    rewards = {"physics_learned": create_reward("physics_learned", pretrained=True).eval(),
               "newton": create_reward("newton").eval(), "quality": create_reward("quality", pretrained=True).eval(),
               "identity": create_reward("identity", pretrained=True).eval()}  # every frame against the first
    world = ToyWorld(max_balls=1)
    scenes = [world.example(TEST_SEED_OFFSET + i) for i in range(args.num_prompts)]
    prompts, seeds = [s.prompt for s in scenes], list(range(args.num_prompts))
    d, k = args.diversity_prompts, args.diversity_seeds
    div_prompts = [p for p in prompts[:d] for _ in range(k)]
    div_seeds = [DIVERSITY_SEED_OFFSET + i for i in range(d * k)]

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
        div = torch.cat([model.generate(div_prompts[i:i + args.batch_size], seeds=div_seeds[i:i + args.batch_size])
                         for i in range(0, len(div_prompts), args.batch_size)])
        add_diversity(row, list(div.split(k)))
        row.update(steps=int(model.hparams.num_inference_steps), guidance=float(model.hparams.guidance_scale),
                   cpu_minutes=minutes)
        if name != base_row:
            name = f"{name} ({row['steps']} steps)"
        rows[name] = row
        print({name: {key: v for key, v in row.items() if not key.endswith(("_per_video", "_per_prompt"))}}, flush=True)
        del model, videos, div

    real = score(torch.stack([s.video for s in scenes]), prompts, rewards)
    add_trajectory(real, torch.stack([s.video for s in scenes]), args.fit_frames)
    same = same_prompt_scenes(world, prompts[:d], k)
    if same:
        add_diversity(real, list(same.values()))
        real["diversity_prompts"] = len(same)
    rows["real videos (ceiling)"] = real

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python -m benchmarks.toyworld_alignment", *map(shlex.quote, argv)]),
        "versions": versions("torch", "diffusers", "lightning"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "num_prompts": args.num_prompts, "diversity_prompts": d, "diversity_seeds": k, "fit_frames": args.fit_frames,
        "base": args.base, "base_row": base_row, "models": args.model, "rows": rows,
        "plot": str(out / "toyworld_alignment.png"),
    }
    plot(result, out / "toyworld_alignment.png")
    return write_result(result, out / "toyworld_alignment", markdown)


if __name__ == "__main__":
    main()
