"""Memory levers as config switches: gradient checkpointing, 8-bit AdamW from YAML, a 4-bit NF4 frozen base under
LoRA (QLoRA), per-block torch.compile, and the FSDP strategy wiring that only runs on CUDA.

diffusers' bitsandbytes quantizer refuses to load without an accelerator, although bitsandbytes >= 0.49 runs NF4 on
CPU; on such a machine the QLoRA tests lift that one environment check (``lift_gpu_check``) and use everything else
as shipped.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.cli import VideoAlignCLI
from lit_videoalign.data.toyworld import ToyWorldDataModule
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.strategies import (
    BlockFSDPStrategy,
    compile_blocks,
    fsdp_strategy,
    is_compiled,
    parameter_bytes,
)
from lit_videoalign.testing import TINY_TEXT_ENCODER, TINY_TRANSFORMER, write_wan_pipeline

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red ball falls", "a blue ball moves left"]
ACCELERATOR = torch.cuda.is_available()


def make_trainer(steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0)


class ReferencedSFT(SFT):
    requires_reference = True  # full fine-tuning with a frozen copy, like DPO/GRPO without LoRA


# -- gradient checkpointing --------------------------------------------------------------------------------------------
def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients(tiny_pixel_pipeline):
    grads, calls = {}, {}
    x = torch.randn(2, 3, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    for on in (False, True):
        bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16, gradient_checkpointing=on)
        assert bb.denoiser.gradient_checkpointing is on
        count = [0]
        for block in [m for m in bb.denoiser.modules() if isinstance(m, bb.block_classes)]:
            # A pre-hook: the recomputation may stop early, once it has what the backward pass needs.
            block.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        bb.train()
        bb.predict_velocity(x, torch.tensor([0.3, 0.7]), bb.encode_prompts(PROMPTS)).square().mean().backward()
        grads[on] = {n: p.grad.clone() for n, p in bb.denoiser.named_parameters()}
        calls[on] = count[0]
    num_blocks = TINY_TRANSFORMER["num_layers"]
    assert calls == {False: num_blocks, True: 2 * num_blocks}  # each block runs again in the backward pass
    # measured bit-identical (the recomputation runs the same kernels; torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 /
    # baseline CPU kernels); 1e-5 of each gradient's largest entry leaves room for a reordered float32 reduction
    assert all(torch.allclose(grads[True][n], g, rtol=0, atol=1e-5 * g.abs().max().item())
               for n, g in grads[False].items())


# -- 8-bit AdamW -------------------------------------------------------------------------------------------------------
def test_adamw8bit_from_yaml_keeps_8bit_state_and_trains(tmp_path, pipeline_64):
    """The optimizer class path of a config is all it takes; big tensors get uint8 moments, small ones float32."""
    import bitsandbytes as bnb

    config = {
        "seed_everything": 0,
        "model": {"class_path": "lit_videoalign.objectives.sft.SFT", "init_args": {
            "backbone": {"class_path": "lit_videoalign.backbones.diffusers.DiffusersVideoBackbone",
                         "init_args": {"pretrained_model_name_or_path": pipeline_64, "max_sequence_length": 16}},
            "optimizer": {"class_path": "bitsandbytes.optim.AdamW8bit", "init_args": {"lr": 1.0e-3}}}},
        "data": {"class_path": "lit_videoalign.data.toyworld.ToyWorldDataModule",
                 "init_args": {"batch_size": 2, "train_size": 4, "val_size": 2}},
        "trainer": {"max_steps": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path)},
    }
    path = tmp_path / "sft_adamw8bit.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = VideoAlignCLI(args=["--config", str(path)], run=False)
    before = {n: p.detach().clone() for n, p in cli.model.backbone.denoiser.named_parameters()}
    cli.trainer.fit(cli.model, cli.datamodule)
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    states = [optimizer.state[p] for g in optimizer.param_groups for p in g["params"]]
    big = [s for s, p in zip(states, [p for g in optimizer.param_groups for p in g["params"]]) if p.numel() >= 4096]
    assert big and all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in big)
    after = dict(cli.model.backbone.denoiser.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert sum(not torch.equal(before[n], p) for n, p in after.items()) > len(before) // 2


# -- QLoRA: a 4-bit NF4 frozen base ------------------------------------------------------------------------------------
@pytest.fixture
def lift_gpu_check(monkeypatch):
    if not ACCELERATOR:
        from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

        monkeypatch.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None)


@pytest.fixture(scope="module")
def pipeline_64(tmp_path_factory) -> str:
    """A tiny pixel-space Wan pipeline whose linear layers are multiples of 64 wide (bitsandbytes' 4-bit block)."""
    transformer = dict(TINY_TRANSFORMER, attention_head_dim=32, ffn_dim=128, text_dim=64, in_channels=3,
                       out_channels=3, patch_size=(2, 4, 4))
    return str(write_wan_pipeline(tmp_path_factory.mktemp("q") / "wan64", transformer=transformer,
                                  text_encoder=dict(TINY_TEXT_ENCODER, d_model=64), vae=None))


def test_nf4_base_is_4bit_smaller_and_close(pipeline_64, lift_gpu_check):
    import bitsandbytes as bnb

    full = DiffusersVideoBackbone(pipeline_64, max_sequence_length=16)
    quant = DiffusersVideoBackbone(pipeline_64, max_sequence_length=16, quantization="nf4")
    assert quant.is_quantized and not full.is_quantized
    blocks = [m for m in quant.denoiser.modules() if isinstance(m, quant.block_classes)]
    linears = [m for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert linears[0].weight.quant_state.quant_type == "nf4"
    # Block weights: 4 bits (plus per-64 absmax) against 32.
    full_bytes = parameter_bytes(p for b in full.denoiser.blocks for p in b.parameters())
    quant_bytes = parameter_bytes(p for b in quant.denoiser.blocks for p in b.parameters())
    assert quant_bytes < 0.25 * full_bytes
    x = torch.randn(2, 3, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    cond = full.encode_prompts(PROMPTS)
    with torch.no_grad():
        a, b = (bb.predict_velocity(x, torch.tensor([0.3, 0.6]), cond) for bb in (full, quant))
    assert 0 < (a - b).norm() / a.norm() < 0.25  # quantisation error, not a different model


def test_qlora_trains_the_adapter_on_a_frozen_4bit_base(pipeline_64, lift_gpu_check):
    bb = DiffusersVideoBackbone(pipeline_64, max_sequence_length=16, quantization="nf4")
    model = SFT(bb, lora_rank=4, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), num_inference_steps=1)
    model.generate(PROMPTS[:1])  # an eval-mode pass first must not break training (bitsandbytes' CPU repacking)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    make_trainer(2).fit(model, ToyWorldDataModule(batch_size=2, train_size=4, val_size=2))
    after = dict(model.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base), "a frozen (4-bit) weight moved"
    assert sum(not torch.equal(lora[n], after[n]) for n in lora) > len(lora) // 2
    assert all(torch.isfinite(p).all() for p in after.values())


def test_quantized_base_needs_lora_and_a_known_scheme(pipeline_64, lift_gpu_check):
    with pytest.raises(ValueError, match="'int3'"):
        DiffusersVideoBackbone(pipeline_64, quantization="int3")
    with pytest.raises(ValueError, match="reinit_denoiser"):
        DiffusersVideoBackbone(pipeline_64, quantization="nf4", reinit_denoiser=True)
    model = SFT(DiffusersVideoBackbone(pipeline_64, max_sequence_length=16, quantization="nf4"))
    with pytest.raises(ValueError, match="lora_rank"):
        model.configure_model()


@pytest.mark.skipif(ACCELERATOR, reason="checks the message diffusers gives on a machine without an accelerator")
def test_without_an_accelerator_diffusers_says_why(pipeline_64):
    with pytest.raises(RuntimeError, match="GPU"):
        DiffusersVideoBackbone(pipeline_64, quantization="nf4")


# -- torch.compile -----------------------------------------------------------------------------------------------------
def test_compile_blocks_is_wired_through_configure_model(tiny_pixel_pipeline):
    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16, compile_blocks=True)
    model = ReferencedSFT(bb)
    keys = list(model.state_dict())
    model.configure_model()  # what the Trainer calls before building the optimizer
    blocks = [m for m in model.modules() if isinstance(m, bb.block_classes)]
    assert len(blocks) == 2 * TINY_TRANSFORMER["num_layers"]  # the trainable denoiser and the reference copy
    assert all(is_compiled(b) for b in blocks)
    assert list(model.state_dict()) == keys  # checkpoint keys do not change
    assert compile_blocks(model) == 0  # idempotent
    plain = ReferencedSFT(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16))
    plain.configure_model()
    assert not any(is_compiled(m) for m in plain.modules() if isinstance(m, bb.block_classes))


