"""One prepared GPU check at the real Wan 2.1 1.3B size: LoRA SFT, DPO and GRPO-update steps, MFU, torch.compile,
FSDP2 on one GPU and gradient checkpointing (issue 26, part 5).

    python -m benchmarks.gpu_check            # one H100/H200, under 8 minutes: benchmarks/results/gpu_check.{json,md}
    python -m benchmarks.gpu_check --smoke    # the same code paths on CPU at a tiny size (a test runs it)

The model is diffusers' ``WanTransformer3DModel`` built directly from the Wan 2.1 T2V 1.3B transformer config (30
blocks, width 1536, 12 heads, FFN 8960, 16 latent channels, patches 1x2x2, text width 4096) with random weights, in
bf16 (``torch_dtype: bfloat16``, ``precision: bf16-true``, as ``configs/wan2.1-1.3b/`` train), on 33-frame 480x832
clips (latents 16x9x60x104: 14,040 video tokens) and 512 text tokens, batch 1, LoRA rank 32 on the attention
projections, AdamW. It is put into a :class:`~lit_videoalign.backbones.diffusers.DiffusersVideoBackbone` whose VAE and
UMT5 text encoder are tiny random stand-ins (the UMT5 is 1 layer wide enough to give ``[B, 512, 4096]`` embeddings):
nothing is downloaded, and what is timed is the transformer. Every step is the suite's own ``training_step`` through a
Lightning ``Trainer``, on precomputed inputs where the objective takes them:

- ``sft``: flow matching on 1 precomputed latent with precomputed prompt embeddings (random, ``[1, 512, 4096]``);
- ``dpo``: Flow-DPO on 1 pair of precomputed latents (policy and adapter-off reference each on 2 clips; DPO encodes
  its prompts with the stand-in text encoder, as it always does);
- ``grpo_update``: the GRPO update on a recorded rollout (group of 2, 2 SDE steps recorded by ``GRPO.rollout`` before
  timing, then returned by it at every step): one recorded transition per rollout re-scored with gradients
  (``sde_step_with_logprob``, clipped surrogate ``grpo_policy_loss``, KL 0.004 to the adapter-off reference),
  micro-batch 1, gradient clipping, one optimizer step;
- ``sft`` again with each lever: blocks compiled (``lit_videoalign.strategies.compile_blocks``), no activation
  checkpointing (the rest recompute each block, as the shipped configs do), FSDP2 under Lightning's
  ``ModelParallelStrategy`` on a world of 1 (``apply_fsdp2``, NCCL), and compiled without checkpointing.

Each measurement builds a fresh model, runs ``--warmup`` untimed steps then ``--steps`` timed ones, each timed
between ``torch.cuda.synchronize()`` calls; the peak is ``torch.cuda.max_memory_allocated`` over the timed steps
(``reset_peak_memory_stats`` before the first). The last warm-up step of an uncompiled run is counted with
``torch.utils.flop_counter.FlopCounterMode``; the forwards that activation checkpointing re-runs in the backward are
counted apart and left out of the model FLOPs, so MFU = model FLOPs / median step time / the chip's bf16 dense peak
(a datasheet table by ``torch.cuda.get_device_name()``; a measured bf16 ``torch.mm`` for other chips). A compiled
run takes the FLOPs of its uncompiled twin. Measurements run most important first; none starts without the time it
needs left in ``--budget`` (default 7 minutes), a running one stops after the step that crosses it, and a watchdog
writes what was measured and exits at ``--budget`` + 30 s (GPU runs only), so the command cannot run past 8 minutes.
An OOM is recorded for its measurement and the next one runs. Without CUDA it prints one line, exits 0 and writes
nothing; ``--smoke`` runs a 2-block tiny Wan on CPU in float32 (1 warm-up and 1 timed step, eager-backend compile,
gloo, process RSS for memory and a measured float32 ``torch.mm`` peak for MFU) and writes to
``benchmarks/results/quick/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30
PROMPT = "a red ball falls and bounces"

# Wan 2.1 T2V 1.3B transformer (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json).
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, eps=1e-6)
TINY_WAN = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=32, num_layers=2,
                rope_max_seq_len=32)
# bf16 dense tensor-core peaks (NVIDIA datasheets, without sparsity); the first name found in the device name wins.
PEAK_BF16_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
                    ("A100", 312.0))


@dataclasses.dataclass(frozen=True)
class Spec:
    """The model and clip of a run."""

    transformer: dict
    frames: int
    height: int
    width: int
    text_len: int
    lora_rank: int
    dtype: str  # torch_dtype of the backbone
    precision: str  # Trainer precision
    warmup: int
    steps: int

    def describe(self) -> str:
        t = self.transformer
        return (f"random-init WanTransformer3DModel, {t['num_layers']} blocks, width "
                f"{t['num_attention_heads'] * t['attention_head_dim']}, FFN {t['ffn_dim']}, text width "
                f"{t['text_dim']}; {self.frames}x{self.height}x{self.width} clips, {self.text_len} text tokens, "
                f"batch 1, LoRA rank {self.lora_rank}, {self.dtype} ({self.precision})")


GPU = Spec(WAN_1_3B, 33, 480, 832, 512, 32, "bfloat16", "bf16-true", warmup=2, steps=5)
SMOKE = Spec(TINY_WAN, 5, 32, 32, 8, 4, "float32", "32-true", warmup=1, steps=1)


@dataclasses.dataclass(frozen=True)
class Measurement:
    name: str
    objective: str  # sft | dpo | grpo
    what: str
    checkpointing: bool = True
    compile: bool = False
    fsdp2: bool = False
    min_s: float = 40.0  # GPU seconds it needs at least: it does not start with less budget left
    flops_from: str | None = None  # compiled steps cannot be counted: the model FLOPs of this measurement


MEASUREMENTS = (  # most important first
    Measurement("sft", "sft", "LoRA SFT: flow matching, 1 precomputed clip"),
    Measurement("dpo", "dpo", "LoRA Flow-DPO: 1 pair (policy + adapter-off reference, 2 clips each)", min_s=60),
    Measurement("grpo_update", "grpo", "LoRA GRPO update: 2 recorded rollouts x 1 transition, micro-batch 1, KL 0.004",
                min_s=60),
    Measurement("sft_compile", "sft", "sft, blocks compiled (compile_blocks)", compile=True, min_s=150,
                flops_from="sft"),
    Measurement("sft_no_checkpointing", "sft", "sft without activation checkpointing", checkpointing=False),
    Measurement("sft_fsdp2", "sft", "sft under ModelParallelStrategy, FSDP2 on a world of 1", fsdp2=True, min_s=50),
    Measurement("sft_compile_no_checkpointing", "sft", "sft, blocks compiled, no activation checkpointing",
                checkpointing=False, compile=True, min_s=120, flops_from="sft_no_checkpointing"),
)
NAMES = [m.name for m in MEASUREMENTS]


# -- FLOPs -------------------------------------------------------------------------------------------------------------
class StepFlops:
    """``FlopCounterMode`` over one step, with the FLOPs of module forwards re-run inside the backward (activation
    checkpointing's recompute) counted apart: ``model = total - recomputed``. Checkpointing's early stop is off while
    counting, so every recomputed forward runs to its end (where its hook closes the count)."""

    def __enter__(self) -> StepFlops:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.utils.checkpoint import set_checkpoint_early_stop
        from torch.utils.flop_counter import FlopCounterMode

        self.mode = FlopCounterMode(display=False)
        self.depth, self.start, self.recomputed = 0, 0, 0
        self.no_early_stop = set_checkpoint_early_stop(False)
        self.no_early_stop.__enter__()
        self.mode.__enter__()
        self.handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        return self

    def _pre(self, module, args) -> None:
        if self.depth or self.mode.mod_tracker.is_bw:  # a forward running inside the backward is a recompute
            if self.depth == 0:
                self.start = self.mode.get_total_flops()
            self.depth += 1

    def _post(self, module, args, output) -> None:
        if self.depth:
            self.depth -= 1
            if self.depth == 0:
                self.recomputed += self.mode.get_total_flops() - self.start

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.mode.__exit__(*exc)
        self.no_early_stop.__exit__(*exc)
        self.total = self.mode.get_total_flops()
        self.model = self.total - self.recomputed


def peak_flops(device: torch.device) -> dict:
    """The chip's bf16 dense peak from the datasheet table, else a measured ``torch.mm`` peak (bf16 on CUDA)."""
    from benchmarks.mfu import matmul_peak

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name:
                return {"flop_per_s": tflops * 1e12, "source": f"datasheet bf16 dense peak of {key} ({name})"}
        best = matmul_peak(8192, torch.bfloat16, device, 5)
        return {"flop_per_s": best["flop_per_s"], "source": f"{name} not in the table: measured bf16 torch.mm 8192^2"}
    best = matmul_peak(256, torch.float32, device, 3)
    return {"flop_per_s": best["flop_per_s"], "source": "measured float32 torch.mm 256x256 on this CPU (smoke)"}


# -- building ----------------------------------------------------------------------------------------------------------
def write_pipeline(path: Path, spec: Spec) -> str:
    """A Wan pipeline folder with tiny random stand-ins: a 1-block transformer (replaced by :func:`build`), a tiny VAE
    (Wan's 4x8x8 compression: only the latent shape and GRPO's rollout decode use it) and a 1-layer UMT5 as wide as
    the transformer's text input."""
    from lit_videoalign.testing import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE, write_wan_pipeline

    t = spec.transformer
    stand_in = dict(TINY_TRANSFORMER, num_layers=1, text_dim=t["text_dim"], patch_size=t["patch_size"],
                    in_channels=t["in_channels"], out_channels=t["out_channels"])
    text = dict(TINY_TEXT_ENCODER, d_model=t["text_dim"], num_layers=1)
    return str(write_wan_pipeline(path, transformer=stand_in, text_encoder=text, vae=TINY_VAE, shift=3.0))


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def build(m: Measurement, spec: Spec, pipeline: str, device: torch.device):
    """The objective module around a fresh ``WanTransformer3DModel(**spec.transformer)`` built on ``device``."""
    from diffusers import WanTransformer3DModel
    from torch import nn

    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone

    dtype = getattr(torch, spec.dtype)
    torch.manual_seed(0)
    bb = DiffusersVideoBackbone(pipeline, max_sequence_length=spec.text_len, torch_dtype=spec.dtype,
                                frozen_dtype=spec.dtype)
    with torch.device(device):
        denoiser = WanTransformer3DModel(**spec.transformer)
    # Every weight in the run's dtype, as bf16-true leaves them (nn.Module.to: diffusers' ModelMixin.to would warn
    # about the modules from_pretrained keeps in float32, which Lightning's bf16-true casts all the same).
    bb.denoiser = nn.Module.to(denoiser, dtype)
    if m.checkpointing:
        bb.denoiser.enable_gradient_checkpointing()
    bb.train(bb.training)
    common = dict(lora_rank=spec.lora_rank, lora_alpha=spec.lora_rank, num_frames=spec.frames, height=spec.height,
                  width=spec.width, optimizer=adamw, max_consecutive_nonfinite=10**6)  # time every step regardless
    if m.objective == "sft":
        from lit_videoalign.objectives.sft import SFT

        return SFT(bb, prompt_dropout=0.0, sigma_shift=3.0, **common)
    if m.objective == "dpo":
        from lit_videoalign.objectives.dpo import DPO

        return DPO(bb, beta=5000.0, sigma_shift=3.0, **common)
    from lit_videoalign.objectives.grpo import GRPO
    from lit_videoalign.testing import Brightness

    common["lora_alpha"] = 2 * spec.lora_rank  # as configs/wan2.1-1.3b/grpo.yaml
    return GRPO(bb, reward=Brightness(), group_size=2, num_sampling_steps=2, train_fraction=0.5, noise_level=0.7,
                rollout_guidance_scale=1.0, micro_batch_size=1, clip_range=1e-4, kl_beta=0.004, **common)


def items(module, objective: str, spec: Spec, n: int) -> list[dict]:
    """``n`` dataset items of one batch-1 step: precomputed latents (and SFT's precomputed prompt embeddings)."""
    g = torch.Generator().manual_seed(1)
    dtype = getattr(torch, spec.dtype)
    shape = module.backbone.latent_shape(spec.frames, spec.height, spec.width)  # (c, t, h, w)
    if objective == "grpo":
        item = {"prompt": PROMPT}
    elif objective == "dpo":
        item = {"prompt": PROMPT, "chosen_latents": torch.randn(shape, generator=g).to(dtype),
                "rejected_latents": torch.randn(shape, generator=g).to(dtype)}
    else:
        embeds = torch.randn(spec.text_len, spec.transformer["text_dim"], generator=g).to(dtype)  # (l, d)
        item = {"prompt": PROMPT, "latents": torch.randn(shape, generator=g).to(dtype),
                "cond": {"prompt_embeds": embeds, "prompt_mask": torch.ones(spec.text_len, dtype=torch.long)}}
    return [item] * n


# -- timing ------------------------------------------------------------------------------------------------------------
def probe_class():
    import lightning as L

    class Probe(L.Callback):
        """Times each step between synchronisations, counts the FLOPs of the last warm-up step and tracks the peak
        memory of the timed steps; stops the fit after the step that crosses ``deadline``."""

        def __init__(self, device: torch.device, warmup: int, count: bool, deadline: float) -> None:
            self.device, self.warmup, self.count, self.deadline = device, warmup, count, deadline
            self.times: list[float] = []
            self.flops: StepFlops | None = None
            self.sampler = None
            self.peak = float("nan")
            self.stopped = False

        def sync(self) -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.sync()
            if batch_idx == self.warmup and self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            elif batch_idx == self.warmup:
                from benchmarks import PeakSampler

                self.sampler = PeakSampler(interval=0.002)
            if self.count and batch_idx == self.warmup - 1:
                self.flops = StepFlops().__enter__()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.sync()
            t = time.perf_counter() - self.t0
            if self.count and batch_idx == self.warmup - 1:
                self.close_flops()
            if batch_idx >= self.warmup:
                self.times.append(t)
                cuda = self.device.type == "cuda"
                self.peak = torch.cuda.max_memory_allocated(self.device) if cuda else self.sampler.read()
            if time.monotonic() > self.deadline and not trainer.should_stop:
                trainer.should_stop, self.stopped = True, True

        def close_flops(self, *exc) -> None:
            """Leave the FLOP counter's dispatch mode; a step that raised must not leave it on for what runs next."""
            if self.flops is not None and not hasattr(self.flops, "total"):
                self.flops.__exit__(*(exc or (None, None, None)))

        def on_exception(self, trainer, pl_module, exception) -> None:
            self.close_flops(type(exception), exception, exception.__traceback__)

        def on_train_end(self, trainer, pl_module) -> None:
            if self.sampler is not None:
                self.peak = self.sampler.stop()

    return Probe


def fit(module, data: list[dict], m: Measurement, spec: Spec, device: torch.device, deadline: float, workdir: str):
    import lightning as L

    probe = probe_class()(device, spec.warmup, not m.compile, deadline)
    strategy = "auto"
    if m.fsdp2:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer = L.Trainer(max_epochs=1, accelerator=device.type, devices=1, strategy=strategy, precision=spec.precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[probe],
                        default_root_dir=workdir)
    loader = torch.utils.data.DataLoader(data, batch_size=1, shuffle=False)
    trainer.fit(module, loader)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    return probe, logged


def run_one(m: Measurement, spec: Spec, pipeline: str, device: torch.device, deadline: float, workdir: str) -> dict:
    """One measurement: build, (record GRPO's rollout), fit, and the figures; OOM and errors are recorded."""
    from lit_videoalign.strategies import compile_blocks

    record: dict = {"status": "ok"}
    env_before = dict(os.environ)
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        module = build(m, spec, pipeline, device)
        record["trainable_params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
        record["denoiser_params"] = sum(p.numel() for p in module.backbone.denoiser.parameters())
        if m.compile:  # the suite's regional compile; an eager backend on CPU keeps the smoke run short
            kwargs = {} if device.type == "cuda" else {"backend": "eager"}
            record["compiled_blocks"] = compile_blocks(module, **kwargs)
        if m.objective == "grpo":  # one real rollout, recorded before timing; every step re-trains on it
            module.to(device=device, dtype=getattr(torch, spec.dtype))
            rollout = module.rollout([PROMPT], generator=torch.Generator().manual_seed(0))
            module.rollout = lambda prompts, generator=None, images=None: rollout
        record["build_s"] = time.perf_counter() - start
        probe, logged = fit(module, items(module, m.objective, spec, spec.warmup + spec.steps), m, spec, device,
                            deadline, workdir)
        record.update(step_times_s=probe.times, steps_timed=len(probe.times), warmup_steps=spec.warmup,
                      logged=logged, nonfinite_skips=module.nonfinite_skips)
        if probe.times:
            record.update(step_time_s=statistics.median(probe.times), step_time_min_s=min(probe.times),
                          step_time_max_s=max(probe.times), peak_mem_gib=probe.peak / GIB)
        else:
            record["status"] = "stopped: budget"
        if probe.stopped and probe.times:
            record["status"] = f"ok (stopped after {len(probe.times)} timed steps: budget)"
        if probe.flops is not None:
            record.update(counted_flops=probe.flops.total, recomputed_flops=probe.flops.recomputed,
                          model_flops=probe.flops.model, flops_from=m.name)
    except torch.OutOfMemoryError as err:
        record.update(status="oom", error=str(err).splitlines()[0][:300])
        if device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    except Exception as err:  # recorded, and the next measurement runs
        first = (str(err).splitlines() or [""])[0]
        record.update(status="error", error=f"{type(err).__name__}: {first}"[:300])
    finally:
        record["wall_s"] = time.perf_counter() - start
        module = rollout = None  # noqa: F841  (free the model before the next one is built)
        if m.fsdp2:
            if not had_group and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            os.environ.clear()
            os.environ.update(env_before)  # Lightning's MASTER_ADDR/PORT, ranks
        if m.compile:
            torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


# -- the run -----------------------------------------------------------------------------------------------------------
def environment(argv: list[str], device: torch.device) -> dict:
    import diffusers
    import lightning
    import peft
    import transformers

    env = {"command": shlex.join(["python", "-m", "benchmarks.gpu_check", *argv]), "python": platform.python_version(),
           "platform": platform.platform(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "device": str(device), "cpu_cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           **{m.__name__: m.__version__ for m in (diffusers, lightning, peft, transformers)}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=props.total_memory / GIB,
                   gpu_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
    return env


class Run:
    """The measurements so far, written atomically at the end or by the watchdog at the hard limit."""

    def __init__(self, result: dict, selected: list[Measurement], spec: Spec, output: Path, start: float) -> None:
        self.result, self.selected, self.spec, self.output, self.start = result, selected, spec, output, start
        self.lock = threading.Lock()
        self.current: str | None = None

    def add(self, record: dict) -> None:
        with self.lock:
            self.result["measurements"].append(record)
            self.current = None

    def finish(self, note: str | None = None) -> dict:
        """Fill in MFU and the measurements that did not run, and write ``OUTPUT.json`` and ``OUTPUT.md``."""
        res = self.result
        done = {r["name"] for r in res["measurements"]}
        for m in self.selected:
            if m.name not in done:
                status = "stopped: hard time limit" if m.name == self.current else "skipped: budget"
                res["measurements"].append({"name": m.name, "what": m.what, "config": config_of(m, self.spec),
                                            "status": status, "environment": res["environment"]})
        by_name = {r["name"]: r for r in res["measurements"]}
        peak = res["peak_flops"]["flop_per_s"]
        counted = [(x.name, by_name[x.name]) for x in self.selected if "model_flops" in by_name[x.name]]
        for r, m in ((by_name[m.name], m) for m in self.selected):
            # its own count, else its twin's, else any run of the objective (model FLOPs do not depend on the levers)
            twins = [(n, c) for n, c in counted if n in (m.name, m.flops_from)] or [
                (n, c) for n, c in counted if c["config"]["objective"] == m.objective]
            if "step_time_s" in r and twins:
                r["model_flops"], r["flops_from"] = twins[0][1]["model_flops"], twins[0][0]
                r["achieved_tflop_per_s"] = r["model_flops"] / r["step_time_s"] / 1e12
                r["mfu"] = r["model_flops"] / r["step_time_s"] / peak
        res["elapsed_s"] = time.monotonic() - self.start
        if note:
            res["note"] = note
        write_atomic(self.output, res)
        return res


def config_of(m: Measurement, spec: Spec) -> dict:
    return {"objective": m.objective, "gradient_checkpointing": m.checkpointing, "compile": m.compile,
            "fsdp2": m.fsdp2, "lora_rank": spec.lora_rank, "batch": 1, "frames": spec.frames, "height": spec.height,
            "width": spec.width, "text_tokens": spec.text_len, "dtype": spec.dtype, "precision": spec.precision,
            "optimizer": "torch.optim.AdamW(lr=1e-4, weight_decay=0)"}


def write_atomic(output: Path, result: dict) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", markdown(result))):
        path = output.with_suffix(suffix)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# GPU check: the suite's steps at the Wan 2.1 1.3B size", "",
             f"{result['model']} ({result['denoiser_params'] or 0:,} transformer parameters, "
             f"{result['video_tokens']:,} video tokens). {env.get('gpu', env['device'])}, torch {env['torch']} "
             f"(CUDA {env['cuda']}), diffusers {env['diffusers']}, Lightning {env['lightning']}, peft {env['peft']}. "
             "Peak: "
             f"{result['peak_flops']['flop_per_s'] / 1e12:.1f} TFLOP/s ({result['peak_flops']['source']}).", "",
             "| measurement | what | status | step (s), median (min-max) | peak memory (GiB) | TFLOP/s | MFU | timed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["measurements"]:
        step = (f"{r['step_time_s']:.3f} ({r['step_time_min_s']:.3f}-{r['step_time_max_s']:.3f})"
                if "step_time_s" in r else "")
        mem = f"{r['peak_mem_gib']:.2f}" if isinstance(r.get("peak_mem_gib"), float) else ""
        tf = f"{r['achieved_tflop_per_s']:.1f}" if "achieved_tflop_per_s" in r else ""
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else ""
        status = r["status"] + (f": {r['error']}" if "error" in r else "")
        lines.append(f"| {r['name']} | {r['what']} | {status} | {step} | {mem} | {tf} | {mfu} | "
                     f"{r.get('steps_timed', '')} |")
    lines += ["", f"Method: {result['method']}.", "", f"Command: `{env['command']}`; {result['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)


def at_least_1(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, 1+1 steps: checks the code paths")
    parser.add_argument("--only", nargs="+", choices=NAMES, help="run only these measurements (in the usual order)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds from start; a watchdog ends the run at "
                        "budget + 30 s with what was measured")
    parser.add_argument("--warmup", type=at_least_1, default=None, help="untimed steps per measurement")
    parser.add_argument("--steps", type=at_least_1, default=None, help="timed steps per measurement")
    parser.add_argument("--output", default=None, help="path stem of the .json and .md files (default "
                        "benchmarks/results/gpu_check; with --smoke benchmarks/results/quick/gpu_check)")
    argv = sys.argv[1:] if argv is None else list(argv)
    start = time.monotonic()
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, nothing measured and no results written (run it on an H100/H200, "
              "or with --smoke on CPU)")
        return None
    spec = SMOKE if args.smoke else GPU
    spec = dataclasses.replace(spec, warmup=args.warmup or spec.warmup, steps=args.steps or spec.steps)
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    output = Path(args.output) if args.output else (RESULTS / "quick" / "gpu_check" if args.smoke
                                                     else RESULTS / "gpu_check")
    selected = [m for m in MEASUREMENTS if not args.only or m.name in args.only]
    from benchmarks.overhead import quiet

    quiet()
    env = environment(argv, device)
    c, t, h, w = 16, (spec.frames - 1) // 4 + 1, spec.height // 8, spec.width // 8
    p = spec.transformer["patch_size"]
    result = {"environment": env, "smoke": args.smoke, "model": spec.describe(), "model_config": spec.transformer,
              "latent_shape": [c, t, h, w], "video_tokens": t // p[0] * (h // p[1]) * (w // p[2]),
              "denoiser_params": None, "budget_s": args.budget, "peak_flops": peak_flops(device),
              "method": "the suite's training_step through Lightning, a fresh model per row, in this order; peak: "
              + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else "process RSS (CPU)") + " over the "
              "timed steps; MFU: model FLOPs (FlopCounterMode, checkpointing's recompute left out; compiled rows take "
              "their uncompiled twin's) / median step time / peak", "measurements": []}
    run = Run(result, selected, spec, output, start)
    hard_limit = args.budget + 30.0

    def watchdog() -> None:
        with run.lock:
            run.finish(note=f"stopped by the hard time limit ({hard_limit:.0f} s) during {run.current}")
        print(f"gpu_check: hard time limit of {hard_limit:.0f} s reached during {run.current}; wrote what was "
              f"measured to {output.with_suffix('.json')}", flush=True)
        os._exit(0)

    timer = threading.Timer(max(hard_limit - (time.monotonic() - start), 1.0), watchdog)
    timer.daemon = True
    if not args.smoke:  # never os._exit a process that runs the smoke test in-process
        timer.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pipeline = write_pipeline(Path(tmp) / "wan", spec)
            deadline = start + args.budget
            for m in selected:
                left = deadline - time.monotonic()
                if left < (0.0 if args.smoke else m.min_s):
                    print(f"gpu_check: {m.name} skipped: budget ({left:.0f} s left, needs {m.min_s:.0f})", flush=True)
                    continue  # recorded as "skipped: budget" by finish
                with run.lock:
                    run.current = m.name
                record = {"name": m.name, "what": m.what, "config": config_of(m, spec)}
                record.update(run_one(m, spec, pipeline, device, deadline, tmp))
                record["environment"] = env
                result["denoiser_params"] = result["denoiser_params"] or record.get("denoiser_params")
                run.add(record)
                got = f", {record['step_time_s']:.3f} s/step" if "step_time_s" in record else ""
                print(f"gpu_check: {m.name}: {record['status']}{got} {record.get('error', '')}", flush=True)
        with run.lock:
            timer.cancel()
            res = run.finish()
    finally:
        timer.cancel()
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
