"""Block-causal Wan, per-chunk noise levels and a KV cache (Self-Forcing arXiv 2506.08009; CausVid arXiv 2412.07772).

A causal student denoises a clip chunk by chunk: ``chunk_frames`` latent frames at a time, every token seeing its own
chunk and the earlier ones, each chunk at its own noise level (diffusion forcing). This module adds that mode to
diffusers' own ``WanTransformer3DModel`` without forking it:

- **Attention.** :class:`CausalWanAttnProcessor` replaces each block's self-attention processor (``attn1``; the text
  cross-attention ``attn2`` is untouched). It is causal only inside a :class:`CausalWan` call and delegates to the
  original processor otherwise, so the same weights still serve as the bidirectional teacher. The causal plan of a call
  travels *with the call's inputs* (on the RoPE tables every block receives), not in global state, so activation
  checkpointing, which re-runs blocks during backward, recomputes the same causal attention.
- **Timesteps.** Tokens are frame-major (the patch embedding flattens ``(t', h', w')``), so a chunk is a contiguous run
  of ``tokens_per_chunk`` tokens. Per-chunk sigmas become a per-token timestep ``(b, seq_len)``, which
  ``WanTransformer3DModel.forward`` accepts for any config (the Wan 2.2 TI2V path: ``timestep.ndim == 2`` embeds each
  token's timestep and modulates each token with it, in every block and in the output norm). A Wan 2.1 config needs
  nothing more.
- **KV cache.** :class:`KVCache` holds, per block, the keys (after RoPE) and values of finished chunks; running chunk
  ``k`` alone attends to them plus itself, with chunk ``k``'s RoPE at its true frame index (the transformer's RoPE
  always starts at frame 0, so a forward hook on ``transformer.rope`` shifts it). A rolling window keeps the last
  chunks and, optionally, the first ``sink_chunks`` (a LongLive-style frame sink) for streaming.

Sigmas follow the project's flow convention (``sigma`` in ``[0, 1]``, 1 is noise; the transformer sees
``sigma * 1000``) and outputs are the transformer's velocity ``noise - x0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

TIMESTEP_SCALE = 1000  # the transformer's timestep for sigma (FlowMatchEulerDiscreteScheduler's num_train_timesteps)

KV = tuple[Tensor, Tensor]  # (keys, values), each (b, tokens, heads, head_dim), keys after RoPE


@dataclass
class _Plan:
    """What one causal call asks of every block's self-attention."""

    tokens_per_chunk: int
    past: list[KV | None] | None  # per block: cached (k, v) the call attends to first; None = full causal forward
    record: bool = False  # keep this call's (k, v) for a cache (off otherwise: checkpointing keeps the plan alive)
    new_kv: dict[int, KV] = field(default_factory=dict)  # per block: this call's (k, v), when recording


class _CausalRope(tuple):
    """The transformer's ``(cos, sin)`` RoPE tables carrying the call's :class:`_Plan`: blocks pass RoPE straight to
    ``attn1``, including when activation checkpointing re-runs them, so the plan reaches the processor unchanged."""

    plan: _Plan

    def __new__(cls, tables: tuple[Tensor, Tensor], plan: _Plan):
        self = super().__new__(cls, tables)
        self.plan = plan
        return self


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's RoPE on interleaved pairs (diffusers' maths): ``x`` (b, s, heads, d), ``cos``/``sin`` (1, s, 1, d)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (b, s, heads, d / 2) each
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class CausalWanAttnProcessor:
    """Self-attention processor of one Wan block: block-causal (full clip) or cached (one chunk) inside a
    :class:`CausalWan` call, the wrapped original processor (``inner``) in any other call."""

    def __init__(self, inner, layer: int):
        self.inner = inner  # the block's original processor (a WanAttnProcessor)
        self.layer = layer  # the block's index, its slot in the KV cache

    # diffusers' set_attention_backend / context parallelism set these on the processor: keep them on the original
    @property
    def _attention_backend(self):
        return getattr(self.inner, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.inner._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(self.inner, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value):
        self.inner._parallel_config = value

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, rotary_emb=None) -> Tensor:
        plan = getattr(rotary_emb, "plan", None)
        if plan is None:  # a plain (bidirectional) call of the transformer
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("CausalWanAttnProcessor is for self-attention (attn1) without a mask; got "
                             f"encoder_hidden_states={encoder_hidden_states is not None}, "
                             f"attention_mask={attention_mask is not None}")
        if self._parallel_config is not None:
            raise ValueError("causal Wan attention does not support context parallelism (the transformer has a "
                             "parallel config); run the causal student without context parallelism")
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)  # (b, s, inner)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))  # (b, s, heads, head_dim)
        q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        if plan.record:
            plan.new_kv[self.layer] = (k, v)

        def attend(q_, k_, v_):  # (b, s_q, heads, d) x (b, s_k, heads, d) -> (b, s_q, heads, d)
            return dispatch_attention_fn(q_, k_, v_, attn_mask=None, dropout_p=0.0, is_causal=False,
                                         backend=self._attention_backend)

        n = plan.tokens_per_chunk
        if plan.past is None:  # whole clip: chunk j's queries see the keys of chunks 0..j
            out = torch.cat([attend(q[:, s:s + n], k[:, :s + n], v[:, :s + n]) for s in range(0, q.shape[1], n)],
                            dim=1)
        else:  # one chunk: the cached chunks, then itself
            past = plan.past[self.layer]
            if past is not None:
                k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)  # (b, n_past + s, heads, d)
            out = attend(q, k, v)
        out = out.flatten(2, 3).type_as(q)  # (b, s, inner)
        return attn.to_out[1](attn.to_out[0](out))


