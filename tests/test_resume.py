"""Exact resume: every objective, stopped right after its step-k checkpoint and resumed from it, ends with the same
weights, optimizer state, RNG states and objective state (rollout history, pair pool, replay buffer, EMA) as an
uninterrupted run with the same seed; one run is a real SIGKILL of a ``videoalign fit`` process. Also: resumable data
loaders and atomic checkpoint writes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.checkpoint_io import AtomicCheckpointIO
from lit_videoalign.cli import VideoAlignCLI, with_atomic_checkpoints
from lit_videoalign.data.resumable import ResumableDataLoader
from lit_videoalign.data.toyworld import ToyWorldDataModule
from lit_videoalign.data.toyworld_pairs import ToyWorldPairsDataModule
from lit_videoalign.objectives.consistency import ConsistencyDistillation
from lit_videoalign.objectives.dmd import DMD
from lit_videoalign.objectives.dpo import DPO
from lit_videoalign.objectives.grpo import GRPO
from lit_videoalign.objectives.nft import DiffusionNFT
from lit_videoalign.objectives.rejection_sft import RejectionSFT
from lit_videoalign.objectives.reward_gradient import RewardGradient
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.testing import Brightness

ROOT = Path(__file__).resolve().parent.parent



def adamw(lr):
    return lambda p: torch.optim.AdamW(p, lr=lr)


def toy(batch_size=1, prompts_only=True, train_size=3):
    return ToyWorldDataModule(batch_size=batch_size, train_size=train_size, val_size=2, max_balls=1,
                              prompts_only=prompts_only)


# name -> (model, data, max_steps, checkpoint step to resume from, validate every step). Every case resumes in the
# middle of an epoch or at its end and runs into the next one; DMD counts two optimizer steps per batch.
CASES = {
    "sft": (lambda bb: SFT(bb, lora_rank=4, optimizer=adamw(1e-2)),
            lambda: toy(batch_size=2, prompts_only=False, train_size=4), 4, 2, True),
    "dpo_offline": (lambda bb: DPO(bb, lora_rank=4, num_inference_steps=2, optimizer=adamw(1e-2),
                                   preference_label="physics"),
                    lambda: ToyWorldPairsDataModule(batch_size=2, train_size=6, val_size=2, max_balls=1,
                                                    tie_prob=0.0, mixed_prob=0.0), 3, 1, False),
    "dpo_online": (lambda bb: DPO(bb, lora_rank=4, reward=Brightness(), num_candidates=2, candidate_steps=2,
                                  num_inference_steps=2, pairs_per_step=1, pool_size=2, refresh_every=2,
                                  optimizer=adamw(1e-2)), toy, 3, 1, False),
    "grpo": (lambda bb: GRPO(bb, reward=Brightness(), lora_rank=4, group_size=2, num_sampling_steps=2,
                             num_inference_steps=2, per_prompt_stats=True, optimizer=adamw(3e-2)), toy, 3, 1, False),
    "nft": (lambda bb: DiffusionNFT(bb, reward=Brightness(), lora_rank=4, group_size=2, num_sampling_steps=2,
                                    num_inference_steps=2, micro_batch_size=1, updates_per_epoch=2,
                                    old_decay_rate=0.1, optimizer=adamw(3e-2)), toy, 6, 2, False),
    "awm_full": (lambda bb: DiffusionNFT(bb, reward=Brightness(), loss_type="awm", group_size=2, num_sampling_steps=2,
                                         num_inference_steps=2, sigma_sampling="logit_normal", old_decay_rate=0.1,
                                         optimizer=adamw(1e-3)), toy, 3, 1, False),
    "dmd": (lambda bb: DMD(bb, teacher_guidance_scale=2.0, num_inference_steps=2, optimizer=adamw(1e-3)),
            toy, 6, 2, False),
    "dmd_lora": (lambda bb: DMD(bb, lora_rank=4, shared_base=True, teacher_guidance_scale=2.0, num_inference_steps=2,
                                optimizer=adamw(1e-2)), toy, 6, 2, False),
    "consistency": (lambda bb: ConsistencyDistillation(bb, lora_rank=4, teacher_guidance_scale=2.0, num_timesteps=4,
                                                       skip_steps=2, num_inference_steps=2, optimizer=adamw(1e-2)),
                    toy, 3, 1, False),
    "reward_gradient": (lambda bb: RewardGradient(bb, reward=Brightness(), lora_rank=4, num_sampling_steps=2,
                                                  truncation_steps=1, num_inference_steps=2, optimizer=adamw(3e-2)),
                        toy, 3, 1, False),
    "rejection_sft": (lambda bb: RejectionSFT(bb, reward=Brightness(), lora_rank=4, num_candidates=2, generate_every=2,
                                              top_fraction=0.5, min_feature_distance=0.0, num_inference_steps=2,
                                              optimizer=adamw(1e-2)), toy, 3, 1, False),
}


class Interrupted(Exception):
    pass


class InterruptAt(Callback):
    """Stop the run at the start of the first batch after ``step`` optimizer steps, i.e. once the step-``step``
    checkpoint is on disk (as a crash between two steps would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise Interrupted


def logged_metrics(log_dir: Path) -> dict[int, dict[str, float]]:
    """The ``train/`` values a CSVLogger wrote, per logged step (only what that step logged)."""
    rows = csv.DictReader((log_dir / "metrics.csv").open())
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        values = {k: float(v) for k, v in row.items() if k.startswith("train/") and v != ""}
        if values:
            out.setdefault(int(row["step"]), {}).update(values)
    return out


def fit(case: str, pipeline: str, ckpt_dir: Path, ckpt_path: Path | None = None, interrupt: int | None = None):
    make_model, make_data, steps, _, validate = CASES[case]
    L.seed_everything(0)
    model = make_model(DiffusersVideoBackbone(pipeline, max_sequence_length=16))
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1)]
    logger = CSVLogger(ckpt_dir.parent / "logs", name=ckpt_dir.name, version=0)
    if interrupt is not None:
        callbacks.append(InterruptAt(interrupt))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=logger, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=callbacks,
                        plugins=[AtomicCheckpointIO()], limit_val_batches=1 if validate else 0,
                        val_check_interval=1 if validate else None)
    try:
        trainer.fit(model, make_data(), ckpt_path=ckpt_path)
    except Interrupted:
        pass
    return logged_metrics(Path(logger.log_dir))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b, where: str = "") -> None:
    """Tensors bit for bit (``torch.equal``), everything else with ``==``, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, set(a) ^ set(b)))} differ"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} and {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def training_state(checkpoint: dict) -> dict:
    """What must match after resuming: weights, optimizer and scheduler states, RNG states, the non-finite guard's
    counters, the objective's own state (``*_state``), the step and epoch. Not the callbacks (they hold the
    checkpoint folder) or the loops' progress counters (bookkeeping of the two runs' own histories)."""
    keep = {"state_dict", "optimizer_states", "lr_schedulers", "rng_states", "nonfinite_guard", "global_step", "epoch"}
    return {k: v for k, v in checkpoint.items() if k in keep or k.endswith("_state")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resumed_run_matches_an_uninterrupted_one(case, tiny_pixel_pipeline, tmp_path):
    _, _, steps, stop, _ = CASES[case]
    full_metrics = fit(case, tiny_pixel_pipeline, tmp_path / "full")
    fit(case, tiny_pixel_pipeline, tmp_path / "crashed", interrupt=stop)
    names = sorted(p.name for p in (tmp_path / "crashed").iterdir())
    assert names[-1] == f"step={stop}.ckpt" and all(n.startswith("step=") for n in names)  # no temporary files
    resumed_metrics = fit(case, tiny_pixel_pipeline, tmp_path / "resumed",
                          ckpt_path=tmp_path / "crashed" / f"step={stop}.ckpt")
    full, resumed = load(tmp_path / "full" / f"step={steps}.ckpt"), load(tmp_path / "resumed" / f"step={steps}.ckpt")
    assert_same_state(training_state(full), training_state(resumed), case)
    assert_holds_what_trains(case, full, tiny_pixel_pipeline)  # so the resume above was from trainable-only files
    before = load(tmp_path / "crashed" / f"step={stop}.ckpt")["state_dict"]
    assert any(not torch.equal(before[k], v) for k, v in full["state_dict"].items()), "nothing trained after the stop"
    # Logged rows are keyed by batch; the resumed run's first row may also hold values its interrupted batch logged
    # before the save, so compare every row after it.
    first = min(resumed_metrics)
    after = {step: m for step, m in full_metrics.items() if step > first}
    assert after, "nothing was logged after the first resumed batch"
    assert {step: m for step, m in resumed_metrics.items() if step > first} == after, "the resume logged other values"


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(int(sys.argv[1]))  # the parent's, so both processes compute bit for bit alike
    from lit_videoalign import checkpoint_io
    save = checkpoint_io.AtomicCheckpointIO.save_checkpoint
    def save_then_die(self, checkpoint, path, storage_options=None):
        save(self, checkpoint, path, storage_options)
        if checkpoint["global_step"] >= int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint_io.AtomicCheckpointIO.save_checkpoint = save_then_die
    from lit_videoalign.cli import main
    main(sys.argv[3:])
""")


