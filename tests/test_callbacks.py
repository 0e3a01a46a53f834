"""Callbacks through short CPU runs: sample files and TensorBoard videos, reward evaluation with held-out gold rewards,
the reward-hacking monitor (scripted histories and real runs), adapter export round trips, Hub pushes with a model
card, EMA from YAML, and resumed runs that continue every callback's state."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_hub import hub  # noqa: F401  (the local Hub fixture)

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.callbacks.adapter_export import WEIGHT_NAME, AdapterExport, load_adapter
from lit_videoalign.callbacks.push_to_hub import PushToHub
from lit_videoalign.callbacks.reward_evaluation import RewardEvaluation
from lit_videoalign.callbacks.reward_hacking_monitor import (
    RewardHackingMonitor,
    detect_divergence,
    mean_pairwise_distance,
    video_features,
    window_change,
)
from lit_videoalign.callbacks.video_sample_logger import VideoSampleLogger
from lit_videoalign.cli import main
from lit_videoalign.data.toyworld import ToyWorldDataModule
from lit_videoalign.objectives.sft import SFT
from reward_zoo import RewardModel, create_reward
from reward_zoo.composite import CompositeReward

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red ball falls", "a blue ball moves left", "a red ball falls"]


def make_model(pipeline: str, **kwargs) -> SFT:
    kwargs = {"lora_rank": 4, "num_inference_steps": 1, "optimizer": lambda p: torch.optim.AdamW(p, lr=5e-2),
              **kwargs}
    return SFT(DiffusersVideoBackbone(pipeline, max_sequence_length=16), **kwargs)


def make_trainer(tmp_path: Path, steps: int, callbacks: list, logger=False, **kwargs) -> L.Trainer:
    kwargs = {"enable_checkpointing": False, **kwargs}
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=logger, callbacks=callbacks,
                     default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1, **kwargs)


def data() -> ToyWorldDataModule:
    return ToyWorldDataModule(batch_size=2, train_size=64, val_size=2)


def lora_weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


class ScriptedReward(RewardModel):
    """A test reward that returns ``values[k]`` for every video at its k-th call (a scripted gold curve)."""

    dimensions = ()

    def __init__(self, values: list[float] = (0.0,)) -> None:
        super().__init__()
        self.values, self.calls = list(values), 0

    def forward(self, videos, prompts=None, references=None):
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return {"overall": torch.full((videos.shape[0],), float(value))}


class RisingRewardSFT(SFT):
    """SFT that also logs a training reward rising with every step (the scripted "training reward goes up")."""

    def training_step(self, batch, batch_idx):
        self.log("train/reward/overall", float(self.global_step), batch_size=2)
        return super().training_step(batch, batch_idx)


# -- VideoSampleLogger + RewardEvaluation ---------------------------------------------------------------------------
def test_samples_files_tensorboard_video_and_reward_scalars(tiny_pixel_pipeline, tmp_path):
    model = make_model(tiny_pixel_pipeline)
    sampler = VideoSampleLogger(prompts=PROMPTS, seeds=[0, 1, 2], every_n_steps=2, dirpath=str(tmp_path / "samples"))
    evaluation = RewardEvaluation(rewards=["newton"], gold_rewards=["flicker"])
    monitor = RewardHackingMonitor(diversity_threshold=0.5)
    logger = TensorBoardLogger(tmp_path, name="tb")
    make_trainer(tmp_path, 3, [sampler, evaluation, monitor], logger=logger).fit(model, data())

    for step in (0, 2, 3):  # rounds before training, every 2 steps, and at the end
        folder = tmp_path / "samples" / f"step_{step:06d}"
        assert sorted(p.suffix for p in folder.iterdir()) == [".gif"] * 4 + [".json"] + [".mp4"] * 3
        with Image.open(folder / "grid.gif") as gif:
            assert gif.n_frames == 16
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000000", "step_000002", "step_000003"]
    assert sampler.num_rounds == 3 and sampler.last_step == 3
    # the last round is exactly what the trained model generates for those prompts and seeds
    assert torch.equal(sampler.latest.videos, model.generate(PROMPTS, [0, 1, 2]))
    newton = create_reward("newton")(sampler.latest.videos, PROMPTS)["overall"].mean()
    # the same float32 scores, averaged in another order: measured rel err <= 1.1e-7 (torch 2.13.0 / 2.14.1)
    assert evaluation.history[-1]["eval/newton/overall"] == pytest.approx(float(newton), rel=1e-5)
    scores = json.loads((tmp_path / "samples" / "step_000003" / "scores.json").read_text())
    assert [s["seed"] for s in scores] == [0, 1, 2] and "gold/flicker/overall" in scores[0]

    events = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    videos = events.Images("samples")
    assert [v.step for v in videos] == [0, 2, 3]
    assert videos[0].encoded_image_string[:6] == b"GIF89a" and videos[0].width == 4 * (3 * 33 + 1)
    for tag in ("eval/newton/overall", "eval/newton/acceleration", "gold/flicker/overall", "monitor/diversity"):
        assert [s.step for s in events.Scalars(tag)] == [0, 2, 3], tag
    # TensorBoard stores float32 (half an ulp is 6e-8 relative): measured rel err 2.1e-8
    assert events.Scalars("gold/flicker/overall")[-1].value == pytest.approx(evaluation.history[-1][
        "gold/flicker/overall"], rel=1e-5)
    assert "train/loss" in events.Tags()["scalars"]


def test_gold_reward_must_be_held_out(tiny_pixel_pipeline, tmp_path):
    class RewardedSFT(SFT):
        def __init__(self, *args, reward=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.reward = reward

    training_reward = CompositeReward({"newton": create_reward("newton"), "flicker": create_reward("flicker")},
                                      {"newton": 1.0, "flicker": 1.0})
    model = RewardedSFT(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16), lora_rank=4,
                        reward=training_reward)
    callbacks = [VideoSampleLogger(prompts=PROMPTS[:2]), RewardEvaluation(rewards=[], gold_rewards=["flicker"])]
    with pytest.raises(ValueError, match="gold reward 'flicker' is part of the module's training reward"):
        make_trainer(tmp_path, 1, callbacks).fit(model, data())
    with pytest.raises(ValueError, match="add lit_videoalign.callbacks.video_sample_logger.VideoSampleLogger"):
        make_trainer(tmp_path, 1, [RewardEvaluation(rewards=["newton"], gold_rewards=[])]).fit(model, data())
    with pytest.raises(ValueError, match="one seed per prompt"):
        VideoSampleLogger(prompts=PROMPTS, seeds=[1])


# -- RewardHackingMonitor -------------------------------------------------------------------------------------------
def test_window_change_and_divergence_by_hand():
    assert window_change([0.0, 1.0, 2.0]) == pytest.approx(2.0)
    assert window_change([3.0, 1.0, 2.0]) == pytest.approx(-1.0)  # slope -0.5 over 2 intervals
    assert window_change([5.0, 5.0, 5.0, 5.0]) == pytest.approx(0.0)
    up, down, flat = [0.1, 0.2, 0.3, 0.4], [0.9, 0.8, 0.8, 0.6], [0.5, 0.5, 0.5, 0.5]
    assert detect_divergence(up, {"gold/a": down, "gold/b": up}, window=4) == ["gold/a"]
    assert detect_divergence(up, {"gold/a": up}, window=4) == []  # healthy: both rise
    assert detect_divergence(down, {"gold/a": down}, window=4) == []  # training reward not rising
    assert detect_divergence(up, {"gold/a": flat}, window=4) == []
    assert detect_divergence(up, {"gold/a": down}, window=4, gold_tolerance=0.5) == []  # fell by 0.28 only
    assert detect_divergence(up[:3], {"gold/a": down[:3]}, window=4) == []  # window not yet full


def test_pairwise_distance_by_hand():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    # pairs: 5, 0, 5 -> mean 10/3, divided by sqrt(D = 2)
    assert float(mean_pairwise_distance(features)) == pytest.approx(10 / 3 / 2 ** 0.5)
    videos = torch.rand(1, 4, 3, 16, 16).repeat(3, 1, 1, 1, 1)
    assert float(mean_pairwise_distance(video_features(videos))) == pytest.approx(0.0, abs=1e-7)  # measured exactly 0
    assert float(mean_pairwise_distance(video_features(torch.rand(3, 4, 3, 16, 16)))) > 0.05


def test_monitor_fires_on_scripted_history_and_stays_quiet_on_a_healthy_one():
    hacked = RewardHackingMonitor(window=3, diversity_threshold=0.5)
    train, gold, diversity = [None, 0.1, 0.3, 0.5, 0.7], [0.5, 0.5, 0.4, 0.3, 0.2], [1.0, 0.9, 0.8, 0.45, 0.4]
    alarms = [hacked.observe(s, t, {"gold/x/overall": g}, d) for s, (t, g, d) in enumerate(zip(train, gold, diversity))]
    assert alarms == [[], [], [], ["divergence:gold/x/overall", "diversity"], ["divergence:gold/x/overall",
                                                                                "diversity"]]
    healthy = RewardHackingMonitor(window=3, diversity_threshold=0.5)
    gold_up, diversity_ok = [0.5, 0.5, 0.6, 0.7, 0.8], [1.0, 0.9, 1.1, 0.7, 0.6]
    assert not any(healthy.observe(s, t, {"gold/x/overall": g}, d)
                   for s, (t, g, d) in enumerate(zip(train, gold_up, diversity_ok)))
    assert [h["step"] for h in healthy.history] == [0, 1, 2, 3, 4] and healthy.initial_diversity == 1.0


@pytest.mark.parametrize("hacking", [True, False])
def test_monitor_stops_a_hacking_run_and_not_a_healthy_one(tiny_pixel_pipeline, tmp_path, hacking):
    model = RisingRewardSFT(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16), lora_rank=4,
                            num_inference_steps=1)
    gold = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3] if hacking else [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    evaluation = RewardEvaluation(rewards=[], gold_rewards={"scripted": ScriptedReward(gold)})
    monitor = RewardHackingMonitor(window=3, diversity_threshold=None, action="stop")
    sampler = VideoSampleLogger(prompts=PROMPTS[:2], every_n_steps=1, save_mp4=False, save_gif=False,
                                dirpath=str(tmp_path / "s"))
    trainer = make_trainer(tmp_path, 4 if hacking else 3, [monitor, sampler, evaluation])  # monitor first on purpose
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data())
    fired = [str(w.message) for w in caught if "reward hacking" in str(w.message)]
    if hacking:  # train rounds 1, 2, 3 rise while gold falls: stops at step 3 of 4
        assert trainer.global_step == 3 and monitor.stopped_at == 3 and len(fired) == 1
        assert "train/reward/overall rose" in fired[0] and "gold/scripted/overall" in fired[0]
        assert monitor.history[-1]["alarms"] == ["divergence:gold/scripted/overall"]
    else:  # the same rising training reward with a rising gold reward: a full window, no alarm
        assert trainer.global_step == 3 and monitor.stopped_at is None and not fired
        assert [h["step"] for h in monitor.history] == [0, 1, 2, 3] and monitor.history[-1]["alarms"] == []
    # float32 scores against float64 values: measured rel err 4e-8; approx's default rel 1e-6 is 25x that
    assert [h["gold"]["gold/scripted/overall"] for h in monitor.history] == pytest.approx(gold[:len(monitor.history)])


def test_restore_action_puts_back_the_best_gold_weights(tiny_pixel_pipeline, tmp_path):
    class Probe(L.Callback):
        video_samples_order = 5  # between the evaluation and the monitor

        def __init__(self):
            self.weights = {}

        def on_video_samples(self, trainer, pl_module, samples):
            self.weights[samples.step] = lora_weights(pl_module)

    model = RisingRewardSFT(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16), lora_rank=4,
                            num_inference_steps=1, optimizer=lambda p: torch.optim.AdamW(p, lr=5e-2))
    gold = [0.1, 0.9, 0.5, 0.3, 0.2, 0.1]  # best at step 1, then falling while training reward rises
    probe = Probe()
    monitor = RewardHackingMonitor(window=3, diversity_threshold=None, action="restore")
    callbacks = [VideoSampleLogger(prompts=PROMPTS[:2], every_n_steps=1, save_mp4=False, save_gif=False,
                                   dirpath=str(tmp_path / "s")),
                 RewardEvaluation(rewards=[], gold_rewards={"scripted": ScriptedReward(gold)}), probe, monitor]
    with pytest.warns(UserWarning, match="Restoring the weights of the best gold round"):
        make_trainer(tmp_path, 6, callbacks).fit(model, data())
    assert monitor.stopped_at == 3 and monitor.best["step"] == 1 and monitor.history[-1]["restored_step"] == 1
    now = lora_weights(model)
    assert all(torch.equal(now[n], probe.weights[1][n]) for n in now)
    assert any(not torch.equal(now[n], probe.weights[3][n]) for n in now)


# -- resuming -------------------------------------------------------------------------------------------------------
def test_resumed_run_continues_callback_state(tiny_pixel_pipeline, tmp_path):
    def callbacks():
        return [VideoSampleLogger(prompts=PROMPTS[:2], every_n_steps=1, dirpath=str(tmp_path / "samples"),
                                  save_mp4=False),
                RewardEvaluation(rewards=[], gold_rewards=["flicker"]),
                RewardHackingMonitor(window=3, diversity_threshold=0.5),
                ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)]

    first = callbacks()
    make_trainer(tmp_path, 2, first, enable_checkpointing=True).fit(make_model(tiny_pixel_pipeline), data())
    assert first[0].num_rounds == 3 and [h["step"] for h in first[2].history] == [0, 1, 2]

    second = callbacks()
    make_trainer(tmp_path, 4, second, enable_checkpointing=True).fit(
        make_model(tiny_pixel_pipeline), data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    sampler, evaluation, monitor = second[:3]
    assert sampler.num_rounds == 5 and sampler.last_step == 4  # step 2 is not sampled again on resume
    assert [h["step"] for h in evaluation.history] == [0, 1, 2, 3, 4]
    assert [h["step"] for h in monitor.history] == [0, 1, 2, 3, 4]
    assert monitor.initial_diversity == first[2].initial_diversity  # still the step-0 baseline
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [f"step_{s:06d}" for s in range(5)]


# -- AdapterExport --------------------------------------------------------------------------------------------------
def test_exported_adapter_loads_back_with_identical_outputs(tiny_pixel_pipeline, tmp_path):
    model = make_model(tiny_pixel_pipeline, lora_alpha=8)  # alpha != rank: the scale must survive the round trip
    export = AdapterExport(dirpath=str(tmp_path / "adapter"))
    make_trainer(tmp_path, 2, [export]).fit(model, data())
    assert export.exports == [2] and (tmp_path / "adapter" / WEIGHT_NAME).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temporary folders left

    trained = model.backbone.eval()
    x = torch.randn(2, 3, 16, 32, 32)
    cond = trained.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        expected = trained.predict_velocity(x, 0.7, cond)
        fresh = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16).eval()
        base = fresh.predict_velocity(x, 0.7, cond)
        load_adapter(fresh, tmp_path / "adapter")
        assert torch.equal(fresh.predict_velocity(x, 0.7, cond), expected)
        assert not torch.allclose(base, expected)  # the adapter changed the model (by 0.86 of the scale, measured)
        # the same file through diffusers' own pipeline loader
        from diffusers import WanPipeline

        pipe = WanPipeline.from_pretrained(tiny_pixel_pipeline, vae=None)  # a pixel-space pipeline has no VAE
        pipe.load_lora_weights(tmp_path / "adapter")
        out = pipe.transformer(hidden_states=x, timestep=torch.full((2,), 700.0), encoder_hidden_states=
                               cond.prompt_embeds, return_dict=False)[0]
        assert torch.equal(out, expected)


def test_adapter_export_needs_lora(tiny_pixel_pipeline, tmp_path):
    model = make_model(tiny_pixel_pipeline, lora_rank=None)
    with pytest.raises(ValueError, match="needs a LoRA adapter 'default'.*PipelineExport"):
        make_trainer(tmp_path, 1, [AdapterExport(dirpath=str(tmp_path / "a"))]).fit(model, data())


# -- PushToHub ------------------------------------------------------------------------------------------------------
def test_push_to_hub_uploads_adapter_card_and_samples(hub, tiny_pixel_pipeline, tmp_path):  # noqa: F811
    model = make_model(tiny_pixel_pipeline)
    push = PushToHub("org/toy-lora", token=hub.token, license="apache-2.0")
    callbacks = [VideoSampleLogger(prompts=PROMPTS[:2], every_n_steps=10, dirpath=str(tmp_path / "s")),
                 RewardEvaluation(rewards=["newton"], gold_rewards=["flicker"]), push]
    make_trainer(tmp_path, 1, callbacks).fit(model, data())

    history = hub.store.history("org/toy-lora")
    assert push.pushes[-1]["commit"] == history[0] and push.pushes[-1]["step"] == 1
    tree = hub.store.tree("org/toy-lora", history[0])
    assert {"README.md", WEIGHT_NAME, "samples.gif"} <= set(tree)
    staged = tmp_path / "hub" / "toy-lora"
    assert hub.store.read_blob("org/toy-lora", tree["samples.gif"]) == (staged / "samples.gif").read_bytes()
    card = hub.store.read_blob("org/toy-lora", tree["README.md"]).decode()
    assert "library_name: diffusers" in card and "license: apache-2.0" in card and "- lora" in card
    assert "base_model" not in card  # a local folder is not a Hub id
    assert f"`{tiny_pixel_pipeline}`" in card and "`SFT` objective" in card and "Method: Supervised fine-tuning" in card
    assert "| lora_rank | `4` |" in card and "`newton`" in card and "`flicker`" in card
    assert "| eval/newton/overall |" in card and "| train/loss |" in card and "![samples](samples.gif)" in card

    from huggingface_hub import snapshot_download

    fresh = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    load_adapter(fresh, snapshot_download("org/toy-lora"))
    assert all(torch.equal(p, dict(model.backbone.denoiser.named_parameters())[n])
               for n, p in fresh.denoiser.named_parameters())
    assert hub.unhandled == []


# -- EMA ------------------------------------------------------------------------------------------------------------
def test_ema_weight_averaging_averages_our_module(tiny_pixel_pipeline, tmp_path):
    class Recorder(L.Callback):
        def __init__(self):
            self.steps = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.steps.append(lora_weights(pl_module))

    model = make_model(tiny_pixel_pipeline)
    recorder = Recorder()
    make_trainer(tmp_path, 2, [recorder, EMAWeightAveraging(decay=0.5)]).fit(model, data())
    p1, p2, final = recorder.steps[0], recorder.steps[1], lora_weights(model)
    # AveragedModel copies the first update, then ema = decay * ema + (1 - decay) * p
    # measured bit-identical (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 / baseline CPU kernels); AveragedModel
    # may lerp in another order, a few ulp: 1e-6 of each tensor's largest weight is ~10 ulp
    assert all(torch.allclose(final[n], 0.5 * p1[n] + 0.5 * p2[n], rtol=0, atol=1e-6 * p2[n].abs().max().item())
               for n in final)
    assert any(not torch.allclose(final[n], p2[n]) for n in final)  # measured apart by 0.08 of their scale


def test_callbacks_and_ema_from_yaml_and_fit_prints_the_summary(tiny_pixel_pipeline, tmp_path, monkeypatch, capsys):
    """Every callback configured in YAML (EMA listed before the exports), one CLI fit, then the checkpoint, the
    exported adapter (the averaged weights) and the end-of-run summary."""
    monkeypatch.chdir(ROOT)
    config = tmp_path / "sft_callbacks.yaml"
    text = (ROOT / "configs/toyworld/sft.yaml").read_text().replace("outputs/sft/pipeline", str(tmp_path / "pipeline"))
    config.write_text(text + f"""\
    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging
      init_args: {{decay: 0.9, device: cpu}}
    - class_path: lit_videoalign.callbacks.video_sample_logger.VideoSampleLogger
      init_args: {{prompts: [a red ball falls, a blue ball falls], every_n_steps: 1, num_inference_steps: 1,
                  save_mp4: false, dirpath: {tmp_path / "samples"}}}
    - class_path: lit_videoalign.callbacks.reward_evaluation.RewardEvaluation
      init_args:
        rewards: [newton]
        gold_rewards: {{flicker: {{class_path: reward_zoo.temporal.TemporalFlicker, init_args: {{grid: 2}}}}}}
    - class_path: lit_videoalign.callbacks.reward_hacking_monitor.RewardHackingMonitor
      init_args: {{train_metric: train/loss, window: 3, action: stop}}
    - class_path: lit_videoalign.callbacks.adapter_export.AdapterExport
      init_args: {{dirpath: {tmp_path / "adapter"}}}
