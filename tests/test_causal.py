"""Causal Wan: the full block-causal forward equals chunk-by-chunk generation with the KV cache, later chunks never
reach earlier ones, one chunk is the bidirectional model, the rolling window keeps what it should, bad input fails."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from lit_videoalign.backbones.causal import CausalWan, KVCache
from lit_videoalign.testing import TINY_TRANSFORMER

B, C, H, W, TEXT = 2, 16, 4, 4, 5  # latents (b, c, f, h, w); prompt embeddings (b, TEXT, 32)


@pytest.fixture()
def transformer():
    torch.manual_seed(0)
    return WanTransformer3DModel(**TINY_TRANSFORMER).eval()


def inputs(frames, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, frames, H, W, generator=g), torch.randn(B, TEXT, 32, generator=g)


def chunk_by_chunk(causal, latents, sigmas, text, cache):
    """Run each chunk alone against the cache, appending it (at its own sigma) once done."""
    f = causal.chunk_frames
    outs = [causal.forward_chunk(latents[:, :, k * f:(k + 1) * f], k, sigmas[:, k], text, cache, update_cache=True)
            for k in range(latents.shape[2] // f)]
    return torch.cat(outs, dim=2)


@torch.no_grad()
def test_full_forward_equals_kv_cached_chunks(transformer):
    causal = CausalWan(transformer, chunk_frames=2)
    latents, text = inputs(6)
    sigmas = torch.tensor([[0.1, 0.5, 0.9], [0.0, 0.3, 1.0]])  # (b, 3 chunks), each chunk at its own level
    full = causal.forward_full(latents, sigmas, text)
    cache = KVCache()
    stepped = chunk_by_chunk(causal, latents, sigmas, text, cache)
    assert cache.chunk_indices == [0, 1, 2]
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    # a prefill of the first two chunks by the full forward, then chunk 2 from that cache: the same again
    prefill = KVCache()
    causal.forward_full(latents[:, :, :4], sigmas[:, :2], text, cache=prefill)
    last = causal.forward_chunk(latents[:, :, 4:], 2, sigmas[:, 2], text, prefill)
    torch.testing.assert_close(last, full[:, :, 4:], atol=1e-5, rtol=1e-5)
    # without the cache (or with chunk 2 placed at frame 0) the result differs: the context and RoPE offset matter
    alone = causal.forward_chunk(latents[:, :, 4:], 0, sigmas[:, 2], text, KVCache())
    assert (alone - full[:, :, 4:]).abs().max() > 1e-3


@torch.no_grad()
def test_later_chunks_never_change_earlier_ones(transformer):
    causal = CausalWan(transformer, chunk_frames=2)
    latents, text = inputs(6)
    sigmas = torch.tensor([[0.2, 0.6, 0.4], [0.7, 0.7, 0.1]])
    base = causal.forward_full(latents, sigmas, text)
    later = latents.clone()
    later[:, :, 4:] = torch.randn_like(later[:, :, 4:])
    later_sigmas = sigmas.clone()
    later_sigmas[:, 2] = 0.95
    changed = causal.forward_full(later, later_sigmas, text)
    torch.testing.assert_close(changed[:, :, :4], base[:, :, :4], atol=1e-6, rtol=0)
    assert (changed[:, :, 4:] - base[:, :, 4:]).abs().max() > 1e-3
    earlier = latents.clone()
    earlier[:, :, :2] = torch.randn_like(earlier[:, :, :2])
    changed = causal.forward_full(earlier, sigmas, text)
    assert (changed[:, :, 2:4] - base[:, :, 2:4]).abs().max() > 1e-3
    assert (changed[:, :, 4:] - base[:, :, 4:]).abs().max() > 1e-3
    # the bidirectional model, by contrast, lets the last chunk reach the first
    plain_base = transformer(latents, torch.full((B,), 500.0), text).sample
    plain = transformer(later, torch.full((B,), 500.0), text).sample
    assert (plain[:, :, :2] - plain_base[:, :, :2]).abs().max() > 1e-3


@torch.no_grad()
def test_one_chunk_is_the_bidirectional_model(transformer):
    latents, text = inputs(4)
    sigma = torch.tensor([0.3, 0.8])
    before = transformer(latents, sigma * 1000, text).sample
    causal = CausalWan(transformer, chunk_frames=4)
    full = causal.forward_full(latents, sigma[:, None], text)
    torch.testing.assert_close(full, before, atol=1e-6, rtol=0)
    chunk = causal.forward_chunk(latents, 0, sigma, text, KVCache())
    torch.testing.assert_close(chunk, before, atol=1e-6, rtol=0)
    # plain calls stay bidirectional while the causal processors are installed, and after remove()
    assert torch.equal(transformer(latents, sigma * 1000, text).sample, before)
    causal.remove()
    assert type(transformer.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"
    assert torch.equal(transformer(latents, sigma * 1000, text).sample, before)


def test_activation_checkpointing_recomputes_causal_attention(transformer):
    causal = CausalWan(transformer, chunk_frames=1)
    latents, text = inputs(3)
    sigmas = torch.tensor([[0.2, 0.5, 0.9], [0.4, 0.4, 0.6]])
    grads = []
    for checkpointing in (False, True):
        transformer.zero_grad()
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        causal.forward_full(latents, sigmas, text)[:, :, 0].square().mean().backward()
        grads.append([p.grad.clone() for p in transformer.blocks[0].attn1.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)
    assert transformer.gradient_checkpointing and all(g.abs().sum() > 0 for g in grads[1])


@torch.no_grad()
def test_rolling_window_and_sink():
    kv = [(torch.zeros(1, 4, 2, 6), torch.zeros(1, 4, 2, 6))]
    cache = KVCache(window_chunks=3, sink_chunks=1)
    for k in range(6):
        cache.append(k, kv)
    assert cache.chunk_indices == [0, 4, 5]
    cache = KVCache(window_chunks=2)
    for k in range(5):
        cache.append(k, kv)
    assert cache.chunk_indices == [3, 4] and cache.next_chunk == 5
    cache.reset()
    assert cache.chunk_indices == [] and cache.next_chunk == 0
    # streaming: with a window of 2 and a sink, chunk 3 sees chunks 0 and 2 but no longer chunk 1. One block, since
    # with more, chunk 1 still reaches chunk 3 through chunk 2's deeper keys/values (computed while 1 was cached)
    torch.manual_seed(0)
    causal = CausalWan(WanTransformer3DModel(**dict(TINY_TRANSFORMER, num_layers=1)).eval(), chunk_frames=1)
    latents, text = inputs(4)
    sigmas = torch.zeros(B, 4)

    def last_chunk(lat):
        cache = KVCache(window_chunks=2, sink_chunks=1)
        for k in range(3):
            causal.forward_chunk(lat[:, :, k:k + 1], k, sigmas[:, k], text, cache, update_cache=True)
        assert cache.chunk_indices == [0, 2]
        return causal.forward_chunk(lat[:, :, 3:], 3, sigmas[:, 3], text, cache)

    base = last_chunk(latents)
    for k, kept in ((1, False), (0, True), (2, True)):
        changed = latents.clone()
        changed[:, :, k] = torch.randn_like(changed[:, :, k])
        differs = bool((last_chunk(changed) - base).abs().max() > 1e-4)
        assert differs == kept, f"chunk {k}: kept={kept} but the output {'changed' if differs else 'did not'}"


def test_bad_inputs_fail_clearly(transformer):
    causal = CausalWan(transformer, chunk_frames=2)
    latents, text = inputs(5)
    with pytest.raises(ValueError, match="5 latent frames cannot be cut into chunks of chunk_frames=2"):
        causal.forward_full(latents, torch.zeros(B, 2), text)
    latents, text = inputs(4)
    with pytest.raises(ValueError, match=r"sigmas has shape \(2, 3\); expected \(batch, num_chunks\) = \(2, 2\)"):
        causal.forward_full(latents, torch.zeros(B, 3), text)
    with pytest.raises(ValueError, match=r"sigmas must be flow times in \[0, 1\]"):
        causal.forward_full(latents, torch.full((B, 2), 1.5), text)
    cache = KVCache()
    with pytest.raises(ValueError, match="chunk_index=1 but the cache holds chunks \\[\\]: the next chunk to run is 0"):
        causal.forward_chunk(latents[:, :, :2], 1, 0.5, text, cache)
    with pytest.raises(ValueError, match=r"sigma has shape \(3,\); expected a float or \(2,\)"):
        causal.forward_chunk(latents[:, :, :2], 0, torch.zeros(3), text, cache)
    with pytest.raises(ValueError, match="chunk_latents has 4 latent frames; expected chunk_frames=2"):
        causal.forward_chunk(latents, 0, 0.5, text, cache)
    with pytest.raises(ValueError, match="rope_max_seq_len=32"):
        causal.forward_full(torch.zeros(B, C, 34, H, W), torch.zeros(B, 17), text)
    with pytest.raises(ValueError, match="chunk_frames=0: expected a positive multiple"):
        CausalWan(transformer, chunk_frames=0)
    with pytest.raises(ValueError, match="needs a diffusers WanTransformer3DModel, got Linear"):
        CausalWan(torch.nn.Linear(2, 2), chunk_frames=1)
    with pytest.raises(ValueError, match="window_chunks=0: a KV window must hold at least one chunk"):
        KVCache(window_chunks=0)
    with pytest.raises(ValueError, match="sink_chunks=2 must be smaller than window_chunks=2"):
        KVCache(window_chunks=2, sink_chunks=2)
    with pytest.raises(ValueError, match="cannot append chunk 3"):
        cache.append(3, [(torch.zeros(1, 4, 2, 6), torch.zeros(1, 4, 2, 6))])
