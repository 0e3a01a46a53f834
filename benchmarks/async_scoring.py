"""Asynchronous scoring: the rollout phase of GRPO and DiffusionNFT with a slow reward server, scored chunk by chunk in
turn against in the background while the next chunk is generated.

    python -m benchmarks.async_scoring [--objectives grpo nft] [--chunks 12] [--group_size 4] [--steps 2]
                                       [--repeats 3] [--threads 1] [--local] [--output benchmarks/results/async_scoring]

The generator is the shipped toy-world base (``builtin:toyworld-base``, CFG-free rollouts); the reward is a cheap one
(mean brightness) served by ``reward_zoo.server.start_server`` on 127.0.0.1 with a server-side delay ``D`` before every
reward call, and read by the ``remote`` client, as a large judge served on its own GPU would be (the server runs in
this process's background threads). ``--local`` replaces the server by an in-process reward that sleeps ``D``.

Each objective's rollout has ``rollout_chunk_size=1``: ``--chunks`` chunks of one prompt x ``--group_size`` videos.
Each of ``--repeats`` repeats first measures one chunk's generation time ``G`` (a rollout with an instant in-process
reward, over its chunks), sets ``D = G`` (``--delay_s`` fixes ``D`` instead), the case where scoring costs as much as
generating, then times a rollout scored in turn and one scored in the background (``async_scoring``), in alternating
order, from the same generator seed; the two rollouts must be identical (checked). With ``n`` chunks and scoring time
``S = G``, in turn takes ``n (G + S)`` and in the background ``n G + S``: the ideal ratio is ``(n + 1) / (2 n)`` (0.54
for 12 chunks). The generator runs one torch thread by default (``--threads``): on a small shared machine more threads
make its time swing with the other load by several times between repeats. Figures are medians with their min-max
spread; results go to ``benchmarks/results/async_scoring.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time

import lightning as L
import torch

from benchmarks import add_output_argument, output_path, write_result
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.objectives.grpo import GRPO
from lit_videoalign.objectives.nft import DiffusionNFT
from lit_videoalign.testing import Brightness
from reward_zoo import create_reward

PROMPTS = ["a red ball falls and bounces", "a blue ball moves left", "a green ball moves right and bounces",
           "a yellow ball falls", "a white ball moves left and bounces", "a red ball moves right",
           "a blue ball falls", "a green ball moves left", "a yellow ball moves right and bounces",
           "a white ball falls and bounces", "a red ball moves left", "a blue ball moves right and bounces"]
OBJECTIVES = {"grpo": GRPO, "nft": DiffusionNFT}


class SleepyBrightness(Brightness):
    """Mean brightness after ``time.sleep(delay_s)``: the in-process stand-in for a slow judge (``--local``)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s = delay_s

    def forward(self, videos, prompts=None, references=None):
        time.sleep(self.delay_s)
        return super().forward(videos, prompts, references)


def build(name: str, reward, args) -> GRPO | DiffusionNFT:
    torch.manual_seed(0)
    backbone = DiffusersVideoBackbone("builtin:toyworld-base", max_sequence_length=24)
    return OBJECTIVES[name](backbone, reward=reward, lora_rank=8, group_size=args.group_size,
                            num_sampling_steps=args.steps, rollout_chunk_size=1, rollout_guidance_scale=1.0)


def timed_rollout(model, prompts: list[str], async_scoring: bool, seed: int):
    model.hparams.async_scoring = async_scoring
    start = time.perf_counter()
    rollout = model.rollout(prompts, generator=torch.Generator().manual_seed(seed))
    return time.perf_counter() - start, rollout


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


@contextlib.contextmanager
def slow_reward(local: bool):
    """``(reward, set_delay, description)``: the remote client of a server that sleeps ``D`` before each reward call,
    or an in-process reward that does; ``set_delay(D)`` sets ``D``."""
    if local:
        reward = SleepyBrightness()
        yield reward, lambda d: setattr(reward, "delay_s", d), "in-process reward sleeping D per call (--local)"
        return
    from reward_zoo.server import start_server

    with start_server(Brightness(), host="127.0.0.1", port=0) as server:
        yield (create_reward("remote", url=server.url), lambda d: setattr(server, "delay_s", d),
               "reward server on 127.0.0.1 (remote client), server-side delay_s = D")


