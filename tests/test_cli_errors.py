"""Errors a user can read (issue 20): each mistake a user makes reaches them through ``videoalign`` or ``reward-zoo``
as one line ``error: ...`` naming the option or file, the value and what was expected, with exit status 2 for the
command line and config and 1 otherwise, no stack trace unless ``--traceback``, and no log or checkpoint folder left
behind. One case per kind runs the console command in a subprocess, as a user does; the others call the same entry
point in process (``main(args, exit_on_error=True)``), which prints and exits exactly as the console script does."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lit_videoalign import checkpoint_io, errors
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.checkpoint_io import AtomicCheckpointIO
from lit_videoalign.cli import main, resolve_prompts
from lit_videoalign.data import video_folder
from lit_videoalign.data.toyworld import ToyWorld
from lit_videoalign.data.video_folder import VideoFolderDataset
from lit_videoalign.video_io import VideoInfo, write_mp4
from reward_zoo import CompositeReward, create_reward
from reward_zoo.cli import main as zoo_main

ROOT = Path(__file__).resolve().parent.parent
SFT_CONFIG = ROOT / "configs/toyworld/sft.yaml"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)


def run(*args: str, cwd: Path, module: str = "lit_videoalign.cli", env: dict | None = None
        ) -> subprocess.CompletedProcess:
    """A command line in a fresh process, run in ``cwd`` (a temporary folder: relative outputs of configs go there)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})


def one_error_line(result: subprocess.CompletedProcess, status: int, *named: str) -> str:
    """The single ``error:`` line of a failed command, checked for its exit status, words and the lack of a stack."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == status, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and result.stderr.rstrip().endswith(lines[0]), result.stderr[-3000:]
    assert all(word in lines[0] for word in named), lines[0]
    return lines[0]


def cli_error_line(capsys, exit_info, status: int, *named: str) -> str:
    """The same checks for an in-process ``main(..., exit_on_error=True)`` that raised ``SystemExit``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == status, err[-3000:]
    assert "Traceback" not in err and len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-3000:]
    assert all(word in lines[0] for word in named), lines[0]
    return lines[0]


def left_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def good_clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "good.mp4"
    write_mp4(ToyWorld().example(0).video, path)
    return path


def video_folder_config(tmp: Path, root: Path, **data) -> Path:
    """The toy SFT config reading a video folder instead of the toy world."""
    text = SFT_CONFIG.read_text()
    init = {"root": str(root), "num_frames": 16, "height": 32, "width": 32, "batch_size": 1, **data}
    cfg = tmp / "folder.yaml"
    cfg.write_text(text.replace(text[text.index("data:"):text.index("trainer:")],
                                "data:\n  class_path: lit_videoalign.data.video_folder.VideoFolderDataModule\n"
                                f"  init_args: {json.dumps(init)}\n"))
    return cfg


def fit_args(cfg: Path, run_dir: Path) -> list[str]:
    return ["fit", "--config", str(cfg), f"--trainer.default_root_dir={run_dir}", "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            f"--trainer.callbacks.init_args.dirpath={run_dir / 'pipeline'}"]


# -- 3. one-line errors ---------------------------------------------------------------------------------------------
def test_a_bad_config_value_is_one_line_and_traceback_shows_the_stack(tmp_path):
    args = ["fit", "--config", str(SFT_CONFIG), f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--model.init_args.lora_rank=0"]
    line = one_error_line(run(*args, cwd=tmp_path), 2, "error: LoRA rank must be a positive integer, got 0")
    assert "Does not validate against any of the Union subtypes" not in line
    result = run(*args, "--traceback", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr and "LoRA rank must be" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "named"), [
    (["--model.init_args.lora_rank=eight"], ["model.init_args.lora_rank: expected int, got 'eight'"]),  # wrong type
    (["--model.init_args.lora_rnak=4"], ["SFT has no argument 'lora_rnak'; did you mean 'lora_rank'?"]),
    (["--model.init_args.num_inference_steps=-5"], ["num_inference_steps must be at least 1, got -5"]),
    (["--model.init_args.backbone.init_args.pretrained_model_name_or_path=./nowhere/model"], ["'./nowhere/model'"]),
    (["--ckpt_path=missing.ckpt"], ["checkpoint not found: missing.ckpt"]),
])
def test_config_errors_are_one_line_with_status_2(args, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(SFT_CONFIG), f"--trainer.default_root_dir={tmp_path / 'run'}", *args],
             exit_on_error=True)
    assert "Does not validate" not in cli_error_line(capsys, exit_info, 2, *named)
    assert not (tmp_path / "run").exists()