class KVCache:
    """Per-block keys (after RoPE) and values of the chunks generated so far, for chunk-by-chunk generation.

    Chunks are appended in order (0, 1, 2, ...). With ``window_chunks`` the cache keeps at most that many chunks:
    the first ``sink_chunks`` always (a frame sink) and the most recent others (a rolling window), so a stream can
    run longer than the model was trained for. Stored tensors keep their autograd graph: fill the cache under
    ``torch.no_grad()`` unless gradients should flow through the context.
    """

    def __init__(self, window_chunks: int | None = None, sink_chunks: int = 0):
        if window_chunks is not None and window_chunks < 1:
            raise ValueError(f"window_chunks={window_chunks}: a KV window must hold at least one chunk (or None for "
                             "no window)")
        if sink_chunks < 0:
            raise ValueError(f"sink_chunks={sink_chunks}: expected 0 or more")
        if window_chunks is not None and sink_chunks >= window_chunks:
            raise ValueError(f"sink_chunks={sink_chunks} must be smaller than window_chunks={window_chunks} (the "
                             "window holds the sink plus at least one recent chunk)")
        if window_chunks is None and sink_chunks:
            raise ValueError(f"sink_chunks={sink_chunks} needs a window_chunks: without a window every chunk is kept")
        self.window_chunks, self.sink_chunks = window_chunks, sink_chunks
        self.reset()

    def reset(self) -> None:
        """Forget every chunk: the next one appended is chunk 0."""
        self._chunks: dict[int, list[KV]] = {}  # chunk index -> per block (k, v)
        self._joined: list[KV] | None = None  # per block, the kept chunks concatenated (built on demand)
        self.next_chunk = 0  # the index the next appended chunk must have
        self.tokens_per_chunk: int | None = None
        self.batch_size: int | None = None

    @property
    def chunk_indices(self) -> list[int]:
        """Indices of the chunks held now, in order."""
        return sorted(self._chunks)

    def append(self, chunk_index: int, kv: list[KV]) -> None:
        """Add chunk ``chunk_index``'s per-block ``(k, v)`` (each (b, tokens, heads, head_dim)); then evict the oldest
        non-sink chunk while the window is over-full."""
        if chunk_index != self.next_chunk:
            raise ValueError(f"cannot append chunk {chunk_index}: the cache holds chunks {self.chunk_indices} and "
                             f"the next must be chunk {self.next_chunk}")
        if self._chunks and len(kv) != len(next(iter(self._chunks.values()))):
            raise ValueError(f"cannot append {len(kv)} blocks of keys/values to a cache of "
                             f"{len(next(iter(self._chunks.values())))} blocks")
        b, n = kv[0][0].shape[:2]
        if self.tokens_per_chunk is not None and (n, b) != (self.tokens_per_chunk, self.batch_size):
            raise ValueError(f"chunk {chunk_index} has {n} tokens and batch {b}; the cache holds chunks of "
                             f"{self.tokens_per_chunk} tokens and batch {self.batch_size}")
        self.tokens_per_chunk, self.batch_size = n, b
        self._chunks[chunk_index] = list(kv)
        self.next_chunk += 1
        while self.window_chunks is not None and len(self._chunks) > self.window_chunks:
            del self._chunks[min(i for i in self._chunks if i >= self.sink_chunks)]
        self._joined = None

    def past(self, num_blocks: int) -> list[KV | None]:
        """Per block, the kept chunks' ``(k, v)`` concatenated in chunk order (b, n_kept * tokens, heads, head_dim),
        or ``None`` per block when the cache is empty."""
        if not self._chunks:
            return [None] * num_blocks
        if self._joined is None:
            chunks = [self._chunks[i] for i in self.chunk_indices]
            self._joined = [(torch.cat([c[layer][0] for c in chunks], dim=1),
                             torch.cat([c[layer][1] for c in chunks], dim=1)) for layer in range(len(chunks[0]))]
        if len(self._joined) != num_blocks:
            raise ValueError(f"the cache holds keys/values of {len(self._joined)} blocks; the transformer has "
                             f"{num_blocks}")
        return self._joined


