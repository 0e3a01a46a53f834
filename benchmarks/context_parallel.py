"""Context parallelism (Ulysses, arXiv 2309.14509) on CPU: per-rank activation memory and step time of one forward and
backward of a Wan-architecture denoiser at CP 1 (one process) and CP 2 (two gloo processes), on the same sequence.

    python -m benchmarks.context_parallel [--layers 2 --heads 2 --head_dim 128 --frames 8 --latent_size 48]

The denoiser is diffusers' ``WanTransformer3DModel`` (random weights, float32, ``patch_size (1, 2, 2)``); the sequence
is one latent video of ``frames x latent_size/2 x latent_size/2`` tokens. CP 2 goes through
:func:`lit_videoalign.context_parallel.enable_context_parallel` on a :func:`context_parallel_mesh` (what
``ContextParallelStrategy`` applies to every denoiser copy). The loss is the whole (gathered) output's mean square.
Measured per rank, each with activation checkpointing off and on (diffusers' ``enable_gradient_checkpointing``):

- **saved activations** (headline, deterministic): bytes of the distinct tensor storages autograd saves for the
  backward pass during the forward (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded), per block
  too. With checkpointing the blocks' inner tensors are not saved, so only the live peak below is reported.
- **live peak**: the peak of live tensor bytes during forward + backward above the bytes live at its start, from
  every allocation and free torch's memory profiler records (activations, temporaries, gradients); repeatable in one
  process, within a few per cent under CP 2 (when gloo frees its buffers varies).
- **RSS peak** (noisy): the process's resident memory sampled every half millisecond, above its start.
- **step time**: median wall time of forward + backward, without any profiler (``--repeats`` after ``--warmup``).

A second part (one process, no timing) measures the saved bytes per token of one steady-state block (the last) at
several widths (``head_dim 128`` as Wan's), in float32 and bfloat16, and fits them as ``c0 + alpha * dim + beta *
ffn`` bytes per token (exact in form: every saved tensor is tokens x dim, x ffn or x heads, and heads = dim / 128); a
held-out width checks the fit. A third part turns these into per-GPU predictions for Wan 2.1 1.3B and 14B (the
memory model of ``docs/context_parallel_memory.md``), checked first against the live peaks measured here.
Writes ``OUTPUT.json`` and ``OUTPUT.md`` (default ``benchmarks/results/context_parallel``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import PeakSampler, add_output_argument, output_path, rss_bytes, write_result

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
TEXT_DIM, TEXT_LEN = 64, 32  # the prompt embeddings the denoiser attends to (Wan: 4096 x 512)
# Calibration widths (heads, ffn) at head_dim 128; the last one is held out to check the fit.
CALIBRATION = ((1, 384), (2, 512), (2, 1024), (3, 768))
CALIBRATION_TOKENS = (256, 512)


def wan_config(layers: int, heads: int, head_dim: int, ffn: int) -> dict:
    return dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
                out_channels=16, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)


def build(config: dict, dtype: torch.dtype = torch.float32):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**config)
    if dtype != torch.float32:  # as from_pretrained(torch_dtype=...) does: some modules stay float32
        keep = set(model._keep_in_fp32_modules or ())
        for name, p in model.named_parameters():
            if not keep & set(name.split(".")):
                p.data = p.data.to(dtype)
    return model


def inputs(frames: int, size: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(batch, 16, frames, size, size, generator=g).to(dtype),
            "timestep": torch.full((batch,), 500.0),
            "encoder_hidden_states": torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g).to(dtype)}


class SavedBytes:
    """Bytes of the distinct storages autograd saves inside the context, parameters excluded, attributed to the
    transformer block running when a storage is first saved (``"outside"`` before and after the blocks)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.by_block: dict[str, int] = {}
        self.where = "outside"
        self.handles = [b.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "where", f"block{i}"))
                        for i, b in enumerate(model.blocks)]
        self.handles += [b.register_forward_hook(lambda *a: setattr(self, "where", "outside")) for b in model.blocks]
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.params and key not in self.seen:
            self.seen.add(key)
            self.by_block[self.where] = self.by_block.get(self.where, 0) + storage.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)
        for h in self.handles:
            h.remove()

    @property
    def total(self) -> int:
        return sum(self.by_block.values())


