"""Peers side by side: LoRA SFT step time and peak memory of this suite, finetrainers and DiffSynth-Studio.

    VIDEOALIGN_PEERS_ROOT=/work/peers python -m benchmarks.peers [--rounds 3] [--steps 8] [--quick]

Every framework trains a LoRA (rank 16 on ``to_q``, ``to_k``, ``to_v``, ``to_out.0``) on the identical tiny Wan 2.1
configuration and batch: one random-initialised transformer of 4.9 M parameters (4 blocks, width 256 in 2 heads of
128 as in Wan, FFN 1024, 16 latent channels, 1x2x2 patches) written once as a diffusers pipeline folder with a tiny
UMT5 text encoder, a word-level tokenizer and a tiny Wan VAE; one 29x128x128 clip (16x8x16x16 latents, 512 video
tokens) with its caption, padded to 512 text tokens as both peers do; batch 1; float32; AdamW (lr 1e-4); latents and
prompt embeddings precomputed once, so a step is the transformer's forward, backward and the optimizer step.

Variants, each in its own fresh process (peak RSS is the process's ``VmHWM``), interleaved round by round:

- ``suite``: this suite's ``SFT`` through a Lightning ``Trainer`` on precomputed ``latents`` and ``cond``;
- ``suite_compiled``: the same with the backbone's ``compile_blocks`` option (regional ``torch.compile`` of the
  transformer blocks, inductor; ``aot_eager`` under ``--quick``) and the suite's default optimizer (fused AdamW),
  paired with the *uncompiled* hand-written loop; its first two steps (compilation) are not timed;
- ``hand``: a minimal hand-written PyTorch loop (diffusers transformer + peft LoRA + AdamW), the yardstick;
- ``finetrainers``: ``finetrainers.SFTTrainer`` driven from Python (its wheel has no CLI) with its precomputation on;
- ``diffsynth``: DiffSynth-Studio's Wan ``train.py`` (from its repository: the wheel does not ship it) in its two
  stages, ``sft:data_process`` once before the rounds (untimed), then ``sft:train`` from that cache (timed); it always
  enables gradient checkpointing, so its yardstick is ``hand_gc@diffsynth``, the hand-written loop with per-block
  checkpointing, in DiffSynth's environment.

The peers live in their own virtual environments under ``$VIDEOALIGN_PEERS_ROOT`` (default ``/work/peers``; see
:data:`SETUP` for how they were made), whose torch may differ from this suite's, so the hand-written loop also runs
in each peer's environment (``hand@finetrainers``, ``hand_gc@diffsynth``), and every framework is compared with the
hand-written loop *in its own environment* (paired per round). Versions, patches applied from this
harness (never to the peers' installed files) and the reasons a peer could not run are written into the results.
Writes ``benchmarks/results/peers.{json,md}``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import write_result

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PEERS_ROOT = Path(os.environ.get("VIDEOALIGN_PEERS_ROOT", "/work/peers"))
PROMPT = "a red ball falls and bounces"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LR = 1e-4

# How the peers' environments were made (the exact commands; run them to reproduce).
SETUP = {
    "finetrainers": [
        "python3 -m venv {root}/finetrainers",
        "{root}/finetrainers/bin/pip install torch==2.15.0 torchvision==0.29.2 finetrainers==0.2.0 'datasets<3.4'",
        "the finetrainers package folder of tag v0.2.0 of its repository (a-r-r-o-w/finetrainers) extracted to "
        "{root}/src/finetrainers-v0.2.0/finetrainers (git archive v0.2.0 finetrainers | tar -x)",
    ],
    "diffsynth": [
        "python3 -m venv {root}/diffsynth",
        "{root}/diffsynth/bin/pip install torch==2.15.0 torchvision==0.29.2 diffsynth==2.1.12 diffusers==0.42.1",
        "examples/wanvideo/model_training/train.py of its repository (modelscope/DiffSynth-Studio) saved as "
        "{root}/src/diffsynth-train/train.py, the commit in {root}/src/diffsynth-train/COMMIT",
    ],
}


def mib_rss_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    """This process's peak resident memory: ``VmHWM`` (``ru_maxrss`` would be at least the parent's RSS at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sizes(quick: bool) -> dict:
    """The shared configuration (``quick``: a tiny one that only checks the harness runs)."""
    if quick:
        return {"transformer": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
                                    out_channels=16, text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2,
                                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
                "frames": 5, "height": 32, "width": 32, "text_len": 512, "rank": 4, "compile_backend": "aot_eager"}
    # 2 heads of 128 channels: Wan's head width, and one DiffSynth's RoPE split supports (it does not support 64)
    return {"transformer": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
                                out_channels=16, text_dim=32, freq_dim=256, ffn_dim=1024, num_layers=4,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
            "frames": 29, "height": 128, "width": 128, "text_len": 512, "rank": 16, "compile_backend": "inductor"}


