"""LoRA Flow-DPO against LoRA SFT on the same preference pairs: peak memory, step time and weight memory.

    python -m benchmarks.dpo_memory [--pipeline builtin:toyworld-base] [--pairs 4] [--steps 6] [--rounds 2]

Every configuration trains in its own fresh process (so allocator state and imports never leak between them), and
the configurations are interleaved round by round in one run, so they share the machine's conditions; ratios are
paired per round. Configurations, all on the same ``--pairs`` toy-world pairs (clean winner, gravity-free loser):

- ``lora_sft``: LoRA SFT on the winners (``B`` videos);
- ``lora_sft_both``: LoRA SFT on winners and losers (``2B`` videos, the tensor volume of DPO's policy pass);
- ``lora_dpo``: LoRA Flow-DPO (policy on ``2B`` videos with gradients, reference on ``2B`` without);
- ``full_sft`` / ``full_dpo``: the same with the whole denoiser trained (DPO then keeps a frozen copy).

Measured per step (Lightning ``on_train_batch_start`` to ``on_train_batch_end``, i.e. forward, backward and the
optimizer step), after ``--warmup`` unmeasured steps:

- step time: wall time of ``--steps`` steps without any profiler attached (median);
- step peak memory: the peak of live tensor bytes during a step above the bytes live at its start (activations,
  gradients, temporaries). On CPU it comes from torch's memory profiler (``torch.profiler.profile(profile_memory=
  True)``: every allocation and free in order, summed), run on ``--mem_steps`` extra steps so it never slows the
  timed ones; on CUDA from ``torch.cuda.max_memory_allocated``;
- process peak: the highest resident memory of the process over the timed steps (``/proc/self/statm`` sampled every
  half millisecond by a thread; it includes imports, weights, optimizer state and allocator caching).

Weight memory is the bytes of every parameter and buffer of the module: under LoRA the DPO reference is the
adapter-disabled base, so DPO and SFT hold exactly the same weights.
Writes ``benchmarks/results/dpo_memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import PeakSampler, add_output_argument, output_path, rss_bytes, write_result

CONFIGS = ("lora_sft", "lora_sft_both", "lora_dpo", "full_sft", "full_dpo")
MIB = 2**20




def live_bytes_peak(prof) -> int:
    """Peak of the running sum of every allocation and free the profiler recorded (bytes above its start)."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# -- one configuration, in its own process -------------------------------------------------------------------------
def worker(config: str, args: argparse.Namespace) -> dict:
    import lightning as L
    import torch

    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
    from lit_videoalign.data.toyworld import ToyWorld
    from lit_videoalign.objectives.dpo import DPO
    from lit_videoalign.objectives.sft import SFT

    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    cuda = torch.cuda.is_available() and not args.cpu
    world = ToyWorld(args.num_frames, args.size, args.size, max_balls=1)
    pairs = []
    for i in range(args.pairs):
        ex = world.example(i)
        pairs.append((ex.prompt, ex.video, world.corrupt(ex, "gravity_zero", torch.Generator().manual_seed(i)).video))
    if config.endswith("sft"):
        items = [{"prompt": p, "video": w} for p, w, _ in pairs]
    elif config.endswith("sft_both"):
        items = [{"prompt": p, "video": v} for p, w, lo in pairs for v in (w, lo)]
    else:
        items = [{"prompt": p, "chosen": w, "rejected": lo} for p, w, lo in pairs]
    batch = len(items)
    loader = torch.utils.data.DataLoader(items * (args.warmup + args.steps + args.mem_steps), batch_size=batch)

    backbone = DiffusersVideoBackbone(args.pipeline, max_sequence_length=24)
    lora = args.lora_rank if config.startswith("lora") else None
    common = dict(lora_rank=lora, num_frames=args.num_frames, height=args.size, width=args.size,
                  optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))
    if "dpo" in config:
        model = DPO(backbone, beta=1000.0, **common)
    else:
        model = SFT(backbone, prompt_dropout=0.0, **common)
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    sampler = PeakSampler()
    timed: list[float] = []
    mem_peaks: list[int] = []
    first_mem_step = args.warmup + args.steps

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.profiler = None
            if batch_idx >= first_mem_step:  # memory steps: profiled, not timed
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    self.start_mem = torch.cuda.memory_allocated()
                else:
                    self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                           profile_memory=True)
                    self.profiler.start()
            elif batch_idx == args.warmup:
                sampler.reset()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self.t0
            if batch_idx >= first_mem_step:
                if cuda:
                    mem_peaks.append(torch.cuda.max_memory_allocated() - self.start_mem)
                else:
                    self.profiler.stop()
                    mem_peaks.append(live_bytes_peak(self.profiler))
            elif batch_idx >= args.warmup:
                timed.append(seconds)
                self.process_peak = sampler.read()

    probe = Probe()
    rss_before = rss_bytes()
    L.Trainer(max_steps=first_mem_step + args.mem_steps, accelerator="gpu" if cuda else "cpu", devices=1,
              logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=0, callbacks=[probe]).fit(model, loader)
    sampler.stop()
    return {
        "config": config, "videos_per_step": batch * (2 if "dpo" in config else 1),
        "step_seconds": statistics.median(timed),
        "step_peak_delta_mib": statistics.median(mem_peaks) / MIB,
        "peak_mib": probe.process_peak / MIB,
        "rss_before_fit_mib": rss_before / MIB,
        "weight_mib": weight_bytes / MIB, "weight_bytes": weight_bytes, "trainable_params": trainable,
        "reference_copy": getattr(model, "_reference_denoiser", None) is not None,
        "memory": "torch.cuda.max_memory_allocated" if cuda else "torch CPU memory profiler (live tensor bytes)",
    }


