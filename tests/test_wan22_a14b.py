"""Wan 2.2 A14B (two experts switched at ``boundary_ratio``) on a tiny random pair of experts: sampling equals
diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline``; each sample runs through the expert of its sigma; training
one expert leaves the other untouched and draws sigmas from its range only; both experts train with separate adapters
and optimizer groups; resume is exact; exports keep the experts apart and load in diffusers."""

import json
import math
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.backbones.experts import TwoExpertDenoiser
from lit_videoalign.callbacks.adapter_export import WEIGHT_NAME, load_adapter, save_adapter
from lit_videoalign.data.resumable import ResumableDataLoader
from lit_videoalign.objectives.grpo import GRPO
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.schedules.flow import sample_training_sigmas, sampling_sigmas
from lit_videoalign.testing import Brightness, tiny_wan22_a14b_pipeline, tiny_wan_pipeline

pytestmark = pytest.mark.usefixtures("ftfy_free_prompt_cleaning")  # its tests run WanImageToVideoPipeline

PROMPTS = ["a red ball falls", "a blue ball moves left"]
FRAMES, SIZE, LATENT, TEXT = 9, 32, (16, 3, 4, 4), 16
BOUNDARY = 0.875


@pytest.fixture(scope="module")
def a14b(tmp_path_factory) -> str:
    return str(tiny_wan22_a14b_pipeline(tmp_path_factory.mktemp("a14b") / "pipe", boundary_ratio=BOUNDARY))


def backbone(path: str, **kwargs) -> DiffusersVideoBackbone:
    return DiffusersVideoBackbone(path, max_sequence_length=TEXT, **kwargs)




@pytest.mark.parametrize("i2v", [False, True])
@pytest.mark.parametrize("guidance_scale,guidance_scale_2", [(1.0, None), (3.0, None), (3.0, 1.5)])
def test_sampling_equals_the_diffusers_two_expert_pipeline(a14b, tmp_path, guidance_scale, guidance_scale_2, i2v):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    path = a14b if not i2v else str(tiny_wan22_a14b_pipeline(tmp_path / "i2v", i2v=True, boundary_ratio=0.9))
    bb = backbone(path, guidance_scale_2=guidance_scale_2)
    assert isinstance(bb.denoiser, TwoExpertDenoiser) and bb.supports_images == i2v
    noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(1))
    pixels = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    img = (pixels * 255).round() / 255
    steps = 4  # sigmas 1, 0.75, 0.5, 0.25: the first step runs the high-noise expert, the rest the low-noise one
    model = SFT(bb, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=steps,
                guidance_scale=guidance_scale).eval()
    with torch.no_grad():
        cond = bb.encode_prompts(PROMPTS)
        if i2v:
            cond = bb.encode_images(img.expand(2, -1, -1, -1), cond, num_frames=FRAMES)
        ours = model.sample_latents(noise, cond, sampler="pipeline")
    pipe = (WanImageToVideoPipeline if i2v else WanPipeline).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    extra = {"image": _pil(img)} if i2v else {}
    theirs = pipe(prompt=PROMPTS, negative_prompt="", latents=noise, num_frames=FRAMES, height=SIZE, width=SIZE,
                  num_inference_steps=steps, guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2,
                  max_sequence_length=TEXT, output_type="latent", **extra).frames
    # float32 rounding only: measured max |diff| <= 1e-6 on latents of max |x| ~4 (torch 2.14.1, diffusers 0.42.1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * theirs.abs().max().item())
    # and the second expert mattered: with the high-noise expert everywhere the result is another one
    single = TwoExpertDenoiser(bb.denoiser.high_noise, bb.denoiser.high_noise, BOUNDARY)
    with torch.no_grad():
        bb.denoiser, kept = single, bb.denoiser
        other = model.sample_latents(noise, cond, sampler="pipeline")
        bb.denoiser = kept
    assert (other - ours).abs().max() > 0.1 * theirs.abs().max()


def _pil(img: torch.Tensor):
    import PIL.Image

    return PIL.Image.fromarray((img[0] * 255).round().byte().permute(1, 2, 0).numpy())


def test_each_sample_runs_through_the_expert_of_its_sigma(a14b):
    bb = backbone(a14b)
    experts = bb.denoiser
    x = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(0))
    cond = bb.encode_prompts(PROMPTS + PROMPTS[:1])
    sigma = torch.tensor([0.95, 0.3, BOUNDARY])  # high, low, and the boundary itself (high, as t >= boundary)
    with torch.no_grad():
        mixed = bb.predict_velocity(x, sigma, cond)
        for i, expert in enumerate([experts.high_noise, experts.low_noise, experts.high_noise]):
            alone = bb.predict_velocity(x[i:i + 1], sigma[i:i + 1], cond.index(slice(i, i + 1)), denoiser=expert)
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=0, atol=1e-5)
        wrong = bb.predict_velocity(x[:1], sigma[:1], cond.index(slice(0, 1)), denoiser=experts.low_noise)
    assert (wrong - mixed[:1]).abs().max() > 1e-2  # the experts differ, so the dispatch is what made them equal
    assert bb.trains_at(torch.tensor([0.95, 0.3, BOUNDARY])).tolist() == [True, True, True]