class CausalWan:
    """A ``WanTransformer3DModel`` run block-causally over chunks of ``chunk_frames`` latent frames.

    Construction installs :class:`CausalWanAttnProcessor` on every block's ``attn1`` (``remove()`` puts the original
    processors back); plain calls of the transformer stay bidirectional. Not an ``nn.Module``: it owns no weights,
    the transformer stays wherever the caller keeps it (LoRA, FSDP and activation checkpointing apply unchanged).

    - :meth:`forward_full`: the whole clip in one pass, each chunk at its own sigma (training, teacher forcing).
    - :meth:`forward_chunk`: one chunk, attending to a :class:`KVCache` of the earlier chunks (generation).
    """

    def __init__(self, transformer, chunk_frames: int):
        from diffusers import WanTransformer3DModel

        if not isinstance(transformer, WanTransformer3DModel):
            raise ValueError(f"CausalWan needs a diffusers WanTransformer3DModel, got {type(transformer).__name__}")
        p_t = transformer.config.patch_size[0]
        if chunk_frames < 1 or chunk_frames % p_t:
            raise ValueError(f"chunk_frames={chunk_frames}: expected a positive multiple of the temporal patch size "
                             f"{p_t}")
        self.transformer, self.chunk_frames = transformer, chunk_frames
        for layer, block in enumerate(transformer.blocks):
            if not isinstance(block.attn1.processor, CausalWanAttnProcessor):
                block.attn1.set_processor(CausalWanAttnProcessor(block.attn1.processor, layer))

    def remove(self) -> None:
        """Put the transformer's original self-attention processors back."""
        for block in self.transformer.blocks:
            if isinstance(block.attn1.processor, CausalWanAttnProcessor):
                block.attn1.set_processor(block.attn1.processor.inner)

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.blocks)

    def num_chunks(self, num_frames: int) -> int:
        """Chunks in a clip of ``num_frames`` latent frames; a clear error when the chunk size does not divide it."""
        if num_frames < 1 or num_frames % self.chunk_frames:
            raise ValueError(f"{num_frames} latent frames cannot be cut into chunks of chunk_frames="
                             f"{self.chunk_frames}: expected a positive multiple of {self.chunk_frames}")
        return num_frames // self.chunk_frames

    def tokens_per_chunk(self, height: int, width: int) -> int:
        """Tokens of one chunk of ``height x width`` latents (frame-major, so a contiguous run of the sequence)."""
        p_t, p_h, p_w = self.transformer.config.patch_size
        return (self.chunk_frames // p_t) * (height // p_h) * (width // p_w)

    def forward_full(self, latents: Tensor, sigmas: Tensor, encoder_hidden_states: Tensor, *,
                     encoder_hidden_states_image: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Velocity of the whole clip under block-causal attention, chunk ``j`` of every sample at ``sigmas[:, j]``.

        Args:
            latents: (b, c, f, h, w) with ``f`` a multiple of ``chunk_frames``.
            sigmas: (b, num_chunks) flow times in [0, 1].
            encoder_hidden_states: (b, text_len, text_dim) prompt embeddings.
            cache: an empty cache to fill with every chunk's keys/values (a prefill: generation then continues from
                chunk ``num_chunks`` with :meth:`forward_chunk`).

        Returns: (b, c_out, f, h, w).
        """
        b, _, f, h, w = latents.shape
        num_chunks, n = self.num_chunks(f), self.tokens_per_chunk(h, w)
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=latents.device)
        if sigmas.shape != (b, num_chunks):
            raise ValueError(f"sigmas has shape {tuple(sigmas.shape)}; expected (batch, num_chunks) = "
                             f"({b}, {num_chunks}) for {f} latent frames in chunks of {self.chunk_frames}")
        _check_sigmas(sigmas)
        if cache is not None and cache.next_chunk:
            raise ValueError(f"forward_full fills an empty cache; this one already holds chunks "
                             f"{cache.chunk_indices}: reset() it first")
        if bool((sigmas == sigmas[:, :1]).all()):  # one level per sample: the transformer's ordinary path, (b,)
            timestep = sigmas[:, 0] * TIMESTEP_SCALE
        else:  # one level per token: (b, num_chunks) -> (b, seq_len)
            timestep = sigmas.repeat_interleave(n, dim=1) * TIMESTEP_SCALE
        plan = _Plan(n, past=None, record=cache is not None)
        out = self._call(latents, timestep, encoder_hidden_states, encoder_hidden_states_image, plan, 0)
        if cache is not None:
            for j in range(num_chunks):
                cache.append(j, [(k[:, j * n:(j + 1) * n], v[:, j * n:(j + 1) * n])
                                 for k, v in (plan.new_kv[layer] for layer in range(self.num_blocks))])
        return out

    def forward_chunk(self, chunk_latents: Tensor, chunk_index: int, sigma: float | Tensor,
                      encoder_hidden_states: Tensor, cache: KVCache, *, update_cache: bool = False,
                      encoder_hidden_states_image: Tensor | None = None) -> Tensor:
        """Velocity of chunk ``chunk_index`` run alone, attending to ``cache`` (its earlier chunks) and itself.

        Args:
            chunk_latents: (b, c, chunk_frames, h, w).
            chunk_index: the chunk's place in the video (its RoPE frames start at ``chunk_index * chunk_frames``);
                must be the cache's ``next_chunk``.
            sigma: the chunk's flow time, a float or (b,).
            update_cache: append this call's keys/values as chunk ``chunk_index`` afterwards (call it once the chunk
                is final, with the clean latents at sigma 0 or at the context noise level the caller chooses).

        Returns: (b, c_out, chunk_frames, h, w).
        """
        b, _, f, h, w = chunk_latents.shape
        if f != self.chunk_frames:
            raise ValueError(f"chunk_latents has {f} latent frames; expected chunk_frames={self.chunk_frames}")
        if chunk_index != cache.next_chunk:
            raise ValueError(f"chunk_index={chunk_index} but the cache holds chunks {cache.chunk_indices}: the next "
                             f"chunk to run is {cache.next_chunk} (append each finished chunk, or reset() the cache)")
        n = self.tokens_per_chunk(h, w)
        if cache.tokens_per_chunk is not None and (n, b) != (cache.tokens_per_chunk, cache.batch_size):
            raise ValueError(f"chunk of {n} tokens and batch {b} does not match the cache's chunks of "
                             f"{cache.tokens_per_chunk} tokens and batch {cache.batch_size}")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=chunk_latents.device)
        if sigma.shape not in ((), (b,)):
            raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected a float or ({b},), one per sample")
        sigma = sigma.expand(b).contiguous()  # (b,)
        _check_sigmas(sigma)
        plan = _Plan(n, past=cache.past(self.num_blocks), record=update_cache)
        out = self._call(chunk_latents, sigma * TIMESTEP_SCALE, encoder_hidden_states, encoder_hidden_states_image,
                         plan, chunk_index * self.chunk_frames)
        if update_cache:
            cache.append(chunk_index, [plan.new_kv[layer] for layer in range(self.num_blocks)])
        return out

    def _call(self, latents: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
              encoder_hidden_states_image: Tensor | None, plan: _Plan, frame_offset: int) -> Tensor:
        """One transformer forward whose RoPE starts at latent frame ``frame_offset`` and carries ``plan``."""
        rope = self.transformer.rope
        _, _, f, h, w = latents.shape
        p_t = self.transformer.config.patch_size[0]
        if (frame_offset + f) // p_t > rope.max_seq_len:
            raise ValueError(f"latent frames up to {frame_offset + f} exceed the transformer's RoPE table of "
                             f"rope_max_seq_len={rope.max_seq_len} positions (patch size {p_t} in time)")

        def with_plan(module, args, tables):  # tables: (cos, sin), each (1, seq_len, 1, head_dim)
            if frame_offset:  # the tables of frames [0, offset + f), keep the last f frames' tokens
                seq_len = tables[0].shape[1]
                whole = module.forward(torch.empty(1, 1, frame_offset + f, h, w, device="meta"))
                tables = tuple(t[:, -seq_len:] for t in whole)
            return _CausalRope(tables, plan)

        handle = rope.register_forward_hook(with_plan)
        try:
            return self.transformer(latents, timestep, encoder_hidden_states,
                                    encoder_hidden_states_image=encoder_hidden_states_image, return_dict=False)[0]
        finally:
            handle.remove()


def _check_sigmas(sigmas: Tensor) -> None:
    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas < 0).any()) or bool((sigmas > 1).any()):
        raise ValueError(f"sigmas must be flow times in [0, 1]; got {sigmas.tolist()}")