def test_malformed_yaml_is_one_line_naming_the_file_and_the_debug_variable_shows_the_stack(tmp_path, capsys,
                                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("model:\n  class_path: lit_videoalign.objectives.sft.SFT\n   init_args: {lora_rank: 4\n")
    with pytest.raises(SystemExit) as exit_info:  # a config that does not parse exits, even from Python
        main(["fit", "--config", str(cfg)])
    cli_error_line(capsys, exit_info, 2, "Problems parsing config", str(cfg), "line 3")
    monkeypatch.setenv("VIDEOALIGN_DEBUG", "1")
    with pytest.raises(Exception, match="line 3"):
        main(["fit", "--config", str(cfg)], exit_on_error=True)


def test_reward_zoo_errors_are_one_line(good_clip, tmp_path, capsys):
    folder = tmp_path / "physics"
    create_reward("physics_learned").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["wdith"] = config.pop("width")  # a typo in a hand-edited config.json
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'wdith'; did you mean 'width'"):
        create_reward(str(folder))
    score = ["score", "--videos", str(good_clip), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        zoo_main([*score, "--reward", str(folder)], exit_on_error=True)
    cli_error_line(capsys, exit_info, 1, "config.json", "'wdith'; did you mean 'width'?")
    with pytest.raises(SystemExit) as exit_info:
        zoo_main([*score, "--reward", "qualty"], exit_on_error=True)
    cli_error_line(capsys, exit_info, 1, "unknown reward 'qualty'; did you mean ['quality']")
    with pytest.raises(SystemExit) as exit_info:
        zoo_main([*score, "--reward", "quality", "--prompts", "a", "b"], exit_on_error=True)
    cli_error_line(capsys, exit_info, 2, "got 2 prompts for 1 videos")
    assert not (tmp_path / "out").exists()


def test_in_process_callers_get_the_exception_and_unexpected_errors_keep_their_traceback(capsys):
    with pytest.raises(ValueError, match="no prompts given"):
        errors.run_cli(lambda argv: resolve_prompts(None, None, None), [])
    with pytest.raises(SystemExit) as exit_info:  # the console script's path: one line, status 2 for a usage error
        errors.run_cli(lambda argv: resolve_prompts(None, None, None), [], exit_on_error=True)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: no prompts given; pass --prompts P [P ...] or --prompts_file FILE\n"

    def bug(argv):
        raise RuntimeError("an internal bug")

    with pytest.raises(RuntimeError, match="an internal bug"):  # not ours: the traceback stays
        errors.run_cli(bug, [], exit_on_error=True)
    with pytest.raises(ValueError, match="no prompts given"):
        errors.run_cli(lambda argv: resolve_prompts(None, None, None), ["--traceback"], exit_on_error=True)


def test_shorten_and_long_values_in_messages(good_clip, capsys):
    prompt = "a red ball falls " * 600  # 10,200 characters
    assert errors.shorten("short") == "'short'"
    quoted = errors.shorten(prompt)
    assert len(quoted) < 120 and quoted.endswith(f"…' ({len(prompt)} characters)")
    with pytest.raises(SystemExit) as exit_info:  # a reward refusing the prompt quotes it shortened
        zoo_main(["score", "--reward", "quality", "--videos", str(good_clip), "--prompts", prompt], exit_on_error=True)
    line = capsys.readouterr().err
    assert exit_info.value.code == 1 and line.startswith("error: ") and len(line) < 400, line
    assert f"({len(prompt.rstrip())} characters)" in line or f"({len(prompt)} characters)" in line


# -- 4. nothing left behind -----------------------------------------------------------------------------------------
def test_a_data_error_in_the_first_batch_removes_the_new_run_folder_only(good_clip, tmp_path, capsys, monkeypatch):
    root = tmp_path / "set"
    root.mkdir()
    (root / "clip.mp4").write_bytes(good_clip.read_bytes()[:2000])
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "clip.mp4", "prompt": "a red ball falls"}) + "\n")
    run_dir = tmp_path / "run"
    earlier = run_dir / "lightning_logs" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "metrics.csv").write_text("step,loss\n0,1.0\n")
    # the file breaks after the check at setup (or passed decode_check=False): the first batch fails
    monkeypatch.setattr(video_folder, "probe_video", lambda path, decode=True: VideoInfo(16, 32, 32))
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(video_folder_config(tmp_path, root), run_dir), exit_on_error=True)
    cli_error_line(capsys, exit_info, 1, "cannot decode video", "clip.mp4")
    assert left_in(run_dir) == ["lightning_logs", "lightning_logs/version_0", "lightning_logs/version_0/metrics.csv"]


