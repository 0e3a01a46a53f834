"""The Wan 2.1 14B context-parallel configs parse through the real ``videoalign`` parser (no model is built) into a
layout that fits: degrees that divide the world, a head count the Ulysses degree divides, a 720p x 81-frame token count
the CP degree divides, and the strategy built from its arguments; plus the benchmark's measuring pieces
(``benchmarks/context_parallel.py``) on a hand-computed graph and one tiny CP 1 run."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml

from lit_videoalign.cli import main
from lit_videoalign.context_parallel import ContextParallelStrategy, check_degrees, check_denoiser, check_token_count

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["configs/wan2.1-14b/sft_fsdp_cp.yaml", "configs/wan2.1-14b/grpo_fsdp_cp.yaml",
           "configs/wan2.1-14b/sft_hsdp_cp_2node.yaml"]
WAN_14B_HEADS = 40  # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json: num_attention_heads


def printed_config(config: str, capsys, *extra: str) -> dict:
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", config, *extra, "--print_config"])
    assert done.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def wan_14b_heads_denoiser():
    """A tiny Wan transformer with the 14B's head count (40), for the real CP checks."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=WAN_14B_HEADS, attention_head_dim=2,
                                 in_channels=16, out_channels=16, text_dim=8, freq_dim=8, ffn_dim=8, num_layers=1)


@pytest.mark.parametrize("config", CONFIGS)
def test_wan14b_cp_config_parses_into_a_layout_that_fits(config, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = printed_config(config, capsys)
    trainer, model = cfg["trainer"], cfg["model"]["init_args"]
    backbone = model["backbone"]["init_args"]
    assert backbone["pretrained_model_name_or_path"] == "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    assert backbone["gradient_checkpointing"] is True and trainer["precision"] == "bf16-mixed"
    strategy = trainer["strategy"]
    assert strategy["class_path"] == "lit_videoalign.context_parallel.ContextParallelStrategy"
    args = strategy["init_args"]
    built = ContextParallelStrategy(**args)  # the YAML's arguments are the strategy's real ones
    assert built.context_parallel_size == args["context_parallel_size"] == 4
    world = trainer["devices"] * trainer["num_nodes"]
    replicate = args.get("data_parallel_replicate_size", 1)
    sizes = check_degrees(world, args["context_parallel_size"], args["ring_degree"], args["data_parallel_size"],
                          **({"data_parallel_replicate_size": replicate} if replicate != 1 else {}))
    assert sizes[-1] * args["ring_degree"] == 4 and (world == 16) == ("2node" in config) == (replicate == 2)
    check_denoiser(wan_14b_heads_denoiser(), args["ring_degree"], args["context_parallel_size"] // args["ring_degree"])
    # 81 frames at 1280x720: latents 21 x 90 x 160 (VAE 4x temporal, 8x spatial), 21 x 45 x 80 = 75,600 tokens
    frames, height, width = model["num_frames"], model["height"], model["width"]
    assert (frames, height, width) == (81, 720, 1280)
    latents = torch.empty(1, 16, 1 + (frames - 1) // 4, height // 8, width // 8, device="meta")
    check_token_count(wan_14b_heads_denoiser(), latents, args["context_parallel_size"])
    data = cfg["data"]["init_args"]
    if "num_frames" in data:  # video data loaded at the model's size
        assert (data["num_frames"], data["height"], data["width"]) == (frames, height, width)


def test_a_misspelt_strategy_argument_is_refused_by_the_parser(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", CONFIGS[0], "--trainer.strategy.init_args.context_paralel_size=4", "--print_config"])
    assert done.value.code != 0
    assert "context_paralel_size" in capsys.readouterr().err


def test_saved_bytes_match_a_hand_computed_graph():
    from benchmarks.context_parallel import SavedBytes

    lin = torch.nn.Linear(8, 8)
    lin.blocks = torch.nn.ModuleList([torch.nn.Identity()])  # SavedBytes attributes to model.blocks
    x = torch.randn(4, 8, requires_grad=True)
    with SavedBytes(lin) as saved:
        y = lin(x)           # saves x (4x8) and the weight (a parameter: not counted)
        z = y.sin()          # saves y (4x8)
        w = (z * z).sum()    # saves z once (one storage, saved twice)
    assert saved.total == 3 * 4 * 8 * 4  # x, y, z in float32
    assert saved.by_block == {"outside": saved.total}
    w.backward()


def test_a_tiny_cp1_run_measures_saved_activations_below_its_live_peak(tmp_path):
    import json

    from benchmarks.context_parallel import worker

    args = argparse.Namespace(layers=2, heads=2, head_dim=16, ffn_mult=2, frames=2, latent_size=16, warmup=0,
                              repeats=1)
    worker(args, 1, tmp_path)
    report = json.loads((tmp_path / "world1_rank0.json").read_text())
    off, on = report["no_checkpointing"], report["checkpointing"]
    assert set(off["saved_by_block"]) == {"outside", "block0", "block1"}
    assert 0 < off["saved_bytes"] < off["live_peak_bytes"]
    assert off["loss"] == pytest.approx(on["loss"], rel=1e-6)  # checkpointing recomputes the same function
