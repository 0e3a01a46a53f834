"""Inference-time alignment on the toy world: plain sampling vs best-of-N vs reward guidance vs noise search.

    python -m benchmarks.toyworld_inference [--num_prompts 48] [--ns 1 2 4 8] [--output results/toyworld_inference]
    python -m benchmarks.toyworld_inference --finetuned reward_gradient=outputs/reward_gradient/pipeline

Prompts come from held-out single-ball toy-world scenes (the test seed range, never trained on); prompt ``i`` is
sampled from seed ``i``. Every method is scored by rewards it did *not* select with, so a gain is not just the
selector being gamed:

- best-of-N and noise search select by ``--select`` (default ``newton``, the verifiable physics checker); best-of-N
  is also re-ranked by the guidance reward on the same candidates, to compare like with like;
- reward guidance follows the gradient of ``--guide`` (default the learned ``physics_learned``: ``newton``'s
  medians and sharp tolerances give it a gradient that does not even raise ``newton`` itself);
- every video is measured by ``newton``, ``physics_learned``, the learned ``quality`` and
  ``prompt_agreement`` (colour, direction and falling read back from the pixels, which no method selects with).

Best-of-N for every N comes from one run of ``max(N)`` candidates per prompt (best-of-N takes the best of the first
N candidates, exactly what a run with that N returns); its wall time is the measured time per candidate times N.
Cost is NFE per video (denoiser forward passes, guidance branches counted) plus backward passes for guidance, and
wall time. Writes ``OUTPUT.json``, ``OUTPUT.md`` and ``OUTPUT.png`` (gain versus N) for ``--output OUTPUT``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import add_output_argument, mean_se, output_path, write_result
from benchmarks.toyworld_eval import SAMPLER, agreement, held_out_scenes, load_reward, reward_scores
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.inference import best_of_n, noise_search, reward_guided_sample
from lit_videoalign.objectives.sft import SFT

MEASURES = ("newton", "physics_learned", "quality")


def measure(videos: torch.Tensor, prompts: list[str], rewards: dict) -> dict:
    """Per-prompt measures of ``videos``: each reward's overall score and prompt agreement (as 0/1)."""
    out = reward_scores(videos, prompts, rewards)
    out.update({f"agree_{key}": values for key, values in agreement(videos, prompts).items()})
    return out


def parse_finetuned(spec: str, default_guidance: float) -> tuple[str, str, float]:
    """``NAME=PIPELINE[@CFG]`` -> ``(name, pipeline, guidance)``; without ``@CFG`` the benchmark's guidance."""
    name, _, path = spec.partition("=")
    path, at, cfg = path.partition("@")
    if not name or not path:
        raise ValueError(f"--finetuned takes NAME=PIPELINE[@CFG], got {spec!r}")
    try:
        guidance = float(cfg) if at else default_guidance
    except ValueError:
        raise ValueError(f"--finetuned takes NAME=PIPELINE[@CFG] with a number CFG, got {spec!r}") from None
    return name, path, guidance


