"""Precision check (issue 22.7): a bf16 run on a CPU without bf16 hardware is told so before its first step, once, in
one line, with the measured slowdown and the switch to float32. CPU flags and the slowdown are injected, so the logic
is tested on any machine; nothing here asserts a timing."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_videoalign import precision
from lit_videoalign.precision import bf16_matmul_slowdown, check_bf16_on_cpu, cpu_flags, warn_if_slow_bf16

ROOT = Path(__file__).resolve().parent.parent
AVX2_ONLY = {"fpu", "sse4_2", "avx", "avx2", "fma", "avx512f"}  # AVX-512 without its BF16 extension


def refuse() -> float:
    raise AssertionError("the slowdown is measured only when the CPU flags do not settle it")


@pytest.mark.parametrize("mode", ["bf16-mixed", "bf16-true"])
def test_bf16_without_bf16_hardware_warns_in_one_line_with_the_slowdown_and_the_switch(mode):
    message = check_bf16_on_cpu(mode, "cpu", flags=AVX2_ONLY, measure=lambda: 107.5)
    assert "\n" not in message
    assert message.startswith(f"precision {mode} on a CPU without native bf16 (no AVX512_BF16, AMX or Arm BF16)")
    assert "108x slower than float32" in message and "--trainer.precision 32-true" in message


def test_bf16_weights_warn_even_under_32_true_and_name_the_dtypes():
    message = check_bf16_on_cpu("32-true", "cpu", bf16_weights=True, flags=AVX2_ONLY, measure=lambda: 40.0)
    assert message.startswith("bfloat16 model weights") and "torch_dtype/frozen_dtype float32" in message


@pytest.mark.parametrize(("mode", "device", "flags", "weights"), [
    ("bf16-true", "cpu", AVX2_ONLY | {"avx512_bf16"}, False),  # x86 AVX512_BF16
    ("bf16-mixed", "cpu", AVX2_ONLY | {"amx_bf16", "amx_tile"}, False),  # x86 AMX
    ("bf16-true", "cpu", {"fp", "asimd", "bf16", "i8mm"}, True),  # Arm BF16 (aarch64 "Features")
    ("bf16-true", "cuda", AVX2_ONLY, True),  # GPUs are not this check's business
    ("32-true", "cpu", AVX2_ONLY, False),
    ("16-mixed", "cpu", AVX2_ONLY, False),
])
def test_nothing_to_say_and_nothing_measured(mode, device, flags, weights):
    assert check_bf16_on_cpu(mode, device, weights, flags=flags, measure=refuse) is None


def test_unknown_flags_let_the_measured_slowdown_decide():
    assert check_bf16_on_cpu("bf16-true", "cpu", flags=None, measure=lambda: 1.2) is None
    message = check_bf16_on_cpu("bf16-true", "cpu", flags=None, measure=lambda: 30.0)
    assert message.startswith("precision bf16-true on this CPU: a bf16 matmul runs 30x slower")


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"} and cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "missing") is None
    assert cpu_flags() is None or "fpu" in cpu_flags() or "fp" in cpu_flags()  # this machine's, whatever it is


def test_the_measurement_is_a_positive_ratio():
    assert bf16_matmul_slowdown(size=32, repeats=1) > 0


def test_a_cpu_trainer_in_bf16_warns_once(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setattr(precision, "bf16_matmul_slowdown", lambda: 50.0)
    monkeypatch.setattr(precision, "_warned", set())
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"precision bf16-mixed .* 50x slower .*--trainer.precision 32-true"):
        assert warn_if_slow_bf16(trainer, torch.nn.Linear(2, 2)) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_slow_bf16(trainer, torch.nn.Linear(2, 2)) is None  # once per process
    fp32 = L.Trainer(accelerator="cpu", precision="32-true", logger=False, enable_checkpointing=False)
    assert warn_if_slow_bf16(fp32, torch.nn.Linear(2, 2)) is None


def test_fit_warns_before_its_first_step(monkeypatch, tmp_path):
    """``videoalign fit`` runs the check at fit start: the warning comes before any step was taken."""
    from lit_videoalign.cli import main

    steps = []
    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setattr(precision, "_warned", set())

    def measure() -> float:
        steps.append("measured")
        return 50.0

    monkeypatch.setattr(precision, "bf16_matmul_slowdown", measure)
    fit = L.Trainer.fit

    def recording_fit(self, *args, **kwargs):
        steps.append("fit")
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", recording_fit)
    monkeypatch.chdir(ROOT)
    with pytest.warns(UserWarning, match="precision bf16-mixed on a CPU without native bf16") as record:
        main(["fit", "--config", "configs/toyworld/sft.yaml", "--trainer.precision=bf16-mixed",
              "--trainer.accelerator=cpu", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
              "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks=[]", "--data.init_args.batch_size=2"])
    assert steps == ["measured", "fit"]  # checked before training started
    assert sum("without native bf16" in str(w.message) for w in record) == 1