# -- 5. checkpoints -------------------------------------------------------------------------------------------------
def test_ckpt_path_that_is_not_a_checkpoint_or_of_another_objective(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    run_dir = tmp_path / "run"
    result = run("fit", "--config", str(SFT_CONFIG), "--ckpt_path", str(text), f"--trainer.default_root_dir={run_dir}",
                 cwd=tmp_path)
    one_error_line(result, 2, f"{text} is not a Lightning checkpoint: it is a text file")
    dpo = tmp_path / "dpo.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "global_step": 3, "pytorch-lightning_version": "2.6.6",
                "hyper_parameters": {"_class_path": "lit_videoalign.objectives.dpo.DPO", "beta": 500.0}}, dpo)
    out = tmp_path / "gen"
    with pytest.raises(SystemExit) as exit_info:  # LightningCLI would build a DPO from it; it is refused instead
        main(["generate", "--config", str(SFT_CONFIG), "--ckpt_path", str(dpo), "--prompts", "a red ball falls",
              "--output_dir", str(out)], exit_on_error=True)
    cli_error_line(capsys, exit_info, 2, "is a checkpoint of DPO (lit_videoalign.objectives.dpo.DPO)",
                   "the config's model is SFT (lit_videoalign.objectives.sft.SFT)", "only in the checkpoint: beta")
    plain = tmp_path / "plain.ckpt"  # a checkpoint without hyperparameters: keys and shapes are checked before fit
    torch.save({"state_dict": {"w": torch.zeros(1)}, "global_step": 3}, plain)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(SFT_CONFIG), "--ckpt_path", str(plain), f"--trainer.default_root_dir={run_dir}"],
             exit_on_error=True)
    cli_error_line(capsys, exit_info, 2, f"{plain} does not hold the weights of this SFT", "1 unexpected keys, e.g. w")
    assert not run_dir.exists() and not out.exists()


