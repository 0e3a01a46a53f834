"""Plain-diffusers interop of exports: a LoRA fit of a tiny random Wan with a VAE, exported by ``PipelineExport``,
opens with ``DiffusionPipeline.from_pretrained`` and samples with ``pipe(...)`` what ``generate`` samples; a
pixel-space export (the toy world's) opens with ``vae=None``, and only ``videoalign generate`` samples it."""

from __future__ import annotations

import lightning as L
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.backbones.loading import BUILTIN_DIR
from lit_videoalign.callbacks.pipeline_export import PipelineExport
from lit_videoalign.data.toyworld import ToyWorldDataModule
from lit_videoalign.objectives.sft import SFT

PROMPT = "a red ball falls"


def fit_and_export(pipeline: str, export, num_frames: int) -> SFT:
    """Two LoRA SFT steps on toy-world clips of ``num_frames`` frames, exported (merged) to ``export``."""
    torch.manual_seed(0)
    model = SFT(DiffusersVideoBackbone(pipeline, max_sequence_length=16), lora_rank=4, num_frames=num_frames,
                height=32, width=32, num_inference_steps=3, guidance_scale=3.0,
                optimizer=lambda p: torch.optim.AdamW(p, lr=5e-2))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[PipelineExport(str(export))], default_root_dir=export.parent)
    trainer.fit(model, datamodule=ToyWorldDataModule(num_frames=num_frames, batch_size=2, train_size=8, val_size=2))
    return model.eval()


def test_a_real_vae_export_samples_in_plain_diffusers(tiny_pipeline, tmp_path):
    from diffusers import DiffusionPipeline, WanPipeline

    model = fit_and_export(tiny_pipeline, tmp_path / "export", num_frames=9)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export")
    assert isinstance(pipe, WanPipeline) and pipe.vae is not None
    pipe.set_progress_bar_config(disable=True)
    base = WanPipeline.from_pretrained(tiny_pipeline).transformer.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in pipe.transformer.state_dict().items())  # the LoRA is merged

    noise = model.initial_noise([7])
    video = pipe(prompt=PROMPT, negative_prompt="", latents=noise, num_frames=9, height=32, width=32,
                 num_inference_steps=3, guidance_scale=3.0, max_sequence_length=16, output_type="pt").frames
    assert video.shape == (1, 9, 3, 32, 32)  # (b, t, c, h, w) in [0, 1]
    assert video.min() >= 0 and video.max() <= 1 and video.std() > 0
    ours = model.generate([PROMPT], seeds=[7])  # the trained model, sampled with the pipeline's scheduler
    # Merged weights and the batched guidance round differently from base + LoRA: measured max |diff| 1.2e-7 in
    # [0, 1] pixels whose std is 0.048 (1.2e-6 on latents of max |x| 4.3; torch 2.14.1, diffusers 0.42.1, CPU); 1e-5
    # is 80x that and 200x below the pixels' spread.
    torch.testing.assert_close(ours, video, rtol=0, atol=1e-5)


def test_a_pixel_space_export_opens_with_vae_none(tiny_pixel_pipeline, tmp_path):
    from diffusers import DiffusionPipeline, WanPipeline

    for path in (BUILTIN_DIR / "toyworld-base", tmp_path / "export"):  # the shipped toy base and a fitted export
        if path.name == "export":
            fit_and_export(tiny_pixel_pipeline, path, num_frames=16)
        pipe = DiffusionPipeline.from_pretrained(path, vae=None)  # no VAE: the transformer works on pixels
        assert isinstance(pipe, WanPipeline) and pipe.vae is None
        assert pipe.transformer.config.in_channels == 3
        again = DiffusersVideoBackbone(str(path), max_sequence_length=16)
        assert again.pixel_space and type(again.scheduler) is type(pipe.scheduler)
