"""Shared fixtures: offline Hub, tiny random pipelines written once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lit_videoalign.testing import tiny_wan_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> str:
    """A tiny random Wan 2.1 pipeline with a VAE (9x32x32 clips)."""
    return str(tiny_wan_pipeline(tmp_path_factory.mktemp("tiny") / "wan"))


@pytest.fixture(scope="session")
def tiny_pixel_pipeline(tmp_path_factory) -> str:
    """A tiny random pixel-space Wan pipeline (16x32x32 clips, like the toy world)."""
    return str(tiny_wan_pipeline(tmp_path_factory.mktemp("tiny") / "wan_pixel", pixel_space=True))


@pytest.fixture(scope="module")
def ftfy_free_prompt_cleaning():
    """diffusers 0.42.1's I2V pipeline calls ``ftfy`` unguarded when cleaning prompts (the T2V pipeline checks that it
    is installed); without ftfy, clean prompts the T2V pipeline's way (our ASCII prompts are unchanged either way).
    Modules that run ``WanImageToVideoPipeline`` use it: ``pytestmark = pytest.mark.usefixtures(...)``."""
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v
    from diffusers.utils import is_ftfy_available

    with pytest.MonkeyPatch.context() as patch:
        if not is_ftfy_available():
            patch.setattr(pipeline_wan_i2v, "basic_clean", pipeline_wan.basic_clean)
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