def measure(name: str, args) -> dict:
    """Per repeat: one chunk's generation time ``G`` (a rollout with an instant in-process reward, over its chunks),
    then with ``D = G`` (or ``--delay_s``) a rollout scored in turn and one scored in the background, in alternating
    order, from the same seed."""
    prompts, instant = PROMPTS[:args.chunks], Brightness()
    model = build(name, instant, args)
    with slow_reward(args.local) as (reward, set_delay, how):
        model.hold_reward(reward)
        model.rollout(prompts[:1], generator=torch.Generator().manual_seed(0))  # warm-up (and the server's)
        gen_s, delay_s, sync_s, async_s, identical = [], [], [], [], True
        for r in range(args.repeats):
            model.hold_reward(instant)
            gen_s.append(timed_rollout(model, prompts, False, r)[0] / len(prompts))
            delay_s.append(args.delay_s if args.delay_s is not None else gen_s[-1])
            set_delay(delay_s[-1])
            model.hold_reward(reward)
            timed = {}
            for mode in ((False, True) if r % 2 == 0 else (True, False)):
                timed[mode] = timed_rollout(model, prompts, mode, r)
            sync_s.append(timed[False][0])
            async_s.append(timed[True][0])
            a, b = timed[False][1], timed[True][1]
            same = [torch.equal(a.valid, b.valid), torch.equal(a.rewards["overall"], b.rewards["overall"]),
                    torch.equal(a.latents, b.latents), torch.equal(a.advantages, b.advantages)]
            identical = identical and all(same) and bool(a.valid.all())
    n = args.chunks
    return {"objective": name, "reward": how, "chunk_generation_s": summary(gen_s), "delay_s": summary(delay_s),
            "sync_s": summary(sync_s), "async_s": summary(async_s),
            "async_over_sync": statistics.median(async_s) / statistics.median(sync_s),
            "async_over_sync_per_repeat": summary([t / s for t, s in zip(async_s, sync_s)]),
            "ideal_ratio": (n + 1) / (2 * n), "identical_rollouts": identical,
            "meets_target": statistics.median(async_s) / statistics.median(sync_s) <= 0.6}


def markdown(result: dict) -> str:
    s = result["setup"]
    fmt = lambda v: f"{v['median']:.2f} s ({v['min']:.2f}-{v['max']:.2f})"  # noqa: E731
    ratio = lambda v: f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})"  # noqa: E731
    lines = [f"Rollout phase with a slow reward, {s['chunks']} chunks of 1 prompt x {s['group_size']} videos, "
             f"{s['sampling_steps']} sampling steps, {result['machine']}; median (min-max) of {s['repeats']}, "
             f"each repeat measures one chunk's generation G, sets the reward delay D to it, then times scoring in "
             f"turn and in the background (in alternating order).", "",
             "| objective | one chunk's generation | reward delay D | in turn | in the background | ratio of medians | "
             "ratio per repeat | ideal | identical |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['objective']} | {fmt(row['chunk_generation_s'])} | {fmt(row['delay_s'])} | "
                     f"{fmt(row['sync_s'])} | {fmt(row['async_s'])} | {row['async_over_sync']:.2f} | "
                     f"{ratio(row['async_over_sync_per_repeat'])} | {row['ideal_ratio']:.2f} | "
                     f"{'yes' if row['identical_rollouts'] else 'NO'} |")
    lines += ["", f"Reward: {result['rows'][0]['reward']}. Target: ratio <= 0.6.", "",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", choices=sorted(OBJECTIVES), default=["grpo", "nft"])
    parser.add_argument("--chunks", type=int, default=12, help=f"prompts per batch, one per chunk (<= {len(PROMPTS)})")
    parser.add_argument("--group_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="sampling steps of a rollout")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--delay_s", type=float, default=None, help="reward delay (default: one chunk's generation)")
    parser.add_argument("--local", action="store_true", help="an in-process sleeping reward instead of the server")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the generator")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 chunks, 2 steps, 1 repeat")
    add_output_argument(parser, "benchmarks/results/async_scoring")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.quick:
        args.chunks, args.steps, args.repeats, args.group_size = 2, 2, 1, 2
    if not 1 <= args.chunks <= len(PROMPTS):
        raise SystemExit(f"--chunks must be in [1, {len(PROMPTS)}], got {args.chunks}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(name, args) for name in args.objectives]
    result = {
        "command": " ".join(["python -m benchmarks.async_scoring", *argv]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
        "setup": {"chunks": args.chunks, "group_size": args.group_size, "sampling_steps": args.steps,
                  "repeats": args.repeats, "local": args.local},
        "rows": rows,
    }
    return write_result(result, output_path(args), markdown)


if __name__ == "__main__":
    main()