# -- preparation (this suite's environment) ---------------------------------------------------------------------------
def prepare(work: Path, quick: bool) -> dict:
    """Write the pipeline, the one-clip dataset in the layouts the peers read, and the precomputed tensors."""
    import torch
    from safetensors.torch import save_file

    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
    from lit_videoalign.data.toyworld import ToyWorld
    from lit_videoalign.testing import TINY_TEXT_ENCODER, TINY_VAE, write_wan_pipeline
    from lit_videoalign.video_io import write_mp4

    cfg = sizes(quick)
    pipeline = write_wan_pipeline(work / "pipeline", transformer=cfg["transformer"], text_encoder=TINY_TEXT_ENCODER,
                                  vae=TINY_VAE)
    world = ToyWorld(cfg["frames"], cfg["height"], cfg["width"], max_balls=1)
    video = world.example(0).video  # (t, c, h, w) in [0, 1]
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_mp4(video, data / "clip0.mp4", fps=8)
    (data / "clip0.txt").write_text(PROMPT)
    bb = DiffusersVideoBackbone(str(pipeline), max_sequence_length=cfg["text_len"])
    with torch.no_grad():
        latents = bb.encode_videos(video[None])  # (1, 16, t', h', w'): the posterior mean, normalised
        cond = bb.encode_prompts([PROMPT])
    save_file({"latents": latents.contiguous(), "prompt_embeds": cond.prompt_embeds.contiguous(),
               "prompt_mask": cond.prompt_mask.contiguous()}, str(work / "precomputed.safetensors"))
    (work / "dataset.json").write_text(json.dumps({"datasets": [{
        "data_root": str(data), "dataset_type": "video",
        "video_resolution_buckets": [[cfg["frames"], cfg["height"], cfg["width"]]], "reshape_mode": "bicubic",
        "remove_common_llm_caption_prefixes": True}]}))
    return {"pipeline": str(pipeline), "latent_shape": list(latents.shape[1:]),
            "tokens": int(latents.shape[2] * latents.shape[3] * latents.shape[4] // 4),
            "transformer_params": sum(p.numel() for p in bb.denoiser.parameters())}


# -- workers ---------------------------------------------------------------------------------------------------------
def _load_precomputed(work: Path):
    from safetensors.torch import load_file

    return load_file(str(work / "precomputed.safetensors"))


def worker_hand(work: Path, steps: int, threads: int, cfg: dict, checkpointing: bool = False) -> dict:
    """The yardstick: diffusers transformer + peft LoRA + AdamW, flow matching with logit-normal sigmas; with
    ``checkpointing`` every transformer block is recomputed in the backward pass (as DiffSynth always does)."""
    import torch

    torch.set_num_threads(threads)
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    rss_imports = mib_rss_now()
    torch.manual_seed(0)
    model = WanTransformer3DModel.from_pretrained(str(work / "pipeline" / "transformer"))
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=cfg["rank"], lora_alpha=cfg["rank"], target_modules=LORA_TARGETS,
                                 init_lora_weights=True))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    data = _load_precomputed(work)
    x0, embeds = data["latents"], data["prompt_embeds"]
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sigma = torch.sigmoid(torch.randn(x0.shape[0]))  # logit-normal(0, 1)
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        pred = model(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=embeds, return_dict=False)[0]
        loss = (pred.float() - (noise - x0).float()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"steps_s": times, "rss_after_imports_mib": rss_imports, "peak_rss_mib": peak_mib(),
            "trainable_params": sum(p.numel() for p in params), "versions": _versions("torch", "diffusers", "peft")}