MODELS = {  # the model block of a fit config per objective: LoRA SFT on videos, LoRA DiffusionNFT on prompts
    "sft": """
        class_path: lit_videoalign.objectives.sft.SFT
        init_args:
          backbone:
            class_path: lit_videoalign.backbones.diffusers.DiffusersVideoBackbone
            init_args: {{pretrained_model_name_or_path: {pipeline}, max_sequence_length: 16}}
          lora_rank: 4
          optimizer: {{class_path: torch.optim.AdamW, init_args: {{lr: 1.0e-2}}}}""",
    "nft": """
        class_path: lit_videoalign.objectives.nft.DiffusionNFT
        init_args:
          backbone:
            class_path: lit_videoalign.backbones.diffusers.DiffusersVideoBackbone
            init_args: {{pretrained_model_name_or_path: {pipeline}, max_sequence_length: 16}}
          reward: {{class_path: lit_videoalign.testing.Brightness}}
          lora_rank: 4
          group_size: 2
          num_sampling_steps: 2
          num_inference_steps: 2
          old_decay_rate: 0.1
          optimizer: {{class_path: torch.optim.AdamW, init_args: {{lr: 3.0e-2}}}}""",
}


def fit_config(tmp: Path, pipeline: str, objective: str = "sft") -> Path:
    cfg = tmp / f"{objective}.yaml"
    model = textwrap.indent(textwrap.dedent(MODELS[objective].format(pipeline=pipeline)).strip(), "  ")
    prompts_only = "true" if objective == "nft" else "false"
    cfg.write_text("seed_everything: 0\nmodel:\n" + model + "\n" + textwrap.dedent(f"""
        data:
          class_path: lit_videoalign.data.toyworld.ToyWorldDataModule
          init_args: {{batch_size: 2, train_size: 6, val_size: 2, max_balls: 1, prompts_only: {prompts_only}}}
        trainer:
          max_steps: 4
          accelerator: cpu
          logger: false
          enable_progress_bar: false
          enable_model_summary: false
          num_sanity_val_steps: 0
          limit_val_batches: 1
          val_check_interval: 2
          check_val_every_n_epoch: null
    """))
    return cfg


