"""``make demo``: a few CPU-minutes of online RL (DiffusionNFT) on the shipped toy-world base, and what it changed.

It builds the run from the shipped config ``toyworld/nft`` through the same CLI a user calls (LoRA on the shipped base,
rewarded by the verifiable ``newton`` physics reward plus the learned ``quality`` reward), then:

1. samples held-out prompts (the toy world's test seed range, never seen in training) from the base and scores them
   with the training reward and with rewards the run never optimises (the learned ``physics_learned`` judge and
   the prompt checks of :func:`~lit_videoalign.data.toyworld.prompt_agreement`): once with the sampler the trained
   model will use (the config's: CFG-free), and once with the base's own guided sampler (``--reference_guidance``);
2. trains for ``--max_steps`` optimizer steps (the config makes 4 per rollout batch), recording the training reward
   of every rollout batch;
3. samples and scores the same prompts and seeds again, and writes to ``outputs/demo/``: MP4s before and after, a
   before/after GIF grid, a reward-curve PNG and ``heldout.json``. Every change is paired (same prompt, same seed).

``--config toyworld/grpo`` runs the same demo with Flow-GRPO. Configs are found as ``videoalign --config`` finds
them (a file, else a shipped name: :mod:`lit_videoalign.shipped_configs`), so the demo runs from an installed wheel in
any folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from typing_extensions import override

from lit_videoalign.cli import VideoAlignCLI
from lit_videoalign.data.toyworld import TEST_SEED_OFFSET, ToyWorld, prompt_agreement
from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.shipped_configs import resolve_config_args
from lit_videoalign.video_io import video_grid, write_gif, write_mp4
from reward_zoo import create_reward
from reward_zoo.base import RewardModel

CONFIG = "toyworld/nft"  # a shipped config (lit_videoalign/configs/toyworld/nft.yaml)


def heldout_prompts(n: int) -> list[str]:
    """``n`` single-ball prompts from the toy world's test seed range."""
    world = ToyWorld(max_balls=1)
    return [world.example(TEST_SEED_OFFSET + i).prompt for i in range(n)]