def test_checkpoint_checks_in_process(tmp_path, sft_checkpoint):
    model, ckpt = sft_checkpoint
    with pytest.raises(ValueError, match="is not a Lightning checkpoint: it is a PNG image"):
        (tmp_path / "image.ckpt").write_bytes(PNG)
        checkpoint_io.read_checkpoint(tmp_path / "image.ckpt")
    with pytest.raises(ValueError, match="is not a Lightning checkpoint: it is an empty file"):
        (tmp_path / "empty.ckpt").write_bytes(b"")
        checkpoint_io.read_checkpoint(tmp_path / "empty.ckpt")
    header = checkpoint_io.read_checkpoint(ckpt, mmap=True)
    checkpoint_io.check_model_class(header, ckpt, "lit_videoalign.objectives.sft.SFT")  # the same class passes
    with pytest.raises(ValueError, match=r"checkpoint of SFT .* config's model is DPO .*different values: lora_rank"):
        checkpoint_io.check_model_class(header, ckpt, "lit_videoalign.objectives.dpo.DPO", {"lora_rank": 2})
    header["state_dict"].pop(next(iter(header["state_dict"])))
    with pytest.raises(ValueError, match=r"1 missing keys, .*backbone is DiffusersVideoBackbone"):
        checkpoint_io.check_state_dict(model, header["state_dict"], ckpt)


@pytest.fixture
def sft_checkpoint(tiny_pixel_pipeline, tmp_path):
    """A tiny SFT model and a Lightning checkpoint of it (written by AtomicCheckpointIO)."""
    from lit_videoalign.objectives.sft import SFT

    model = SFT(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16), lora_rank=4)
    path = tmp_path / "sft.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": model.state_dict(), "global_step": 1,
                                          "hyper_parameters": {"_class_path": "lit_videoalign.objectives.sft.SFT",
                                                               "lora_rank": 4}}, path)
    return model, path


# -- 6. disk full and read-only targets -----------------------------------------------------------------------------
def test_a_full_disk_names_path_and_bytes_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    io, path = AtomicCheckpointIO(), tmp_path / "ckpts" / "last.ckpt"
    first = {"state_dict": {"w": torch.arange(1000.0)}, "global_step": 1}
    io.save_checkpoint(first, path)
    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", save_until_full)
    second = {"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}
    with pytest.raises(OSError, match=rf"no space left on device while writing checkpoint {path}: it needs about "
                                      r"4.0 KB \(4000 bytes\), .* free in .*the previous last.ckpt is intact"):
        io.save_checkpoint(second, path)
    assert left_in(path.parent) == ["last.ckpt"]  # no temporary file
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], first["state_dict"]["w"])

    def torch_reports_it_as_a_runtime_error(obj, f, *args, **kwargs):  # torch's zip writer loses the errno
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(checkpoint_io.torch, "save", torch_reports_it_as_a_runtime_error)
    monkeypatch.setattr(checkpoint_io.shutil, "disk_usage", lambda p: SimpleNamespace(free=100))
    with pytest.raises(OSError, match="no space left on device .* 100 B are free"):
        io.save_checkpoint(second, path)
    with pytest.raises(SystemExit) as exit_info:  # what the command line prints
        errors.run_cli(lambda argv: io.save_checkpoint(second, path), [], exit_on_error=True)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith(f"error: no space left on device while writing checkpoint {path}")
    monkeypatch.setattr(checkpoint_io.torch, "save", real_save)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(checkpoint_io.tempfile, "mkstemp", read_only)
    with pytest.raises(PermissionError, match=f"cannot write checkpoint {path}: .* is read-only"):
        io.save_checkpoint(second, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], first["state_dict"]["w"])


# -- 7. validate before work ----------------------------------------------------------------------------------------
@pytest.fixture
def bad_folder(good_clip, tmp_path) -> Path:
    """A video folder with a good clip and four bad ones: empty, truncated, a PNG and a text file named .mp4."""
    root = tmp_path / "set"
    root.mkdir()
    files = {"good.mp4": good_clip.read_bytes(), "empty.mp4": b"", "truncated.mp4": good_clip.read_bytes()[:2000],
             "image.mp4": PNG, "notes.mp4": b"this is not a video\n"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "prompt": "a red ball falls"}) + "\n"
                                                 for n in files))
    return root


