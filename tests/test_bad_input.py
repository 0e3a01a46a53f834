"""Bad input, in one place: every case fails with an error that names the problem and what was expected, the CLI
exits non-zero, and nothing half-written is left behind. Pickles are refused without being run (a payload that would
create a file proves it), and manifests cannot reach outside their root. What the console commands print for each
mistake (one ``error:`` line, exit status, ``--traceback``) is in ``tests/test_cli_errors.py``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import lightning as L
import pytest
import test_hub
import torch
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import save_file

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.cli import generate_videos, load_weights, main
from lit_videoalign.data.preference import PreferenceDataset
from lit_videoalign.data.toyworld import ToyWorld, ToyWorldDataModule
from lit_videoalign.data.video_folder import VideoFolderDataset
from lit_videoalign.evaluation import read_video_folder
from lit_videoalign.objectives.base import NonFiniteError
from lit_videoalign.objectives.grpo import GRPO
from lit_videoalign.objectives.reward_gradient import RewardGradient
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.video_io import write_mp4
from reward_zoo import create_reward
from reward_zoo.base import RewardModel

ROOT = Path(__file__).resolve().parent.parent
SFT_CONFIG = "configs/toyworld/sft.yaml"
hub = test_hub.hub  # the local loopback Hub of tests/hub_server.py


class RaisingReward(RewardModel):
    """A judge whose service is down."""

    dimensions = ("brightness",)
    differentiable = True

    def forward(self, videos, prompts=None, references=None):
        raise RuntimeError("judge offline")


class Payload:
    """Unpickling this creates ``marker``: the proof that a loader ran pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """A good clip, a truncated one and a text file named .mp4."""
    root = tmp_path_factory.mktemp("videos")
    write_mp4(ToyWorld().example(0).video, root / "good.mp4")
    data = (root / "good.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[:len(data) // 3])
    (root / "notes.mp4").write_text("this is not a video")
    return root


def manifest(root: Path, *entries: dict, name: str = "metadata.jsonl") -> Path:
    path = root / name
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def left_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- configs --------------------------------------------------------------------------------------------------------
def test_malformed_yaml_exits_nonzero_naming_the_line(tmp_path, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("model:\n  class_path: lit_videoalign.objectives.sft.SFT\n   init_args: {lora_rank: 4\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(cfg), f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "Problems parsing config" in err and "line 3" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "named"), [
    (["--model.class_path=lit_videoalign.objectives.sft.SFTT"], ["SFTT", "has no attribute"]),
    (["--model.init_args.lora_rank=eight"], ["lora_rank", "eight"]),
    (["--data.init_args.batch_size=two"], ["batch_size", "two"]),
    (["--trainer.max_stepz=3"], ["max_stepz"]),
])
def test_unknown_class_paths_keys_and_wrong_types_exit_nonzero_naming_them(args, named, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", SFT_CONFIG, f"--trainer.default_root_dir={tmp_path / 'run'}", *args])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert all(word in err for word in named), err[-2000:]
    assert not (tmp_path / "run").exists()


# -- datasets -------------------------------------------------------------------------------------------------------
def test_video_folder_with_missing_truncated_or_non_video_files(videos, tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    for name in ("good.mp4", "truncated.mp4", "notes.mp4"):
        (root / name).write_bytes((videos / name).read_bytes())
    manifest(root, {"file_name": "good.mp4", "prompt": "a red ball falls"},
             {"file_name": "missing.mp4", "prompt": "a red ball falls"})
    with pytest.raises(FileNotFoundError, match=r"metadata.jsonl:2: video file 'missing.mp4' not found under"):
        VideoFolderDataset(str(root), 9, 32, 32)
    (root / "metadata.jsonl").write_text('{"file_name": "good.mp4", "prompt": "a red ball falls"\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: not valid JSON"):
        VideoFolderDataset(str(root), 9, 32, 32)
    for name in ("truncated.mp4", "notes.mp4"):
        manifest(root, {"file_name": name, "prompt": "a red ball falls"})
        with pytest.raises(ValueError, match=rf"cannot decode video .*{name}"):
            VideoFolderDataset(str(root), 9, 32, 32)[0]
    manifest(root, {"file_name": "good.mp4", "prompt": "a red ball falls"})
    with pytest.raises(ValueError, match="has 16 frames, expected at least 40"):
        VideoFolderDataset(str(root), 40, 32, 32)[0]


def test_fit_on_a_broken_dataset_exits_and_leaves_no_run_folder(tmp_path, monkeypatch):
    """The default logger would have created ``lightning_logs/version_0``; a run that never started removes it."""
    monkeypatch.chdir(ROOT)
    root = tmp_path / "set"
    root.mkdir()
    manifest(root, {"file_name": "missing.mp4", "prompt": "a red ball falls"})
    cfg = tmp_path / "folder.yaml"
    text = (ROOT / SFT_CONFIG).read_text()
    data = text[text.index("data:"):text.index("trainer:")]
    cfg.write_text(text.replace(data, "data:\n  class_path: lit_videoalign.data.video_folder.VideoFolderDataModule\n"
                                      f"  init_args: {{root: {root}, num_frames: 16, height: 32, width: 32}}\n"))
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="metadata.jsonl:1: video file 'missing.mp4' not found"):
        main(["fit", "--config", str(cfg), f"--trainer.default_root_dir={run}",
              f"--trainer.callbacks.init_args.dirpath={run / 'pipeline'}"])
    assert not run.exists()


def test_manifest_paths_cannot_escape_their_root(videos, tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    (root / "good.mp4").write_bytes((videos / "good.mp4").read_bytes())
    outside = tmp_path / "outside.mp4"
    outside.write_bytes((videos / "good.mp4").read_bytes())
    (root / "link").symlink_to(tmp_path)
    for escaping in ("../outside.mp4", str(outside), "link/outside.mp4"):
        manifest(root, {"prompt": "a red ball falls", "chosen": "good.mp4", "rejected": escaping}, name="pairs.jsonl")
        with pytest.raises(ValueError, match=rf"pairs.jsonl:1 rejected: path '{escaping}' escapes the dataset root"):
            PreferenceDataset(str(root), "pairs.jsonl", skip_invalid=True)  # escaping paths are never skipped
        manifest(root, {"file_name": escaping, "prompt": "a red ball falls"})
        with pytest.raises(ValueError, match="escapes the dataset root"):
            VideoFolderDataset(str(root), 9, 32, 32)
        with pytest.raises(ValueError, match="escapes the dataset root"):
            read_video_folder(root)


def test_a_video_folder_manifest_with_a_broken_line_names_file_and_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.mp4", "prompt": "a red ball falls"}\n{"file_name": \n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: not valid JSON"):
        read_video_folder(tmp_path)


@pytest.mark.parametrize(("videos_", "error", "named"), [
    (torch.rand(2, 16, 32, 32), ValueError, r"shape \[B, T, C, H, W\], got shape \(2, 16, 32, 32\)"),
    (torch.rand(2, 16, 32, 32, 3), ValueError, r"3 channels at dim -3 of \[B, T, C, H, W\], got shape"),
    (torch.rand(2, 16, 3, 32, 32) * 255, ValueError, r"values must lie in \[0, 1\], got range"),
    ((torch.rand(2, 16, 3, 32, 32) * 255).to(torch.uint8), TypeError, r"floating-point tensor with values in \[0, 1\]"),
    (torch.full((2, 16, 3, 32, 32), float("nan")), ValueError, "NaN or infinite"),
    (torch.rand(2, 2, 3, 32, 32), ValueError, "needs at least"),
])
def test_rewards_refuse_wrong_shapes_and_value_ranges(videos_, error, named):
    with pytest.raises(error, match=named):
        create_reward("newton")(videos_, ["a red ball falls"] * 2)


# -- checkpoints ----------------------------------------------------------------------------------------------------
@pytest.fixture
def sft(tiny_pixel_pipeline) -> SFT:
    return SFT(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16), lora_rank=4)


def test_checkpoints_with_wrong_keys_or_shapes_are_named(sft, tmp_path):
    state = {k: v.clone().contiguous() for k, v in sft.state_dict().items()}
    key = next(k for k in state if "lora_A" in k)
    renamed = {("backbone.extra" if k == key else k): v for k, v in state.items()}
    save_file(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(ValueError, match=rf"does not hold the weights of this SFT: 1 missing keys, e.g. {key}; "
                                         r"1 unexpected keys, e.g. backbone.extra"):
        load_weights(sft, tmp_path / "renamed.safetensors")
    resized = {**state, key: torch.zeros(2, 2)}
    torch.save({"state_dict": resized}, tmp_path / "resized.ckpt")
    with pytest.raises(ValueError, match=rf"1 wrong shapes, e.g. {key} \(2, 2\) \(expected \(4, \d+\)\)"):
        load_weights(sft, tmp_path / "resized.ckpt")
    torch.save({"weights": state}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        load_weights(sft, tmp_path / "plain.pt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "resized.ckpt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read .*cut.ckpt as a weights-only checkpoint"):
        load_weights(sft, tmp_path / "cut.ckpt")


def test_generate_with_a_mismatched_checkpoint_exits_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    out = tmp_path / "gen"
    with pytest.raises(ValueError, match="does not hold the weights of this SFT"):
        main(["generate", "--config", SFT_CONFIG, "--ckpt_path", str(tmp_path / "other.ckpt"), "--prompts", "a",
              "--output_dir", str(out)])
    assert left_in(tmp_path) == ["other.ckpt"]


def test_pickles_are_refused_without_being_unpickled(sft, tmp_path, monkeypatch):
    marker = tmp_path / "PAYLOAD_RAN"
    with open(tmp_path / "model.safetensors", "wb") as f:  # a pickle where safetensors is expected
        pickle.dump({"w": Payload(marker)}, f)
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        load_weights(sft, tmp_path / "model.safetensors")
    torch.save({"state_dict": {"w": Payload(marker)}}, tmp_path / "evil.ckpt")  # a checkpoint with pickled code
    with pytest.raises(ValueError, match="as a weights-only checkpoint"):
        load_weights(sft, tmp_path / "evil.ckpt")
    reward = tmp_path / "reward"
    create_reward("newton").save_pretrained(reward)
    (reward / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors file"):
        create_reward(str(reward))
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="holds pickled objects, which are never unpickled"):
        main(["fit", "--config", SFT_CONFIG, "--ckpt_path", str(tmp_path / "evil.ckpt"),
              f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert not marker.exists() and not (tmp_path / "run").exists()


# -- the Hub --------------------------------------------------------------------------------------------------------
def test_a_hub_id_or_revision_that_does_not_exist(hub, tiny_pixel_pipeline, tmp_path, monkeypatch):
    with pytest.raises(RepositoryNotFoundError, match="Repository Not Found for url: .*/org/missing"):
        create_reward("hf-hub:org/missing")
    with pytest.raises(RepositoryNotFoundError, match="org/missing-model"):
        DiffusersVideoBackbone("org/missing-model")
    hub.commit("org/tiny-wan", tiny_pixel_pipeline, "tiny pixel-space Wan")
    with pytest.raises(RevisionNotFoundError, match="Revision Not Found"):
        DiffusersVideoBackbone("org/tiny-wan", revision="no-such-branch")
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"(?s)Revision Not Found for url: \S*/org/tiny-wan/revision/no-such-branch"):
        main(["fit", "--config", SFT_CONFIG, f"--trainer.default_root_dir={run}",
              "--model.init_args.backbone.init_args.pretrained_model_name_or_path=org/tiny-wan",
              "--model.init_args.backbone.init_args.revision=no-such-branch"])
    out = tmp_path / "eval"
    with pytest.raises(RepositoryNotFoundError):
        main(["evaluate", "--config", SFT_CONFIG, "--prompts", "a red ball falls", "--rewards", "hf-hub:org/missing",
              "--output_dir", str(out)])
    assert not run.exists() and not out.exists()  # the reward failed before anything was generated


# -- rewards that raise, and failures half-way ----------------------------------------------------------------------
def test_a_reward_that_raises(tiny_pixel_pipeline, videos, tmp_path):
    judge = tmp_path / "judge"
    RaisingReward().save_pretrained(judge)
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "good.mp4").write_bytes((videos / "good.mp4").read_bytes())
    manifest(folder, {"file_name": "good.mp4", "prompt": "a red ball falls"})
    out = tmp_path / "eval"
    with pytest.raises(RuntimeError, match="judge offline"):  # evaluate: the reward's own error, and no tables
        main(["evaluate", "--videos", str(folder), "--rewards", str(judge), "--output_dir", str(out)])
    assert not out.exists()

    def fit(model):
        L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0).fit(
            model, ToyWorldDataModule(batch_size=1, train_size=4, max_balls=1, prompts_only=True))

    def backbone():
        return DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)

    with pytest.raises(RuntimeError, match="judge offline"):  # reward-gradient cannot learn without it: stop
        fit(RewardGradient(backbone(), reward=RaisingReward(), lora_rank=4, num_sampling_steps=1,
                           num_inference_steps=1))
    grpo = GRPO(backbone(), reward=RaisingReward(), lora_rank=4, group_size=2, num_sampling_steps=1,
                num_inference_steps=1, max_consecutive_nonfinite=2)
    before = {n: p.detach().clone() for n, p in grpo.named_parameters()}
    with pytest.warns(UserWarning, match="GRPO: the reward raised RuntimeError: judge offline"):
        with pytest.raises(NonFiniteError, match="2 optimizer steps in a row had a NaN or infinite reward"):
            fit(grpo)  # online RL skips a failed batch, and stops when the judge stays down
    assert all(torch.equal(before[n], p) for n, p in grpo.named_parameters())


def test_generation_that_fails_half_way_writes_nothing(tmp_path):
    def sampler(fail_at: int):
        calls = []

        def sample(model, prompts, seeds, images=None):
            calls.append(prompts)
            if len(calls) == fail_at:
                raise RuntimeError("out of memory")
            return torch.rand(len(prompts), 4, 3, 16, 16)

        return sample

    out = tmp_path / "gen"
    with pytest.raises(RuntimeError, match="out of memory"):
        generate_videos(None, ["a", "b", "c"], [0, 1, 2], out, batch_size=1, sampler=sampler(fail_at=2))
    assert left_in(tmp_path) == []  # neither the first video nor a staging folder
    _, files = generate_videos(None, ["a", "b"], [0, 1], out, batch_size=1, sampler=sampler(fail_at=0), gif=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([f.name for f in files] + ["metadata.jsonl"])