def cli_fit(cfg: Path, ckpt_dir: Path, *extra: str) -> VideoAlignCLI:
    return VideoAlignCLI(args=["fit", "--config", str(cfg), "--trainer.callbacks+=ModelCheckpoint",
                               f"--trainer.callbacks.dirpath={ckpt_dir}", "--trainer.callbacks.filename={step}",
                               "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
                               *extra])


@pytest.mark.parametrize("objective", sorted(MODELS))
def test_sigkilled_fit_resumes_exactly(objective, tiny_pixel_pipeline, tmp_path, monkeypatch):
    """A `videoalign fit` killed with SIGKILL right after its step-1 checkpoint (mid-epoch) and resumed with
    --ckpt_path ends like an uninterrupted run; the killed process wrote exactly the checkpoints it finished."""
    monkeypatch.chdir(tmp_path)
    cfg = fit_config(tmp_path, tiny_pixel_pipeline, objective)
    killed = tmp_path / "killed"
    args = ["fit", "--config", str(cfg), "--trainer.callbacks+=ModelCheckpoint",
            f"--trainer.callbacks.dirpath={killed}", "--trainer.callbacks.filename={step}",
            "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1"]
    res = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(torch.get_num_threads()), "1", *args], cwd=tmp_path,
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert res.returncode == -9, res.stderr[-3000:]
    assert sorted(p.name for p in killed.iterdir()) == ["step=1.ckpt"]  # no partial or temporary file

    full = cli_fit(cfg, tmp_path / "full")
    resumed = cli_fit(cfg, tmp_path / "resumed", f"--ckpt_path={killed / 'step=1.ckpt'}")
    assert full.trainer.global_step == resumed.trainer.global_step == 4
    assert_same_state(training_state(load(killed / "step=1.ckpt")),
                      training_state(load(tmp_path / "full" / "step=1.ckpt")), "step 1 in two processes")
    assert_same_state(training_state(load(tmp_path / "full" / "step=4.ckpt")),
                      training_state(load(tmp_path / "resumed" / "step=4.ckpt")), f"{objective} via the CLI")