# -- the side-by-side run ------------------------------------------------------------------------------------------
def run_worker(config: str, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.dpo_memory", *argv, "--worker", config,
                               "--worker_out", out], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {config} failed:\n{proc.stderr[-4000:]}")
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def summarise(rounds: list[dict[str, dict]], configs: list[str]) -> dict:
    summary = {}
    for c in configs:
        runs = [r[c] for r in rounds]
        summary[c] = {k: statistics.median(run[k] for run in runs)
                      for k in ("step_seconds", "step_peak_delta_mib", "peak_mib", "weight_mib")}
        summary[c].update({k: runs[0][k] for k in ("weight_bytes", "trainable_params", "reference_copy",
                                                    "videos_per_step")})
    ratios = {}
    for num, den in (("lora_dpo", "lora_sft"), ("lora_dpo", "lora_sft_both"), ("full_dpo", "full_sft")):
        if num in configs and den in configs:
            ratios[f"{num}/{den}"] = {
                k: statistics.median(r[num][k] / r[den][k] for r in rounds if r[den][k] > 0)
                for k in ("step_seconds", "step_peak_delta_mib", "peak_mib", "weight_mib")
                if any(r[den][k] > 0 for r in rounds)}
    return {"configs": summary, "paired_ratios": ratios}


def markdown(result: dict) -> str:
    s, a = result["summary"]["configs"], result["args"]
    lines = [
        "# LoRA Flow-DPO vs LoRA SFT: memory and step time", "",
        f"`python -m benchmarks.dpo_memory {' '.join(result['argv'])}` on {result['machine']}; pipeline "
        f"`{a['pipeline']}`, {a['pairs']} pairs of {a['num_frames']}x{a['size']}x{a['size']} videos per step, "
        f"LoRA rank {a['lora_rank']}, {a['threads']} torch thread(s). Each configuration in a fresh process, "
        f"configurations interleaved over {a['rounds']} rounds; per process the median of {a['steps']} timed steps "
        f"after {a['warmup']} warm-up step(s) and of {a['mem_steps']} memory-profiled steps, then the median over "
        f"rounds. Step peak: {result['memory']}, above the step's start; process peak: resident memory.", "",
        "| config | videos / step | step time (s) | step peak (MiB above step start) | process peak (MiB) "
        "| weights (MiB) | trainable params | frozen reference copy |",
        "|---|---|---|---|---|---|---|---|"]
    for c, v in s.items():
        lines.append(f"| {c} | {v['videos_per_step']} | {v['step_seconds']:.3f} | {v['step_peak_delta_mib']:.1f} | "
                     f"{v['peak_mib']:.1f} | {v['weight_mib']:.3f} | {v['trainable_params']:,} | "
                     f"{'yes' if v['reference_copy'] else 'no'} |")
    lines += ["", "Paired ratios (median over rounds of the per-round ratio):", "",
              "| ratio | step time | step peak | process peak | weights |", "|---|---|---|---|---|"]
    for name, r in result["summary"]["paired_ratios"].items():
        cells = [f"{r[k]:.2f}" if k in r else "n/a"
                 for k in ("step_seconds", "step_peak_delta_mib", "peak_mib", "weight_mib")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    if "lora_dpo" in s and "lora_sft" in s:
        same = s["lora_dpo"]["weight_bytes"] == s["lora_sft"]["weight_bytes"]
        lines += ["", f"Weights of the LoRA-DPO module minus the LoRA-SFT module: "
                      f"{s['lora_dpo']['weight_bytes'] - s['lora_sft']['weight_bytes']} bytes "
                      f"({'the reference is the adapter-disabled base: no weight copy' if same else 'NOT equal'})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="builtin:toyworld-base")
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--num_frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mem_steps", type=int, default=2, help="extra steps profiled for memory, not timed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even if CUDA is available")
    add_output_argument(parser, "benchmarks/results/dpo_memory")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(args.worker, args)))
        return None

    raw_argv = list(sys.argv[1:] if argv is None else argv)
    forwarded = list(raw_argv)
    rounds = []
    for r in range(args.rounds):
        order = args.configs if r % 2 == 0 else args.configs[::-1]  # alternate the order against drift
        results = {}
        for config in order:
            results[config] = run_worker(config, forwarded)
            print(f"round {r + 1}/{args.rounds} {config}: {results[config]['step_seconds']:.3f} s/step, "
                  f"step peak {results[config]['step_peak_delta_mib']:.1f} MiB, "
                  f"weights {results[config]['weight_mib']:.3f} MiB", flush=True)
        rounds.append(results)
    first = rounds[0][args.configs[0]]
    result = {"argv": raw_argv, "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
              "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.python_implementation()} "
                         f"{platform.python_version()}",
              "memory": first["memory"], "rounds": rounds, "summary": summarise(rounds, args.configs)}
    return write_result(result, output_path(args), markdown)


if __name__ == "__main__":
    main()