def summarise(name: str, method: str, selected_by: str | None, per_prompt: dict, nfe: int, backward: int,
              seconds_per_video: float, **params) -> dict:
    stats = {k: mean_se(v) for k, v in per_prompt.items()}
    return {"name": name, "method": method, "selected_by": selected_by, "params": params, "nfe": nfe,
            "denoiser_backward": backward, "seconds_per_video": seconds_per_video,
            "mean": {k: s[0] for k, s in stats.items()}, "se": {k: s[1] for k, s in stats.items()},
            "per_prompt": per_prompt}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="builtin:toyworld-base")
    parser.add_argument("--num_prompts", type=int, default=48)
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 2, 4, 8], help="best-of-N sizes")
    parser.add_argument("--select", default="newton", help="reward best-of-N and noise search select by")
    parser.add_argument("--guide", default="physics_learned", help="differentiable reward of reward guidance")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[0.003, 0.01])
    parser.add_argument("--guidance_steps", type=int, nargs=2, default=None, metavar=("START", "STOP"),
                        help="guided step range [START, STOP) (default: every step)")
    parser.add_argument("--search_population", type=int, default=4)
    parser.add_argument("--search_perturbation", type=float, default=0.5)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=2.0, help="classifier-free guidance")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--finetuned", nargs="*", default=[], metavar="NAME=PIPELINE[@CFG]",
                        help="also evaluate plain sampling from fine-tuned pipelines (e.g. PipelineExport folders), "
                             "at --guidance_scale or at their own classifier-free guidance CFG (e.g. @1 for a "
                             "model that distilled guidance in)")
    add_output_argument(parser, "benchmarks/results/toyworld_inference")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--add_finetuned", action="store_true",
                        help="measure only the --finetuned pipelines and add their rows to the result already in "
                             "--output (same prompts, seeds and sampler; checked), replacing rows of the same name")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def load_model(path: str) -> SFT:
        model = SFT(DiffusersVideoBackbone(path, max_sequence_length=24), num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale).to(device)
        return model.eval()

    model = load_model(args.pipeline)
    prompts = [scene.prompt for scene in held_out_scenes(args.num_prompts)]
    seeds = list(range(args.num_prompts))
    rewards = {name: load_reward(name).to(device) for name in MEASURES}
    select = rewards.get(args.select) or load_reward(args.select).to(device)
    guide = rewards.get(args.guide) or load_reward(args.guide).to(device)
    sample_nfe = args.num_inference_steps * (1 if args.guidance_scale == 1.0 else 2)
    rows = []
    previous = None
    out = output_path(args)
    if args.add_finetuned:
        previous = json.loads(out.with_suffix(".json").read_text())
        for key in ("pipeline", "num_prompts", "num_inference_steps", "guidance_scale"):
            if previous[key] != getattr(args, key):
                raise ValueError(f"--add_finetuned: the existing result has {key}={previous[key]!r}, this run "
                                 f"{getattr(args, key)!r}; rows would not be paired")
        names = {f"fine-tuned: {spec.partition('=')[0]}" for spec in args.finetuned}
        rows = [r for r in previous["rows"] if r["name"] not in names]

    if previous is None:  # with --add_finetuned, only the fine-tuned rows below are measured
        # best-of-N: one run of max(N) candidates; best-of-N is the best of the first N
        n_max = max(args.ns)
        start = time.perf_counter()
        bon = best_of_n(model, prompts, select, n_max, seeds, reward_key="overall", batch_size=args.batch_size,
                        return_candidates=True, sampler=SAMPLER)
        per_candidate = (time.perf_counter() - start) / (args.num_prompts * n_max)
        candidates = bon.info["candidates"]  # (b, n, t, c, h, w)
        for selector_name, selector in ((args.select, select), (args.guide, guide)):
            with torch.no_grad():
                scores = torch.stack([selector(candidates[i], [p] * n_max)["overall"].float()
                                      for i, p in enumerate(prompts)])  # (b, n)
            for n in sorted(set(args.ns)):
                if n == 1 and selector_name != args.select:
                    continue  # best-of-1 is plain sampling whatever the selector
                index = scores[:, :n].argmax(1)
                videos = candidates[torch.arange(len(prompts)), index]
                name = "plain" if n == 1 else f"best-of-{n} ({selector_name})"
                rows.append(summarise(name, "plain" if n == 1 else "best_of_n", None if n == 1 else selector_name,
                                      measure(videos, prompts, rewards), n * sample_nfe, 0, per_candidate * n, n=n))
        del candidates

        # reward guidance
        for scale in args.guidance_scales:
            start = time.perf_counter()
            res = reward_guided_sample(model, prompts, guide, seeds, scale=scale, step_range=args.guidance_steps,
                                       batch_size=args.batch_size)
            seconds = (time.perf_counter() - start) / len(prompts)
            rows.append(summarise(f"guidance {scale:g} ({args.guide})", "reward_guidance", args.guide,
                                  measure(res.videos, prompts, rewards), res.nfe, res.info["denoiser_backward"],
                                  seconds, scale=scale, step_range=args.guidance_steps))

        # noise search with the budget of the largest best-of-N
        start = time.perf_counter()
        res = noise_search(model, prompts, select, n_max * sample_nfe, seeds, mode="greedy",
                           population=args.search_population, perturbation=args.search_perturbation,
                           batch_size=args.batch_size, sampler=SAMPLER)
        seconds = (time.perf_counter() - start) / len(prompts)
        rows.append(summarise(f"noise search greedy ({args.select})", "noise_search", args.select,
                              measure(res.videos, prompts, rewards), res.nfe, 0, seconds,
                              budget_nfe=n_max * sample_nfe, population=args.search_population,
                              perturbation=args.search_perturbation, rounds=res.info["rounds"]))

    # fine-tuned models (e.g. RewardGradient / RejectionSFT pipelines), plain sampling
    for spec in args.finetuned:
        name, path, cfg = parse_finetuned(spec, args.guidance_scale)
        tuned = load_model(path)
        start = time.perf_counter()
        videos = tuned.generate(prompts, seeds, guidance_scale=cfg, sampler=SAMPLER)
        seconds = (time.perf_counter() - start) / len(prompts)
        nfe = args.num_inference_steps * (1 if cfg == 1.0 else 2)
        rows.append(summarise(f"fine-tuned: {name}", "finetuned", None, measure(videos, prompts, rewards),
                              nfe, 0, seconds, pipeline=path, guidance_scale=cfg))
        del tuned

    plain = next(r for r in rows if r["name"] == "plain")
    for row in rows:  # paired over prompts: the same prompt and seed in every row
        diffs = {k: [a - b for a, b in zip(row["per_prompt"][k], plain["per_prompt"][k])] for k in row["mean"]}
        row["gain"] = {k: mean_se(d)[0] for k, d in diffs.items()}
        row["gain_se"] = {k: mean_se(d)[1] for k, d in diffs.items()}
    if previous is not None:
        result = {**previous, "rows": rows}
    else:
        result = {"pipeline": args.pipeline, "num_prompts": args.num_prompts,
                  "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                  "select": args.select, "guide": args.guide, "device": device,
                  "torch_threads": torch.get_num_threads(), "rows": rows}
    write_result(result, out, markdown)
    plot(result, out.with_name(f"{out.name}.png"))
    return result


