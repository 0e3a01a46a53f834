"""FSDP2 x context parallelism with more than one data-parallel rank, and HSDP, on 4 CPU processes (gloo).

Three layouts of ``ContextParallelStrategy`` on 4 ranks train SFT for 2 steps with SGD, each sample's noise and sigma
seeded by the sample (so the run does not depend on which rank draws it), against one process on the same global
batch: data parallel 2 x CP 2 (FSDP2 over all 4), HSDP with 2 replicas x CP 2, and HSDP 2 replicas x 2 shards without
CP. Losses and trained weights equal the one-process run's, under HSDP the ranks that hold the same shard in
different replicas hold identical shards after the steps, and an HSDP x CP checkpoint consolidates into the weights.

The 4-process half runs this file as a script (``python tests/test_context_parallel_hsdp.py OUT PIPELINE``), as
``tests/test_context_parallel.py`` does with 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from gloo_ranks import run_ranks
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.context_parallel import ContextParallelStrategy
from lit_videoalign.data.toyworld import ToyWorld
from lit_videoalign.objectives.sft import SFT, flow_matching_loss
from lit_videoalign.schedules.flow import add_noise, sample_training_sigmas, velocity_target

WORLD, STEPS = 4, 2
# name: (strategy arguments, data-parallel size = samples per global batch, one per data-parallel rank)
LAYOUTS = {"dp2_cp2": ({"context_parallel_size": 2}, 2),
           "hsdp2_cp2": ({"context_parallel_size": 2, "data_parallel_replicate_size": 2}, 2),
           "hsdp2x2": ({"context_parallel_size": 1, "data_parallel_replicate_size": 2}, 4)}


class Clips(Dataset):
    def __init__(self, size: int) -> None:
        self.world, self.size = ToyWorld(), size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        ex = self.world.example(5000 + i)
        return {"video": ex.video, "prompt": ex.prompt, "index": i}


class SeededSFT(SFT):
    """SFT whose noise and sigma depend only on the sample index, recording the global batch's loss each step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []
        self.indices: list[list[int]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = self.batch_latents(batch)  # (b, c, t, h, w)
        sigmas, noises = [], []
        for idx in batch["index"].tolist():
            g = torch.Generator().manual_seed(int(idx))
            sigmas.append(sample_training_sigmas(1, mode="logit_normal", generator=g))
            noises.append(torch.randn((1, *x0.shape[1:]), generator=g))
        sigma, noise = torch.cat(sigmas), torch.cat(noises)
        x_t = add_noise(x0, noise, sigma)
        loss = flow_matching_loss(self.backbone.predict_velocity(x_t, sigma, self.encode_prompts(batch["prompt"])),
                                  velocity_target(x0, noise))
        # every data-parallel rank holds one sample (its CP peers the same one): the mean is the global batch's loss
        self.losses.append(self.all_gather(loss.detach()).mean().item())
        self.indices.append(self.all_gather(batch["index"]).flatten().tolist())
        return loss


def fit(pipeline: str, batch_size: int, strategy="auto", devices: int = 1, sampler=None) -> SeededSFT:
    L.seed_everything(0)
    model = SeededSFT(DiffusersVideoBackbone(pipeline, max_sequence_length=16), prompt_dropout=0.0,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False)
    # one process: the global batch, in order; 4 processes: each data-parallel rank's interleaved share (``sampler``)
    trainer.fit(model, DataLoader(Clips(STEPS * WORLD), batch_size=batch_size, shuffle=False, sampler=sampler))
    return model


# -- the 4-process worker ------------------------------------------------------------------------------------------
def worker(out: Path, pipeline: str) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    rank = int(os.environ["LOCAL_RANK"])
    report = {}
    for name, (kwargs, dp) in LAYOUTS.items():
        strategy = ContextParallelStrategy(process_group_backend="gloo", **kwargs)
        # rank r is data-parallel rank r // CP (consecutive ranks form a CP group); the test checks the strategy agrees
        sampler = DistributedSampler(Clips(STEPS * WORLD), num_replicas=dp,
                                     rank=rank // kwargs["context_parallel_size"], shuffle=False)
        model = fit(pipeline, 1, strategy, devices=WORLD, sampler=sampler)
        params = dict(model.backbone.denoiser.named_parameters())
        report[name] = {"losses": model.losses, "indices": model.indices, "shape": list(strategy.device_mesh.shape),
                        "sampler": strategy.distributed_sampler_kwargs,
                        "placements": sorted({str(p.placements) for p in params.values() if isinstance(p, DTensor)})}
        save_file({n: p.to_local().detach().clone().contiguous() for n, p in params.items()},
                  str(out / f"{name}.local{rank}.safetensors"))
        if name == "hsdp2_cp2":  # a distributed checkpoint of replicated shards (each shard stored once)
            model.trainer.save_checkpoint(out / f"{name}.ckpt")
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            save_file({k: v.clone().contiguous() for k, v in state.items() if k.startswith("backbone.denoiser.")},
                      str(out / f"{name}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def four_process_run(tmp_path_factory, tiny_pixel_pipeline) -> Path:
    return run_ranks(__file__, tmp_path_factory.mktemp("hsdp"), tiny_pixel_pipeline, WORLD, timeout=300)


# -- the tests -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_four_ranks_match_one_process_on_the_same_global_batch(four_process_run, tiny_pixel_pipeline, name):
    from safetensors.torch import load_file

    kwargs, dp = LAYOUTS[name]
    reports = [json.loads((four_process_run / f"rank{r}.json").read_text())[name] for r in range(WORLD)]
    cp, replicas = kwargs["context_parallel_size"], kwargs.get("data_parallel_replicate_size", 1)
    assert reports[0]["shape"] == [replicas, dp // replicas, 1, cp]
    # the strategy's sampler shards over data parallel only: the ranks of a CP group (consecutive ranks) share samples
    assert [r["sampler"] for r in reports] == [{"num_replicas": dp, "rank": r // cp} for r in range(WORLD)]
    for r in reports:  # each step's global batch: the next dp samples, each drawn by both ranks of its CP group
        assert [sorted(set(i)) for i in r["indices"]] == [list(range(s * dp, (s + 1) * dp)) for s in range(STEPS)]
        assert all(len(i) == WORLD for i in r["indices"])
    single = fit(tiny_pixel_pipeline, dp)
    assert len(single.losses) == STEPS and len(set(single.losses)) == STEPS
    for r in reports:
        assert r["losses"] == pytest.approx(single.losses, rel=1e-5)
    trained = load_file(four_process_run / f"{name}.safetensors")
    L.seed_everything(0)
    before = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16).state_dict()
    state = {k: v for k, v in single.state_dict().items() if k.startswith("backbone.denoiser.")}
    assert set(trained) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-5, msg=key)
    moved = sum(not torch.equal(v, before[k.removeprefix("backbone.")]) for k, v in state.items())
    assert moved > len(state) // 2  # the steps changed the weights: the comparison is not vacuous


@pytest.mark.parametrize("name", ["hsdp2_cp2", "hsdp2x2"])
def test_hsdp_replicas_hold_identical_shards_after_the_steps(four_process_run, name):
    from safetensors.torch import load_file

    report = json.loads((four_process_run / "rank0.json").read_text())[name]
    assert report["placements"] == ["(Replicate(), Shard(dim=0))"]  # HSDP: replicate x shard
    local = [load_file(four_process_run / f"{name}.local{r}.safetensors") for r in range(WORLD)]
    # mesh (replicate 2, shard x CP 2): rank r and r + 2 hold the same shard in the two replicas
    for r in (0, 1):
        assert all(torch.equal(v, local[r + 2][k]) for k, v in local[r].items())
    # ... and ranks 0 and 1 hold different halves, so the equality above is a real check
    assert any(v.shape != local[1][k].shape or not torch.equal(v, local[1][k]) for k, v in local[0].items())
    dp2 = json.loads((four_process_run / "rank0.json").read_text())["dp2_cp2"]
    assert dp2["placements"] == ["(Shard(dim=0),)"]  # without replicas: plain FSDP2 over data x CP


def test_an_hsdp_checkpoint_consolidates_into_the_trained_weights(four_process_run, tmp_path):
    from safetensors.torch import load_file

    from lit_videoalign.strategies import consolidate_sharded_checkpoint

    ckpt = four_process_run / "hsdp2_cp2.ckpt"
    assert len(list(ckpt.glob("*.distcp"))) == WORLD
    merged = load_file(consolidate_sharded_checkpoint(ckpt, tmp_path / "weights.safetensors"))
    trained = load_file(four_process_run / "hsdp2_cp2.safetensors")
    assert all(torch.equal(merged[k], v) for k, v in trained.items())


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
