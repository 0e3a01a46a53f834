"""Checkpoints hold what trains: under LoRA a checkpoint keeps the adapters (and the objective's other trained parts),
their optimizer state, the loop state and a fingerprint of the frozen base, never the base itself; resuming loads the
base from its pipeline again and refuses another one. Full fine-tuning keeps full checkpoints; old full checkpoints of
LoRA runs still load; ``load_weights`` (generate, evaluate) and the pipeline export accept the trainable-only files.

Exact resume from these files, objective by objective, is ``test_resume.py`` (its checkpoints are trainable-only now,
and it checks so with :func:`test_resume.assert_holds_what_trains`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from test_resume import CASES, adamw, assert_same_state, cli_fit, fit_config, load, toy, training_state
from torch import nn

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.backbones.fingerprint import describe, pipeline_fingerprint
from lit_videoalign.callbacks.pipeline_export import PipelineExport
from lit_videoalign.checkpoint_io import AtomicCheckpointIO, checkpoint_nbytes, load_weights
from lit_videoalign.errors import UsageError
from lit_videoalign.objectives.dmd import DMD
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.testing import tiny_wan_pipeline

FULL_CASES = ("awm_full", "dmd")  # the resume cases that fine-tune the whole denoiser
LORA_CASES = [name for name in sorted(CASES) if name not in FULL_CASES]


@pytest.fixture(scope="module")
def other_pipeline(tmp_path_factory) -> str:
    """The same tiny pixel-space architecture as ``tiny_pixel_pipeline`` with other random weights (seed 1)."""
    return str(tiny_wan_pipeline(tmp_path_factory.mktemp("other") / "wan_pixel", pixel_space=True, seed=1))


def test_every_objective_has_a_lora_case():
    assert {"sft", "dpo_offline", "dpo_online", "grpo", "nft", "dmd_lora", "consistency", "reward_gradient",
            "rejection_sft"} <= set(LORA_CASES)


@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_state_dict_leaves_the_frozen_base_out(case, tiny_pixel_pipeline):
    model = CASES[case][0](DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16))
    assert model.backbone.has_lora and model.frozen_base
    state, everything = model.state_dict(), nn.Module.state_dict(model)
    frozen = model.frozen_state_dict()
    assert frozen and not set(state) & set(frozen)
    assert set(state) | set(frozen) == {k for k in everything if not k.startswith("_reference_denoiser.")}
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains <= set(state)  # every trained weight is kept
    # what else is kept: adapters moved without gradients (NFT's "old", consistency's "ema") and non-backbone state
    assert all(k in trains or ".lora_" in k or not k.startswith("backbone.") for k in state), case
    # rank-4 adapters against the whole tiny pipeline: 12 kB to 49 kB of 267 kB to 392 kB measured
    assert checkpoint_nbytes(state) * 5 < checkpoint_nbytes(everything), case


def test_full_fine_tuning_keeps_full_checkpoints(tiny_pixel_pipeline):
    for model in (SFT(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)),
                  DMD(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16), num_inference_steps=2)):
        assert not model.frozen_base and model.frozen_state_dict() == {}
        everything = {k for k in nn.Module.state_dict(model) if not k.startswith("_reference_denoiser.")}
        assert set(model.state_dict()) == everything and any(k.startswith("backbone.vae") or
                                                             k.startswith("backbone.text_encoder") for k in everything)


def test_fingerprint_follows_the_content_not_the_folder(tiny_pixel_pipeline, other_pipeline, tmp_path):
    base = pipeline_fingerprint(tiny_pixel_pipeline)
    moved = shutil.copytree(tiny_pixel_pipeline, tmp_path / "moved")
    same = pipeline_fingerprint(moved, "elsewhere")
    assert same["source"] == "elsewhere" and (same["configs"], same["weights"]) == (base["configs"], base["weights"])
    other = pipeline_fingerprint(other_pipeline)  # same architecture and headers, other weights
    assert other["configs"] == base["configs"] and other["weights"] != base["weights"]
    config = moved / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"num_layers": 2', '"num_layers": 3'))
    assert pipeline_fingerprint(moved)["configs"] != base["configs"]


def train(pipeline: str, ckpt_dir: Path, steps: int = 2, ckpt_path: Path | None = None, lora: bool = True,
          export: Path | None = None) -> SFT:
    """LoRA SFT on toy videos, a checkpoint after every step."""
    L.seed_everything(0)
    model = SFT(DiffusersVideoBackbone(pipeline, max_sequence_length=16), lora_rank=4 if lora else None,
                optimizer=adamw(1e-2), num_inference_steps=2)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1)]
    if export is not None:
        callbacks.append(PipelineExport(str(export)))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=callbacks, plugins=[AtomicCheckpointIO()])
    trainer.fit(model, toy(batch_size=2, prompts_only=False, train_size=4), ckpt_path=ckpt_path)
    return model


def test_resume_from_trainable_only_and_from_old_full_checkpoints(tiny_pixel_pipeline, tmp_path):
    """2 steps, save, 2 more equals 4 steps, from the trainable-only file and from the full file a LoRA run wrote
    before; the trainable-only file is a small fraction of the full one."""
    full_run = train(tiny_pixel_pipeline, tmp_path / "full", steps=4)
    trimmed = tmp_path / "full" / "step=2.ckpt"
    ckpt = load(trimmed)
    assert not set(ckpt["state_dict"]) & set(full_run.frozen_state_dict())
    old = tmp_path / "old" / "step=2.ckpt"  # what a LoRA run wrote before: the frozen base in the state dict too
    old.parent.mkdir()
    base = {k: v for k, v in SFT(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16),
                                 lora_rank=4).frozen_state_dict().items()}
    old_ckpt = {k: v for k, v in ckpt.items() if k != "frozen_base_fingerprint"}
    AtomicCheckpointIO().save_checkpoint({**old_ckpt, "state_dict": {**base, **ckpt["state_dict"]}}, old)
    # Tensor bytes (adapters, their AdamW moments, RNG states): 52 kB against 257 kB measured. The files differ less
    # (117 kB and 331 kB): each also holds about 70 kB of key names and loop state, whatever the model's size.
    assert checkpoint_nbytes(ckpt) * 4 < checkpoint_nbytes(load(old)) and trimmed.stat().st_size < old.stat().st_size
    expected = training_state(load(tmp_path / "full" / "step=4.ckpt"))
    for name, path in (("trainable-only", trimmed), ("old full", old)):
        train(tiny_pixel_pipeline, tmp_path / name, steps=4, ckpt_path=path)
        assert_same_state(expected, training_state(load(tmp_path / name / "step=4.ckpt")), name)


def test_load_weights_and_pipeline_export_take_trainable_only_checkpoints(tiny_pixel_pipeline, other_pipeline,
                                                                         tmp_path):
    trained = train(tiny_pixel_pipeline, tmp_path / "ckpts", export=tmp_path / "export")
    fresh = SFT(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16), lora_rank=4,
                num_inference_steps=2)
    load_weights(fresh, tmp_path / "ckpts" / "step=2.ckpt")
    assert torch.equal(fresh.generate(["a red ball"], seeds=[3]), trained.generate(["a red ball"], seeds=[3]))
    fresh.backbone.save_pretrained(tmp_path / "again")
    exported = load_file(tmp_path / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    again = load_file(tmp_path / "again" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == again.keys() and all(torch.equal(exported[k], again[k]) for k in exported)
    other = SFT(DiffusersVideoBackbone(other_pipeline, max_sequence_length=16), lora_rank=4)
    with pytest.raises(UsageError, match="frozen base") as err:
        load_weights(other, tmp_path / "ckpts" / "step=2.ckpt")
    assert describe(trained.base_fingerprint()) in str(err.value)
    assert describe(other.base_fingerprint()) in str(err.value)


def test_fit_refuses_a_checkpoint_of_another_base(tiny_pixel_pipeline, other_pipeline, tmp_path, monkeypatch):
    """``videoalign fit --ckpt_path`` of a LoRA checkpoint on a base with other weights: one line naming the
    checkpoint and both fingerprints, non-zero exit, before any step."""
    monkeypatch.chdir(tmp_path)  # the in-process fit writes its config.yaml into the working directory
    (tmp_path / "trained").mkdir()
    cli_fit(fit_config(tmp_path / "trained", tiny_pixel_pipeline), tmp_path / "ckpts", "--trainer.max_steps=1")
    ckpt = tmp_path / "ckpts" / "step=1.ckpt"
    cfg = fit_config(tmp_path, other_pipeline)
    res = subprocess.run([sys.executable, "-m", "lit_videoalign.cli", "fit", "--config", str(cfg),
                          f"--ckpt_path={ckpt}", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                          f"--trainer.default_root_dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    saved = describe(pipeline_fingerprint(tiny_pixel_pipeline, tiny_pixel_pipeline))
    current = describe(pipeline_fingerprint(other_pipeline, other_pipeline))
    assert last.startswith("error: ") and str(ckpt) in last and saved in last and current in last, res.stderr[-2000:]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.ckpt"))
