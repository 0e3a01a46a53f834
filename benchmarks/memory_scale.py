"""Memory of the scale levers, side by side on one small random-initialised Wan-shaped transformer.

    python -m benchmarks.memory_scale [--layers 4 --heads 4 --head_dim 64] [--output benchmarks/results/memory_scale]

1. **FSDP2** (Lightning ``ModelParallelStrategy``; gloo on CPU, one process per rank): per-rank bytes of parameters,
   gradients and AdamW state after one full fine-tuning step, with 1 and with 2 processes.
2. **8-bit AdamW** (``bitsandbytes.optim.AdamW8bit``) against float32 ``torch.optim.AdamW``: optimizer-state bytes
   after one step of the same model.
3. **4-bit NF4 frozen base** (``quantization="nf4"``: diffusers' ``BitsAndBytesConfig``) against a bf16 base: bytes
   of the transformer's weights (plus the quantisation statistics).

Bytes are counted from the tensors each process holds (the local shard of a ``DTensor``), so they are exact and
repeatable; process RSS is not reported (it is dominated by the imported libraries at this size). Writes
``OUT.json`` and ``OUT.md``. On a machine without an accelerator, diffusers refuses to load bitsandbytes weights,
although bitsandbytes runs them on CPU; this script then lifts that one check and says so in the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import add_output_argument, output_path, write_result

ROOT = Path(__file__).resolve().parent.parent


def tensor_bytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(v) for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def quant_state_bytes(param: torch.Tensor) -> int:
    """Bytes of a bitsandbytes 4-bit weight's statistics (absmax, nested absmax, code book)."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return 0
    total = 0
    for obj in (state, getattr(state, "state2", None)):
        if obj is None:
            continue
        for name in ("absmax", "code", "offset"):
            value = getattr(obj, name, None)
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def write_pipeline(path: Path, layers: int, heads: int, head_dim: int) -> str:
    from lit_videoalign.testing import TINY_TEXT_ENCODER, TINY_TRANSFORMER, write_wan_pipeline

    dim = heads * head_dim
    transformer = dict(TINY_TRANSFORMER, num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim,
                       ffn_dim=4 * dim, text_dim=64, in_channels=3, out_channels=3, patch_size=(2, 4, 4))
    return str(write_wan_pipeline(path, transformer=transformer, text_encoder=dict(TINY_TEXT_ENCODER, d_model=64),
                                  vae=None))


def make_model(pipeline: str, torch_dtype: str = "float32"):
    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
    from lit_videoalign.objectives.sft import SFT

    torch.manual_seed(0)
    bb = DiffusersVideoBackbone(pipeline, max_sequence_length=16, torch_dtype=torch_dtype)
    return SFT(bb, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4), prompt_dropout=0.0)


# -- 1. FSDP2 worker: one rank of a 1- or 2-process run ----------------------------------------------------------------
def fsdp2_worker(pipeline: str, out: Path, world: int) -> None:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lit_videoalign.data.toyworld import ToyWorldDataModule

    torch.set_num_threads(1)
    model = make_model(pipeline)
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, ToyWorldDataModule(batch_size=1, train_size=8, val_size=1))
    trainable = [p for p in model.backbone.denoiser.parameters() if p.requires_grad]
    result = {
        "world_size": world, "rank": trainer.global_rank,
        "denoiser_param_bytes": sum(tensor_bytes(p) for p in model.backbone.denoiser.parameters()),
        "grad_bytes": sum(tensor_bytes(p.grad) for p in trainable if p.grad is not None),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizers[0]),
        "frozen_param_bytes": sum(tensor_bytes(p) for n, p in model.named_parameters()
                                  if not n.startswith("backbone.denoiser.")),
    }
    (out / f"fsdp2_world{world}_rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():  # left to process exit, gloo's threads can abort it (exit code 134)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_fsdp2(pipeline: str, tmp: Path, world: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "NODE_RANK": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "benchmarks.memory_scale", "--worker", str(world), "--pipeline", pipeline,
           "--output", str(tmp)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"FSDP2 run with {world} processes failed:\n" + "\n".join(log[-3000:] for log in logs))
    return [json.loads((tmp / f"fsdp2_world{world}_rank{r}.json").read_text()) for r in range(world)]


# -- 2. 8-bit AdamW against float32 AdamW ------------------------------------------------------------------------------
def adam_states(pipeline: str) -> dict:
    import bitsandbytes as bnb

    from lit_videoalign.data.toyworld import ToyWorld

    world = ToyWorld()
    ex = [world.example(i) for i in range(2)]
    batch = {"video": torch.stack([e.video for e in ex]), "prompt": [e.prompt for e in ex]}
    out = {}
    for name, cls in (("adamw_float32", torch.optim.AdamW), ("adamw_8bit", bnb.optim.AdamW8bit)):
        model = make_model(pipeline)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = cls(params, lr=1e-4)
        model.loss(batch, generator=torch.Generator().manual_seed(0)).backward()
        optimizer.step()
        num = sum(p.numel() for p in params)
        small = [p for p in params if p.numel() < 4096]
        out[name] = {"state_bytes": optimizer_state_bytes(optimizer), "trainable_params": num,
                     "bytes_per_param": optimizer_state_bytes(optimizer) / num}
        if name == "adamw_8bit":  # bitsandbytes keeps tensors under min_8bit_size (4096) in 32 bits
            out[name]["params_kept_32bit"] = sum(p.numel() for p in small)
    return out


