"""Reward-hacking probe: GRPO on a deliberately hackable proxy, with pointwise against win-rate advantages.

    python -m benchmarks.reward_hacking --seeds 0 --jobs 2

Both runs train the toy-world GRPO config (``configs/toyworld/grpo.yaml``) from the shipped base with one change, the
reward: the learned ``quality`` reward's visual head alone (``benchmarks/configs/hackable_visual.yaml``), which sees
how the ball looks and not how it moves. ``hack_pointwise`` standardises that score within each group, as GRPO does;
``hack_winrate`` turns the same reward into each sample's win rate over its group (Bradley-Terry, all pairs; Pref-
GRPO, arXiv 2508.20751) and standardises that. Everything else is :mod:`benchmarks.toyworld_rl`: one torch thread,
weights kept every ``--eval_every`` training CPU-minutes, then the held-out gold metrics the proxy never saw
(``physics_learned``, trajectory error against the true physics, strict ``newton``, diversity) and ``quality`` (whose
visual head is the proxy), each paired against the shipped base on the same 48 held-out prompts and seeds with a 95 %
interval. Then the question the probe asks, head to head: each seed's last win-rate weights against its last pointwise
weights, paired on the same held-out videos. Writes ``benchmarks/results/reward_hacking.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks import toyworld_rl, write_result
from benchmarks.toyworld_eval import paired_ci95

ROOT = Path(__file__).resolve().parent.parent
PROXY = "--model.init_args.reward=benchmarks/configs/hackable_visual.yaml"
VARIANTS = {"hack_pointwise": f"grpo:{PROXY}",
            "hack_winrate": f"grpo:{PROXY},--model.init_args.advantage=win_rate"}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--minutes", type=float, default=12.0, help="training CPU-minutes per run")
    parser.add_argument("--eval_every", type=float, default=4.0, help="training CPU-minutes between kept weights")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run that measures nothing")
    parser.add_argument("--merge_only", action="store_true", help="only build the table from the runs on disk")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "reward_hacking"))
    args = parser.parse_args(argv)
    rl_args = ["--methods", *args.methods, "--variant", *[f"{m}={VARIANTS[m]}" for m in VARIANTS],
               "--seeds", *map(str, args.seeds), "--default_minutes", str(args.minutes),
               "--default_eval_every", str(args.eval_every), "--jobs", str(args.jobs), "--output", args.output]
    if args.quick:
        rl_args[rl_args.index("--default_minutes") + 1] = rl_args[rl_args.index("--default_eval_every") + 1] = "0.05"
        rl_args += ["--num_prompts", "2", "--diversity_prompts", "1", "--diversity_seeds", "2", "--batch_size", "2"]
    result = toyworld_rl.main(rl_args + (["--merge_only"] if args.merge_only else []))
    made_by = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--merge_only"]  # the runs' command
    result["command"] = "python -m benchmarks.reward_hacking " + shlex.join(made_by)
    result["head_to_head"] = head_to_head(Path(args.output), args.seeds)
    return write_result(result, args.output, markdown)


def head_to_head(output: Path, seeds: list[int]) -> list[dict]:
    """Per seed: the last ``hack_winrate`` weights minus the last ``hack_pointwise`` weights, paired per video."""
    runs = output.parent / f"{output.name}_runs"
    rows = []
    for seed in seeds:
        paths = [runs / f"{m}_seed{seed}.json" for m in VARIANTS]
        if not all(p.is_file() for p in paths):
            continue
        pointwise, winrate = (json.loads(p.read_text())["points"][-1] for p in paths)
        row = {"seed": seed, "cpu_minutes": [pointwise["cpu_minutes"], winrate["cpu_minutes"]]}
        for key in toyworld_rl.KEYS:
            row[key], row[f"{key}_ci95"] = paired_ci95(winrate, pointwise, key)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [toyworld_rl.markdown(result).rstrip("\n"), "", "## Win rate against pointwise, head to head", "",
             "Each seed's last win-rate weights minus its last pointwise weights, on the same held-out videos "
             "(positive = win rate better, except trajectory error where lower is better); 95 % intervals.", "",
             "| seed | CPU-min (pointwise, win rate) | " + " | ".join(toyworld_rl.KEYS) + " |",
             "|---|---|" + "---|" * len(toyworld_rl.KEYS)]
    for row in result["head_to_head"]:
        cells = [f"{row[k]:+.3f} ({row[k] - row[k + '_ci95']:+.3f} to {row[k] + row[k + '_ci95']:+.3f})"
                 for k in toyworld_rl.KEYS]
        lines.append(f"| {row['seed']} | {row['cpu_minutes'][0]:.1f}, {row['cpu_minutes'][1]:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