""")
    main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
          "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.logger=false",
          "--data.init_args.batch_size=2", "--data.init_args.val_size=2",
          f"--model.init_args.backbone.init_args.pretrained_model_name_or_path={tiny_pixel_pipeline}",
          "--model.init_args.backbone.init_args.max_sequence_length=16"])
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), map_location="cpu", weights_only=True)
    assert {"current_model_state", "averaging_state"} <= set(ckpt)
    averaged = {k: v for k, v in ckpt["state_dict"].items() if "lora_" in k}
    assert averaged and any(not torch.equal(v, ckpt["current_model_state"][k]) for k, v in averaged.items())
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "adapter" / WEIGHT_NAME)
    assert len(adapter) == len(averaged)
    for key, value in averaged.items():  # the export ran after EMA put the average into the model
        assert torch.equal(adapter[key.replace("backbone.denoiser.", "transformer.").replace(".default.", ".")],
                           value)
    states = ckpt["callbacks"]
    assert any(k.startswith("VideoSampleLogger") and v["num_rounds"] == 3 for k, v in states.items())
    assert any(k.startswith("RewardEvaluation") and v["history"][-1]["gold/flicker/overall"] > 0
               for k, v in states.items())
    out = capsys.readouterr().out
    for expected in ("SFT: 2 steps", str(tmp_path / "pipeline"), str(tmp_path / "adapter"), str(tmp_path / "samples"),
                     "best checkpoint", "train/loss"):
        assert expected in out, expected
