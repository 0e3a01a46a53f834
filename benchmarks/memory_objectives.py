"""Peak memory of LoRA-SFT, LoRA-DPO, LoRA-GRPO and DMD (shared base) on the same batch and backbone.

    python -m benchmarks.memory_objectives [--steps 2] [--variants lora_sft lora_dpo ...] [--quick]

The backbone, LoRA and batch are those of ``benchmarks.overhead`` (a 4.9 M-parameter random Wan transformer, 8x32x32
pixel-space clips = 512 video tokens, 512 text tokens, LoRA rank 16, AdamW), and every variant trains on the same two
prompts (with their clips where the objective reads clips):

- ``lora_sft``: flow matching on the 2 clips;
- ``lora_dpo``: Flow-DPO on 2 pairs (the reference is the adapter-disabled base, no weight copy);
- ``lora_grpo``: full GRPO steps, rollouts included: 2 prompts x 2 rollouts of 2 SDE steps scored by the ``newton``
  reward, then the update on the 4 trajectories;
- ``dmd_shared_base``: DMD2 with student and critic as two LoRA adapters of one frozen base (the base is the teacher),
  a one-step student, teacher guidance 3; one critic and one generator update per step.

Each variant runs in its own fresh process (its own allocator and peak), ``--warmup`` + ``--steps`` steps
through a Lightning ``Trainer``, ``--rounds`` times, variants interleaved round by round. Per process it records the
resident memory after imports and after building the module, the process's peak resident memory (``VmHWM``), and
the peak during the training steps above the memory just before ``fit`` (a thread samples ``/proc/self/statm`` every
half millisecond). On CUDA it also records ``torch.cuda.max_memory_allocated`` over the steps. Figures are medians
over rounds with the min-max spread; ratios are against ``lora_sft``. Writes ``benchmarks/results/memory_objectives.*``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import PeakSampler, rss_bytes, write_result

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"lora_sft": "sft", "lora_dpo": "dpo", "lora_grpo": "grpo", "dmd_shared_base": "dmd"}
WHAT = {
    "lora_sft": "2 clips, flow matching",
    "lora_dpo": "2 pairs: policy (grad) + adapter-off reference (no grad) on 4 clips",
    "lora_grpo": "rollout 2 prompts x 2, 2 SDE steps + reward, then update on 4 trajectories",
    "dmd_shared_base": "2 prompts: critic update + generator update (student, teacher CFG 3, critic)",
}
MIB = 2**20



def vm_hwm_mib() -> float:
    """Peak resident memory of this process (``VmHWM``; ``ru_maxrss`` would start at the parent's RSS at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024



def worker(variant: str, pipeline: str, quick: bool, warmup: int, steps: int, threads: int) -> dict:
    rss_start = rss_bytes()
    # every library a variant needs is imported before the baseline, so no variant pays imports the others do not
    import diffusers  # noqa: F401
    import lightning as L
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from diffusers import WanTransformer3DModel  # noqa: F401
    from transformers import UMT5EncoderModel  # noqa: F401

    import lit_videoalign.objectives.consistency  # noqa: F401
    import lit_videoalign.objectives.dmd  # noqa: F401
    import lit_videoalign.objectives.dpo  # noqa: F401
    import lit_videoalign.objectives.grpo  # noqa: F401
    import lit_videoalign.objectives.sft  # noqa: F401
    import reward_zoo  # noqa: F401
    from benchmarks.overhead import FULL, QUICK, batch_items, build, device, quiet, sync

    quiet()
    torch.set_num_threads(threads)
    rss_imports = rss_bytes()
    size = QUICK if quick else FULL
    objective = VARIANTS[variant]
    L.seed_everything(0, verbose=False)
    module = build(objective, pipeline, size)
    items = batch_items(objective, size)
    weight_bytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    rss_build = rss_bytes()
    cuda = device().type == "cuda"
    sampler = PeakSampler()
    timer_s: list[float] = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:  # the peak of the measured steps only (optimizer state exists by then)
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    self.cuda_start = torch.cuda.memory_allocated()
                self.rss_before = sampler.reset()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            if batch_idx >= warmup:
                timer_s.append(time.perf_counter() - self.t0)

    probe = Probe()
    trainer = L.Trainer(max_epochs=1, accelerator=device().type, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[probe])
    loader = torch.utils.data.DataLoader(items * (warmup + steps), batch_size=len(items))
    trainer.fit(module, loader)
    step_peak = sampler.stop()
    out = {
        "variant": variant,
        "rss_start_mib": rss_start / MIB,
        "rss_after_imports_mib": rss_imports / MIB,
        "rss_after_build_mib": rss_build / MIB,
        "rss_before_steps_mib": probe.rss_before / MIB,
        "peak_rss_mib": vm_hwm_mib(),
        "step_peak_rss_mib": step_peak / MIB,
        "step_peak_above_start_mib": (step_peak - probe.rss_before) / MIB,
        "weight_mib": weight_bytes / MIB,
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "step_s": statistics.median(timer_s),
    }
    out["peak_above_imports_mib"] = out["peak_rss_mib"] - out["rss_after_imports_mib"]
    if cuda:
        out["cuda_step_peak_mib"] = torch.cuda.max_memory_allocated() / MIB
        out["cuda_step_peak_above_start_mib"] = (torch.cuda.max_memory_allocated() - probe.cuda_start) / MIB
    return out


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


METRICS = ("peak_rss_mib", "peak_above_imports_mib", "step_peak_above_start_mib", "cuda_step_peak_mib",
           "cuda_step_peak_above_start_mib", "rss_after_imports_mib", "rss_after_build_mib", "weight_mib", "step_s")


def markdown(result: dict) -> str:
    cfg, m = result["config"], result["machine"]
    cuda = any("cuda_step_peak_mib" in v for v in result["variants"].values())
    lines = [
        "# Peak memory per objective (LoRA, same batch and backbone)", "",
        f"{cfg['backbone']}; AdamW. Each variant in its own process, {cfg['warmup']} warm-up + {cfg['steps']} "
        f"measured Lightning steps, {cfg['rounds']} round(s) interleaved; medians over rounds (min-max). Machine: "
        f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), device {m['device']}, torch "
        f"{m['torch']}, Lightning {m['lightning']}" + (f" ({cfg['note']})" if cfg.get("note") else "") + ".", "",
        "| variant | one step | peak RSS (MiB) | peak above imports (MiB) | step peak above pre-step RSS (MiB) | "
        + ("CUDA step peak allocated (MiB) | " if cuda else "") + "weights (MiB) | trainable params | "
        "peak above imports vs lora_sft |",
        "|---|---|---|---|---|" + ("---|" if cuda else "") + "---|---|---|",
    ]
    ref = result["variants"]["lora_sft"]["peak_above_imports_mib"]["median"] if "lora_sft" in result["variants"] \
        else None

    def f(s: dict) -> str:
        return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"

    for name, r in result["variants"].items():
        ratio = f"{r['peak_above_imports_mib']['median'] / ref:.2f}x" if ref else "-"
        lines.append(f"| {name} | {WHAT[name]} | {f(r['peak_rss_mib'])} | {f(r['peak_above_imports_mib'])} | "
                     f"{f(r['step_peak_above_start_mib'])} | " + (f"{f(r['cuda_step_peak_mib'])} | " if cuda else "")
                     + f"{r['weight_mib']['median']:.1f} | {r['trainable_params']:,} | {ratio} |")
    imports = statistics.median(r["rss_after_imports_mib"]["median"] for r in result["variants"].values())
    lines += ["", f"Importing torch, Lightning, diffusers, transformers and peft alone takes about {imports:.0f} MiB "
              "of resident memory in every process; the peak above imports is what the objective itself costs "
              "(weights, optimizer state, activations, allocator caching). The step peak is measured over the "
              "measured steps only, above the resident memory at their start.", "",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny model and clips, one round of one step")
    parser.add_argument("--note", default="", help="free text about the machine, written into the results")
    parser.add_argument("--output", default=str(RESULTS / "memory_objectives"), help="path stem of .json and .md")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 1
    if args.worker:
        print(json.dumps(worker(args.worker, args.pipeline, args.quick, args.warmup, args.steps, args.threads)))
        return {}

    import torch

    from benchmarks.overhead import FULL, QUICK, machine, write_pipeline

    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = write_pipeline(Path(tmp) / "wan", size)
        for r in range(args.rounds):
            order = args.variants if r % 2 == 0 else list(reversed(args.variants))
            for variant in order:
                cmd = [sys.executable, "-m", "benchmarks.memory_objectives", "--worker", variant, "--pipeline",
                       pipeline, "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads",
                       str(args.threads), *(["--quick"] if args.quick else [])]
                env = {**os.environ, "HF_HUB_OFFLINE": "1",
                       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
                if res.returncode:
                    raise RuntimeError(f"variant {variant} failed:\n{res.stderr[-3000:]}")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                runs[variant].append(row)
                print(f"round {r + 1}/{args.rounds} {variant}: peak RSS {row['peak_rss_mib']:.0f} MiB, "
                      f"{row['peak_above_imports_mib']:.0f} above imports, step peak +"
                      f"{row['step_peak_above_start_mib']:.0f} MiB", flush=True)
    variants = {}
    for name, rows in runs.items():
        variants[name] = {k: summary([row[k] for row in rows]) for k in METRICS if k in rows[0]}
        variants[name]["trainable_params"] = rows[0]["trainable_params"]
        variants[name]["runs"] = rows
    result = {
        "command": "python -m benchmarks.memory_objectives " + shlex.join(argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "config": {"backbone": size.describe(), "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps,
                   "quick": args.quick, "note": args.note},
        "variants": variants,
    }
    return write_result(result, args.output, markdown)


if __name__ == "__main__":
    main()
