"""Compute efficiency: an SFT step's achieved FLOP rate as a fraction of the machine's measured matmul peak (MFU).

    python -m benchmarks.mfu [--rounds 3] [--steps 3] [--threads 1] [--variants sft_full sft_full_compiled] [--quick]

The step is the suite's SFT ``training_step`` through a Lightning ``Trainer`` on the backbone of
``benchmarks.overhead`` (4.9 M-parameter random Wan transformer, 2 clips of 512 video tokens, 512 text tokens), once
training the full denoiser and once a rank-16 LoRA, float32; the ``_compiled`` variants run the same step with the
backbone's ``compile_blocks`` option (regional ``torch.compile`` of the transformer blocks, inductor; ``aot_eager``
under ``--quick``) and the suite's default (fused) AdamW, as ``benchmarks.overhead``'s ``compiled`` row does. The
variants alternate round by round; compilation falls in the first round's untimed warm-up step. Its work is counted with
``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward of the same loss (matmuls, attention,
convolutions: what the counter knows; element-wise work is not counted, as is usual for MFU), and checked against an
analytic count from the transformer's shape. The peak is measured on the same machine, at the same torch thread
count, in the same process, before and after the steps: the best median time of a square ``torch.mm`` (sizes
``--mm_sizes``) in float32 (the best of both, the stricter yardstick when the machine's load changes).
MFU = counted FLOPs / median step time / peak. Where CUDA is available the same is measured in bf16 on the GPU
(``precision="bf16-mixed"`` against a bf16 ``torch.mm`` peak). Writes ``benchmarks/results/mfu.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import write_result

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device, reps: int) -> dict:
    """Median seconds and FLOP/s of ``torch.mm`` of two ``n x n`` matrices."""
    from benchmarks.overhead import sync

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"n": n, "median_s": t, "min_s": min(times), "max_s": max(times), "flops": 2 * n**3,
            "flop_per_s": 2 * n**3 / t}


def analytic_flops(size, batch: int, trainable_full: bool) -> dict:
    """Matmul FLOPs of the Wan transformer blocks for ``batch`` clips: one forward, and forward + backward.

    The backward of a linear layer computes the input gradient (1x its forward) and, when its weight trains, the
    weight gradient (1x more); the attention products (scores and weighted values) always need both input gradients
    (2x). LoRA's own small matmuls are left out."""
    d, f, L, Lt = size.heads * size.head_dim, size.ffn, size.tokens, size.text_len
    linear = (4 * 2 * L * d * d  # self-attention q, k, v, o
              + 2 * 2 * L * d * d + 2 * 2 * Lt * d * d  # cross-attention q, o on video tokens; k, v on text tokens
              + 2 * 2 * L * d * f)  # feed-forward
    attention = 2 * 2 * L * L * d + 2 * 2 * L * Lt * d  # self- and cross-attention scores and weighted values
    scale = batch * size.layers
    return {"forward": scale * (linear + attention),
            "forward_backward": scale * (linear * (3 if trainable_full else 2) + attention * 3)}