def test_compiled_blocks_trace_as_one_graph_and_match(tiny_pixel_pipeline):
    """Dynamo captures each block whole (``fullgraph``); the eager backend keeps the test fast (inductor is slow on
    this CPU) while checking the graph computes the same thing."""
    model = SFT(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16))
    x = torch.randn(2, 3, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = model.backbone.encode_prompts(PROMPTS)
    expected = model.backbone.predict_velocity(x, torch.tensor([0.3, 0.6]), cond)
    torch._dynamo.reset()
    assert compile_blocks(model, backend="eager", fullgraph=True) == TINY_TRANSFORMER["num_layers"]
    out = model.backbone.predict_velocity(x, torch.tensor([0.3, 0.6]), cond)
    # measured bit-identical (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 of the
    # largest velocity leaves room for a traced graph that fuses or reorders float32 operations
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.backbone.denoiser.blocks.parameters())


# -- FSDP (CUDA): the wiring that can be checked without a GPU ---------------------------------------------------------
def test_fsdp_strategy_wraps_and_checkpoints_the_blocks(tiny_pixel_pipeline):
    from torch.distributed.fsdp import MixedPrecision

    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    strategy = fsdp_strategy(bb)
    wrapped = strategy.kwargs["auto_wrap_policy"]._module_classes
    assert set(bb.block_classes) <= wrapped
    assert {type(m).__name__ for m in bb.text_encoder.modules()} & {c.__name__ for c in wrapped} == {"UMT5Block"}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == set(bb.block_classes)
    assert strategy.mixed_precision == MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    assert strategy._state_dict_type == "sharded"
    plain = fsdp_strategy(bb.block_classes, activation_checkpointing=False, param_dtype=None)
    assert plain._activation_checkpointing_kwargs == {} and plain.mixed_precision is None
    with pytest.raises(ValueError, match="no transformer block classes"):
        fsdp_strategy([])
    with pytest.raises(ValueError, match="'fp8'"):
        fsdp_strategy(bb, param_dtype="fp8")


def test_block_fsdp_strategy_from_the_14b_config_finds_blocks_at_setup(tiny_pixel_pipeline, monkeypatch):
    from lightning.pytorch.strategies import FSDPStrategy

    config = yaml.safe_load((ROOT / "configs/wan2.1-14b/sft_fsdp.yaml").read_text())
    spec = config["trainer"]["strategy"]
    assert spec["class_path"] == "lit_videoalign.strategies.BlockFSDPStrategy"
    strategy = BlockFSDPStrategy(**spec["init_args"])
    model = SFT(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16))
    monkeypatch.setattr(FSDPStrategy, "_setup_model", lambda self, m: m)  # stop before the CUDA-only wrapping
    monkeypatch.setattr(BlockFSDPStrategy, "lightning_module", property(lambda self: model))
    strategy._setup_model(model)
    assert set(model.backbone.block_classes) <= strategy.kwargs["auto_wrap_policy"]._module_classes
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == set(
        model.backbone.block_classes)
    assert strategy._state_dict_type == "sharded" and strategy.mixed_precision.param_dtype == torch.bfloat16