def worker_suite(work: Path, steps: int, threads: int, cfg: dict, compiled: bool = False) -> dict:
    """This suite's SFT through Lightning on precomputed latents and conditioning; ``compiled``: with its
    ``compile_blocks`` option and default optimizer."""
    import torch

    torch.set_num_threads(threads)
    import lightning as L

    from benchmarks.overhead import quiet
    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
    from lit_videoalign.objectives.sft import SFT

    quiet()
    rss_imports = mib_rss_now()
    L.seed_everything(0, verbose=False)
    bb = DiffusersVideoBackbone(str(work / "pipeline"), max_sequence_length=cfg["text_len"], compile_blocks=compiled)
    optimizer = {} if compiled else {"optimizer": lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.0)}
    model = SFT(bb, lora_rank=cfg["rank"], lora_target_modules=LORA_TARGETS, prompt_dropout=0.0,
                num_frames=cfg["frames"], height=cfg["height"], width=cfg["width"], **optimizer)
    if compiled and cfg["compile_backend"] != "inductor":  # else configure_model compiles them with inductor
        from lit_videoalign.strategies import compile_blocks

        compile_blocks(model, backend=cfg["compile_backend"])
    data = _load_precomputed(work)
    item = {"latents": data["latents"][0], "prompt": PROMPT,
            "cond": {"prompt_embeds": data["prompt_embeds"][0], "prompt_mask": data["prompt_mask"][0], "extra": {}}}
    starts: list[float] = []
    end = [0.0]

    class Timer(L.Callback):
        def on_train_batch_start(self, *args) -> None:
            starts.append(time.perf_counter())

        def on_train_batch_end(self, *args) -> None:
            end[0] = time.perf_counter()

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Timer()])
    trainer.fit(model, torch.utils.data.DataLoader([item] * steps, batch_size=1))
    ts = [*starts, end[0]]
    return {"steps_s": [b - a for a, b in zip(ts, ts[1:])], "rss_after_imports_mib": rss_imports,
            "peak_rss_mib": peak_mib(), "trainable_params": sum(p.numel() for p in model.parameters()
                                                                if p.requires_grad),
            "versions": _versions("torch", "lightning", "diffusers", "peft")}


class _ServeMissingModules:
    """Import hook: serve the finetrainers modules its 0.2.0 wheel lacks from the v0.2.0 tag of its repository."""

    PREFIXES = ("finetrainers.patches.dependencies", "finetrainers.patches.models")

    def __init__(self, tree: Path) -> None:
        self.tree = tree

    def find_spec(self, name, path, target=None):
        import importlib.machinery
        import importlib.util

        if not name.startswith(self.PREFIXES):
            return None
        base = self.tree.joinpath(*name.split("."))
        if (base / "__init__.py").is_file():
            return importlib.util.spec_from_file_location(name, base / "__init__.py",
                                                          submodule_search_locations=[str(base)])
        if base.with_suffix(".py").is_file():
            return importlib.util.spec_from_file_location(name, base.with_suffix(".py"))
        if base.is_dir():  # a folder without __init__.py in the tag: a namespace package
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(base)]
            return spec
        return None