def live_bytes_peak(prof) -> int:
    """Peak of the running sum of every allocation and free the profiler recorded (bytes above its start)."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def step(model, batch: dict) -> float:
    out = model(**batch, return_dict=False)[0]  # [B, C, T, H, W], the whole sequence on every rank
    loss = out.float().square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


# -- part 1: one rank of a CP 1 or CP 2 run --------------------------------------------------------------------------
def worker(args: argparse.Namespace, world: int, out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    model = build(wan_config(args.layers, args.heads, args.head_dim, args.ffn_mult * args.heads * args.head_dim))
    if world > 1:
        from lit_videoalign.context_parallel import context_parallel_mesh, enable_context_parallel

        dist.init_process_group("gloo", rank=rank, world_size=world)
        enable_context_parallel(model, context_parallel_mesh(world, world))
    batch = inputs(args.frames, args.latent_size)

    def sync() -> None:
        if world > 1:
            dist.barrier()

    report: dict = {"world": world, "rank": rank}
    for ac in (False, True):
        model.enable_gradient_checkpointing() if ac else model.disable_gradient_checkpointing()
        row: dict = {}
        if not ac:
            with SavedBytes(model) as saved:
                output = model(**batch, return_dict=False)[0]
            output.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
            del output
            row["saved_bytes"], row["saved_by_block"] = saved.total, saved.by_block
        sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            row["loss"] = step(model, batch)
        row["live_peak_bytes"] = live_bytes_peak(prof)
        del prof
        sampler = PeakSampler()
        times, rss = [], []
        for i in range(args.warmup + args.repeats):
            sync()
            start_rss = sampler.reset()
            t0 = time.perf_counter()
            step(model, batch)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
                rss.append(sampler.read() - start_rss)
        sampler.stop()
        row.update(step_seconds=times, step_seconds_median=statistics.median(times), rss_peak_bytes=max(rss))
        report["checkpointing" if ac else "no_checkpointing"] = row
    (out / f"world{world}_rank{rank}.json").write_text(json.dumps(report))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_world(args: argparse.Namespace, argv: list[str], world: int, tmp: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "benchmarks.context_parallel", *argv, "--worker", str(world), "--output", str(tmp)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "LOCAL_RANK": str(r), "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"the CP {world} run failed:\n" + "\n".join(log[-3000:] for log in logs))
    return [json.loads((tmp / f"world{world}_rank{r}.json").read_text()) for r in range(world)]


# -- part 2: saved bytes per token of one block, against width --------------------------------------------------------
def block_bytes_per_token(heads: int, ffn: int, dtype: torch.dtype, head_dim: int = 128) -> dict:
    """Saved bytes of the last of 2 blocks at two token counts: the per-token slope and the per-block constant."""
    model = build(wan_config(2, heads, head_dim, ffn), dtype)
    per_tokens = {}
    for n in CALIBRATION_TOKENS:  # n = 4 frames x (side/2)^2 tokens
        side = 2 * int(round((n / 4) ** 0.5))
        with SavedBytes(model) as saved:
            model(**inputs(4, side, dtype=dtype), return_dict=False)
        per_tokens[4 * (side // 2) ** 2] = saved.by_block["block1"]
    (n1, b1), (n2, b2) = sorted(per_tokens.items())
    slope = (b2 - b1) / (n2 - n1)
    return {"heads": heads, "dim": heads * head_dim, "ffn": ffn, "bytes_per_token": slope, "constant": b1 - slope * n1}


def calibrate() -> dict:
    torch.set_num_threads(1)
    result = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        points = [block_bytes_per_token(h, f, dtype) for h, f in CALIBRATION]
        fit, held_out = points[:-1], points[-1]
        a = torch.tensor([[1.0, p["dim"], p["ffn"]] for p in fit], dtype=torch.float64)
        y = torch.tensor([p["bytes_per_token"] for p in fit], dtype=torch.float64)
        c0, alpha, beta = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.flatten().tolist()
        result[name] = {"points": points, "c0": c0, "alpha_per_dim": alpha, "beta_per_ffn": beta,
                        "fit_max_abs_residual": max(abs(c0 + alpha * p["dim"] + beta * p["ffn"] - p["bytes_per_token"])
                                                    for p in fit),
                        "held_out_predicted": c0 + alpha * held_out["dim"] + beta * held_out["ffn"],
                        "held_out_measured": held_out["bytes_per_token"],
                        # the sequence-independent part of a block (cross-attention on the text), per text token x dim
                        "text_bytes_per_token_dim": statistics.mean(p["constant"] / (TEXT_LEN * p["dim"])
                                                                    for p in points)}
    return result


# -- part 3: the memory model ----------------------------------------------------------------------------------------
GIB = 2**30
WAN = {"Wan 2.1 1.3B": dict(dim=1536, ffn=8960, layers=30, heads=12),
       "Wan 2.1 14B": dict(dim=5120, ffn=13824, layers=40, heads=40)}
TOKENS = {"480p": 21 * 30 * 52, "720p": 21 * 45 * 80}  # 81 frames -> 21 latent frames; 832x480 / 1280x720 in 16 px
# (layout, FSDP shard group size S, CP degree c, GPUs): HSDP shards inside a node and replicates across the 2 nodes
LAYOUTS = (("FSDP 8", 8, 1, 8), ("FSDP 2 x CP 4", 8, 4, 8), ("HSDP 2 x (CP 4 x shard 2)", 8, 4, 16))
WAN_TEXT_TOKENS, LORA_RANK = 512, 64
# UMT5-XXL encoder and Wan VAE parameters (counted from their configs on the meta device), bf16, not sharded by FSDP2
FROZEN_PARAMS = 5_680_910_336 + 126_892_531


def block_bytes(cal: dict, dim: int, ffn: int) -> float:
    """Saved activation bytes per token of one block, from the width fit."""
    return cal["c0"] + cal["alpha_per_dim"] * dim + cal["beta_per_ffn"] * ffn


def wan_params(w: dict) -> tuple[int, int]:
    """(all, one block's) parameters of the Wan 2.1 transformer of width ``w``, counted on the meta device."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        m = WanTransformer3DModel(num_attention_heads=w["heads"], attention_head_dim=128, ffn_dim=w["ffn"],
                                  num_layers=w["layers"], text_dim=4096, freq_dim=256, in_channels=16, out_channels=16,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", patch_size=(1, 2, 2))
    return sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.blocks[0].parameters())


