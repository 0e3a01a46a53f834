"""GRPO overhead: rollouts against bare denoiser forwards, and the update phase against a hand-written loop.

    python -m benchmarks.grpo_overhead [--prompts 2] [--group_size 8] [--steps 10] [--repeats 5]

Both comparisons run side by side in one process on the shipped toy-world base with the LoRA of
``configs/toyworld/grpo.yaml``, alternating the two sides each repetition so machine noise hits both alike:

- **rollout**: ``GRPO.rollout`` (text encoding, SDE steps with log-probs, decoding, reward, advantages) against the
  bare cost of ``steps`` guided transformer calls on the same ``prompts x group_size`` batch (no SDE maths,
  no reward), which is the floor any implementation pays;
- **update**: one ``GRPO.training_step`` through a Lightning ``Trainer`` on a fixed, pre-recorded rollout (so only the
  update is timed) against a minimal PyTorch loop doing the same maths on an identical copy of the model: guided
  velocity, SDE log-prob of the recorded next latent, clipped surrogate, backward, gradient clipping, AdamW step.

Figures are medians over ``--repeats`` with their min-max spread; results go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from typing_extensions import override

from lit_videoalign.backbones.base import Conditioning
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.objectives.grpo import GRPO, grpo_policy_loss
from lit_videoalign.schedules.flow import sde_step_with_logprob
from reward_zoo import create_reward

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["a red ball falls and bounces", "a blue ball moves left", "a green ball moves right and bounces",
           "a yellow ball falls", "a white ball moves left and bounces", "a red ball moves right"]


def build(args) -> GRPO:
    torch.manual_seed(0)
    backbone = DiffusersVideoBackbone("builtin:toyworld-base", max_sequence_length=24)
    return GRPO(backbone, reward=create_reward("newton"), lora_rank=8, group_size=args.group_size,
                num_sampling_steps=args.steps, rollout_guidance_scale=2.0, train_fraction=1.0, clip_range=0.01,
                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0))


@torch.no_grad()
def bare_forwards(model: GRPO, n: int, steps: int) -> float:
    """Seconds for ``steps`` guided transformer calls (cond + uncond in one batch) on ``n`` latents."""
    hp = model.hparams
    bb = model.backbone
    cond = Conditioning.cat([bb.encode_prompts(["a red ball falls"] * n), bb.encode_prompts([""] * n)])
    x = torch.randn(n, *bb.latent_shape(hp.num_frames, hp.height, hp.width))
    t = torch.full((2 * n,), 500.0)
    start = time.perf_counter()
    for _ in range(steps):
        v_c, v_u = bb.denoiser(hidden_states=torch.cat([x, x]), timestep=t, encoder_hidden_states=cond.prompt_embeds,
                               return_dict=False)[0].chunk(2)
        x = x - 0.01 * (v_u + 2.0 * (v_c - v_u))
    return time.perf_counter() - start


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def lightning_update(model: GRPO, rollout, prompts: list[str], repeats: int) -> list[float]:
    """Per-step seconds of ``GRPO.training_step`` in a Trainer, each step replaying ``rollout``."""
    model.rollout = lambda _prompts, generator=None, images=None: rollout  # only the update is timed
    timer = StepTimer()
    trainer = L.Trainer(max_steps=repeats + 1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    loader = torch.utils.data.DataLoader([{"prompt": p} for p in prompts] * (repeats + 1), batch_size=len(prompts))
    trainer.fit(model, loader)
    return timer.seconds[1:]  # the first step includes optimizer creation


def manual_update(model: GRPO, rollout, clip_range: float, noise_level: float, guidance: float) -> float:
    """One update by hand: the maths of GRPO.training_step with no framework in between."""
    bb = model.backbone
    params = [p for p in model.parameters() if p.requires_grad]
    if not hasattr(model, "_bench_opt"):
        model._bench_opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    opt = model._bench_opt
    n = len(rollout.prompts)
    both = Conditioning.cat([rollout.cond, rollout.uncond])
    start = time.perf_counter()
    opt.zero_grad()
    for step in rollout.sde_steps:
        x, x_next = rollout.latents[:, step], rollout.latents[:, step + 1]
        s, s_next = rollout.sigmas[step].expand(n), rollout.sigmas[step + 1].expand(n)
        out = bb.denoiser(hidden_states=torch.cat([x, x]), timestep=torch.cat([s, s]) * 1000,
                          encoder_hidden_states=both.prompt_embeds, return_dict=False)[0]
        v_c, v_u = out.chunk(2)
        v = v_u + guidance * (v_c - v_u)
        _, log_prob, _, _ = sde_step_with_logprob(x, v, s, s_next, noise_level=noise_level, prev_sample=x_next)
        loss = grpo_policy_loss(log_prob, rollout.log_probs[:, step], rollout.advantages, clip_range)
        (loss / len(rollout.sde_steps)).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return time.perf_counter() - start


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", default=str(RESULTS / "grpo_overhead"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = PROMPTS[:args.prompts]
    n = len(prompts) * args.group_size

    model = build(args)
    hand = copy.deepcopy(model)  # identical weights and LoRA for the hand-written loop
    rollout_s, bare_s = [], []
    bare_forwards(model, n, 1)  # warm-up
    for r in range(args.repeats):  # alternate the two sides
        start = time.perf_counter()
        rollout = model.rollout(prompts, generator=torch.Generator().manual_seed(r))
        rollout_s.append(time.perf_counter() - start)
        bare_s.append(bare_forwards(model, n, args.steps))

    hp = model.hparams
    manual_update(hand, rollout, hp.clip_range, hp.noise_level, 2.0)  # warm-up (optimizer state)
    light_s, hand_s = [], []
    for _ in range(args.repeats):  # alternate: one Lightning step, one hand-written step
        light_s += lightning_update(model, rollout, prompts, 1)
        hand_s.append(manual_update(hand, rollout, hp.clip_range, hp.noise_level, 2.0))

    result = {
        "command": "python -m benchmarks.grpo_overhead " + " ".join(argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
        "setup": {"prompts": len(prompts), "group_size": args.group_size, "videos": n, "sde_steps": args.steps,
                  "guidance": "CFG 2.0 (cond + uncond in one batch)", "lora_rank": 8},
        "rollout_s": summary(rollout_s), "bare_forwards_s": summary(bare_s),
        "rollout_over_bare": statistics.median(rollout_s) / statistics.median(bare_s),
        "update_lightning_s": summary(light_s), "update_hand_written_s": summary(hand_s),
        "update_overhead": statistics.median(light_s) / statistics.median(hand_s) - 1,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    fmt = lambda s: f"{s['median']:.2f} s ({s['min']:.2f}-{s['max']:.2f})"  # noqa: E731
    table = "\n".join([
        f"GRPO overhead, {n} videos ({len(prompts)} prompts x {args.group_size}), {args.steps} SDE steps, "
        f"{result['machine']}; median (min-max) of {args.repeats}",
        "", "| phase | this suite | floor | ratio |", "|---|---|---|---|",
        f"| rollout (encode, SDE, decode, reward) | {fmt(result['rollout_s'])} | {fmt(result['bare_forwards_s'])} "
        f"bare guided forwards | {result['rollout_over_bare']:.2f}x |",
        f"| update (Lightning `training_step`) | {fmt(result['update_lightning_s'])} | "
        f"{fmt(result['update_hand_written_s'])} hand-written loop | {result['update_overhead']:+.1%} |",
        "", f"Command: `{result['command'].strip()}`", ""])
    out.with_suffix(".md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
