"""Run the benchmarks: ``python -m benchmarks [--quick] [--only NAME ...] [--list] [--results DIR] [-- ARGS]``.

Every benchmark module of this folder runs in its own process (``python -m benchmarks.NAME``), one after the other,
and writes its JSON and Markdown to the results folder (``benchmarks/results/``; with ``--quick``,
``benchmarks/results/quick/`` so smoke runs never overwrite measured tables). ``--quick`` runs each at its tiniest
size, which checks that everything runs rather than measuring anything. An index of what ran, with the exact
commands, exit status and wall time, is written to ``index.json`` and ``index.md`` in the results folder.

Benchmarks that evaluate trained models (``toyworld_dpo``, ``toyworld_distill``, ``toyworld_alignment``) need arguments
and are skipped unless named with ``--only`` and given their arguments after ``--``. ``make bench`` runs
``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One module of ``benchmarks/``: what it measures, its smoke-test arguments and how it names its output."""

    name: str
    measures: str
    quick: tuple[str, ...] = ()
    output_flag: str | None = None  # the module's option for where results go: ``--output STEM`` everywhere
    needs: str | None = None  # arguments it cannot run without

    def output_args(self, results: Path) -> list[str]:
        if self.output_flag is None:
            return []
        return [self.output_flag, str(results / self.name)]


BENCHMARKS = (
    Benchmark("overhead", "step time of SFT, DPO, GRPO (update), NFT (update), DMD and consistency through Lightning "
              "vs a hand-written loop (target: at most 5 % overhead)", ("--quick",), "--output"),
    Benchmark("memory_objectives", "peak memory of LoRA-SFT, LoRA-DPO, LoRA-GRPO and shared-base DMD on one batch",
              ("--quick",), "--output"),
    Benchmark("grpo_overhead", "GRPO rollout vs K x steps bare denoiser forwards; update vs a hand-written loop",
              ("--prompts", "1", "--group_size", "2", "--steps", "2", "--repeats", "1", "--threads", "1"),
              "--output"),
    Benchmark("peers", "LoRA SFT step time and peak memory against finetrainers and DiffSynth-Studio",
              ("--quick",), "--output"),
    Benchmark("peers_flow_grpo", "flow_grpo's SDE step with log-prob and group advantages against ours: max abs "
              "differences and CPU time per call (needs flow_grpo's source under $VIDEOALIGN_PEERS_ROOT/src/flow_grpo; "
              "records 'could not run' without it)", ("--quick",), "--output"),
    Benchmark("mfu", "an SFT step's achieved FLOP rate as a fraction of the measured matmul peak", ("--quick",),
              "--output"),
    Benchmark("dpo_memory", "LoRA/full Flow-DPO vs SFT: step time and peak memory",
              ("--pairs", "1", "--steps", "1", "--warmup", "0", "--mem_steps", "1", "--rounds", "1", "--configs",
               "lora_sft", "lora_dpo"), "--output"),
    Benchmark("dmd_memory", "DMD with shared-base adapters vs separate models: peak memory",
              ("--layers", "1", "--rank", "4", "--batches", "1"), "--output"),
    Benchmark("memory_scale", "FSDP2, 8-bit AdamW and NF4 base: bytes per rank", ("--layers", "1", "--heads", "2",
              "--head_dim", "16"), "--output"),
    Benchmark("reward_zoo", "reward models: ranking accuracy on held-out toy-world corruptions",
              ("--seeds", "4", "--no_ties"), "--output"),
    Benchmark("toyworld_base", "the shipped toy-world base: held-out loss and prompt agreement",
              ("--num_videos", "2", "--num_inference_steps", "2"), "--output"),
    Benchmark("toyworld_inference", "inference-time alignment: best-of-N, noise search, reward guidance",
              ("--num_prompts", "2", "--ns", "1", "2", "--num_inference_steps", "2", "--batch_size", "2"), "--output"),
    Benchmark("toyworld_rl", "online RL (GRPO, DiffusionNFT, AWM) from the shipped base: held-out scores against "
              "training CPU-minutes, paired with the base", ("--methods", "nft", "--seeds", "0", "--minutes",
              "nft=0.05", "--eval_every", "nft=0.05", "--num_prompts", "2", "--diversity_prompts", "1",
              "--diversity_seeds", "2", "--batch_size", "2"), "--output"),
    Benchmark("checkpoint_size", "LoRA checkpoints that hold what trains against full ones on the Wan 2.1 1.3B "
              "architecture (random weights): bytes, save time, bit-exact resume", ("--layers", "1", "--rank", "4"),
              "--output"),
    Benchmark("reward_real_size", "the real rewards (videoreward, pickscore, hpsv2) at their real sizes with random "
              "weights: seconds per 2-second 480p video, peak memory, vision tokens", (), "--output",
              needs="--rewards NAME [NAME ...]: about 10 GiB of memory and minutes per reward"),
    Benchmark("toyworld_dpo", "a trained DPO model against the base on the toy world", (), "--output",
              needs="--pipeline PIPELINE or --ckpt CKPT of a trained DPO model"),
    Benchmark("toyworld_distill", "distilled few-step students against the teacher on the toy world", (), "--output",
              needs="--student NAME=CONFIG[:WEIGHTS] (repeatable)"),
    Benchmark("toyworld_alignment", "aligned models (SFT, DPO, GRPO, DMD, consistency, ...) against the base on the "
              "toy world: rewards, trajectory error against true physics, diversity, NFE", (), "--output",
              needs="--model NAME=CONFIG[:WEIGHTS][@CPU_MINUTES] (repeatable)"),
    Benchmark("async_scoring", "the rollout phase with a slow reward server (delay = one chunk's generation): "
              "scored in turn against in the background, GRPO and DiffusionNFT", ("--quick",), "--output"),
    Benchmark("reward_hacking", "GRPO on a deliberately hackable proxy (quality's visual head), pointwise against "
              "win-rate advantages: held-out physics, trajectory error, diversity, and the two head to head",
              ("--quick",), "--output"),
    Benchmark("toyworld_i2v_alignment", "identity-preserving image-to-video alignment (NFT, online DPO) from the I2V "
              "base: held-out identity, physics, trajectory error, colour drift, first-frame error and diversity "
              "paired with the base; a GIF of reference, base and aligned", ("--quick",), "--output"),
    Benchmark("toyworld_autoregressive", "causal students (Self-Forcing, teacher forcing) against the bidirectional "
              "teacher at 1x, 2x and 4x the trained length (streamed): trajectory error and its growth, rewards of "
              "the stream's end, fps, time to first frame", (), "--output",
              needs="--student NAME=CONFIG:WEIGHTS (repeatable) of a causal SelfForcing student"),
    Benchmark("context_parallel", "context parallelism (Ulysses, gloo, 2 processes) against one process: step time "
              "and saved-activation memory per rank", ("--heads", "2", "--head_dim", "16", "--frames", "2",
                                                        "--latent_size", "16", "--warmup", "0", "--repeats", "1"),
              "--output"),
    Benchmark("gpu_check", "Wan 2.1 1.3B architecture on one CUDA GPU: SFT / DPO / GRPO-update step time, peak "
              "memory, MFU, compile, FSDP2, checkpointing (under 8 minutes)", (), "--output",
              needs="a CUDA GPU (`--smoke` runs it tiny on CPU)"),
)
BY_NAME = {b.name: b for b in BENCHMARKS}


