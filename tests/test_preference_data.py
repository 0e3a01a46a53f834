"""Preference manifests: pairs decode as batches, every bad entry is named up front, escaping paths are refused."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lit_videoalign.data.preference import (
    PreferenceDataModule,
    PreferenceDataset,
    probe_video,
    write_toyworld_manifest,
)
from lit_videoalign.data.toyworld import ToyWorld
from lit_videoalign.video_io import write_mp4


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A folder with two 16-frame clips, one 12-frame clip, one 16-frame 48x48 clip and a damaged file."""
    root = tmp_path_factory.mktemp("pairs")
    world = ToyWorld(max_balls=1)
    for i in range(2):
        write_mp4(world.example(i).video, root / f"c{i}.mp4")
    write_mp4(world.example(5).video[:12], root / "short.mp4")
    write_mp4(ToyWorld(height=48, width=48).example(0).video, root / "big.mp4")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    return root


def manifest(root, *lines, name="pairs.jsonl"):
    (root / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return name


def pair(chosen="c0.mp4", rejected="c1.mp4", **extra):
    return {"prompt": "a red ball falls", "chosen": chosen, "rejected": rejected, **extra}


def test_pairs_load_and_batch_with_labels_scores_and_weights(clips):
    labels, scores = {"physics": 1, "visual": 0}, {"chosen": {"overall": 0.9}, "rejected": {"overall": 0.2}}
    name = manifest(clips, pair(labels=labels, scores=scores, weight=2.0),
                    pair("c1.mp4", "c0.mp4", tie=True, labels=labels, scores=scores, weight=1.0))
    dm = PreferenceDataModule(str(clips), manifest=name, num_frames=8, height=16, width=16, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen"].shape == batch["rejected"].shape == (2, 8, 3, 16, 16)
    assert 0 <= batch["chosen"].min() and batch["chosen"].max() <= 1
    assert sorted(batch["tie"].tolist()) == [False, True]
    assert batch["labels"]["physics"].tolist() == [1, 1]
    assert batch["scores"]["chosen"]["overall"].dtype == torch.float32 and batch["weight"].shape == (2,)


def test_latents_are_read_when_every_line_has_them(clips):
    save_file({"latents": torch.ones(3, 16, 32, 32)}, str(clips / "w.safetensors"))
    save_file({"latents": torch.zeros(3, 16, 32, 32)}, str(clips / "l.safetensors"))
    name = manifest(clips, {"prompt": "a", "chosen_latents": "w.safetensors", "rejected_latents": "l.safetensors"},
                    name="latents.jsonl")
    item = PreferenceDataset(clips, name)[0]
    assert "chosen" not in item and item["chosen_latents"].sum() == 3 * 16 * 32 * 32
    save_file({"latents": torch.zeros(3, 8, 32, 32)}, str(clips / "l_small.safetensors"))
    line = {"prompt": "a", "chosen_latents": "w.safetensors", "rejected_latents": "l_small.safetensors"}
    name = manifest(clips, line, name="latents_bad.jsonl")
    with pytest.raises(ValueError, match=r"latents_bad.jsonl:1: mismatched latents"):
        PreferenceDataset(clips, name)


def test_missing_unreadable_and_mismatched_entries_are_all_named(clips):
    name = manifest(clips, pair(), pair(rejected="gone.mp4"), pair(rejected="broken.mp4"), pair(rejected="short.mp4"))
    with pytest.raises(ValueError) as err:
        PreferenceDataset(clips, name)
    msg = str(err.value)
    assert "3 of 4 pairs are invalid" in msg
    assert "pairs.jsonl:2" in msg and "gone.mp4" in msg and "not found" in msg
    assert "pairs.jsonl:3" in msg and "broken.mp4" in msg and "cannot decode" in msg
    assert "pairs.jsonl:4" in msg and "mismatched frame counts" in msg and "12" in msg
    assert "pairs.jsonl:1" not in msg


def test_skip_invalid_trains_on_the_rest_and_says_so(clips):
    name = manifest(clips, pair(), pair(rejected="gone.mp4"))
    with pytest.warns(UserWarning, match=r"(?s)1 of 2 pairs are invalid.*training on the 1 valid pairs"):
        ds = PreferenceDataset(clips, name, skip_invalid=True)
    assert len(ds) == 1


def test_frame_counts_and_sizes_must_agree_unless_resized(clips):
    name = manifest(clips, pair(), pair("big.mp4", "big.mp4"))
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: frame size \(48, 48\) differ"):
        PreferenceDataset(clips, name)
    assert len(PreferenceDataset(clips, name, height=32, width=32)) == 2
    name = manifest(clips, pair("short.mp4", "short.mp4"))
    with pytest.raises(ValueError, match="short.mp4 has 12 frames, expected at least num_frames=16"):
        PreferenceDataset(clips, name, num_frames=16)


def test_empty_manifest_and_escaping_paths_are_refused(clips, tmp_path):
    with pytest.raises(ValueError, match="has no pairs"):
        PreferenceDataset(clips, manifest(clips, name="empty.jsonl"))
    outside = tmp_path / "outside.mp4"
    write_mp4(ToyWorld().example(0).video, outside)
    for path in (f"../{tmp_path.name}/outside.mp4", str(outside)):
        with pytest.raises(ValueError, match="escapes the dataset root"):
            PreferenceDataset(clips, manifest(clips, pair(rejected=path)), skip_invalid=True)
    with pytest.raises(FileNotFoundError, match="no preference manifest"):
        PreferenceDataset(clips, "nope.jsonl")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'labels' must map"):
        PreferenceDataset(clips, manifest(clips, pair(labels={"physics": 2}), name="bad.jsonl"))


def test_toyworld_manifest_round_trips(tmp_path):
    path = write_toyworld_manifest(tmp_path, num_pairs=2, seed=3)
    ds = PreferenceDataset(tmp_path, path.name, decode_check=False)
    item = ds[0]
    line = json.loads(path.read_text().splitlines()[0])
    assert line["labels"]["physics"] == 1 and line["corruption"] in {"gravity_wrong", "gravity_zero", "teleport",
                                                                       "size_change", "time_reversal"}
    # the pair differs by up to 0.75 (measured), far above allclose's default tolerance
    assert item["chosen"].shape == (16, 3, 32, 32) and not torch.allclose(item["chosen"], item["rejected"])
    assert probe_video(tmp_path / line["chosen"], decode=False).num_frames == 16
