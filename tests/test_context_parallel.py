"""Context parallelism on 2 CPU processes (gloo, Ulysses over SDPA): the tiny Wan denoiser's output and summed
parameter gradients equal one process's (an uneven split's output too); SFT, LoRA SFT, DPO (a frozen reference copy),
GRPO (rollouts sampled under CP), DiffusionNFT (its EMA "old" policy as a frozen copy, and as a LoRA adapter), DMD (a
critic and a teacher copy) and LoRA consistency distillation (an EMA adapter) through Lightning's
``ContextParallelStrategy`` equal the same runs in one process (losses and trained weights); a run resumed from its
step-2 distributed checkpoint ends bit-identical to the uninterrupted run; the sharded checkpoint loads into one
process; CP peers share their random state; the backbone's ``supports_context_parallel`` decides; and every bad input
gets its one-line error before any work.

The 2-process half runs this file as a script (``python tests/test_context_parallel.py OUT PIPELINE``), started twice
with the environment Lightning reads for externally launched processes, as ``tests/test_fsdp2.py`` does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from gloo_ranks import run_ranks
from torch.utils.data import DataLoader, Dataset

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.context_parallel import (
    ContextParallelStrategy,
    check_degrees,
    check_denoiser,
    check_token_count,
    context_parallel_mesh,
)
from lit_videoalign.data.toyworld import ToyWorld
from lit_videoalign.objectives.consistency import ConsistencyDistillation
from lit_videoalign.objectives.dmd import DMD
from lit_videoalign.objectives.dpo import DPO
from lit_videoalign.objectives.grpo import GRPO
from lit_videoalign.objectives.nft import DiffusionNFT
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.strategies import apply_fsdp2, denoiser_copies
from lit_videoalign.testing import Brightness

WORLD, STEPS, BATCH = 2, 2, 2
# A tiny Wan denoiser: 2 heads (Ulysses 2 puts one on each rank), 2 blocks, latents 4x2x8x8 -> 2x4x4 = 32 tokens.
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
           rope_max_seq_len=32)


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**WAN)


def denoiser_inputs(odd: bool = False) -> dict:
    """Latents of 2x4x4 = 32 tokens, or with ``odd`` 1x3x3 = 9 (which 2 does not divide)."""
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(2, 4, 2, 8, 8, generator=g), "timestep": torch.tensor([300.0, 700.0]),
              "encoder_hidden_states": torch.randn(2, 8, 32, generator=g)}
    if odd:
        inputs["hidden_states"] = inputs["hidden_states"][:, :, :1, :6, :6]
    return inputs


def forward_backward(model, odd: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(**denoiser_inputs(odd), return_dict=False)[0]
    out.square().mean().backward()  # a loss over the whole (gathered) sequence
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


class Clips(Dataset):
    def __init__(self, size: int) -> None:
        self.world, self.size = ToyWorld(), size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        ex = self.world.example(2000 + i)
        return {"video": ex.video, "prompt": ex.prompt}


class Recording:
    """An objective, unchanged (noise, sigmas and prompt dropout from the global RNG), recording each step's loss."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []

    def setup(self, stage: str) -> None:
        # Lightning reseeds (``reset_seed``) when it starts a process group, after the model is built; reseed the
        # one-process run at the same point, so both start training from the same random state.
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


class RecordingSFT(Recording, SFT):
    pass


class RecordingDPO(Recording, DPO):
    pass


class RecordingGRPO(Recording, GRPO):
    pass


class RecordingNFT(Recording, DiffusionNFT):
    pass


class RecordingDMD(Recording, DMD):
    pass


class RecordingConsistency(Recording, ConsistencyDistillation):
    pass


class Prompts(Dataset):
    def __init__(self, size: int) -> None:
        self.world, self.size = ToyWorld(), size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.world.example(4000 + i).prompt}