# -- resumable data -------------------------------------------------------------------------------------------------
def loader(**kwargs):
    return ResumableDataLoader(list(range(10)), batch_size=3, shuffle=True, drop_last=True,
                               generator=torch.Generator().manual_seed(5), **kwargs)


def epochs(dl, n: int, first: int = 0) -> list[list[list[int]]]:
    """``n`` epochs as Lightning reads them: ``len(dl)`` batches each (``first`` of them already served)."""
    out = []
    for e in range(n):
        it = iter(dl)
        out.append([next(it).tolist() for _ in range(len(dl) - (first if e == 0 else 0))])
    return out


def test_resumable_loader_matches_dataloader_and_resumes_mid_epoch_and_at_its_end():
    plain = DataLoader(list(range(10)), batch_size=3, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(5))
    expected = epochs(plain, 3)
    assert epochs(loader(), 3) == expected  # the same order as a DataLoader
    for served in (1, 3):  # mid-epoch, and after the epoch's last batch
        dl = loader()
        it = iter(dl)
        first = [next(it).tolist() for _ in range(served)]
        resumed = loader()
        resumed.load_state_dict(dl.state_dict())
        if served < len(dl):
            rest = epochs(resumed, 2, first=served)
            assert [first + rest[0], rest[1]] == expected[:2]
        else:
            assert [first, *epochs(resumed, 2)] == expected
    with pytest.raises(ValueError, match="not a ResumableDataLoader state"):
        loader().load_state_dict({"position": 3})
    with pytest.raises(TypeError, match="ResumableBatchSampler"):
        ResumableDataLoader(list(range(4)), batch_sampler=[[0, 1], [2, 3]])


# -- atomic checkpoints ---------------------------------------------------------------------------------------------
def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    old = path.read_bytes()

    def partial_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == old
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    monkeypatch.undo()
    (path.parent / ".last.ckpt.abc123.tmp").write_bytes(b"left by a killed save")
    io.save_checkpoint({"step": 3, "w": torch.zeros(3)}, path)
    assert io.load_checkpoint(path)["step"] == 3 and [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_the_cli_writes_checkpoints_atomically_unless_told_otherwise():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    plugins = with_atomic_checkpoints({"plugins": None})["plugins"]
    assert len(plugins) == 1 and isinstance(plugins[0], AtomicCheckpointIO)
    own = TorchCheckpointIO()
    assert with_atomic_checkpoints({"plugins": [own]})["plugins"] == [own]


# -- trainable-only checkpoints (more in test_checkpoint_lora.py) -------------------------------------------------
def assert_holds_what_trains(case: str, checkpoint: dict, pipeline: str) -> None:
    """A LoRA run's checkpoint holds its adapters (and its objective's other trained modules) and the base's
    fingerprint, none of the frozen base; a full fine-tuning run's holds every weight."""
    model = CASES[case][0](DiffusersVideoBackbone(pipeline, max_sequence_length=16))
    keys, everything = set(checkpoint["state_dict"]), set(torch.nn.Module.state_dict(model))
    reference = {k for k in everything if k.startswith("_reference_denoiser.")}
    if model.backbone.has_lora:
        assert keys and not keys & set(model.frozen_state_dict()), f"{case}: frozen base weights in the checkpoint"
        assert all(".lora_" in k or not k.startswith("backbone.") for k in keys), f"{case}: non-adapter backbone keys"
        assert checkpoint["frozen_base_fingerprint"] == model.base_fingerprint()
    else:
        assert keys == everything - reference and "frozen_base_fingerprint" not in checkpoint
