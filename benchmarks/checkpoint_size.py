"""Checkpoint size of a LoRA run on the Wan 2.1 1.3B architecture, before and after checkpoints left the frozen base
out, and whether a run resumed from the small file continues bit for bit.

    python -m benchmarks.checkpoint_size --output benchmarks/results/checkpoint_size

The pipeline has random weights: the real Wan 2.1 T2V 1.3B transformer geometry (30 blocks, width 1536, FFN 8960;
its text projection takes the small text encoder's width instead of UMT5-XXL's 4096) and the real Wan 2.1 VAE
(``AutoencoderKLWan()``'s defaults), with a tiny UMT5 text encoder. LoRA SFT as in ``configs/wan2.1-1.3b/sft_lora.yaml``
(rank 32, alpha 32, attention projections, AdamW), float32 on CPU, on 5x32x32 toy-world clips (so a step takes
seconds). Run A trains 2 steps with a checkpoint after each; the "before" file is run A's step-1 checkpoint with the
frozen base put back into its state dict (what a LoRA run wrote before); run B resumes from run A's step-1 file and
trains 1 more step; its step-2 checkpoint is compared with run A's tensor by tensor (``torch.equal``). Needs about
14 GB of memory and 7 GB of disk in ``--workdir``.
"""

from __future__ import annotations

import argparse
import gc
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import add_output_argument, output_path, write_result

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                rope_max_seq_len=1024, eps=1e-6)
FRAMES, SIZE = 5, 32  # 5x32x32 clips -> latents 16x2x4x4 -> 8 tokens


def write_pipeline(path: Path, layers: int) -> Path:
    from lit_videoalign.testing import TINY_TEXT_ENCODER, write_wan_pipeline

    transformer = {**WAN_1_3B, "num_layers": layers, "text_dim": TINY_TEXT_ENCODER["d_model"]}
    return write_wan_pipeline(path, transformer=transformer, text_encoder=TINY_TEXT_ENCODER, vae={}, shift=3.0)


def run(pipeline: Path, ckpt_dir: Path, rank: int, steps: int, ckpt_path: Path | None = None):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
    from lit_videoalign.checkpoint_io import AtomicCheckpointIO
    from lit_videoalign.data.toyworld import ToyWorldDataModule
    from lit_videoalign.objectives.sft import SFT

    L.seed_everything(0)
    model = SFT(DiffusersVideoBackbone(str(pipeline), max_sequence_length=16), lora_rank=rank, lora_alpha=rank,
                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.0), num_frames=FRAMES, height=SIZE,
                width=SIZE)
    data = ToyWorldDataModule(batch_size=1, train_size=4, val_size=1, max_balls=1, num_frames=FRAMES, height=SIZE,
                              width=SIZE)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", precision="32-true", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, plugins=[AtomicCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1,
                                                   save_top_k=-1)])
    start = time.perf_counter()
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, time.perf_counter() - start


def training_state(ckpt: dict) -> dict:
    keep = {"state_dict", "optimizer_states", "lr_schedulers", "rng_states", "nonfinite_guard", "global_step", "epoch"}
    return {k: v for k, v in ckpt.items() if k in keep}