class Pairs(Dataset):
    """Toy-world clips preferred over the same scenes without gravity."""

    def __init__(self, size: int) -> None:
        self.world, self.size = ToyWorld(max_balls=1), size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        ex = self.world.example(3000 + i)
        bad = self.world.corrupt(ex, "gravity_zero", torch.Generator().manual_seed(i))
        return {"prompt": ex.prompt, "chosen": ex.video, "rejected": bad.video}


# tag: (objective, its arguments, dataset, SGD learning rate). SGD, not Adam: Adam's update hardly depends on the
# gradient's scale, SGD's is proportional to it. DPO trains all weights, so its frozen reference is a second copy;
# GRPO samples its rollouts (2 Euler steps, CFG) under context parallelism before the update.
RUNS = {"sft": (RecordingSFT, {"prompt_dropout": 0.5}, Clips, 0.5),
        "lora": (RecordingSFT, {"prompt_dropout": 0.5, "lora_rank": 4}, Clips, 0.5),
        "dpo": (RecordingDPO, {"beta": 1000.0}, Pairs, 0.01),
        "grpo": (RecordingGRPO, {"reward": "brightness", "lora_rank": 4, "group_size": 2, "num_sampling_steps": 2,
                                 "num_inference_steps": 2}, Prompts, 1.0),
        # NFT's EMA "old" policy (sampling and v_old): a frozen denoiser copy when full, an adapter role under LoRA
        "nft": (RecordingNFT, {"reward": "brightness", "group_size": 2, "num_sampling_steps": 2,
                               "num_inference_steps": 2, "old_decay_rate": 0.3}, Prompts, 0.05),
        "nft_lora": (RecordingNFT, {"reward": "brightness", "lora_rank": 4, "group_size": 2, "num_sampling_steps": 2,
                                    "num_inference_steps": 2, "old_decay_rate": 0.3}, Prompts, 1.0),
        # DMD: the trained critic and the frozen teacher (reference) are copies; one batch is 2 optimizer steps
        # (critic, generator), so its 2 steps are one batch
        "dmd": (RecordingDMD, {"teacher_guidance_scale": 2.0, "num_inference_steps": 2}, Prompts, 0.05),
        "consistency": (RecordingConsistency, {"lora_rank": 4, "teacher_guidance_scale": 2.0, "num_timesteps": 4,
                                               "skip_steps": 2, "num_inference_steps": 2}, Prompts, 1.0)}
RESUME_STEPS = 4  # SFT with AdamW, one shuffled epoch of 4 batches: stop after step 2, resume mid-epoch


def make_model(pipeline: str, tag: str):
    cls, kwargs, _, lr = RUNS[tag]
    if kwargs.get("reward") == "brightness":
        kwargs = {**kwargs, "reward": Brightness()}
    return cls(DiffusersVideoBackbone(pipeline, max_sequence_length=16),
               optimizer=lambda p: torch.optim.SGD(p, lr=lr), **kwargs)


def fit_run(pipeline: str, tag: str, strategy="auto", devices: int = 1):
    L.seed_everything(0)
    model = make_model(pipeline, tag)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(model, DataLoader(RUNS[tag][2](STEPS * BATCH), batch_size=BATCH, shuffle=False))
    return model