def run_one(bench: Benchmark, args: list[str], in_process: bool) -> tuple[int, float]:
    """Run one benchmark; returns its exit status and wall seconds."""
    start = time.perf_counter()
    if in_process:
        module = importlib.import_module(f"benchmarks.{bench.name}")
        try:
            module.main(args)
            code = 0
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
    else:
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        code = subprocess.run([sys.executable, "-m", f"benchmarks.{bench.name}", *args], cwd=ROOT, env=env).returncode
    return code, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m benchmarks", *argv])
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiniest sizes: checks everything runs, measures nothing")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=list(BY_NAME), help="run only these benchmarks")
    parser.add_argument("--skip", nargs="+", metavar="NAME", choices=list(BY_NAME), default=[],
                        help="run every benchmark but these")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--results", default=None, help="results folder (default benchmarks/results, with --quick "
                                                         "benchmarks/results/quick)")
    parser.add_argument("--in_process", action="store_true", help="call each module's main() in this process")
    args = parser.parse_args(argv)

    if args.list:
        for b in BENCHMARKS:
            need = f" [needs {b.needs}]" if b.needs else ""
            print(f"{b.name:20s} {b.measures}{need}")
        return 0
    results = Path(args.results) if args.results else (RESULTS / "quick" if args.quick else RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    selected = [BY_NAME[n] for n in args.only] if args.only else [b for b in BENCHMARKS if b.name not in args.skip]
    rows = []
    for bench in selected:
        if bench.needs and not (args.only and extra):
            print(f"== {bench.name}: skipped (needs {bench.needs}; run `python -m benchmarks --only {bench.name} -- "
                  "ARGS`)", flush=True)
            rows.append({"name": bench.name, "status": "skipped", "reason": f"needs {bench.needs}"})
            continue
        bench_args = [*(bench.quick if args.quick else ()), *bench.output_args(results), *extra]
        line = " ".join(["python -m", f"benchmarks.{bench.name}", *bench_args])
        print(f"== {bench.name}: {line}", flush=True)
        code, seconds = run_one(bench, bench_args, args.in_process)
        status = "ok" if code == 0 else f"failed (exit {code})"
        print(f"== {bench.name}: {status} in {seconds:.0f} s", flush=True)
        rows.append({"name": bench.name, "status": status, "seconds": round(seconds, 1), "command": line})
    index = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}", "quick": args.quick,
             "command": command, "runs": rows}
    (results / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    lines = ["# Benchmark runs", "", f"{index['date']}, {index['machine']}" + (" (quick: smoke sizes)" if args.quick
             else ""), "", "| benchmark | status | seconds | command |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['status']} | {r.get('seconds', '')} | "
                     f"{('`' + r['command'] + '`') if 'command' in r else r.get('reason', '')} |")
    (results / "index.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(not r["status"].startswith("failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