def video_loader(n: int = 8) -> ResumableDataLoader:
    g = torch.Generator().manual_seed(0)
    items = [{"video": torch.rand(FRAMES, 3, SIZE, SIZE, generator=g), "prompt": PROMPTS[i % 2]} for i in range(n)]
    return ResumableDataLoader(items, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(3))


def fit(model, steps: int, root=None, ckpt_path=None) -> L.Trainer:
    callbacks = [] if root is None else [ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1,
                                                         save_top_k=-1)]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=root is not None,
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, video_loader(), ckpt_path=ckpt_path)
    return trainer


def weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("lora", [True, False])
def test_training_the_low_noise_expert_alone_leaves_the_high_noise_one_untouched(a14b, lora, monkeypatch):
    L.seed_everything(0)
    bb = backbone(a14b, train_experts=["low_noise"])
    assert bb.training_sigma_range == (0.0, BOUNDARY)
    model = SFT(bb, lora_rank=4 if lora else None, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                num_frames=FRAMES, height=SIZE, width=SIZE)
    assert not any("lora_" in n for n, _ in bb.denoiser.high_noise.named_parameters())  # no adapter on it
    drawn = []
    monkeypatch.setattr(bb.denoiser.low_noise, "forward", _recording(bb.denoiser.low_noise.forward, drawn))
    high, low = weights(bb.denoiser.high_noise), weights(bb.denoiser.low_noise)
    trainer = fit(model, 3)
    assert all(torch.equal(high[n], p) for n, p in bb.denoiser.high_noise.named_parameters())
    moved = [n for n, p in bb.denoiser.low_noise.named_parameters() if not torch.equal(low[n], p)]
    assert moved and all(("lora_" in n) == lora for n in moved)
    assert drawn and max(drawn) < BOUNDARY * 1000  # every training sigma in the low-noise expert's range
    groups = trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["low_noise"]


def _recording(forward, seen: list):
    def wrapped(*args, timestep, **kwargs):
        seen.extend(timestep.tolist())
        return forward(*args, timestep=timestep, **kwargs)
    return wrapped


def test_both_experts_train_with_separate_adapters_and_optimizer_groups_and_resume_exactly(tmp_path):
    half = str(tiny_wan22_a14b_pipeline(tmp_path / "half", boundary_ratio=0.5))  # uniform sigmas reach both experts

    def make():
        L.seed_everything(0)
        bb = backbone(half, expert_lr={"low_noise": 5e-3})
        return SFT(bb, lora_rank=4, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), num_frames=FRAMES,
                   height=SIZE, width=SIZE, sigma_sampling="uniform")

    model = make()
    experts = model.backbone.denoiser
    adapters = {name: [n for n, _ in experts.expert(name).named_parameters() if "lora_" in n]
                for name in ("high_noise", "low_noise")}
    assert adapters["high_noise"] and adapters["high_noise"] == adapters["low_noise"]  # same layout, own weights
    assert not set(map(id, experts.high_noise.parameters())) & set(map(id, experts.low_noise.parameters()))
    before = weights(experts)
    trainer = fit(model, 4, root=tmp_path / "full")
    groups = trainer.optimizers[0].param_groups
    assert [(g["name"], g["lr"]) for g in groups] == [("high_noise", 1e-2), ("low_noise", 5e-3)]
    for name in ("high_noise", "low_noise"):
        assert any(not torch.equal(before[f"{name}.{n}"], p) for n, p in experts.expert(name).named_parameters()
                   if "lora_" in n), f"the {name} adapter did not train"
    full = torch.load(tmp_path / "full" / "step=4.ckpt", weights_only=True)
    assert any(k.startswith("backbone.denoiser.low_noise.") for k in full["state_dict"])

    fit(make(), 4, root=tmp_path / "resumed", ckpt_path=tmp_path / "full" / "step=2.ckpt")
    resumed = torch.load(tmp_path / "resumed" / "step=4.ckpt", weights_only=True)
    for key in ("state_dict",):
        assert full[key].keys() == resumed[key].keys()
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key]), "resume is not exact"
    for a, b in zip(full["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)

    # exports: merged weights as transformer/ and transformer_2/, adapters as high_noise/ and low_noise/
    out = model.backbone.save_pretrained(tmp_path / "export")
    assert (out / "transformer" / "config.json").is_file() and (out / "transformer_2" / "config.json").is_file()
    reloaded = backbone(str(out))
    x = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.9, 0.2])
    with torch.no_grad():
        cond = model.backbone.encode_prompts(PROMPTS)
        torch.testing.assert_close(reloaded.predict_velocity(x, sigma, cond),
                                   model.backbone.predict_velocity(x, sigma, cond), rtol=1e-4, atol=1e-5)
    save_adapter(model.backbone, tmp_path / "lora")
    assert {p.parent.name for p in (tmp_path / "lora").rglob(WEIGHT_NAME)} == {"high_noise", "low_noise"}
    fresh = backbone(half)
    load_adapter(fresh, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict_velocity(x, sigma, cond),
                                   model.backbone.predict_velocity(x, sigma, cond), rtol=1e-4, atol=1e-5)