def resume_run(pipeline: str, ckpt_dir: Path, ckpt_path: Path | None = None):
    """SFT (prompt dropout, AdamW) for RESUME_STEPS steps under CP 2, a distributed checkpoint every 2 steps; the
    loader's place in its shuffled epoch is checkpointed too (``ResumableDataLoader``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_videoalign.data.resumable import ResumableDataLoader

    L.seed_everything(0)
    model = RecordingSFT(DiffusersVideoBackbone(pipeline, max_sequence_length=16), prompt_dropout=0.5,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    strategy = ContextParallelStrategy(context_parallel_size=WORLD, process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=RESUME_STEPS, logger=False,
                        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=2,
                                                   save_top_k=-1)],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, use_distributed_sampler=False)
    data = ResumableDataLoader(Clips(RESUME_STEPS * BATCH), batch_size=BATCH, shuffle=True,
                               generator=torch.Generator().manual_seed(0))
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


class NoCPBackbone(DiffusersVideoBackbone):
    supports_context_parallel = False  # declared, as a backbone whose denoiser has no _cp_plan would


# -- the 2-process worker ------------------------------------------------------------------------------------------
def worker(out: Path, pipeline: str) -> None:
    import random

    import numpy as np
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lit_videoalign.context_parallel import enable_context_parallel, synchronize_rng

    torch.set_num_threads(1)
    rank = int(os.environ["LOCAL_RANK"])
    report: dict = {}
    # 1. the bare denoiser, Ulysses 2: output gathered on every rank, each rank's gradient a part of the sum.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = context_parallel_mesh(WORLD, WORLD)
    model = tiny_wan()
    assert enable_context_parallel(model, mesh) and not enable_context_parallel(model, mesh)
    output, grads = forward_backward(model)
    summed = {}
    for name, grad in grads.items():
        summed[name] = grad.clone()
        dist.all_reduce(summed[name])
    # An uneven split (9 tokens over 2 ranks: 5 + 4), without gradients: diffusers has no backward for it.
    uneven = tiny_wan()
    enable_context_parallel(uneven, context_parallel_mesh(WORLD, WORLD, uneven=True))
    try:
        uneven(**denoiser_inputs(odd=True), return_dict=False)
        report["uneven_grad_error"] = None
    except ValueError as e:
        report["uneven_grad_error"] = str(e)
    with torch.no_grad():
        uneven_output = uneven(**denoiser_inputs(odd=True), return_dict=False)[0]
    report["uneven_mode"] = uneven._parallel_config.context_parallel_config.ulysses_anything
    # The random state: ranks seeded apart draw the same numbers after synchronize_rng (torch, numpy, random).
    torch.manual_seed(rank), np.random.seed(rank), random.seed(rank)
    synchronize_rng(dist.group.WORLD)
    report["draws"] = [torch.rand(1).item(), float(np.random.rand()), random.random()]
    if rank == 0:
        save_file({"output": output, "uneven_output": uneven_output, **{f"local.{n}": g for n, g in grads.items()},
                   **{f"sum.{n}": g for n, g in summed.items()}}, str(out / "denoiser.safetensors"))
    # 2. bad input at the first forward: a token count the degree does not divide; ranks given different noise.
    errors = {}
    for case in ("tokens", "inputs"):
        fresh = tiny_wan()
        enable_context_parallel(fresh, mesh)
        inputs = denoiser_inputs(odd=case == "tokens")
        if case == "inputs":
            inputs["hidden_states"] = inputs["hidden_states"] + rank
        try:
            fresh(**inputs, return_dict=False)
            errors[case] = None
        except (ValueError, RuntimeError) as e:
            errors[case] = str(e)
    report["errors"] = errors

    # 3. SFT through Lightning, full and LoRA: ContextParallelStrategy builds its own mesh on the process group
    # (Lightning keeps an initialised one; a second group on the same port would hang).
    for tag in RUNS:
        strategy = ContextParallelStrategy(context_parallel_size=WORLD, process_group_backend="gloo")
        sft = fit_run(pipeline, tag, strategy, devices=WORLD)
        state = get_model_state_dict(sft, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        report[tag] = {"losses": sft.losses, "copies": [c._parallel_config is not None for c in denoiser_copies(sft)]}
        report[tag]["num_copies"] = len(denoiser_copies(sft))
        report["mesh"] = {"dims": list(strategy.device_mesh.mesh_dim_names), "shape": list(strategy.device_mesh.shape),
                          "sampler": strategy.distributed_sampler_kwargs}
        if rank == 0:
            save_file({k: v.clone().contiguous() for k, v in state.items() if k.startswith("backbone.denoiser.")},
                      str(out / f"{tag}.safetensors"))
        if tag == "sft":  # a distributed checkpoint of the dp x cp sharded weights, one file per rank
            sft.trainer.save_checkpoint(out / "sft.ckpt")
    # 4. resume on the same mesh: 4 steps straight vs resumed from the step-2 checkpoint of the same run
    for name, ckpt in (("straight", None), ("resumed", out / "straight" / "step=2.ckpt")):
        model = resume_run(pipeline, out / name, ckpt)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        report[name] = model.losses
        if rank == 0:
            save_file({k: v.clone().contiguous() for k, v in state.items()}, str(out / f"{name}.safetensors"))
    # 5. a backbone that declares no context parallelism is refused before anything is sharded
    model = RecordingSFT(NoCPBackbone(pipeline, max_sequence_length=16))
    try:
        apply_fsdp2(model, context_parallel_mesh(WORLD, WORLD))
        report["no_cp_error"] = None
    except ValueError as e:
        report["no_cp_error"] = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_pixel_pipeline) -> Path:
    return run_ranks(__file__, tmp_path_factory.mktemp("cp"), tiny_pixel_pipeline, WORLD, timeout=240)


# -- the tests -----------------------------------------------------------------------------------------------------
def test_denoiser_output_and_gradients_match_one_process(two_process_run):
    from safetensors.torch import load_file

    cp = load_file(two_process_run / "denoiser.safetensors")
    output, grads = forward_backward(tiny_wan())
    torch.testing.assert_close(cp["output"], output, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(cp[f"sum.{name}"], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The gradient scale: a rank's own gradient is only its tokens' part (diffusers does not rescale it), so the
    # strategy must sum over the CP group, not average.
    block = "blocks.0.attn1.to_q.weight"
    assert not torch.allclose(cp[f"local.{block}"], grads[block], rtol=1e-2)
    assert not torch.allclose(cp[f"local.{block}"] * WORLD, grads[block], rtol=1e-2)


def test_uneven_split_matches_one_process_without_gradients(two_process_run):
    from safetensors.torch import load_file

    cp = load_file(two_process_run / "denoiser.safetensors")
    with torch.no_grad():
        output = tiny_wan()(**denoiser_inputs(odd=True), return_dict=False)[0]
    torch.testing.assert_close(cp["uneven_output"], output, rtol=1e-5, atol=1e-6)
    for r in range(WORLD):
        report = json.loads((two_process_run / f"rank{r}.json").read_text())
        assert report["uneven_mode"]  # diffusers' ulysses_anything split ran, not a silent fallback
        assert "uneven context-parallel splits run without gradients only" in report["uneven_grad_error"]


def test_ranks_seeded_apart_draw_alike_after_synchronize_rng(two_process_run):
    draws = [json.loads((two_process_run / f"rank{r}.json").read_text())["draws"] for r in range(WORLD)]
    assert draws[0] == draws[1]
    seeded = {seed: torch.Generator().manual_seed(seed) for seed in (0, 1)}
    first = {seed: torch.rand(1, generator=g).item() for seed, g in seeded.items()}
    assert draws[0][0] == first[0] != first[1]  # the group's first rank (seeded 0) gave its state to the other


@pytest.mark.parametrize("tag", list(RUNS))
def test_training_steps_through_lightning_match_one_process(two_process_run, tiny_pixel_pipeline, tag):
    from safetensors.torch import load_file

    reports = [json.loads((two_process_run / f"rank{r}.json").read_text()) for r in range(WORLD)]
    single = fit_run(tiny_pixel_pipeline, tag)
    # Every copy of the denoiser is context-parallel: DPO's and DMD's frozen reference, NFT's old policy, DMD's critic.
    copies = len(denoiser_copies(single))
    assert copies == {"dpo": 2, "nft": 2, "dmd": 3}.get(tag, 1)  # LoRA roles are adapters on the one denoiser
    assert all(r[tag]["copies"] == [True] * copies and r[tag]["num_copies"] == copies for r in reports)
    assert reports[0]["mesh"]["dims"] == ["data_parallel_replicate", "data_parallel_shard", "ring", "ulysses"]
    assert reports[0]["mesh"]["shape"] == [1, 1, 1, WORLD]
    assert all(r["mesh"]["sampler"] == {"num_replicas": 1, "rank": 0} for r in reports)  # CP peers share batches
    batches = STEPS // 2 if tag == "dmd" else STEPS
    assert len(single.losses) == batches and len(set(single.losses)) == batches
    # DPO's loss scales differences of denoising errors by beta (1000): the float summation order of CP (~1e-7 in an
    # error) shows in it as ~1e-4, so its losses get that much absolute room (weights are compared below as for all)
    room = 2e-4 if tag == "dpo" else None
    for r in reports:  # both ranks of the CP group computed the whole sequence's loss
        assert r[tag]["losses"] == pytest.approx(single.losses, rel=1e-4, abs=room)
    trained = load_file(two_process_run / f"{tag}.safetensors")
    state = {k: v for k, v in single.state_dict().items() if k.startswith("backbone.denoiser.")}
    trainable = {f"backbone.denoiser.{n}" for n, p in single.backbone.denoiser.named_parameters() if p.requires_grad}
    assert set(trained) == set(state)
    moved = 0
    L.seed_everything(0)  # the weights both runs started from (LoRA's A matrices are random)
    before = make_model(tiny_pixel_pipeline, tag).state_dict()
    for key, value in state.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-5, msg=key)
        moved += key in trainable and not torch.equal(value, before[key])
    assert moved > len(trainable) // 2  # the steps changed the weights: the comparison is not vacuous


def test_a_checkpoint_written_under_context_parallelism_loads_into_one_process(two_process_run, tiny_pixel_pipeline,
                                                                                tmp_path):
    from safetensors.torch import load_file

    from lit_videoalign.strategies import consolidate_sharded_checkpoint, load_sharded_checkpoint

    ckpt = two_process_run / "sft.ckpt"
    assert len(list(ckpt.glob("*.distcp"))) == WORLD
    trained = load_file(two_process_run / "sft.safetensors")
    model = make_model(tiny_pixel_pipeline, "sft")
    load_sharded_checkpoint(model, ckpt)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    merged = load_file(consolidate_sharded_checkpoint(ckpt, tmp_path / "weights.safetensors"))
    assert all(torch.equal(merged[k], v) for k, v in trained.items())


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(two_process_run, tmp_path):
    from safetensors.torch import load_file

    from lit_videoalign.strategies import consolidate_sharded_checkpoint

    straight, resumed = (load_file(two_process_run / f"{n}.safetensors") for n in ("straight", "resumed"))
    assert set(straight) == set(resumed)
    assert all(torch.equal(v, resumed[k]) for k, v in straight.items())
    for r in range(WORLD):
        report = json.loads((two_process_run / f"rank{r}.json").read_text())
        assert len(report["straight"]) == RESUME_STEPS and len(report["resumed"]) == RESUME_STEPS - 2
        assert report["resumed"] == report["straight"][2:]  # the same float losses, not just close ones
    # the resumed steps trained: the step-2 weights differ from the end's, so the comparison above can fail
    at_stop = load_file(consolidate_sharded_checkpoint(two_process_run / "straight" / "step=2.ckpt",
                                                       tmp_path / "step2.safetensors"))
    assert set(at_stop) == set(straight) and any(not torch.equal(v, at_stop[k]) for k, v in straight.items())


def test_the_backbone_capability_decides_context_parallelism(two_process_run, tiny_pixel_pipeline, tmp_path):
    from diffusers import HunyuanVideoTransformer3DModel

    from lit_videoalign.testing import tiny_hunyuan_pipeline

    assert DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16).supports_context_parallel  # Wan
    hunyuan = DiffusersVideoBackbone(str(tiny_hunyuan_pipeline(tmp_path / "hunyuan")))
    assert isinstance(hunyuan.denoiser, HunyuanVideoTransformer3DModel) and not hunyuan.supports_context_parallel
    for r in range(WORLD):  # a declared False is what apply_fsdp2 reads (the Wan denoiser underneath has a _cp_plan)
        error = json.loads((two_process_run / f"rank{r}.json").read_text())["no_cp_error"]
        assert "NoCPBackbone with a WanTransformer3DModel denoiser does not support context parallelism" in error
    with pytest.raises(ValueError, match="has no _cp_plan"):
        check_denoiser(tiny_wan(), ring_degree=1, ulysses_degree=2, supported=False)


def test_bad_inputs_at_the_first_forward_fail_on_every_rank(two_process_run):
    for r in range(WORLD):
        errors = json.loads((two_process_run / f"rank{r}.json").read_text())["errors"]
        assert "9 tokens" in errors["tokens"] and "does not divide" in errors["tokens"]
        assert "different denoiser inputs" in errors["inputs"]


def test_degrees_that_do_not_fit_the_world_are_refused():
    assert check_degrees(4, 2) == (1, 2, 1, 2)
    assert check_degrees(8, 4, ring_degree=2) == (1, 2, 2, 2)
    assert check_degrees(8, 2, data_parallel_replicate_size=2) == (2, 2, 1, 2)  # HSDP: 2 replicas of 2 x CP 2
    with pytest.raises(ValueError, match="data_parallel_replicate_size=3 does not divide the data-parallel size 4"):
        check_degrees(8, 2, data_parallel_replicate_size=3)
    with pytest.raises(ValueError, match="data_parallel_replicate_size must be a positive integer, got 0"):
        ContextParallelStrategy(context_parallel_size=2, data_parallel_replicate_size=0)
    with pytest.raises(ValueError, match="data_parallel_replicate_size=2 does not divide the data-parallel size 3"):
        ContextParallelStrategy(context_parallel_size=2, data_parallel_size=3, data_parallel_replicate_size=2)
    ContextParallelStrategy(context_parallel_size=1, data_parallel_size=4, data_parallel_replicate_size=2)  # HSDP
    with pytest.raises(ValueError, match="context_parallel_size=3 does not divide the world size 4"):
        check_degrees(4, 3)
    with pytest.raises(ValueError, match="ring_degree=3 does not divide context_parallel_size=4"):
        check_degrees(4, 4, ring_degree=3)
    with pytest.raises(ValueError, match="data_parallel_size=3"):
        check_degrees(4, 2, data_parallel_size=3)
    with pytest.raises(ValueError, match="ring_degree=3"):
        ContextParallelStrategy(context_parallel_size=2, ring_degree=3)
    with pytest.raises(ValueError, match="uneven=True needs pure ulysses or pure ring"):
        context_parallel_mesh(4, 4, ring_degree=2, uneven=True)


def test_denoisers_and_sequences_context_parallelism_cannot_split_are_refused():
    from diffusers import HunyuanVideoTransformer3DModel

    from lit_videoalign.testing import TINY_HUNYUAN_TRANSFORMER

    wan = tiny_wan()
    check_denoiser(wan, ring_degree=1, ulysses_degree=2)  # Ulysses on SDPA: fine
    with pytest.raises(ValueError, match="HunyuanVideoTransformer3DModel has no _cp_plan"):
        check_denoiser(HunyuanVideoTransformer3DModel(**TINY_HUNYUAN_TRANSFORMER), ring_degree=1, ulysses_degree=2)
    with pytest.raises(ValueError, match="ring_degree=2 needs an attention backend that returns the log-sum-exp"):
        check_denoiser(wan, ring_degree=2, ulysses_degree=1)
    with pytest.raises(ValueError, match="2 attention heads, which ulysses_degree=4 does not divide"):
        check_denoiser(wan, ring_degree=1, ulysses_degree=4)
    latents = denoiser_inputs()["hidden_states"]  # 2x8x8 latents in 1x2x2 patches: 32 tokens
    check_token_count(wan, latents, 4)
    with pytest.raises(ValueError, match="the video has 32 tokens .* degree 3 does not divide"):
        check_token_count(wan, latents, 3)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