def worker_finetrainers(work: Path, steps: int, threads: int, cfg: dict) -> dict:
    import torch

    torch.set_num_threads(threads)
    patches = []
    tree = PEERS_ROOT / "src" / "finetrainers-v0.2.0"
    sys.meta_path.insert(0, _ServeMissingModules(tree))
    patches.append(f"import hook serving finetrainers.patches.dependencies.* and finetrainers.patches.models.* from "
                   f"the v0.2.0 tag of the repository ({tree}): the 0.2.0 wheel lacks them")
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)
    patches.append("WORLD_SIZE=1 (and RANK, LOCAL_RANK) in the environment: otherwise the world size is "
                   "torch.cuda.device_count(), 0 on a machine without CUDA")
    if not torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
        patches.append("torch.cuda.reset_peak_memory_stats made a no-op (called on the precomputation path)")
    import torchvision.io

    if not hasattr(torchvision.io, "video_reader"):
        import types

        torchvision.io.video_reader = types.SimpleNamespace(VideoReader=type("VideoReader", (), {}))
        patches.append(f"torchvision.io.video_reader.VideoReader stubbed with an empty class (torchvision "
                       f"{torchvision.__version__} removed it; finetrainers only uses it in isinstance checks, videos "
                       "are decoded by decord)")
    import finetrainers
    import finetrainers.utils
    import finetrainers.utils.memory

    if not torch.cuda.is_available():
        finetrainers.utils.get_memory_statistics = lambda *a, **k: {}
        finetrainers.utils.memory.get_memory_statistics = finetrainers.utils.get_memory_statistics
        patches.append("finetrainers.utils.get_memory_statistics returns {} (it calls round(None) without CUDA)")
    from finetrainers import BaseArgs, SFTTrainer, TrainingType
    from finetrainers.models.wan import WanModelSpecification
    from finetrainers.trainer.sft_trainer.config import SFTLowRankConfig

    rss_imports = mib_rss_now()
    out = work / "finetrainers_out"
    args = BaseArgs()
    args.register_args(SFTLowRankConfig()) if hasattr(args, "register_args") else None
    values = dict(
        parallel_backend="accelerate", model_name="wan", pretrained_model_name_or_path=str(work / "pipeline"),
        text_encoder_dtype=torch.float32, transformer_dtype=torch.float32, vae_dtype=torch.float32,
        dataset_config=str(work / "dataset.json"), enable_precomputation=True, precomputation_items=steps,
        precomputation_dir=str(out / "precomputed"), dataloader_num_workers=0, training_type=TrainingType.LORA,
        seed=0, batch_size=1, train_steps=steps, rank=cfg["rank"], lora_alpha=cfg["rank"],
        target_modules=LORA_TARGETS, optimizer="adamw", lr=LR, lr_scheduler="constant", beta1=0.9, beta2=0.999,
        weight_decay=0.0, epsilon=1e-8, max_grad_norm=1e9, flow_weighting_scheme="logit_normal",
        checkpointing_steps=10**9, validation_steps=10**9, output_dir=str(out), report_to="none", logging_steps=10**9,
        compile_scopes=[], compile_modules=[], gradient_checkpointing=False, verbose=0)
    for key, value in values.items():
        setattr(args, key, value)
    spec = WanModelSpecification(pretrained_model_name_or_path=str(work / "pipeline"),
                                 text_encoder_dtype=torch.float32, transformer_dtype=torch.float32,
                                 vae_dtype=torch.float32)
    trainer = SFTTrainer(args, spec)
    stamps: list[float] = []
    prepare_checkpointing = trainer._prepare_checkpointing

    def timed_checkpointing() -> None:  # time each step at its end (the checkpointer is called once per step)
        prepare_checkpointing()
        save = trainer.checkpointer.save

        def stamp(*a, **k):
            if not k.get("force"):
                stamps.append(time.perf_counter())
            return save(*a, **k)

        trainer.checkpointer.save = stamp

    trainer._prepare_checkpointing = timed_checkpointing
    patches.append("SFTTrainer.checkpointer.save wrapped to record the time at the end of every step (no change "
                   "in behaviour)")
    trainer.run()
    trainable = trainer.state.num_trainable_parameters
    return {"steps_s": [b - a for a, b in zip(stamps, stamps[1:])], "rss_after_imports_mib": rss_imports,
            "peak_rss_mib": peak_mib(), "trainable_params": trainable, "patches": patches,
            "versions": _versions("torch", "finetrainers", "diffusers", "peft", "datasets")}


def _diffsynth_setup(work: Path, cfg: dict, patches: list[str]) -> dict:
    """DiffSynth's native-format model files of the shared configuration, registered by hash (in this process)."""
    import torch

    os.environ["DIFFSYNTH_SKIP_DOWNLOAD"] = "True"
    from diffsynth.configs import model_configs as registry
    from diffsynth.core.loader.file import hash_model_file
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder
    from diffsynth.models.wan_video_vae import WanVideoVAE
    from safetensors.torch import save_file

    t = cfg["transformer"]
    dit_kwargs = {"has_image_input": False, "patch_size": list(t["patch_size"]), "in_dim": t["in_channels"],
                  "dim": t["num_attention_heads"] * t["attention_head_dim"], "ffn_dim": t["ffn_dim"],
                  "freq_dim": t["freq_dim"], "text_dim": t["text_dim"], "out_dim": t["out_channels"],
                  "num_heads": t["num_attention_heads"], "num_layers": t["num_layers"], "eps": 1e-6}
    te = json.loads((work / "pipeline" / "text_encoder" / "config.json").read_text())
    te_kwargs = {"vocab": te["vocab_size"], "dim": te["d_model"], "dim_attn": te["d_kv"] * te["num_heads"],
                 "dim_ffn": te["d_ff"], "num_heads": te["num_heads"], "num_layers": te["num_layers"]}
    folder = work / "diffsynth_models"
    folder.mkdir(exist_ok=True)
    files = {"dit": folder / "dit.safetensors", "text_encoder": folder / "text_encoder.safetensors",
             "vae": folder / "vae.safetensors"}
    builders = {"dit": lambda: WanModel(**dit_kwargs), "text_encoder": lambda: WanTextEncoder(**te_kwargs),
                "vae": lambda: WanVideoVAE(z_dim=16)}
    for name, path in files.items():
        if not path.exists():
            torch.manual_seed(0)
            state = {k: v.contiguous() for k, v in builders[name]().state_dict().items()}
            save_file(state, str(path))
    entries = [
        {"model_hash": hash_model_file(str(files["dit"])), "model_name": "wan_video_dit",
         "model_class": "diffsynth.models.wan_video_dit.WanModel", "extra_kwargs": dit_kwargs},
        {"model_hash": hash_model_file(str(files["text_encoder"])), "model_name": "wan_video_text_encoder",
         "model_class": "diffsynth.models.wan_video_text_encoder.WanTextEncoder", "extra_kwargs": te_kwargs},
        {"model_hash": hash_model_file(str(files["vae"])), "model_name": "wan_video_vae",
         "model_class": "diffsynth.models.wan_video_vae.WanVideoVAE"},
    ]
    registry.MODEL_CONFIGS.extend(entries)
    patches.append("diffsynth.configs.model_configs.MODEL_CONFIGS extended with the md5 key/shape hashes of the tiny "
                   f"DiT ({dit_kwargs}), text encoder ({te_kwargs}) and VAE (z_dim 16; its width 96 is fixed in "
                   "DiffSynth), written in DiffSynth's own format with random weights: DiffSynth recognises models "
                   "only by these hashes")
    patches.append("DIFFSYNTH_SKIP_DOWNLOAD=True; --tokenizer_path points at the shared pipeline's tokenizer")
    return {k: str(v) for k, v in files.items()}