def test_the_adapters_load_into_diffusers_own_two_expert_pipeline(a14b, tmp_path):
    from diffusers import WanPipeline

    bb = backbone(a14b)
    SFT(bb, lora_rank=4, num_frames=FRAMES, height=SIZE, width=SIZE)
    for p in bb.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(p.numel()))
    save_adapter(bb, tmp_path / "lora")
    pipe = WanPipeline.from_pretrained(a14b)
    pipe.load_lora_weights(tmp_path / "lora" / "high_noise", weight_name=WEIGHT_NAME, adapter_name="hi")
    pipe.load_lora_weights(tmp_path / "lora" / "low_noise", weight_name=WEIGHT_NAME, adapter_name="lo",
                           load_into_transformer_2=True)
    x = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(5))
    cond = bb.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        for sigma, theirs in ((0.95, pipe.transformer), (0.3, pipe.transformer_2)):
            ours = bb.predict_velocity(x, sigma, cond)
            ref = theirs(hidden_states=x, timestep=torch.tensor([sigma * 1000]),
                         encoder_hidden_states=cond.prompt_embeds, return_dict=False)[0]
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_nft_and_grpo_train_only_where_their_expert_runs(a14b):
    bb = backbone(a14b, train_experts=["high_noise"])
    grpo = GRPO(bb, reward=Brightness(), lora_rank=4, num_frames=FRAMES, height=SIZE, width=SIZE,
                num_sampling_steps=8, group_size=2)
    grid = sampling_sigmas(8, shift=grpo.sampling_shift)
    assert grpo.sde_steps() == [i for i in range(8) if grid[i] >= BOUNDARY]  # the high-noise expert's steps only
    low = backbone(a14b, train_experts=["low_noise"])
    nft = _nft(low, sigma_sampling="grid")
    assert (nft.training_sigmas(64) < BOUNDARY).all()
    drawn = _nft(low, sigma_sampling="logit_normal").training_sigmas(256)
    assert drawn.max() < BOUNDARY and drawn.min() >= _nft(low).hparams.sigma_min


def _nft(bb, **kwargs):
    from lit_videoalign.objectives.nft import DiffusionNFT

    return DiffusionNFT(bb, reward=Brightness(), num_frames=FRAMES, height=SIZE, width=SIZE, **kwargs)


@pytest.mark.parametrize("mode,shift", [("uniform", 1.0), ("logit_normal", 1.0), ("logit_normal", 3.0)])
def test_truncated_training_sigmas_follow_the_conditional_distribution(mode, shift):
    """Drawn in range by the inverse CDF, they match rejection sampling of the full draw (quantiles within 0.02)."""
    low, high = 0.2, BOUNDARY
    ours = sample_training_sigmas(20000, mode=mode, shift=shift, sigma_range=(low, high),
                                  generator=torch.Generator().manual_seed(0))
    full = sample_training_sigmas(200000, mode=mode, shift=shift, generator=torch.Generator().manual_seed(1))
    kept = full[(full >= low) & (full <= high)]
    assert ours.min() >= low and ours.max() <= high
    q = torch.linspace(0.05, 0.95, 10)
    assert (torch.quantile(ours, q) - torch.quantile(kept, q)).abs().max() < 0.02
    same = sample_training_sigmas(4, mode=mode, shift=shift, generator=torch.Generator().manual_seed(2))
    assert torch.equal(same, sample_training_sigmas(4, mode=mode, shift=shift, sigma_range=(0.0, 1.0),
                                                    generator=torch.Generator().manual_seed(2)))
    assert not math.isnan(ours.mean().item())


def test_bad_expert_settings_are_refused_in_one_line(a14b, tmp_path):
    with pytest.raises(ValueError, match=r"train_experts must name some of the pipeline's experts .*\['middle'\]"):
        backbone(a14b, train_experts=["middle"])
    with pytest.raises(ValueError, match="has one transformer"):
        backbone(str(tiny_wan_pipeline(tmp_path / "one")), train_experts=["low_noise"])
    with pytest.raises(ValueError, match="expert_lr must give positive learning rates to trained experts"):
        backbone(a14b, train_experts=["low_noise"], expert_lr={"high_noise": 1e-4})
    with pytest.raises(ValueError, match="guidance_scale_2=2.0 must be a non-negative number for a two-expert"):
        backbone(str(tiny_wan_pipeline(tmp_path / "one_more")), guidance_scale_2=2.0)
    with pytest.raises(ValueError, match="sigma_range must be"):
        sample_training_sigmas(2, sigma_range=(0.5, 0.5))
    broken = tmp_path / "broken"
    shutil.copytree(a14b, broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps(dict(index, boundary_ratio=None)))
    with pytest.raises(ValueError, match="two experts .* but no boundary_ratio") as err:
        backbone(str(broken))
    assert "\n" not in str(err.value)
    shutil.rmtree(broken / "transformer_2")  # listed but absent: refused before anything loads, not half loaded
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="no transformer_2/"):
        backbone(str(broken))