def test_a_video_folder_reports_every_bad_file_before_the_first_step(bad_folder, tmp_path):
    with pytest.raises(ValueError, match=r"4 of 5 videos in .*metadata.jsonl cannot be used: line 2 \(empty.mp4\): "
                                         r"cannot decode video: it is an empty file \(0 bytes\), not a video; line 3 "
                                         r"\(truncated.mp4\): cannot decode video: .*; line 4 \(image.mp4\): .*a PNG "
                                         r"image, not a video; line 5 \(notes.mp4\): .*a text file, not a video"):
        VideoFolderDataset(str(bad_folder), 16, 32, 32, decode_check=False)
    run_dir = tmp_path / "run"
    result = run(*fit_args(video_folder_config(tmp_path, bad_folder), run_dir), cwd=tmp_path)
    one_error_line(result, 1, "4 of 5 videos", "empty.mp4", "truncated.mp4", "image.mp4", "notes.mp4")
    assert not run_dir.exists()


def test_composite_weights_must_not_all_be_zero():
    with pytest.raises(ValueError, match=r"weights are all zero \({'a': 0.0, 'b': 0}\)"):
        CompositeReward({"a": create_reward("newton"), "b": create_reward("flicker")}, {"a": 0.0, "b": 0})


# -- 8. over-long prompts -------------------------------------------------------------------------------------------
def test_over_long_prompts_warn_once_or_are_refused(tiny_pixel_pipeline):
    long = "a red ball falls and bounces " * 400
    backbone = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    with pytest.warns(UserWarning, match=r"1 of 2 prompts are longer than max_sequence_length=16 tokens .*"
                                         r"characters\)\) and are truncated to 16 tokens"):
        cond = backbone.encode_prompts([long, "a red ball falls"])
    assert cond.prompt_embeds.shape[1] == 16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone.encode_prompts([long])
    assert not [w for w in caught if "max_sequence_length" in str(w.message)]  # once per backbone
    strict = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16, strict_prompts=True)
    strict.encode_prompts(["a red ball falls"])
    with pytest.raises(ValueError, match=r"1 of 1 prompts are longer .* \(11600 characters\)\); shorten them") as info:
        strict.encode_prompts([long])
    assert len(str(info.value)) < 400


# -- 9. the Hub offline, and pipeline folders -----------------------------------------------------------------------
def test_an_uncached_hub_id_offline_names_the_ways_out(good_clip, tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    ways_out = ["offline (HF_HUB_OFFLINE=1)", "cannot find the requested files in the local cache",
                "hf download org/not-cached", "HF_HUB_OFFLINE=0 once", "or pass a local folder"]
    result = run("fit", "--config", str(SFT_CONFIG), f"--trainer.default_root_dir={tmp_path / 'run'}",
                 "--model.init_args.backbone.init_args.pretrained_model_name_or_path=org/not-cached", env=env,
                 cwd=tmp_path)
    one_error_line(result, 2, "pipeline 'org/not-cached'", *ways_out)
    result = run("score", "--reward", "hf-hub:org/not-cached", "--videos", str(good_clip), module="reward_zoo.cli",
                 env=env, cwd=tmp_path)
    one_error_line(result, 1, "reward 'org/not-cached'", *ways_out)
    assert not (tmp_path / "run").exists()


def test_a_pipeline_folder_without_transformer_says_so(tiny_pixel_pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_pixel_pipeline, folder)
    shutil.rmtree(folder / "transformer")
    with pytest.raises(FileNotFoundError, match=rf"pipeline {folder} has no transformer/: model_index.json lists it"):
        DiffusersVideoBackbone(str(folder))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(SFT_CONFIG), f"--trainer.default_root_dir={tmp_path / 'run'}",
              f"--model.init_args.backbone.init_args.pretrained_model_name_or_path={folder}"], exit_on_error=True)
    cli_error_line(capsys, exit_info, 2, "has no transformer/")
    assert not (tmp_path / "run").exists()
