"""Outputs the next tool reads (issue 22.4): a ``videoalign generate`` folder is scored as it is by ``reward-zoo score``
and ``videoalign evaluate``, run as a user runs them (separate processes, one after the other); files named one by one
find their prompts in the ``metadata.jsonl`` beside them."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lit_videoalign.video_io import current_umask
from reward_zoo.cli import main as zoo_main
from reward_zoo.cli import score_files

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red ball falls", "a blue ball moves left"]


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root; fails the test with its stderr when it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"{module} {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A folder written by ``videoalign generate`` (toy-world base, one step: the content does not matter here)."""
    out = tmp_path_factory.mktemp("gen") / "gen"
    run("lit_videoalign.cli", "generate", "--config", "configs/toyworld/sft.yaml", "--prompts", *PROMPTS,
        "--seeds", "3", "4", "--num_inference_steps", "1", "--output_dir", str(out))
    return out


def test_the_manifest_lists_every_file_generate_wrote(generated):
    entries = [json.loads(line) for line in (generated / "metadata.jsonl").read_text().splitlines()]
    assert [(e["prompt"], e["seed"]) for e in entries] == [(PROMPTS[0], 3), (PROMPTS[1], 4)]
    listed = {e["file_name"] for e in entries} | {e["preview"] for e in entries} | {"metadata.jsonl"}
    on_disk = {p.relative_to(generated).as_posix() for p in generated.rglob("*") if p.is_file()}
    assert on_disk == listed  # nothing unlisted, nothing missing
    assert all(e["preview"].startswith("previews/") and e["preview"].endswith(".gif") for e in entries)
    assert sorted(p.suffix for p in generated.iterdir() if p.is_file()) == [".jsonl", ".mp4", ".mp4"]
    readable = 0o666 & ~current_umask()  # what open() gives: not mkstemp's owner-only 0600 (issue 22.5)
    assert {oct(stat.S_IMODE((generated / f).stat().st_mode)) for f in listed} == {oct(readable)}


def test_generate_then_score_the_folder_then_explicit_files_then_evaluate(generated, tmp_path):
    run("reward_zoo.cli", "score", "--reward", "quality", "--videos", str(generated), "--output_dir",
        str(tmp_path / "folder"))
    rows = json.loads((tmp_path / "folder" / "scores.json").read_text())
    assert [r["prompt"] for r in rows] == PROMPTS and all(r["video"].endswith(".mp4") for r in rows)

    mp4s = sorted(str(p) for p in generated.glob("*.mp4"))  # what a shell makes of gen/*.mp4
    zoo_main(["score", "--reward", "quality", "--videos", *reversed(mp4s), "--output_dir", str(tmp_path / "files")])
    by_file = json.loads((tmp_path / "files" / "scores.json").read_text())
    assert [r["prompt"] for r in by_file] == PROMPTS[::-1]  # each file's own prompt, from the manifest beside it
    assert [r["text"] for r in by_file] == [r["text"] for r in rows][::-1]

    run("lit_videoalign.cli", "evaluate", "--videos", str(generated), "--rewards", "newton", "quality",
        "--output_dir", str(tmp_path / "eval"))
    evaluated = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert len(evaluated) == 2 and [r["prompt"] for r in evaluated] == PROMPTS


def test_a_folder_from_before_the_previews_subfolder_still_scores(generated, tmp_path):
    """Older ``generate`` runs wrote the GIFs beside the MP4s, unlisted: the manifest decides what is scored."""
    old = tmp_path / "old"
    shutil.copytree(generated, old)
    for gif in (old / "previews").iterdir():
        gif.rename(old / gif.name)
    rows = score_files("newton", [str(old)])
    assert [Path(r["video"]).suffix for r in rows] == [".mp4", ".mp4"] and [r["prompt"] for r in rows] == PROMPTS


def test_files_without_a_manifest_beside_them_score_without_prompts_unless_the_reward_needs_them(generated, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    first = sorted(generated.glob("*.mp4"))[0]
    clip = shutil.copy(first, loose / "clip.mp4")
    rows = score_files("newton", [str(clip), str(first)])
    assert [r["prompt"] for r in rows] == ["", PROMPTS[0]]  # mixed: a prompt where a manifest knows one
    with pytest.raises(ValueError, match=r"quality needs prompts, and 1 of 2 videos have none \(first: .*clip.mp4\)"):
        score_files("quality", [str(clip), str(first)])