def _run_diffsynth_train(argv: list[str], patches: list[str]) -> None:
    """Run DiffSynth's Wan training script (from its repository: the wheel does not ship it) as ``__main__``."""
    import runpy
    import types

    import torch

    if "librosa" not in sys.modules:
        try:
            import librosa  # noqa: F401
        except ImportError:
            stub = types.ModuleType("librosa")
            stub.load = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("librosa is not installed"))
            sys.modules["librosa"] = stub
            patches.append("a stub `librosa` module whose load() raises (train.py builds an audio loader with "
                           "librosa.load from the `audio` extra; no audio is loaded here)")
    from diffsynth.pipelines import wan_video

    original = wan_video.WanVideoPipeline.from_pretrained

    def float32_from_pretrained(*args, **kwargs):
        kwargs["torch_dtype"] = torch.float32
        return original(*args, **kwargs)

    wan_video.WanVideoPipeline.from_pretrained = staticmethod(float32_from_pretrained)
    patches.append("WanVideoPipeline.from_pretrained called with torch_dtype=float32 (train.py hard-codes bf16)")
    script = PEERS_ROOT / "src" / "diffsynth-train" / "train.py"
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


def worker_diffsynth(work: Path, steps: int, threads: int, cfg: dict, prepare_only: bool = False) -> dict:
    """DiffSynth-Studio's two-stage LoRA SFT: ``sft:data_process`` caches the VAE latents and prompt embeddings once
    (untimed, skipped when the cache exists), then ``sft:train`` trains from the cache (timed)."""
    import torch

    torch.set_num_threads(threads)
    patches: list[str] = []
    files = _diffsynth_setup(work, cfg, patches)
    import diffsynth.diffusion.logger as dlogger

    rss_imports = mib_rss_now()
    common = ["--model_paths", json.dumps([files["dit"], files["text_encoder"], files["vae"]]),
              "--tokenizer_path", str(work / "pipeline" / "tokenizer"), "--height", str(cfg["height"]),
              "--width", str(cfg["width"]), "--num_frames", str(cfg["frames"]), "--lora_base_model", "dit",
              "--lora_target_modules", "self_attn.q,self_attn.k,self_attn.v,self_attn.o,cross_attn.q,cross_attn.k,"
              "cross_attn.v,cross_attn.o", "--lora_rank", str(cfg["rank"]), "--learning_rate", str(LR),
              "--weight_decay", "0", "--dataset_num_workers", "0", "--initialize_model_on_cpu"]
    cache = work / "diffsynth_cache"
    if prepare_only:
        (work / "diffsynth_metadata.csv").write_text(f"video,prompt\nclip0.mp4,{PROMPT}\n")
        _run_diffsynth_train([*common, "--task", "sft:data_process", "--dataset_base_path", str(work / "data"),
                              "--dataset_metadata_path", str(work / "diffsynth_metadata.csv"), "--output_path",
                              str(cache), "--dataset_repeat", "1"], patches)
        return {"cache": [str(p) for p in cache.rglob("*.pth")], "patches": patches}
    common[1] = json.dumps([files["dit"]])  # the train stage reads the cache: only the DiT is loaded
    stamps: list[float] = []
    on_step_end = dlogger.ModelLogger.on_step_end

    def stamp(self, *a, **k):
        stamps.append(time.perf_counter())
        return on_step_end(self, *a, **k)

    dlogger.ModelLogger.on_step_end = stamp
    patches.append("diffsynth ModelLogger.on_step_end wrapped to record the time at the end of every step (no change "
                   "in behaviour)")
    _run_diffsynth_train([*common, "--task", "sft:train", "--dataset_base_path", str(cache), "--output_path",
                          str(work / "diffsynth_out"), "--dataset_repeat", str(steps), "--num_epochs", "1"], patches)
    return {"steps_s": [b - a for a, b in zip(stamps, stamps[1:])], "rss_after_imports_mib": rss_imports,
            "peak_rss_mib": peak_mib(), "trainable_params": None, "patches": list(dict.fromkeys(patches)),
            "versions": _versions("torch", "diffsynth", "accelerate", "peft")}


