"""``python -m benchmarks.gpu_check``: its smoke mode runs every measurement's code path on CPU and records it; without
CUDA the real run says so in one line, exits 0 and writes nothing (figures are not checked: they belong in
benchmarks/results/)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_records_every_measurement(tmp_path):
    out = tmp_path / "gpu_check"
    dist_env = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
    before = {k: os.environ.get(k) for k in dist_env}
    had_group = torch.distributed.is_initialized()  # an earlier test in this process may have left one
    returned = gpu_check.main(["--smoke", "--output", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert result == json.loads(json.dumps(returned))
    env = result["environment"]
    for key in ("torch", "diffusers", "lightning", "peft", "cuda", "device", "command"):
        assert key in env, key
    assert env["command"] == f"python -m benchmarks.gpu_check --smoke --output {out}"
    records = {r["name"]: r for r in result["measurements"]}
    assert list(records) == gpu_check.NAMES  # most important first, none left out
    for name, r in records.items():
        assert r["status"] == "ok", (name, r.get("error"))
        assert r["steps_timed"] == len(r["step_times_s"]) == 1
        for key in ("step_time_s", "peak_mem_gib", "mfu", "model_flops"):
            assert isinstance(r[key], float | int) and math.isfinite(r[key]) and r[key] > 0, (name, key)
        assert r["environment"] == env
        assert r["config"]["objective"] in ("sft", "dpo", "grpo")
        assert r["nonfinite_skips"] == 0
    # compiled blocks, and compiled steps take their uncompiled twin's count
    assert records["sft_compile"]["compiled_blocks"] == gpu_check.SMOKE.transformer["num_layers"]
    assert "counted_flops" not in records["sft_compile"]
    assert records["sft_compile"]["flops_from"] == "sft"
    assert records["sft_compile_no_checkpointing"]["flops_from"] == "sft_no_checkpointing"
    # checkpointing re-runs each block's forward in the backward: counted apart, so the model FLOPs do not change
    ckpt, plain = records["sft"], records["sft_no_checkpointing"]
    assert ckpt["recomputed_flops"] > 0 and plain["recomputed_flops"] == 0
    assert ckpt["counted_flops"] - ckpt["recomputed_flops"] == ckpt["model_flops"] == plain["model_flops"]
    assert records["sft_fsdp2"]["model_flops"] == plain["model_flops"]
    # DPO's policy and reference each see twice the clips of SFT: more work per step
    assert records["dpo"]["model_flops"] > ckpt["model_flops"]
    assert "| grpo_update |" in out.with_suffix(".md").read_text()
    # the FSDP2 run left no process group of its own and no rendezvous variables behind
    assert torch.distributed.is_initialized() == had_group
    assert {k: os.environ.get(k) for k in dist_env} == before


def test_budget_and_failures_are_recorded_not_fatal(tmp_path, monkeypatch):
    out = tmp_path / "budget"
    result = gpu_check.main(["--smoke", "--budget", "0", "--only", "sft", "dpo", "--output", str(out)])
    assert [r["status"] for r in result["measurements"]] == ["skipped: budget"] * 2
    assert out.with_suffix(".json").is_file()

    def failing(m, *args):
        if m.name == "sft":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        raise RuntimeError("something else broke")

    monkeypatch.setattr(gpu_check, "build", failing)
    result = gpu_check.main(["--smoke", "--only", "sft", "dpo", "--output", str(tmp_path / "fail")])
    sft, dpo = result["measurements"]
    assert (sft["status"], dpo["status"]) == ("oom", "error")
    assert "out of memory" in sft["error"] and dpo["error"] == "RuntimeError: something else broke"
    assert "mfu" not in sft and "step_time_s" not in dpo


def test_without_cuda_one_line_exit_0_nothing_written(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results" / "gpu_check"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--output", str(out)]) is None
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "no CUDA" in printed[0]
    assert not (tmp_path / "results").exists()
    # the command itself: exit status 0, one line, nothing written
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--output", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and "no CUDA" in proc.stdout
    assert not (tmp_path / "results").exists()