# -- 3. 4-bit NF4 base against bf16 ------------------------------------------------------------------------------------
def quantized_base(pipeline: str) -> dict:
    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone

    patches = []
    if not torch.cuda.is_available():
        from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

        BnB4BitDiffusersQuantizer.validate_environment = lambda self, *a, **k: None
        patches.append("diffusers BnB4BitDiffusersQuantizer.validate_environment (GPU check) lifted: no accelerator")
    out = {"patches": patches}
    for name, kwargs in (("bf16", {}), ("nf4", {"quantization": "nf4"})):
        bb = DiffusersVideoBackbone(pipeline, max_sequence_length=16, torch_dtype="bfloat16", **kwargs)
        params = list(bb.denoiser.parameters())
        blocks = [p for b in bb.denoiser.blocks for p in b.parameters()]
        out[name] = {"weight_bytes": sum(tensor_bytes(p) for p in params),
                     "quant_state_bytes": sum(quant_state_bytes(p) for p in params),
                     "block_weight_bytes": sum(tensor_bytes(p) + quant_state_bytes(p) for p in blocks),
                     "is_quantized": bb.is_quantized}
        out[name]["total_bytes"] = out[name]["weight_bytes"] + out[name]["quant_state_bytes"]
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:.3f}"


def markdown(r: dict) -> str:
    f1, f2 = r["fsdp2"]["1"][0], r["fsdp2"]["2"]
    a = r["adamw"]
    q = r["quantized_base"]
    lines = [
        "# Memory of the scale levers", "",
        f"Model: random-initialised Wan 2.1-shaped transformer, {r['model']['denoiser_params']:,} parameters "
        f"({r['model']['layers']} blocks, width {r['model']['width']}); pixel-space toy-world clips 16x32x32, batch 1 "
        "per rank, full fine-tune.", f"Command: `{r['command']}`", f"Machine: {r['machine']}", "",
        "## FSDP2: per-rank bytes after one step (MiB)", "",
        "| processes | rank | denoiser params | gradients | AdamW state | params + grads + state "
        "| frozen (replicated) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in [f1, *f2]:
        total = row["denoiser_param_bytes"] + row["grad_bytes"] + row["optimizer_state_bytes"]
        lines.append(f"| {row['world_size']} | {row['rank']} | {mib(row['denoiser_param_bytes'])} | "
                     f"{mib(row['grad_bytes'])} | {mib(row['optimizer_state_bytes'])} | {mib(total)} | "
                     f"{mib(row['frozen_param_bytes'])} |")
    lines += ["", f"Per-rank params + grads + state with 2 processes / with 1: **{r['fsdp2']['ratio_2_over_1']:.3f}**",
              "", "## 8-bit AdamW against float32 AdamW (optimizer state after one step)", "",
              "| optimizer | state (MiB) | bytes per trainable parameter |", "|---|---|---|"]
    for name in ("adamw_float32", "adamw_8bit"):
        lines.append(f"| {name} | {mib(a[name]['state_bytes'])} | {a[name]['bytes_per_param']:.2f} |")
    lines += ["", f"8-bit / float32: **{a['ratio_8bit_over_float32']:.3f}** "
              f"({a['adamw_8bit']['params_kept_32bit']:,} parameters in tensors under 4,096 elements stay 32-bit)",
              "", "## 4-bit NF4 frozen base against bf16 (transformer weights)", "",
              "| base | weights (MiB) | quantisation statistics (MiB) | total (MiB) | transformer blocks (MiB) |",
              "|---|---|---|---|---|"]
    for name in ("bf16", "nf4"):
        lines.append(f"| {name} | {mib(q[name]['weight_bytes'])} | {mib(q[name]['quant_state_bytes'])} | "
                     f"{mib(q[name]['total_bytes'])} | {mib(q[name]['block_weight_bytes'])} |")
    lines += ["", f"NF4 / bf16, whole transformer: **{q['ratio_total']:.3f}**; blocks only: "
              f"**{q['ratio_blocks']:.3f}** (embeddings and norms stay in bf16/float32).", ""]
    if q["patches"]:
        lines += ["Patches: " + "; ".join(q["patches"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    add_output_argument(parser, "benchmarks/results/memory_scale")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        fsdp2_worker(args.pipeline, Path(args.output), args.worker)  # a worker's --output: the run's folder
        return {}

    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipeline = write_pipeline(tmp / "pipe", args.layers, args.heads, args.head_dim)
        denoiser = make_model(pipeline).backbone.denoiser
        fsdp2 = {str(w): run_fsdp2(pipeline, tmp, w) for w in (1, 2)}
        adamw = adam_states(pipeline)
        quant = quantized_base(pipeline)

    def total(row: dict) -> int:
        return row["denoiser_param_bytes"] + row["grad_bytes"] + row["optimizer_state_bytes"]

    fsdp2["ratio_2_over_1"] = max(total(r) for r in fsdp2["2"]) / total(fsdp2["1"][0])
    adamw["ratio_8bit_over_float32"] = adamw["adamw_8bit"]["state_bytes"] / adamw["adamw_float32"]["state_bytes"]
    quant["ratio_total"] = quant["nf4"]["total_bytes"] / quant["bf16"]["total_bytes"]
    quant["ratio_blocks"] = quant["nf4"]["block_weight_bytes"] / quant["bf16"]["block_weight_bytes"]
    import bitsandbytes
    import lightning

    result = {
        "command": " ".join(["python -m benchmarks.memory_scale", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, lightning "
                   f"{lightning.__version__}, bitsandbytes {bitsandbytes.__version__}",
        "model": {"layers": args.layers, "width": args.heads * args.head_dim,
                  "denoiser_params": sum(p.numel() for p in denoiser.parameters())},
        "fsdp2": fsdp2, "adamw": adamw, "quantized_base": quant,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return write_result(result, output_path(args), markdown)


if __name__ == "__main__":
    main()
