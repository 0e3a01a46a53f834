"""Asynchronous scoring in GRPO and DiffusionNFT: rollouts generated chunk by chunk and scored in a background thread
train to bit-identical weights as scoring each chunk in turn; a reward that raises in the thread masks its chunk and is
counted; bad chunk sizes are refused; a resumed asynchronous run matches an uninterrupted one."""

import threading
import time

import lightning as L
import pytest
import torch
from test_resume import CASES, adamw, assert_same_state, fit, load, toy, training_state

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.objectives.grpo import GRPO
from lit_videoalign.objectives.nft import DiffusionNFT
from lit_videoalign.testing import Brightness


class SlowBrightness(Brightness):
    """Brightness after a short sleep (so generation and scoring really overlap), noting the thread of each call."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        super().__init__()
        self.threads: list[str] = []
        self.fail_on_call = fail_on_call

    def forward(self, videos, prompts=None, references=None):
        self.threads.append(threading.current_thread().name)
        time.sleep(0.05)
        if len(self.threads) == self.fail_on_call:
            raise ConnectionError("judge timed out")
        return super().forward(videos, prompts, references)


def make(objective, pipeline, reward=None, **kwargs):
    bb = DiffusersVideoBackbone(pipeline, max_sequence_length=16)
    defaults = dict(lora_rank=4, group_size=4, num_sampling_steps=3, num_inference_steps=3,
                    optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2))
    return objective(bb, reward=reward or SlowBrightness(), **{**defaults, **kwargs})


def trainer(steps):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)


def prompt_loader(batch_size=2):
    prompts = [{"prompt": p} for p in ["a red ball falls", "a blue ball moves left"] * 2]
    return torch.utils.data.DataLoader(prompts, batch_size=batch_size)


def trained(objective, pipeline, **kwargs):
    L.seed_everything(0)
    model = make(objective, pipeline, **kwargs)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    t = trainer(2)
    t.fit(model, train_dataloaders=prompt_loader())
    return model, before, t.callback_metrics


@pytest.mark.parametrize("objective, extra", [
    (GRPO, dict(same_noise_per_group=False)),
    (DiffusionNFT, dict(sampler="sde", advantage="win_rate", win_rate_pairs=2)),  # SDE noise and drawn opponents
])
def test_async_scoring_trains_bit_identical_weights_to_sync(tiny_pixel_pipeline, objective, extra):
    sync, before, _ = trained(objective, tiny_pixel_pipeline, rollout_chunk_size=1, **extra)
    async_, _, metrics = trained(objective, tiny_pixel_pipeline, rollout_chunk_size=1, async_scoring=True, **extra)
    params = dict(async_.named_parameters())
    moved = [n for n, p in sync.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert moved, "nothing trained"
    assert all(torch.equal(p, params[n]) for n, p in sync.named_parameters() if p.requires_grad)
    main = threading.main_thread().name
    assert sync.reward.threads == [main] * 4  # two batches of two one-prompt chunks, scored in turn
    assert len(async_.reward.threads) == 4 and main not in async_.reward.threads  # scored in the background
    assert metrics["train/scoring_wait_seconds"] >= 0 and metrics["train/reward_failures"] == 0


def test_a_reward_that_raises_in_the_scoring_thread_masks_its_chunk_and_is_counted(tiny_pixel_pipeline):
    for objective in (GRPO, DiffusionNFT):
        model = make(objective, tiny_pixel_pipeline, reward=SlowBrightness(fail_on_call=2), async_scoring=True,
                     rollout_chunk_size=1)
        with pytest.warns(UserWarning, match="judge timed out"):
            rollout = model.rollout(["a red ball falls", "a blue ball moves left"])
        assert rollout.valid.tolist() == [True] * 4 + [False] * 4  # the second chunk failed
        assert model.reward_failures == 1 and torch.isfinite(rollout.advantages).all()
        assert (rollout.advantages[4:] == 0).all() and (rollout.advantages[:4] != 0).any()


def test_bad_chunk_sizes_are_refused(tiny_pixel_pipeline):
    for objective in (GRPO, DiffusionNFT):
        for bad in (0, -2, 1.5):
            with pytest.raises(ValueError, match=f"rollout_chunk_size must be a positive number of prompts or null "
                                                 f"\\(the whole batch\\), got {bad}"):
                make(objective, tiny_pixel_pipeline, rollout_chunk_size=bad)
        with pytest.raises(TypeError, match="async_scoring must be true or false, got 'yes'"):
            make(objective, tiny_pixel_pipeline, async_scoring="yes")
        with pytest.raises(ValueError, match="rollout_chunk_size=3 must divide the number of prompts per batch, got a "
                                             "batch of 2 prompts"):  # GRPO says so at fit start, NFT at its rollout
            trainer(1).fit(make(objective, tiny_pixel_pipeline, rollout_chunk_size=3), prompt_loader())


def test_an_async_win_rate_run_resumes_exactly(tiny_pixel_pipeline, tmp_path, monkeypatch):
    monkeypatch.setitem(CASES, "grpo_async", (
        lambda bb: GRPO(bb, reward=Brightness(), lora_rank=4, group_size=3, num_sampling_steps=2, num_inference_steps=2,
                        advantage="win_rate", win_rate_pairs=1, async_scoring=True, rollout_chunk_size=1,
                        optimizer=adamw(3e-2)),
        lambda: toy(batch_size=2, train_size=4), 3, 1, False))
    fit("grpo_async", tiny_pixel_pipeline, tmp_path / "full")
    fit("grpo_async", tiny_pixel_pipeline, tmp_path / "crashed", interrupt=1)
    fit("grpo_async", tiny_pixel_pipeline, tmp_path / "resumed", ckpt_path=tmp_path / "crashed" / "step=1.ckpt")
    full, resumed = load(tmp_path / "full" / "step=3.ckpt"), load(tmp_path / "resumed" / "step=3.ckpt")
    assert_same_state(training_state(full), training_state(resumed), "grpo_async")
    before = load(tmp_path / "crashed" / "step=1.ckpt")["state_dict"]
    assert any(not torch.equal(before[k], v) for k, v in full["state_dict"].items()), "nothing trained after the stop"
