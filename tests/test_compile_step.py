"""A faster step, the same maths: the backbone's ``compile_blocks`` option (regional ``torch.compile`` of every
transformer block, in ``configure_model``) and the default AdamW with its fused kernel change the speed of an SFT step,
not what it computes (issue 26; the speed is measured by ``benchmarks/overhead.py``, row ``compiled``).

The compiled fits here use the ``aot_eager`` backend: TorchDynamo captures each block and AOTAutograd builds and
partitions its joint forward-backward graph, as with inductor, but eager kernels run the graphs. Inductor's cold
compile of even the tiny model takes over a minute on 2 shared CPU cores, too slow for ``make test``; its code
generation is exercised by the benchmark (``python -m benchmarks.overhead --objectives compiled``).
"""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

import lit_videoalign.strategies as strategies
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import ToyWorldDataModule
from lit_videoalign.objectives.base import _default_optimizer
from lit_videoalign.objectives.sft import SFT

# Float32 rounding, never a change of the update. Measured on torch 2.14.1, CPU, for this test's 2-step fit: aot_eager
# equal bit for bit; inductor (fused kernels, other summation orders) losses equal and LoRA weights within 1.7e-6,
# where the two AdamW steps move them by up to 2e-2. A wrong gradient (a block left out, a term lost) moves weights
# by the order of the update, 1e-2, a thousand times TOL_WEIGHT.
TOL_LOSS = 1e-6
TOL_WEIGHT = 1e-5


class CountingBackend:
    """``aot_eager``, counting the graphs it compiles and how often compiled code runs."""

    def __init__(self) -> None:
        self.graphs = 0
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        compiled = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
        self.graphs += 1

        @functools.wraps(compiled)
        def run(*args):
            self.calls += 1
            return compiled(*args)

        return run


def fit_sft(pipeline: str, compile_blocks: bool, steps: int = 2) -> tuple[SFT, list[float]]:
    """A LoRA SFT fit of ``steps`` steps (prompt dropout on: the RNG must advance alike); the losses of its steps."""
    torch.manual_seed(0)
    bb = DiffusersVideoBackbone(pipeline, max_sequence_length=16, compile_blocks=compile_blocks)
    model = SFT(bb, lora_rank=4, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Losses()])
    trainer.fit(model, ToyWorldDataModule(batch_size=2, train_size=4, val_size=2))
    return model, losses


def test_compiled_fit_equals_the_uncompiled_fit_and_compiles_every_block(tiny_pixel_pipeline, monkeypatch):
    torch._dynamo.reset()
    backend, compiled_counts = CountingBackend(), []
    original = strategies.compile_blocks

    def compile_with_counting_backend(module, **kwargs):  # what configure_model calls for compile_blocks=True
        compiled_counts.append(original(module, backend=backend, **kwargs))
        return compiled_counts[-1]

    monkeypatch.setattr(strategies, "compile_blocks", compile_with_counting_backend)
    eager, eager_losses = fit_sft(tiny_pixel_pipeline, compile_blocks=False)
    assert compiled_counts == []  # the option is off: nothing compiled
    compiled, compiled_losses = fit_sft(tiny_pixel_pipeline, compile_blocks=True)

    blocks = list(compiled.backbone.denoiser.blocks)
    assert compiled_counts == [len(blocks)] and all(strategies.is_compiled(b) for b in blocks)
    assert not any(strategies.is_compiled(b) for b in eager.backbone.denoiser.blocks)
    # Every block ran its compiled graph at every step (no silent fallback to eager): at most 2 graphs are
    # compiled (the first block's input needs no gradient, the others' do), each then reused by every block.
    assert backend.calls == 2 * len(blocks) and 1 <= backend.graphs <= 2
    assert compiled_losses == pytest.approx(eager_losses, rel=TOL_LOSS, abs=0)
    for (name, p_eager), (_, p_compiled) in zip(eager.named_parameters(), compiled.named_parameters()):
        if "lora_" in name:
            torch.testing.assert_close(p_compiled, p_eager, rtol=0, atol=TOL_WEIGHT, msg=name)
    torch._dynamo.reset()  # leave no compiled code behind for other tests


def test_default_optimizer_is_fused_where_the_device_has_it_and_computes_the_same_update():
    params = [torch.nn.Parameter(torch.randn(64, 8)), torch.nn.Parameter(torch.randn(8))]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = _default_optimizer(params)
    plain = torch.optim.AdamW(reference, lr=1e-4, weight_decay=0.0, foreach=True)
    assert fused.defaults["fused"] is True  # CPU has the fused kernel
    for step in range(3):
        for p, q in zip(params, reference):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, reference):  # the same update within float32 rounding (measured: 1 ulp)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)
    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    assert not _default_optimizer(meta).defaults["fused"]  # a device without the kernel keeps the for-each one