def per_token_terms(summary: dict, bench_dim: int) -> dict:
    """Measured float32 per-token costs outside the blocks (O) and of backward temporaries at the peak (w, at CP 1 and
    under CP), per unit of width."""
    n, off = summary["tokens"], summary["no_checkpointing"]
    return {"outside_per_dim": summary["per_layer"]["1"]["outside_blocks_bytes"] / n / bench_dim,
            "transient_per_dim": (off["1"]["live_peak_bytes"] - off["1"]["saved_bytes"]) / n / bench_dim,
            "transient_cp_per_dim": (off["2"]["live_peak_bytes"] - off["2"]["saved_bytes"]) / (n // 2) / bench_dim}


def activations(cal: dict, terms: dict, dim: int, ffn: int, layers: int, n: int, text: int, checkpointing: bool,
                cp: bool, elem: int, scale: float = 1.0) -> float:
    """Per-rank activation bytes at the peak: n (O + L a + w) without checkpointing, n (O + L h + a + w) with it,
    plus the text part of the blocks; O and w scaled from the measured width (and dtype, by ``scale``)."""
    a = block_bytes(cal, dim, ffn)
    o = terms["outside_per_dim"] * dim * scale
    w = terms[f"transient{'_cp' if cp else ''}{'_ckpt' if cp and checkpointing else ''}_per_dim"] * dim * scale
    txt = cal["text_bytes_per_token_dim"] * text * dim
    if checkpointing:
        return n * (o + layers * elem * dim + a + w) + txt
    return n * (o + layers * a + w) + layers * txt


def memory_model(result: dict) -> dict:
    cal32, cal16 = result["calibration"]["float32"], result["calibration"]["bfloat16"]
    m, s = result["model"], result["summary"]
    terms = per_token_terms(s, m["dim"])
    # The temporaries of a checkpointed block's backward under CP (attention recomputed inside diffusers' CP op,
    # all-to-all buffers): what the model without them misses in the measured CP 2 checkpointed peak.
    n2, measured = s["tokens"] // 2, s["checkpointing"]["2"]["live_peak_bytes"]
    terms["transient_cp_ckpt_per_dim"] = terms["transient_cp_per_dim"]
    missing = measured - activations(cal32, terms, m["dim"], m["ffn"], m["layers"], n2, TEXT_LEN, True, True, 4)
    terms["transient_cp_ckpt_per_dim"] += max(missing, 0) / n2 / m["dim"]
    check = []  # the model in float32 at the measured size against the measured live peaks
    for key, ac in (("no_checkpointing", False), ("checkpointing", True)):
        for world in (1, 2):
            pred = activations(cal32, terms, m["dim"], m["ffn"], m["layers"], s["tokens"] // world, TEXT_LEN, ac,
                               world > 1, 4)
            check.append({"checkpointing": ac, "cp": world, "predicted": pred, "fitted": world > 1 or not ac,
                          "measured": s[key][str(world)]["live_peak_bytes"]})
    rows = []
    for name, w in WAN.items():
        params, block = wan_params(w)
        lora = w["layers"] * 8 * LORA_RANK * 2 * w["dim"]  # to_q/k/v/out.0 of both attentions
        scale = block_bytes(cal16, w["dim"], w["ffn"]) / block_bytes(cal32, w["dim"], w["ffn"])
        for res, tokens in TOKENS.items():
            for layout, shard, cp, gpus in LAYOUTS:
                act = {ac: activations(cal16, terms, w["dim"], w["ffn"], w["layers"], tokens // cp, WAN_TEXT_TOKENS,
                                       ac, cp > 1, 2, scale) for ac in (False, True)}
                full = 16 * params / shard + 2 * 2 * block + 4 * block  # fp32 master+grad+2 Adam; 2 bf16 blocks+grad
                low = 2 * params / shard + 16 * lora / shard + 2 * 2 * block  # bf16 base; LoRA fp32 states
                frozen = 2 * FROZEN_PARAMS
                rows.append({"model": name, "resolution": res, "tokens": tokens, "layout": layout, "gpus": gpus,
                             "tokens_per_gpu": tokens // cp, "params": params, "lora_params": lora,
                             "act_no_ckpt": act[False], "act_ckpt": act[True], "states_full": full, "states_lora": low,
                             "frozen": frozen})
    return {"terms": terms, "check_float32": check, "rows": rows}


def memory_model_markdown(mm: dict) -> list[str]:
    g = lambda b: f"{b / GIB:,.1f}"  # noqa: E731
    lines = ["## Memory model: check at the measured size (float32, CPU)", "",
             "| checkpointing | CP | predicted live peak (MiB) | measured (MiB) | predicted / measured | role |",
             "|---|---|---|---|---|---|"]
    for c in mm["check_float32"]:
        lines.append(f"| {'on' if c['checkpointing'] else 'off'} | {c['cp']} | {mib(c['predicted'])} | "
                     f"{mib(c['measured'])} | {c['predicted'] / c['measured']:.3f} | "
                     f"{'sets a temporaries term w' if c['fitted'] else '**check** (nothing fitted to it)'} |")
    lines += ["", "O (outside the blocks): {outside_per_dim:.2f}, w (CP 1): {transient_per_dim:.2f}, w (CP): "
              "{transient_cp_per_dim:.2f}, w (CP, checkpointed): {transient_cp_ckpt_per_dim:.2f} float32 bytes per "
              "token per unit of width.".format(**mm["terms"])]
    lines += ["", "## Predicted per-GPU memory, Wan 2.1, 81 frames, bf16, batch 1 per CP group (GiB; a prediction "
              "scaled from CPU measurements, not a GPU measurement)", "",
              "Totals add the replicated frozen UMT5-XXL + VAE (bf16, "
              f"{g(mm['rows'][0]['frozen'])} GiB; 0 with `videoalign precompute`). Full FT: fp32 master weights, "
              f"gradients and AdamW states sharded over 8; LoRA: rank {LORA_RANK} on the attention projections, "
              "bf16 base sharded over 8.", "",
              "| model | video | layout (GPUs) | tokens / GPU | activations, ckpt off | activations, ckpt on | "
              "full FT, ckpt on | full FT, ckpt off | LoRA, ckpt on | LoRA, ckpt off |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in mm["rows"]:
        tot = {k: r[s] + r["frozen"] + r[a] for k, s, a in (("fo", "states_full", "act_ckpt"),
                                                             ("fx", "states_full", "act_no_ckpt"),
                                                             ("lo", "states_lora", "act_ckpt"),
                                                             ("lx", "states_lora", "act_no_ckpt"))}
        lines.append(f"| {r['model']} | {r['resolution']} ({r['tokens']:,}) | {r['layout']} ({r['gpus']}) | "
                     f"{r['tokens_per_gpu']:,} | {g(r['act_no_ckpt'])} | {g(r['act_ckpt'])} | "
                     + " | ".join(g(tot[k]) for k in ("fo", "fx", "lo", "lx")) + " |")
    return lines


# -- report -----------------------------------------------------------------------------------------------------------
def summarise(runs: dict[int, list[dict]], args: argparse.Namespace) -> dict:
    tokens = args.frames * (args.latent_size // 2) ** 2
    out: dict = {"tokens": tokens}
    for key in ("no_checkpointing", "checkpointing"):
        rows = {}
        for world, ranks in runs.items():
            rs = [r[key] for r in ranks]
            rows[str(world)] = {
                "saved_bytes": max(r.get("saved_bytes", 0) for r in rs) or None,
                "live_peak_bytes": max(r["live_peak_bytes"] for r in rs),
                "rss_peak_bytes": max(r["rss_peak_bytes"] for r in rs),
                "step_seconds": max(r["step_seconds_median"] for r in rs),
                "loss": [r["loss"] for r in rs],
            }
        one, two = rows["1"], rows[str(max(runs))]
        rows["ratio"] = {k: (two[k] / one[k] if one[k] else None)
                         for k in ("saved_bytes", "live_peak_bytes", "rss_peak_bytes", "step_seconds")}
        rows["loss_rel_diff"] = max(abs(x - one["loss"][0]) / abs(one["loss"][0]) for x in two["loss"])
        out[key] = rows
    per_layer = {}
    for world, ranks in runs.items():
        blocks = ranks[0]["no_checkpointing"]["saved_by_block"]
        steady = blocks[f"block{args.layers - 1}"]
        per_layer[str(world)] = {"tokens_per_rank": tokens // world, "block_bytes": steady,
                                 "bytes_per_token": steady / (tokens // world),
                                 "outside_blocks_bytes": blocks.get("outside", 0)}
    out["per_layer"] = per_layer
    return out


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:,.1f}"


def markdown(r: dict) -> str:
    m, s = r["model"], r["summary"]
    lines = [
        "# Context parallelism on CPU: per-rank activation memory and step time", "",
        f"Model: diffusers `WanTransformer3DModel`, random weights, float32, {m['layers']} blocks, dim {m['dim']} "
        f"({m['heads']} heads x {m['head_dim']}), ffn {m['ffn']}, {m['params']:,} parameters; one latent video "
        f"16 x {m['frames']} x {m['latent_size']} x {m['latent_size']} = **{s['tokens']:,} tokens**, "
        f"{TEXT_LEN} text tokens. CP 2: Ulysses over 2 gloo processes (`enable_context_parallel`).",
        f"Command: `{r['command']}`", f"Machine: {r['machine']}; load average at start {r['load_average']}, "
        "shared with other jobs: times are indicative, bytes are not affected.", "",
        "| checkpointing | CP | saved activations (MiB) | live peak fwd+bwd (MiB) | RSS peak (MiB) | step (s) |",
        "|---|---|---|---|---|---|"]
    for key, label in (("no_checkpointing", "off"), ("checkpointing", "on")):
        rows = s[key]
        for world in ("1", "2"):
            row = rows[world]
            lines.append(f"| {label} | {world} | {mib(row['saved_bytes'])} | {mib(row['live_peak_bytes'])} | "
                         f"{mib(row['rss_peak_bytes'])} | {row['step_seconds']:.2f} |")
        ratio = rows["ratio"]

        def fmt(k: str) -> str:
            return "-" if ratio[k] is None else f"**{ratio[k]:.3f}**"

        lines.append(f"| {label} | 2 / 1 | {fmt('saved_bytes')} | {fmt('live_peak_bytes')} | "
                     f"{fmt('rss_peak_bytes')} | {fmt('step_seconds')} |")
    ratio = s["no_checkpointing"]["ratio"]["saved_bytes"]
    lines += ["", f"Headline: per-rank saved activations at CP 2 / CP 1 = **{ratio:.3f}** (target <= 0.55: "
              f"{'met' if ratio <= 0.55 else 'NOT met'}). Loss CP 2 vs CP 1, largest relative difference: "
              f"{max(s[k]['loss_rel_diff'] for k in ('no_checkpointing', 'checkpointing')):.1e}.",
              "Per-rank figures are the larger of the two ranks. Live peak: the peak of live tensor bytes during "
              "forward + backward above the start (torch's memory profiler); RSS: resident memory, allocator and "
              "thread noise included.", "",
              "## Saved activations per token per block (steady state: the last block)", "",
              "| CP | tokens per rank | block (MiB) | bytes per token | before/after the blocks (MiB) |",
              "|---|---|---|---|---|"]
    for world, row in s["per_layer"].items():
        lines.append(f"| {world} | {row['tokens_per_rank']:,} | {mib(row['block_bytes'])} | "
                     f"{row['bytes_per_token']:,.0f} | {mib(row['outside_blocks_bytes'])} |")
    lines += ["", "Under CP diffusers' SDPA op saves q, k and v and recomputes the attention in its backward; plain "
              "SDPA (CP 1) saves its output and log-sum-exp too, as a GPU flash/cuDNN backend does under CP. The "
              "memory model uses the CP 1 figures.",
              "", "## Saved bytes per token of one block against width (head_dim 128, one process)", "",
              "| dtype | heads | dim | ffn | bytes per token | per-block constant (bytes) |",
              "|---|---|---|---|---|---|"]
    for name, cal in r["calibration"].items():
        for p in cal["points"]:
            lines.append(f"| {name} | {p['heads']} | {p['dim']} | {p['ffn']} | {p['bytes_per_token']:,.1f} | "
                         f"{p['constant']:,.0f} |")
    lines += ["", "Fit `bytes per token per block = c0 + alpha * dim + beta * ffn` on the first three widths; the "
              "fourth is held out. The per-block constant is the cross-attention on the text: `k_text` bytes per "
              "text token x dim.", "",
              "| dtype | c0 | alpha | beta | max residual (fit) | held out: predicted / measured | k_text |",
              "|---|---|---|---|---|---|---|"]
    for name, cal in r["calibration"].items():
        lines.append(f"| {name} | {cal['c0']:.1f} | {cal['alpha_per_dim']:.3f} | {cal['beta_per_ffn']:.3f} | "
                     f"{cal['fit_max_abs_residual']:.2g} | {cal['held_out_predicted']:,.1f} / "
                     f"{cal['held_out_measured']:,.1f} | {cal['text_bytes_per_token_dim']:.2f} |")
    lines.append("")
    for name, cal in r["calibration"].items():
        for model, w in WAN.items():
            lines.append(f"- {model}, {name}: {block_bytes(cal, w['dim'], w['ffn']):,.0f} bytes per token per block "
                         "(fit, extrapolated)")
    if r.get("memory_model"):
        lines += ["", *memory_model_markdown(r["memory_model"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2, help="attention heads (Ulysses 2 needs an even count)")
    parser.add_argument("--head_dim", type=int, default=128, help="Wan's is 128")
    parser.add_argument("--ffn_mult", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8, help="latent frames")
    parser.add_argument("--latent_size", type=int, default=48, help="latent height = width (patches of 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no_calibration", action="store_true", help="skip the width sweep (part 2)")
    add_output_argument(parser, "benchmarks/results/context_parallel")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args, args.worker, Path(args.output))  # a worker's --output: the run's folder
        return {}
    tokens = args.frames * (args.latent_size // 2) ** 2
    if args.heads % 2 or tokens % 2 or args.layers < 2:
        raise ValueError(f"CP 2 needs an even head count and token count and the steady-state block needs 2+ layers; "
                         f"got heads={args.heads}, tokens={tokens}, layers={args.layers}")
    start, load = time.perf_counter(), os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    passed = [f"--{k}={getattr(args, k)}" for k in ("layers", "heads", "head_dim", "ffn_mult", "frames",
                                                     "latent_size", "warmup", "repeats")]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {w: run_world(args, passed, w, Path(tmp)) for w in (1, 2)}
    calibration = {} if args.no_calibration else calibrate()
    import diffusers
    import lightning

    dim = args.heads * args.head_dim
    config = wan_config(args.layers, args.heads, args.head_dim, args.ffn_mult * dim)
    with torch.device("meta"):
        params = sum(p.numel() for p in build(config).parameters())
    result = {
        "command": " ".join(["python -m benchmarks.context_parallel", *argv]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 thread per process, "
                   f"torch {torch.__version__}, diffusers {diffusers.__version__}, lightning {lightning.__version__}",
        "load_average": round(load, 2), "rss_at_start_mib": round(rss_bytes() / MIB, 1),
        "model": {"layers": args.layers, "heads": args.heads, "head_dim": args.head_dim, "dim": dim,
                  "ffn": args.ffn_mult * dim, "params": params, "frames": args.frames,
                  "latent_size": args.latent_size},
        "runs": {str(w): r for w, r in runs.items()}, "summary": summarise(runs, args), "calibration": calibration,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if calibration:
        result["memory_model"] = memory_model(result)
    return write_result(result, output_path(args), markdown)


if __name__ == "__main__":
    main()