@torch.no_grad()
def heldout_scores(model: AlignmentModule, prompts: list[str], seeds: list[int], rewards: dict[str, RewardModel],
                   guidance_scale: float | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Deterministic samples of ``prompts`` (the model's sampler; ``guidance_scale`` overrides its guidance) and their
    per-prompt scores: each reward's overall, and prompt agreement.

    Returns:
        ``{name: (b,) scores}`` and the videos ``(b, t, c, h, w)``.
    """
    videos = model.generate(prompts, seeds, guidance_scale=guidance_scale,
                            sampler="euler")  # (b, t, c, h, w); the README's demo figures use this grid
    scores = {name: reward(videos, prompts)["overall"].float().cpu() for name, reward in rewards.items()}
    agree = [prompt_agreement(v, p) for v, p in zip(videos, prompts)]
    for key in agree[0]:
        scores[f"prompt_{key}"] = torch.tensor([float(a[key]) for a in agree])
    return scores, videos


def paired_change(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """Mean per-prompt change ``after - before`` with a normal-approximation 95 % interval.

    The same prompts and seeds are sampled before and after, so the paired difference cancels prompt difficulty and
    is the honest test of whether training moved a held-out score.
    """
    diff = after - before  # (b,)
    half = 1.96 * diff.std(unbiased=True).item() / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
    return {"mean": diff.mean().item(), "ci95_low": diff.mean().item() - half, "ci95_high": diff.mean().item() + half}


class RewardHistory(L.Callback):
    """Keeps the training reward of every rollout batch, for the curve."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys, self.history = keys, {k: [] for k in keys}

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for key in self.keys:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.history[key].append(float(value))


def plot_curve(history: dict[str, list[float]], change: dict[str, dict[str, float]], path: Path) -> Path:
    """One panel per training reward (per rollout batch, with a 5-batch moving average), then the held-out change
    with its paired 95 % interval (``change`` from :func:`paired_change` per score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in history.items() if v}
    fig, axes = plt.subplots(1, len(curves) + 1, figsize=(4 * (len(curves) + 1), 3.4), squeeze=False)
    for ax, (key, values) in zip(axes[0], curves.items()):
        ax.plot(values, alpha=0.35, color="tab:blue")
        if len(values) >= 5:
            smooth = torch.tensor(values).unfold(0, 5, 1).mean(1)
            ax.plot(range(4, len(values)), smooth, color="tab:blue", label="5-batch mean")
            ax.legend(fontsize=8)
        ax.set_xlabel("rollout batch")
        ax.set_title(f"training reward: {key.removeprefix('train/reward/').removesuffix('/overall')}", fontsize=10)
    ax = axes[0][-1]
    names = list(change)
    deltas = [change[k]["mean"] for k in names]
    errors = [[change[k]["mean"] - change[k]["ci95_low"] for k in names],
              [change[k]["ci95_high"] - change[k]["mean"] for k in names]]
    ax.barh(range(len(names)), deltas, xerr=errors, capsize=3,
            color=["tab:green" if d >= 0 else "tab:red" for d in deltas])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_title("held-out prompts: after - base (95 % CI)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--max_steps", type=int, default=160, help="optimizer steps (4 per rollout batch)")
    parser.add_argument("--num_heldout", type=int, default=32, help="held-out prompts scored before and after")
    parser.add_argument("--config", default=CONFIG, help="a YAML file or a shipped config name (`videoalign configs`)")
    parser.add_argument("--reference_guidance", type=float, default=2.0,
                        help="guidance of the base's own sampler: the second reference of the trained model")
    args, overrides = parser.parse_known_args(argv)  # the rest are CLI overrides, e.g. --model.init_args.group_size=4
    out = Path(args.output_dir)

    cli = VideoAlignCLI(args=[*resolve_config_args(["--config", args.config]), f"--trainer.max_steps={args.max_steps}",
                              f"--trainer.default_root_dir={out / 'run'}", "--trainer.val_check_interval=null",
                              "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
                              f"--trainer.callbacks.init_args.dirpath={out / 'pipeline'}", *overrides], run=False)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    history = RewardHistory(tuple(f"train/reward/{k}/overall" for k in getattr(model.reward, "rewards", {}))
                            or ("train/reward/overall",))
    trainer.callbacks.append(history)
    judges = {"newton (trained on)": create_reward("newton"),
              "physics_learned (held out)": create_reward("physics_learned", pretrained=True)}
    prompts = heldout_prompts(args.num_heldout)
    seeds = list(range(len(prompts)))

    method = type(model).__name__
    guidance = model.hparams.guidance_scale
    print(f"\n[1/3] sampling {len(prompts)} held-out prompts from the shipped base (guidance {guidance:g}, and "
          f"{args.reference_guidance:g} as the base's own sampler)")
    per_before, videos_before = heldout_scores(model, prompts, seeds, judges)
    per_reference = None
    if args.reference_guidance != guidance:
        per_reference, _ = heldout_scores(model, prompts, seeds, judges, guidance_scale=args.reference_guidance)

    print(f"[2/3] {method} with LoRA for {args.max_steps} optimizer steps "
          f"({model.hparams.group_size} rollouts per prompt, {data.batch_size} prompts per step)")
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    minutes = (time.perf_counter() - start) / 60

    print("[3/3] sampling the same prompts and seeds from the aligned model")
    per_after, videos_after = heldout_scores(model, prompts, seeds, judges)
    before = {k: v.mean().item() for k, v in per_before.items()}
    after = {k: v.mean().item() for k, v in per_after.items()}
    change = {k: paired_change(per_before[k], per_after[k]) for k in per_before}
    reference = None
    if per_reference is not None:
        reference = {"guidance_scale": args.reference_guidance,
                     "before": {k: v.mean().item() for k, v in per_reference.items()},
                     "paired_change": {k: paired_change(per_reference[k], per_after[k]) for k in per_reference}}

    for i, prompt in enumerate(prompts[:8]):
        stem = f"{i:02d}_{prompt.replace(' ', '_').replace(',', '')}"
        write_mp4(videos_before[i], out / "before" / f"{stem}.mp4", upscale=4)
        write_mp4(videos_after[i], out / "after" / f"{stem}.mp4", upscale=4)
    grid = write_gif(video_grid(list(videos_before[:8]) + list(videos_after[:8]), ncols=8), out / "before_after.gif")
    curve = plot_curve(history.history, change, out / "reward_curve.png")
    result = {"method": method, "max_steps": args.max_steps, "train_minutes": minutes,
              "heldout_prompts": len(prompts), "guidance_scale": guidance, "before": before, "after": after,
              "paired_change": change, "against_guided_base": reference, "train_reward": history.history}
    (out / "heldout.json").write_text(json.dumps(result, indent=2))

    print(f"\nheld-out scores, {len(prompts)} prompts, base -> after {args.max_steps} {method} optimizer steps "
          f"({minutes:.1f} min of training on this machine), the same sampler (guidance {guidance:g}) and seeds:")
    for key in before:
        c = change[key]
        print(f"  {key:32s} {before[key]:8.3f} -> {after[key]:8.3f}   "
              f"change {c['mean']:+.3f} (95 % CI {c['ci95_low']:+.3f} .. {c['ci95_high']:+.3f})")
    if reference is not None:
        print(f"against the base's own sampler (guidance {args.reference_guidance:g}, twice the denoiser calls), same "
              f"seeds:")
        for key, c in reference["paired_change"].items():
            print(f"  {key:32s} {reference['before'][key]:8.3f} -> {after[key]:8.3f}   "
                  f"change {c['mean']:+.3f} (95 % CI {c['ci95_low']:+.3f} .. {c['ci95_high']:+.3f})")
    print(f"samples: {out / 'before'} and {out / 'after'} (MP4), {grid} (top row base, bottom row after {method})")
    print(f"reward curve: {curve}; merged pipeline: {out / 'pipeline'}")
    return result


if __name__ == "__main__":
    main()