def counted_flops(module, batch: dict) -> dict:
    """FLOPs of one forward + backward of the SFT loss, as ``FlopCounterMode`` counts them, total and by module.

    Attention is counted through the math kernel (its products as ``bmm``; forward 1x, backward 2x): torch 2.14's
    counter has no formula for the CPU flash kernel and would count none of its FLOPs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        loss = module.loss(batch)
        loss.backward()
    module.zero_grad(set_to_none=True)
    by_module = counter.get_flop_counts()
    denoiser = sum(by_module.get("backbone.denoiser", {}).values()) if "backbone.denoiser" in by_module else None
    return {"total": counter.get_total_flops(), "denoiser": denoiser}


VARIANTS = ("sft_full", "sft_lora", "sft_full_compiled", "sft_lora_compiled")


def prepare(variant: str, pipeline: str, size, precision: str | None, compile_backend: str) -> dict:
    """The variant's module and its counted FLOPs (counted on an uncompiled twin: compilation changes no maths)."""
    from benchmarks.overhead import batch_items, build, device

    lora, compiled = "lora" in variant, variant.endswith("_compiled")
    twin = build("sft", pipeline, size, lora=lora).to(device())
    batch = torch.utils.data.default_collate(batch_items("sft", size))
    batch = {k: v.to(device()) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if precision == "bf16-mixed":
        with torch.autocast(device().type, dtype=torch.bfloat16):
            flops = counted_flops(twin, batch)
    else:
        flops = counted_flops(twin, batch)
    module = build("compiled", pipeline, size, lora=lora, compile_backend=compile_backend).to(device()) \
        if compiled else twin
    return {"module": module, "flops": flops, "lora": lora, "times": [], "first_step_s": None}


def measure(runs: dict, size, rounds: int, warmup: int, steps: int) -> list[dict]:
    """Step times of every ``(variant, precision)`` of ``runs``, alternating round by round."""
    from benchmarks.overhead import batch_items, lightning_round

    items = batch_items("sft", size)
    keys = list(runs)
    for r in range(rounds):
        for variant, precision in keys if r % 2 == 0 else keys[::-1]:
            run = runs[variant, precision]
            timed, _, split = lightning_round(run["module"], items, warmup, steps, precision=precision)
            run["times"] += timed
            if run["first_step_s"] is None:
                run["first_step_s"] = (split["warmup_s"] + split["steps_s"])[0]
    rows = []
    for (variant, precision), run in runs.items():
        times, flops = run["times"], run["flops"]
        t = statistics.median(times)
        rows.append({"variant": variant, "precision": precision or "32-true", "counted_flops": flops["total"],
                     "counted_denoiser_flops": flops["denoiser"],
                     "analytic_block_flops": analytic_flops(size, len(items), not run["lora"])["forward_backward"],
                     "step_s": {"median": t, "min": min(times), "max": max(times), "n": len(times)},
                     "first_step_s": run["first_step_s"], "flop_per_s": flops["total"] / t,
                     "trainable_params": sum(p.numel() for p in run["module"].parameters() if p.requires_grad)})
    return rows


def markdown(result: dict) -> str:
    cfg, m = result["config"], result["machine"]
    lines = ["# Model FLOPs utilisation of an SFT step", "",
             f"{cfg['backbone']}; batch of 2 clips; step through Lightning (median of {cfg['rounds']} x "
             f"{cfg['steps']} steps, variants alternating round by round, min-max in brackets); `_compiled`: "
             f"`compile_blocks` ({cfg.get('compile_backend', 'inductor')}) and the default fused AdamW. Machine: "
             f"{m['cpu']}, {m['cores']} cores, "
             f"{m['torch_threads']} torch thread(s), torch {m['torch']}"
             + (f", {m['gpu']}" if "gpu" in m else "")
             + (f"; load average (1 min) {m['load_average_at_start'][0]:.2f} at the start, "
                f"{m['load_average_at_end'][0]:.2f} at the end" if "load_average_at_end" in m else "")
             + (f" ({cfg['note']})" if cfg.get("note") else "") + ".", ""]
    for peak_name, peak in result["peaks"].items():
        best = peak["best"]
        lines.append(f"Measured {peak_name} matmul peak: **{best['flop_per_s'] / 1e9:.1f} GFLOP/s** (`torch.mm` "
                     f"{best['n']}x{best['n']}, median of {cfg['mm_reps']}; sizes tried, before and after the steps: "
                     + ", ".join(f"{p['n']}: {p['flop_per_s'] / 1e9:.1f}" for p in peak["sizes"]) + ").")
    lines += ["", "| step | precision | trainable params | counted FLOPs / step (G) | analytic block FLOPs (G) | "
              "step time (s) | achieved GFLOP/s | MFU | first step (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["steps"]:
        peak = result["peaks"]["bf16 (CUDA)" if r["precision"] == "bf16-mixed" else result["fp32_peak_name"]]
        s = r["step_s"]
        lines.append(f"| {r['variant']} | {r['precision']} | {r['trainable_params']:,} | "
                     f"{r['counted_flops'] / 1e9:.2f} | {r['analytic_block_flops'] / 1e9:.2f} | "
                     f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}) | {r['flop_per_s'] / 1e9:.1f} | "
                     f"**{r['flop_per_s'] / peak['best']['flop_per_s']:.1%}** | {r.get('first_step_s') or 0:.1f} |")
    lines += ["", "Counted FLOPs are those of `FlopCounterMode` over one forward and backward of the loss (text "
              "encoder included); the analytic column counts the transformer blocks' matmuls only (2 x multiply-adds; "
              "the backward of a linear layer is 2x its forward when its weight trains, 1x when it is frozen as "
              "under LoRA; "
              "attention products are 2x). Element-wise work (norms, activations, RoPE, the optimizer) and the "
              "framework's own work are not counted but take time, so they lower the MFU. The first step (untimed) "
              "includes the first fit's setup and, in the `_compiled` variants, the compilation of the blocks.", "",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (steps and peak alike)")
    parser.add_argument("--mm_sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--compile_backend", default=None,
                        help="compile backend of the _compiled variants (default inductor; aot_eager with --quick)")
    parser.add_argument("--mm_reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny model, small matmuls, one round of one step")
    parser.add_argument("--note", default="", help="free text about the machine, written into the results")
    parser.add_argument("--output", default=str(RESULTS / "mfu"), help="path stem of the .json and .md files")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    from benchmarks.overhead import FULL, QUICK, device, machine, quiet, write_pipeline

    quiet()
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    if args.quick:
        args.rounds, args.steps, args.mm_sizes, args.mm_reps = 1, 1, [256], 2
    backend = args.compile_backend or ("aot_eager" if args.quick else "inductor")
    info = machine()  # the load average before the run
    dev = device()
    fp32_name = f"fp32 ({dev.type.upper() if dev.type == 'cuda' else 'CPU'})"
    big = [max(args.mm_sizes) * 2, max(args.mm_sizes) * 4]

    def peaks_now() -> dict[str, list[dict]]:
        found = {fp32_name: [matmul_peak(n, torch.float32, dev, args.mm_reps) for n in args.mm_sizes]}
        if dev.type == "cuda":
            found["bf16 (CUDA)"] = [matmul_peak(n, torch.bfloat16, dev, args.mm_reps) for n in big]
        return found

    before = peaks_now()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        pipeline = write_pipeline(Path(tmp) / "wan", size)
        precisions = [None] + (["bf16-mixed"] if dev.type == "cuda" else [])
        runs = {(v, p): prepare(v, pipeline, size, p, backend) for p in precisions for v in args.variants}
        steps = measure(runs, size, args.rounds, args.warmup, args.steps)
    after = peaks_now()
    peaks = {name: {"sizes": before[name] + after[name],
                    "best": max(before[name] + after[name], key=lambda p: p["flop_per_s"])} for name in before}
    for row in steps:
        peak = peaks["bf16 (CUDA)" if row["precision"] == "bf16-mixed" else fp32_name]["best"]["flop_per_s"]
        row["mfu"] = row["flop_per_s"] / peak
        print(f"{row['variant']} {row['precision']}: {row['counted_flops'] / 1e9:.2f} GFLOP in "
              f"{row['step_s']['median']:.3f} s = {row['flop_per_s'] / 1e9:.1f} GFLOP/s, MFU {row['mfu']:.1%}",
              flush=True)
    info["load_average_at_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min): {info['load_average_at_start']} at the start, "
          f"{info['load_average_at_end']} at the end", flush=True)
    result = {
        "command": "python -m benchmarks.mfu " + shlex.join(argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": info,
        "config": {"backbone": size.describe(), "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps,
                   "mm_reps": args.mm_reps, "variants": args.variants, "compile_backend": backend,
                   "quick": args.quick, "note": args.note},
        "fp32_peak_name": fp32_name,
        "peaks": peaks,
        "steps": steps,
    }
    return write_result(result, args.output, markdown)


if __name__ == "__main__":
    main()