def _versions(*names: str) -> dict:
    import importlib.metadata as md

    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


WORKERS = {"hand": worker_hand, "hand_gc": lambda *a: worker_hand(*a, checkpointing=True), "suite": worker_suite,
           "suite_compiled": lambda *a: worker_suite(*a, compiled=True),
           "finetrainers": worker_finetrainers, "diffsynth": worker_diffsynth,
           "diffsynth_prepare": lambda *a: worker_diffsynth(*a, prepare_only=True)}


# variant -> (environment, yardstick it is paired with, steps left out of the timing)
VARIANTS = {
    "suite": ("suite", "hand", 2),
    "suite_compiled": ("suite", "hand", 3),
    "hand": ("suite", None, 2),
    "finetrainers": ("finetrainers", "hand@finetrainers", 1),
    "hand@finetrainers": ("finetrainers", None, 2),
    "diffsynth": ("diffsynth", "hand_gc@diffsynth", 1),
    "hand_gc@diffsynth": ("diffsynth", None, 2),
}
WHAT = {
    "suite": "this suite: `SFT` through Lightning, precomputed latents and conditioning",
    "suite_compiled": "the same with `compile_blocks` (regional torch.compile) and the default fused AdamW; ratio to "
                      "the *uncompiled* hand-written loop",
    "hand": "hand-written loop (this suite's environment)",
    "finetrainers": "finetrainers 0.2.0 `SFTTrainer`, precomputation on",
    "hand@finetrainers": "hand-written loop (finetrainers' environment)",
    "diffsynth": "DiffSynth-Studio `train.py`, `sft:train` from its cache (gradient checkpointing always on)",
    "hand_gc@diffsynth": "hand-written loop with per-block gradient checkpointing (DiffSynth's environment)",
}


DIFFERENCES = [
    "DiffSynth runs its own implementations of the Wan DiT, UMT5 and VAE: the DiT has the same configuration and "
    "shapes but its own random weights, its cached latents and prompt embeddings have the same shapes but come from "
    "its own VAE (width 96, fixed in DiffSynth) and text encoder; the other variants share one diffusers pipeline.",
    "DiffSynth always enables gradient checkpointing (train.py forces it), so it is compared with the hand-written "
    "loop with per-block checkpointing; the suite and finetrainers run without it, as configured here.",
    "finetrainers computes the gradient norm every step (clipping at max_grad_norm, set to 1e9 here so it never "
    "clips), reloads its precomputed items from disk, samples latents from the stored VAE posterior each step and "
    "routes attention through its own dispatcher (it replaces F.scaled_dot_product_attention globally); DiffSynth "
    "unpickles its cached inputs every step and draws timesteps from its scheduler's grid with its training "
    "weights. These are the frameworks' own per-step costs and are part of what is measured.",
    "This suite's step includes its non-finite guard (a finiteness check of the loss and of every gradient) and "
    "Lightning's loop; the suite loads the whole pipeline (text encoder and VAE too), which its peak RSS includes.",
]


def python_of(env: str) -> Path:
    return Path(sys.executable) if env == "suite" else PEERS_ROOT / env / "bin" / "python"


