"""Peak memory of DMD with student and critic as LoRA adapters over one shared base, against separate models.

    python -m benchmarks.dmd_memory [--layers 2] [--rank 64] [--batches 2]

DMD needs three denoisers: the student, the critic (fake score) and the frozen teacher (real score). Modes, each
trained for the same batches with the same seed, each in its own subprocess so it has its own allocator and peak RSS:

- ``shared_base``: student and critic are two peft LoRA adapters over one frozen base; the base is the teacher;
- ``separate_full``: three full copies (student and critic trained in full, frozen teacher copy);
- ``separate_lora``: a LoRA student over its base (adapters off = teacher) and a critic copy with its own LoRA.

The model is a random-weight Wan 2.1 transformer with the real 1.3B block geometry (width 1536, 12 heads, FFN 8960)
but ``--layers`` of its 30 blocks, on 17x128x128 clips (16x5x16x16 latents, 320 tokens), float32 on CPU. Per mode it
records the peak RSS above the process's RSS after imports, and the bytes of distinct parameter storage, gradients
and optimizer state. A last table projects the weight/gradient/optimizer bytes to the full 30-block model in bf16
(counted on the meta device, no memory used). Results go to ``benchmarks/results/dmd_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import write_result

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {
    "shared_base": {"shared_base": True, "lora": True},
    "separate_full": {"shared_base": False, "lora": False},
    "separate_lora": {"shared_base": False, "lora": True},
}
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, eps=1e-6)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
NUM_FRAMES, SIZE = 17, 128


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_pipeline(path: Path, layers: int) -> Path:
    from lit_videoalign.testing import TINY_TEXT_ENCODER, TINY_VAE, write_wan_pipeline

    transformer = {**WAN_1_3B, "num_layers": layers, "text_dim": TINY_TEXT_ENCODER["d_model"]}
    return write_wan_pipeline(path, transformer=transformer, text_encoder=TINY_TEXT_ENCODER, vae=TINY_VAE)


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta" or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


def worker(mode: str, pipeline: str, rank: int, batches: int) -> dict:
    import lightning as L
    import torch

    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
    from lit_videoalign.objectives.dmd import DMD

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    rss_imports = rss_mib()
    L.seed_everything(0, verbose=False)
    spec = MODES[mode]
    backbone = DiffusersVideoBackbone(pipeline, max_sequence_length=16)
    model = DMD(backbone, lora_rank=rank if spec["lora"] else None, shared_base=spec["shared_base"],
                num_frames=NUM_FRAMES, height=SIZE, width=SIZE, teacher_guidance_scale=2.0, critic_updates=1,
                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-6))
    rss_model = rss_mib()
    prompts = [{"prompt": "a red ball falls"}, {"prompt": "a blue ball moves left"}] * batches
    loader = torch.utils.data.DataLoader(prompts, batch_size=2)
    trainer = L.Trainer(max_steps=2 * batches, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = list(model.parameters())
    denoisers = [m for m in (model.backbone.denoiser, model.critic, model._reference_denoiser) if m is not None]
    den_params = [p for m in denoisers for p in m.parameters()]
    states = [v for opt in trainer.optimizers for s in opt.state.values() for v in s.values()
              if isinstance(v, torch.Tensor)]
    return {
        "mode": mode,
        "denoiser_weight_bytes": tensor_bytes(den_params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "gradient_bytes": tensor_bytes(p.grad for p in params),
        "optimizer_state_bytes": tensor_bytes(states),
        "rss_after_imports_mib": rss_imports,
        "rss_after_build_mib": rss_model,
        "peak_rss_mib": peak,
        "peak_rss_above_imports_mib": peak - rss_imports,
        "train_seconds": seconds,
        "generator_updates": model.generator_updates,
    }


def projection(rank: int) -> dict:
    """Weight, gradient and AdamW-state bytes of each mode for the full Wan 2.1 1.3B transformer in bf16."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**WAN_1_3B)
    base = sum(p.numel() for p in model.parameters())
    lora = sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in LORA_TARGETS))
    b = 2  # bf16 weights, gradients and (under bf16-true) optimizer moments
    rows = {
        "shared_base": {"weights": base + 2 * lora, "trained": 2 * lora},
        "separate_full": {"weights": 3 * base, "trained": 2 * base},
        "separate_lora": {"weights": 2 * base + 2 * lora, "trained": 2 * lora},
    }
    out = {"base_params": base, "lora_params_per_adapter": lora, "rank": rank, "bytes_per_value": b}
    for mode, r in rows.items():
        out[mode] = {"weight_gib": r["weights"] * b / 2**30, "grad_gib": r["trained"] * b / 2**30,
                     "adam_gib": 2 * r["trained"] * b / 2**30}
        out[mode]["total_gib"] = sum(out[mode].values())
    return out


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# DMD memory: shared-base adapters vs separate models",
        "",
        f"Wan 2.1 1.3B block geometry with {cfg['layers']} of 30 blocks (random weights), LoRA rank {cfg['rank']} on "
        f"{', '.join(LORA_TARGETS)}, {NUM_FRAMES}x{SIZE}x{SIZE} clips, batch 2, {cfg['batches']} batches of one critic "
        f"and one student step, float32, CPU ({cfg['machine']}). Each mode ran in its own process.",
        "",
        "| mode | denoiser weights (MiB) | trainable params | gradients (MiB) | optimizer state (MiB) | "
        "peak RSS above imports (MiB) | vs shared_base |",
        "|---|---|---|---|---|---|---|",
    ]
    ref = result["modes"]["shared_base"]["peak_rss_above_imports_mib"]
    for mode, r in result["modes"].items():
        lines.append(f"| {mode} | {r['denoiser_weight_bytes'] / 2**20:.0f} | {r['trainable_params']:,} | "
                     f"{r['gradient_bytes'] / 2**20:.0f} | {r['optimizer_state_bytes'] / 2**20:.0f} | "
                     f"{r['peak_rss_above_imports_mib']:.0f} | {r['peak_rss_above_imports_mib'] / ref:.2f}x |")
    p = result["projection_wan2.1_1.3b_bf16"]
    lines += [
        "",
        f"Projected to the full 30-block Wan 2.1 1.3B ({p['base_params'] / 1e9:.2f} B parameters, "
        f"{p['lora_params_per_adapter'] / 1e6:.1f} M per rank-{p['rank']} adapter), bf16 weights, gradients and AdamW "
        "moments, activations not included:",
        "",
        "| mode | weights (GiB) | gradients (GiB) | AdamW state (GiB) | total (GiB) |",
        "|---|---|---|---|---|",
    ]
    for mode in MODES:
        r = p[mode]
        lines.append(f"| {mode} | {r['weight_gib']:.2f} | {r['grad_gib']:.2f} | {r['adam_gib']:.2f} | "
                     f"{r['total_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (the 1.3B model has 30)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "dmd_memory"), help="path stem of the .json and .md files")
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.pipeline, args.rank, args.batches)))
        return {}

    modes = {}
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = write_pipeline(Path(tmp) / "wan", args.layers)
        for mode in MODES:
            cmd = [sys.executable, "-m", "benchmarks.dmd_memory", "--worker", mode, "--pipeline", str(pipeline),
                   "--rank", str(args.rank), "--batches", str(args.batches)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                                 env=env)
            if res.returncode:
                raise RuntimeError(f"mode {mode} failed:\n{res.stderr[-3000:]}")
            modes[mode] = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{mode}: peak RSS above imports {modes[mode]['peak_rss_above_imports_mib']:.0f} MiB", flush=True)
    result = {
        "config": {"layers": args.layers, "rank": args.rank, "batches": args.batches, "frames": NUM_FRAMES,
                   "size": SIZE, "dtype": "float32", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"},
        "modes": modes,
        "projection_wan2.1_1.3b_bf16": projection(args.rank),
    }
    return write_result(result, args.output, markdown)


if __name__ == "__main__":
    main()
