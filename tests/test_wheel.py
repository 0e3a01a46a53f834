"""The built wheel, installed outside the repository, runs the README's quick start from an empty folder (#22.1).

The wheel is built offline (``pip wheel --no-deps --no-build-isolation --no-index``) from a copy of the packaged
sources (pyproject.toml, README.md, lit_videoalign/, reward_zoo/), so neither the repository's ``configs/`` links nor
a stale ``build/`` folder can leak into it, and installed with ``pip install --no-deps --target``. The commands then
run with ``PYTHONPATH`` set to that target from an empty temporary folder; each asserts it imported the installed copy.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lit_videoalign", "reward_zoo")
URLS = ("Homepage", "Repository", "Issues", "Documentation")


def pip(*args: str) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    res = subprocess.run([sys.executable, "-m", "pip", *args, "--quiet"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """The wheel built once for this module, its ``--target`` install and an empty working folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src))
    (wheel,) = (tmp / "dist").glob("lit_videoalign-*.whl")
    pip("install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel))
    work = tmp / "work"
    work.mkdir()
    return {"wheel": wheel, "site": tmp / "site", "work": work, "src": src}


def run(installed: dict[str, Path], *command: str) -> subprocess.CompletedProcess:
    """``command`` from the empty folder with only the installed wheel on ``PYTHONPATH`` (the repository's editable
    install comes after it on ``sys.path``)."""
    env = {**os.environ, "PYTHONPATH": str(installed["site"]), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(list(command), cwd=installed["work"], capture_output=True, text=True, env=env)


def test_the_wheel_holds_configs_weights_and_project_urls(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    data = {p.relative_to(installed["src"]).as_posix() for package in PACKAGES
            for p in (installed["src"] / package).rglob("*") if p.is_file() and p.suffix != ".py"}
    assert data and data <= names, sorted(data - names)  # every non-Python file of the packages ships
    assert {"lit_videoalign/configs/toyworld/sft.yaml", "reward_zoo/configs/quality.yaml",
            "lit_videoalign/pretrained/toyworld-base/transformer/diffusion_pytorch_model.safetensors",
            "lit_videoalign/pretrained/toyworld-base/model_index.json",
            "reward_zoo/pretrained/quality/model.safetensors",
            "reward_zoo/pretrained/physics_learned/model.safetensors"} <= names
    assert not [n for n in names if n.startswith(("configs/", "tests/", "benchmarks/"))]
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(installed["wheel"]).read(metadata).decode()
    urls = dict(line.removeprefix("Project-URL: ").split(", ", 1) for line in text.splitlines()
                if line.startswith("Project-URL: "))
    assert set(URLS) <= set(urls) and all(u.startswith("https://github.com/lit-videoalign/") for u in urls.values())


def test_the_quick_start_runs_from_an_empty_folder(installed):
    site, work = installed["site"], installed["work"]
    check = ("import lit_videoalign, reward_zoo; from lit_videoalign.shipped_configs import config_path; "
             "from lit_videoalign.pretrained import TOYWORLD_BASE; "
             "print(lit_videoalign.__file__, reward_zoo.__file__, config_path('toyworld/sft'), TOYWORLD_BASE)")
    res = run(installed, sys.executable, "-c", check)
    assert res.returncode == 0, res.stderr[-2000:]
    paths = res.stdout.split()
    assert len(paths) == 4 and all(Path(p).is_relative_to(site) for p in paths), (paths, site)

    res = run(installed, str(site / "bin" / "videoalign"), "configs")  # the console script the wheel installs
    assert res.returncode == 0, res.stderr[-2000:]
    assert "toyworld/sft" in res.stdout.split() and "wan2.1-1.3b/sft_lora" in res.stdout.split()

    res = run(installed, sys.executable, "-m", "lit_videoalign.cli", "fit", "--config", "toyworld/sft",
              "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
              "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=2", "--data.init_args.val_size=2")
    assert res.returncode == 0, res.stderr[-3000:]
    (ckpt,) = (work / "outputs" / "sft").rglob("*.ckpt")  # the config's outputs/, relative to the empty folder
    assert (work / "outputs" / "sft" / "pipeline" / "model_index.json").is_file()
    assert "step=2" in ckpt.name

    res = run(installed, sys.executable, "-m", "lit_videoalign.cli", "generate", "--config", "toyworld/sft",
              "--ckpt_path", str(ckpt), "--prompts", "a red ball falls", "--num_inference_steps", "2",
              "--output_dir", "outputs/gen")
    assert res.returncode == 0, res.stderr[-3000:]
    entries = [json.loads(line) for line in (work / "outputs" / "gen" / "metadata.jsonl").read_text().splitlines()]
    assert len(entries) == 1 and (work / "outputs" / "gen" / entries[0]["file_name"]).is_file()