def run_worker(variant: str, work: Path, steps: int, threads: int, quick: bool) -> dict:
    env_name = VARIANTS[variant][0] if variant in VARIANTS else "diffsynth"
    worker = variant.split("@")[0]
    python = python_of(env_name)
    cmd = [str(python), "-m", "benchmarks.peers", "--worker", worker, "--work", str(work), "--steps", str(steps),
           "--threads", str(threads), *(["--quick"] if quick else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"),  # cold in the first round, warm in the next ones
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("PEER_RESULT ")]
    if res.returncode or not lines:
        tail = (res.stderr or res.stdout).strip().splitlines()[-6:]
        return {"error": f"exit {res.returncode}: " + " | ".join(tail)[-1500:]}
    return json.loads(lines[-1][len("PEER_RESULT "):])


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = ["# Peers side by side: LoRA SFT step time and peak memory", "",
             f"Shared configuration: {cfg['describe']}. {cfg['rounds']} rounds, each variant in a fresh process per "
             f"round, {cfg['steps']} steps per process of which the first ones (model loading, precomputation, "
             "warm-up) are not timed; step time = median over rounds of each process's median step; ratio = median "
             "over rounds of the per-round ratio to the hand-written loop *in the same environment*. "
             f"Machine: {result['machine']}" + (f" ({cfg['note']})" if cfg.get("note") else "") + ".", "",
             "| variant | what runs | torch | step (s) | vs hand-written loop | peak RSS (MiB) | RSS after imports "
             "(MiB) |", "|---|---|---|---|---|---|---|"]
    for name, r in result["variants"].items():
        if "error" in r:
            lines.append(f"| {name} | {WHAT[name]} | - | **could not run** | - | - | - |")
            continue
        ratio = f"{r['ratio']['median']:.2f}x ({r['ratio']['min']:.2f}-{r['ratio']['max']:.2f})" if "ratio" in r \
            else "(yardstick)"
        step, peak = r["step_s"], r["peak_rss_mib"]["median"]
        lines.append(f"| {name} | {WHAT[name]} | {r['versions'].get('torch')} | {step['median']:.3f} "
                     f"({step['min']:.3f}-{step['max']:.3f}) | {ratio} | {peak:.0f} "
                     f"| {r['rss_after_imports_mib']['median']:.0f} |")
    compiled = result["variants"].get("suite_compiled", {})
    if "runs" in compiled:
        first = [row["steps_s"][0] for row in compiled["runs"]]
        lines += ["", f"`suite_compiled` compiles the blocks ({cfg.get('compile_backend')}) in its first step, not "
                  f"timed: {first[0]:.1f} s in the first round (a fresh cache: a cold compile)"
                  + (f", {statistics.median(first[1:]):.1f} s in the next ones (warm cache)." if first[1:] else ".")]
    lines += ["", "Peak RSS is the whole process (`VmHWM`): imports, every model the framework loads (this suite's "
              "backbone also holds the tiny text encoder and VAE; finetrainers loads them for its precomputation and "
              "frees them; DiffSynth's train stage loads only the DiT), optimizer state and activations.", ""]
    lines += ["## What still differs between the variants", ""] + [f"- {d}" for d in DIFFERENCES] + [""]
    errors = {n: r["error"] for n, r in result["variants"].items() if "error" in r}
    if errors:
        lines += ["## Could not run", ""] + [f"- **{n}**: {e}" for n, e in errors.items()] + [""]
    lines += ["## Versions, environments and patches", ""]
    for name, r in result["variants"].items():
        if "versions" in r:
            lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    lines += ["", "Patches (all applied by this harness in the peer's own process; no installed file was edited):", ""]
    for peer, patches in result["patches"].items():
        lines += [f"- {peer}:"] + [f"  - {p}" for p in patches]
    lines += ["", "Environments (commands run to make them):", ""]
    for peer, cmds in result["setup"].items():
        lines += [f"- {peer}:"] + [f"  - `{c}`" for c in cmds]
    lines += ["", f"DiffSynth's `train.py` is taken from its repository at commit {result.get('diffsynth_commit')} "
              "(the wheel does not ship it).", "", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps per process (the first ones are not timed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="tiny model, one round (checks the harness runs)")
    parser.add_argument("--note", default="", help="free text about the machine, written into the results")
    parser.add_argument("--output", default=str(RESULTS / "peers"), help="path stem of the .json and .md files")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.worker:
        row = WORKERS[args.worker](Path(args.work), args.steps, args.threads, sizes(args.quick))
        print("PEER_RESULT " + json.dumps(row))
        return {}
    if args.quick:
        args.rounds, args.steps = 1, 4
    cfg = sizes(args.quick)
    load_start = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    missing = {}
    for variant in args.variants:
        env = VARIANTS[variant][0]
        if not python_of(env).exists():
            missing[variant] = (f"no environment at {python_of(env).parent.parent}: make it with the commands under "
                                f"'Environments' (benchmarks.peers.SETUP)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        info = prepare(work, args.quick)
        prep_patches: list[str] = []
        if any(v.startswith("diffsynth") for v in args.variants) and "diffsynth" not in missing:
            prep = run_worker("diffsynth_prepare", work, 1, args.threads, args.quick)
            if "error" in prep:
                missing["diffsynth"] = "its data-processing stage failed: " + prep["error"]
            else:
                prep_patches = prep["patches"]
        for r in range(args.rounds):
            order = args.variants if r % 2 == 0 else list(reversed(args.variants))
            for variant in order:
                if variant in missing:
                    continue
                row = run_worker(variant, work, args.steps, args.threads, args.quick)
                runs[variant].append(row)
                if "error" in row:
                    print(f"round {r + 1} {variant}: FAILED {row['error'][-300:]}", flush=True)
                else:
                    # hand and suite time every step from the first; the peers' stamps start after their first
                    row["timed_s"] = row["steps_s"][VARIANTS[variant][2] - 1:]
                    print(f"round {r + 1} {variant}: step {statistics.median(row['timed_s']):.3f} s, peak RSS "
                          f"{row['peak_rss_mib']:.0f} MiB", flush=True)
    variants: dict[str, dict] = {}
    for name in args.variants:
        rows = [row for row in runs[name] if "error" not in row]
        if name in missing or not rows:
            variants[name] = {"error": missing.get(name) or next(row["error"] for row in runs[name])}
            continue
        variants[name] = {"step_s": stats([statistics.median(row["timed_s"]) for row in rows]),
                          "peak_rss_mib": stats([row["peak_rss_mib"] for row in rows]),
                          "rss_after_imports_mib": stats([row["rss_after_imports_mib"] for row in rows]),
                          "versions": rows[0]["versions"], "trainable_params": rows[0].get("trainable_params"),
                          "runs": rows}
    for name, (_, yardstick, _) in VARIANTS.items():
        if name in variants and yardstick in variants and "error" not in variants[name] \
                and "error" not in variants[yardstick]:
            pairs = zip(variants[name]["runs"], variants[yardstick]["runs"])
            variants[name]["ratio"] = stats([statistics.median(a["timed_s"]) / statistics.median(b["timed_s"])
                                             for a, b in pairs])
    patches = {"finetrainers": next((row.get("patches", []) for row in runs.get("finetrainers", [])
                                     if "patches" in row), []),
               "diffsynth": list(dict.fromkeys(prep_patches + next((row.get("patches", []) for row in
                                                                     runs.get("diffsynth", []) if "patches" in row),
                                                                    [])))}
    commit = PEERS_ROOT / "src" / "diffsynth-train" / "COMMIT"
    t = cfg["transformer"]
    result = {
        "command": "python -m benchmarks.peers " + shlex.join(argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch "
                   f"thread(s), Python {platform.python_version()}; load average (1 min) {load_start:.2f} at the "
                   f"start, {os.getloadavg()[0]:.2f} at the end",
        "config": {"describe": f"Wan transformer {info['transformer_params']:,} parameters ({t['num_layers']} blocks, "
                               f"{t['num_attention_heads']} heads x {t['attention_head_dim']}, FFN {t['ffn_dim']}), "
                               f"{cfg['frames']}x{cfg['height']}x{cfg['width']} clip -> latents "
                               f"{'x'.join(map(str, info['latent_shape']))} ({info['tokens']} video tokens), "
                               f"{cfg['text_len']} text tokens, batch 1, LoRA rank {cfg['rank']} on attention q/k/v/o "
                               "(self and cross), AdamW lr 1e-4, float32",
                   "rounds": args.rounds, "steps": args.steps, "quick": args.quick, "note": args.note,
                   "compile_backend": cfg["compile_backend"],
                   "peers_root": str(PEERS_ROOT)},
        "variants": variants,
        "patches": patches,
        "setup": {k: [c.format(root=PEERS_ROOT) for c in v] for k, v in SETUP.items()},
        "diffsynth_commit": commit.read_text().strip() if commit.exists() else None,
    }
    return write_result(result, args.output, markdown)


if __name__ == "__main__":
    main()