def markdown(result: dict) -> str:
    """The results table: mean (standard error over prompts) of every measure, in-sample cells starred."""
    cols = [*MEASURES, "agree_all", "agree_colour", "agree_direction", "agree_falls"]
    head = ["method", "NFE/video", "backward/video", "s/video", *cols]
    lines = [f"Toy-world inference-time alignment: {result['num_prompts']} held-out prompts, "
             f"{result['num_inference_steps']} Euler steps, CFG {result['guidance_scale']}, {result['device']}, "
             f"{result['torch_threads']} torch threads. Mean (standard error over prompts); `*` marks the reward the "
             f"row selected or guided by (in-sample), every other column is held out. `newton` in (0, 1], "
             f"`physics_learned` and `quality` are logits, `agree_*` are rates.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["name"], str(r["nfe"]), str(r["denoiser_backward"]), f"{r['seconds_per_video']:.2f}"]
        for c in cols:
            star = "*" if c == r["selected_by"] else ""
            cells.append(f"{r['mean'][c]:.3f}{star} ({r['se'][c]:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    gain_cols = [*MEASURES, "agree_all"]
    lines += ["", "Paired gain over plain sampling, mean (s.e.) [per 100 extra NFE-equivalents, a backward pass "
              "counted as two forwards]; `-` where the row selected by that reward:", "",
              "| method | extra NFE | " + " | ".join(gain_cols) + " |", "|" + "---|" * (len(gain_cols) + 2)]
    plain_nfe = next(r["nfe"] for r in result["rows"] if r["name"] == "plain")
    for r in result["rows"]:
        extra = r["nfe"] + 2 * r["denoiser_backward"] - plain_nfe
        if r["name"] == "plain":
            continue
        cells = []
        for c in gain_cols:
            if c == r["selected_by"]:
                cells.append("-")
                continue
            rate = f" [{100 * r['gain'][c] / extra:+.4f}]" if extra > 0 else ""
            cells.append(f"{r['gain'][c]:+.3f} ({r['gain_se'][c]:.3f}){rate}")
        lines.append(f"| {r['name']} | {extra} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Best-of-N gain over plain sampling versus N, one curve per selection reward, one panel per measure (dashed
    where the panel's measure is the curve's own selection reward, i.e. in-sample)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = [r for r in result["rows"] if r["method"] == "plain"]
    selectors = sorted({r["selected_by"] for r in result["rows"] if r["method"] == "best_of_n"},
                       key=lambda s: s != result["select"])
    panels = [*MEASURES, "agree_all"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, key in zip(axes, panels):
        for sel in selectors:
            rows = plain + [r for r in result["rows"] if r["method"] == "best_of_n" and r["selected_by"] == sel]
            rows.sort(key=lambda r: r["params"]["n"])
            ns = [r["params"]["n"] for r in rows]
            ax.errorbar(ns, [r["gain"][key] for r in rows], yerr=[r["gain_se"][key] for r in rows], marker="o",
                        capsize=3, ls="--" if key == sel else "-",
                        label=f"by {sel}" + (" (in-sample)" if key == sel else ""))
            ax.set_xticks(ns, [str(n) for n in ns])
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["params"]["n"] for r in result["rows"] if r["method"] in ("plain", "best_of_n")}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("N (candidates per prompt)")
        ax.set_title("prompt agreement (all three)" if key == "agree_all" else key, fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("gain over plain sampling")
    fig.suptitle(f"Best-of-N on {result['num_prompts']} held-out toy-world prompts "
                 f"(error bars: paired s.e. over prompts)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