def differences(a, b, where: str = "") -> tuple[int, list[str]]:
    """``(tensors compared, places that differ)``: tensors with ``torch.equal``, the rest with ``==``."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return 1, [] if same else [where]
    if isinstance(a, dict):
        if set(a) != set(b):
            return 0, [f"{where}: keys differ"]
        parts = [differences(a[k], b[k], f"{where}/{k}") for k in a]
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return 0, [f"{where}: lengths differ"]
        parts = [differences(x, y, f"{where}/{i}") for i, (x, y) in enumerate(zip(a, b))]
    else:
        return 0, [] if a == b else [where]
    return sum(n for n, _ in parts), [d for _, found in parts for d in found]


def measure(args: argparse.Namespace, work: Path) -> dict:
    from lit_videoalign.backbones.fingerprint import backbone_fingerprint
    from lit_videoalign.checkpoint_io import AtomicCheckpointIO, checkpoint_nbytes

    t0 = time.perf_counter()
    pipeline = write_pipeline(work / "pipeline", args.layers)
    write_s = time.perf_counter() - t0
    model, a_s = run(pipeline, work / "a", args.rank, steps=2)
    t0 = time.perf_counter()
    fingerprint = backbone_fingerprint(model.backbone)  # what each save and resume computes once
    fingerprint_s = time.perf_counter() - t0
    trimmed = work / "a" / "step=1.ckpt"
    ckpt = torch.load(trimmed, map_location="cpu", weights_only=True)
    base = model.frozen_state_dict()
    old = {k: v for k, v in ckpt.items() if k != "frozen_base_fingerprint"}
    old["state_dict"] = {**base, **ckpt["state_dict"]}
    t0 = time.perf_counter()
    AtomicCheckpointIO().save_checkpoint(old, work / "old.ckpt")
    old_save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    AtomicCheckpointIO().save_checkpoint(ckpt, work / "again.ckpt")
    new_save_s = time.perf_counter() - t0
    result = {
        "before_bytes": (work / "old.ckpt").stat().st_size,
        "after_bytes": trimmed.stat().st_size,
        "after_state_dict_bytes": checkpoint_nbytes(ckpt["state_dict"]),
        "after_optimizer_bytes": checkpoint_nbytes(ckpt["optimizer_states"]),
        "frozen_base_bytes": checkpoint_nbytes(base),
        "after_keys": len(ckpt["state_dict"]), "before_keys": len(old["state_dict"]),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "denoiser_params": sum(p.numel() for n, p in model.backbone.denoiser.named_parameters() if ".lora_" not in n),
        "fingerprint": fingerprint, "fingerprint_seconds": fingerprint_s,
        "save_seconds": {"before": old_save_s, "after": new_save_s},
        "pipeline_write_seconds": write_s, "run_a_seconds": a_s,
    }
    (work / "old.ckpt").unlink()
    del model, ckpt, old, base
    gc.collect()
    if not args.skip_resume:
        _, b_s = run(pipeline, work / "b", args.rank, steps=2, ckpt_path=trimmed)
        full = torch.load(work / "a" / "step=2.ckpt", map_location="cpu", weights_only=True)
        resumed = torch.load(work / "b" / "step=2.ckpt", map_location="cpu", weights_only=True)
        compared, diff = differences(training_state(full), training_state(resumed))
        result.update(run_b_seconds=b_s, resume_tensors_compared=compared, resume_differences=diff[:20],
                      resume_bit_exact=not diff)
    return result


def markdown(result: dict) -> str:
    cfg, r = result["config"], result["result"]
    gb = 1e9
    lines = [
        "# Checkpoint size of a LoRA run on the Wan 2.1 1.3B architecture",
        "",
        f"`{cfg['command']}`",
        "",
        f"Random-weight Wan 2.1 T2V 1.3B pipeline: the real transformer geometry ({cfg['layers']} blocks, "
        f"{r['denoiser_params'] / 1e9:.2f} B parameters), the real Wan 2.1 VAE, a tiny UMT5 text encoder. LoRA SFT, "
        f"rank {cfg['rank']} on the attention projections ({r['trainable_params'] / 1e6:.1f} M parameters), AdamW, "
        f"float32, CPU ({cfg['machine']}).",
        "",
        "| checkpoint | file size | state-dict keys |",
        "|---|---|---|",
        f"| before: the whole model (frozen base included) | {r['before_bytes'] / gb:.2f} GB | {r['before_keys']} |",
        f"| after: what trains + base fingerprint | {r['after_bytes'] / gb:.3f} GB | {r['after_keys']} |",
        "",
        f"The after file holds the adapters ({r['after_state_dict_bytes'] / gb:.3f} GB), their AdamW state "
        f"({r['after_optimizer_bytes'] / gb:.3f} GB), the RNG and loop state and the fingerprint "
        f"`{r['fingerprint']['configs']}/{r['fingerprint']['weights']}` of the base; "
        f"{r['frozen_base_bytes'] / gb:.2f} GB of frozen weights are loaded from the pipeline instead. "
        f"{r['before_bytes'] / r['after_bytes']:.0f}x smaller; saving took {r['save_seconds']['after']:.1f} s "
        f"instead of {r['save_seconds']['before']:.1f} s.",
        "",
    ]
    if "resume_bit_exact" in r:
        verdict = "bit-exact" if r["resume_bit_exact"] else f"NOT bit-exact: {r['resume_differences']}"
        lines.append(f"Resume: 1 step, save, 1 more step from the small file against 2 steps uninterrupted: "
                     f"{verdict} ({r['resume_tensors_compared']} tensors of weights, AdamW state and RNG states "
                     "compared with `torch.equal`).")
    else:
        lines.append("Resume: not measured in this run (`--skip_resume`).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_argument(parser, "benchmarks/results/checkpoint_size")
    parser.add_argument("--layers", type=int, default=30, help="transformer blocks (the 1.3B model has 30)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (the shipped Wan 1.3B configs use 32)")
    parser.add_argument("--workdir", default=None, help="folder for the pipeline and checkpoints (default: a temp dir)")
    parser.add_argument("--skip_resume", action="store_true", help="measure the sizes only")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="checkpoint_size.", dir=args.workdir))
    try:
        result = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config = {"command": "python -m benchmarks.checkpoint_size " + " ".join(argv if argv is not None else sys.argv[1:]),
              "layers": args.layers, "rank": args.rank, "frames": FRAMES, "size": SIZE,
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads"}
    return write_result({"config": config, "result": result}, output_path(args), markdown)


if __name__ == "__main__":
    main()
