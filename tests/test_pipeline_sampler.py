"""Sampling with the pipeline's own diffusers scheduler: ``generate`` gives what diffusers' ``WanPipeline`` gives for
the same noise (UniPC with ``flow_shift`` as real Wan ships it, and FlowMatchEuler), ``sampler="euler"`` keeps the
Euler ODE, and best-of-N and noise search sample through the same scheduler."""

import json
import shutil

import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.inference import best_of_n, noise_search, reward_guided_sample, sample_from_noise
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.schedules.flow import euler_sample, sampling_sigmas
from lit_videoalign.schedules.samplers import scheduler_sample
from lit_videoalign.testing import Brightness

PROMPTS = ["a red ball falls", "a blue ball moves left"]
SEEDS = [3, 4]
STEPS = 4
# Wan 2.1's scheduler config (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, scheduler/scheduler_config.json), flow_shift 3.0.
WAN_UNIPC = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, solver_order=2,
                 num_train_timesteps=1000, final_sigmas_type="zero", lower_order_final=True)


def with_scheduler(src: str, dst, scheduler) -> str:
    """A copy of the pipeline folder ``src`` whose scheduler is ``scheduler`` (saved, and named in model_index)."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "scheduler")
    scheduler.save_pretrained(dst / "scheduler")
    index = json.loads((dst / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (dst / "model_index.json").write_text(json.dumps(index))
    return str(dst)


@pytest.fixture(scope="module")
def pipelines(tiny_pipeline, tmp_path_factory) -> dict[str, str]:
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    root = tmp_path_factory.mktemp("schedulers")
    return {"unipc": with_scheduler(tiny_pipeline, root / "unipc", UniPCMultistepScheduler(**WAN_UNIPC)),
            "flowmatch": with_scheduler(tiny_pipeline, root / "flowmatch", FlowMatchEulerDiscreteScheduler(shift=3.0))}


def make_model(path: str, guidance_scale: float) -> SFT:
    torch.manual_seed(0)
    bb = DiffusersVideoBackbone(path, max_sequence_length=16)
    return SFT(bb, num_frames=9, height=32, width=32, num_inference_steps=STEPS, guidance_scale=guidance_scale).eval()


@pytest.mark.parametrize("kind", ["unipc", "flowmatch"])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_generate_equals_the_diffusers_wan_pipeline(pipelines, kind, guidance_scale):
    from diffusers import WanPipeline

    model = make_model(pipelines[kind], guidance_scale)
    assert type(model.backbone.scheduler).__name__ == {"unipc": "UniPCMultistepScheduler",
                                                       "flowmatch": "FlowMatchEulerDiscreteScheduler"}[kind]
    ours = model.generate(PROMPTS, SEEDS, return_latents=True)  # sampler="pipeline" is the default
    pipe = WanPipeline.from_pretrained(pipelines[kind])
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt=PROMPTS, negative_prompt="", latents=model.initial_noise(SEEDS), num_frames=9, height=32,
                  width=32, num_inference_steps=STEPS, guidance_scale=guidance_scale, max_sequence_length=16,
                  output_type="latent").frames
    assert ours.shape == theirs.shape == (2, 16, 3, 4, 4)
    # Float32 rounding only (our guidance batches both branches in one call, the pipeline calls them one by one):
    # measured max |diff| 0.0 without guidance and 1.9e-6 (UniPC) / 1.7e-6 (FlowMatchEuler) with it, on latents of
    # max |x| ~4 (torch 2.14.1, diffusers 0.42.1, CPU); 2e-5 is 10x that. Our Euler ODE is 0.11-0.16 away.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
    euler = model.generate(PROMPTS, SEEDS, return_latents=True, sampler="euler")
    assert (euler - theirs).abs().max() > 1e-3  # another sampler: the comparison can fail


@pytest.mark.parametrize("name", ["ltx", "hunyuan_video"])
def test_generate_equals_the_ltx_and_hunyuan_pipelines_with_their_own_sigmas(name, tmp_path):
    """LTX-Video and HunyuanVideo pass their own sigmas (and LTX a resolution-dependent ``mu``) to ``set_timesteps``;
    without guidance (HunyuanVideo's is embedded), ``generate`` gives their pipelines' latents."""
    import diffusers

    from lit_videoalign.backbones.diffusers import pack_latents, unpack_latents
    from lit_videoalign.testing import TINY_HUNYUAN_PROMPT_TEMPLATE, tiny_hunyuan_pipeline, tiny_ltx_pipeline

    write, options, (frames, size), cls = {
        "ltx": (tiny_ltx_pipeline, None, (9, 64), "LTXPipeline"),
        "hunyuan_video": (tiny_hunyuan_pipeline, {"prompt_template": TINY_HUNYUAN_PROMPT_TEMPLATE}, (9, 32),
                          "HunyuanVideoPipeline")}[name]
    path = str(write(tmp_path / name))
    torch.manual_seed(0)
    model = SFT(DiffusersVideoBackbone(path, max_sequence_length=16, family_options=options), num_frames=frames,
                height=size, width=size, num_inference_steps=3, guidance_scale=1.0).eval()
    ours = model.generate(PROMPTS, SEEDS, return_latents=True)
    noise = model.initial_noise(SEEDS)
    pipe = getattr(diffusers, cls).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPTS, num_frames=frames, height=size, width=size, num_inference_steps=3,
                  max_sequence_length=16, output_type="latent")
    if name == "ltx":
        theirs = pipe(latents=pack_latents(noise), guidance_scale=1.0, **kwargs).frames  # packed (b, t'h'w', c)
        theirs = unpack_latents(theirs, tuple(noise.shape[2:]))
    else:
        theirs = pipe(latents=noise, prompt_template=TINY_HUNYUAN_PROMPT_TEMPLATE, **kwargs).frames
    # the same calls in the same order: measured max |diff| 0.0 for both (torch 2.14.1, diffusers 0.42.1, CPU); the
    # tolerance only allows float32 rounding
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())
    euler = model.generate(PROMPTS, SEEDS, return_latents=True, sampler="euler")
    if name == "ltx":
        assert (euler - theirs).abs().max() > 1e-3  # another grid: the comparison can fail
    else:  # HunyuanVideo's pipeline grid is our Euler grid, linspace(1, 0, N + 1) shifted; the default one is not
        # our sigmas are computed otherwise (torch vs numpy): measured max |diff| 6.6e-7 on latents of max |x| 3.6
        torch.testing.assert_close(euler, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())
        cond = model.backbone.encode_prompts(PROMPTS)
        with torch.no_grad():
            default = scheduler_sample(model.backbone.scheduler, model.guided_velocity_fn(cond, 1.0), noise, 3)
        assert (default - theirs).abs().max() > 1e-3


def test_euler_sampler_keeps_the_old_output_and_the_scheduler_is_untouched(pipelines):
    model = make_model(pipelines["unipc"], 4.0)
    scheduler = model.backbone.scheduler
    before = (scheduler.timesteps, scheduler.step_index, json.dumps(dict(scheduler.config), default=str))
    noise = model.initial_noise(SEEDS)
    with torch.no_grad():
        old = euler_sample(model.guided_velocity_fn(model.backbone.encode_prompts(PROMPTS), 4.0), noise,
                           sampling_sigmas(STEPS, shift=model.sampling_shift))
    assert torch.equal(model.generate(PROMPTS, SEEDS, return_latents=True, sampler="euler"), old)
    with torch.no_grad():  # sample_latents' own default is the Euler ODE, which training rollouts rely on
        assert torch.equal(model.sample_latents(noise, model.backbone.encode_prompts(PROMPTS)), old)
    model.generate(PROMPTS, SEEDS, return_latents=True)
    assert model.backbone.scheduler is scheduler
    assert (scheduler.timesteps, scheduler.step_index, json.dumps(dict(scheduler.config), default=str)) == before
    with pytest.raises(ValueError, match="sampler must be one of \\['pipeline', 'euler'\\] or None, got 'unipc'"):
        model.generate(PROMPTS, SEEDS, sampler="unipc")


def test_a_stochastic_scheduler_draws_from_each_seeds_generator(tiny_pipeline, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = with_scheduler(tiny_pipeline, tmp_path / "sde", FlowMatchEulerDiscreteScheduler(stochastic_sampling=True))
    model = make_model(path, 1.0)
    both = model.generate(PROMPTS, SEEDS, return_latents=True)
    alone = model.generate(PROMPTS[1:], SEEDS[1:], return_latents=True)
    # Batch rounding only: measured max |diff| 4.8e-7 (torch 2.14.1, CPU); 1e-5 is 20x that.
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-5)
    other = model.generate(PROMPTS[1:], [5], return_latents=True)
    assert (other - alone).abs().max() > 1e-2
    with pytest.raises(ValueError, match="got 1 generators for a batch of 2"):
        scheduler_sample(model.backbone.scheduler, lambda x, s: x, torch.zeros(2, 1), 2, [torch.Generator()])


def test_inference_time_methods_sample_through_the_pipeline_scheduler(pipelines):
    model = make_model(pipelines["unipc"], 4.0)
    plain = model.generate(PROMPTS, SEEDS)
    euler = model.generate(PROMPTS, SEEDS, sampler="euler")
    assert torch.equal(sample_from_noise(model, PROMPTS, model.initial_noise(SEEDS)), plain)
    res = best_of_n(model, PROMPTS, Brightness(), 2, SEEDS, return_candidates=True)
    # candidate 0 is the plain sample of the seed, sampled in a batch of 4 (measured exact; 1e-5 allows rounding)
    torch.testing.assert_close(res.info["candidates"][:, 0], plain, rtol=0, atol=1e-5)
    assert torch.equal(best_of_n(model, PROMPTS, Brightness(), 1, SEEDS, sampler="euler").videos, euler)
    found = noise_search(model, PROMPTS, Brightness(), budget_nfe=STEPS * 2 * 2, seeds=SEEDS, mode="random",
                         population=2)
    # candidate 0 is the plain sample, scored in another batch: 1e-5 covers float32 rounding (measured 0.0 where it won)
    assert found.info["samples"] == 2 and (found.scores >= Brightness()(plain)["overall"] - 1e-5).all()
    again = sample_from_noise(model, PROMPTS, found.info["noise"])  # the winners, resampled by the same scheduler
    # another batching (2 videos, the search sampled 4 at once): measured max |diff| 0.0; 1e-5 allows float32 rounding
    torch.testing.assert_close(again, found.videos, rtol=0, atol=1e-5)
    # reward guidance steers the Euler ODE: at scale 0 it is the Euler sample, never the scheduler's
    assert torch.equal(reward_guided_sample(model, PROMPTS, Brightness(), SEEDS, scale=0.0).videos, euler)


def test_generate_cli_samples_with_the_pipeline_scheduler_unless_told_euler(tmp_path, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    from lit_videoalign.cli import main
    from lit_videoalign.video_io import read_video

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    args = ["generate", "--config", "configs/toyworld/sft.yaml", "--prompts", "a red ball falls", "--seeds", "5",
            "--num_inference_steps", "3", "--gif", "false"]
    main([*args, "--output_dir", str(tmp_path / "pipeline")])
    res = subprocess.run([sys.executable, "-m", "lit_videoalign.cli", *args, "--sampler", "euler", "--output_dir",
                          str(tmp_path / "euler")], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    pipeline, euler = (read_video(next((tmp_path / name).glob("*.mp4"))).float() for name in ("pipeline", "euler"))
    # The toy base's FlowMatchEuler (shift 3) steps through sigmas (1, 0.75, 0.009, 0) in 3 steps, our Euler ODE
    # through (1, 0.86, 0.6, 0): the videos differ by far more than MP4 coding does (measured max 0.55 per pixel)
    assert (pipeline - euler).abs().max() > 0.05
    for command in ("generate", "evaluate"):
        with pytest.raises(ValueError, match="--sampler must be one of \\['pipeline', 'euler'\\], got 'unipc'"):
            main([command, "--config", "configs/toyworld/sft.yaml", "--prompts", "a", "--sampler", "unipc",
                  "--output_dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
