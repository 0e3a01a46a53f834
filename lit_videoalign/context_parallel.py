"""Context parallelism: one video's tokens split across the ranks of a group, through diffusers' ``_cp_plan`` hooks
(Ulysses all-to-all attention, Jacobs et al., arXiv 2309.14509; ring attention, Liu et al., arXiv 2310.01889).

Video is long before it is wide: an 81-frame 720p Wan clip is ~75k tokens. Under context parallelism (CP) of degree
``c`` every rank of a CP group holds the same batch but runs the transformer blocks on ``1/c`` of the tokens; diffusers
splits the tokens before the first block, exchanges heads for tokens around each attention (Ulysses) and gathers the
tokens after ``proj_out``, so the denoiser's output, and every loss computed from it, is the whole sequence's on every
rank of the group.

How the pieces fit in Lightning:

* :class:`ContextParallelStrategy` (a ``ModelParallelStrategy``) builds one device mesh with the dimensions
  ``("data_parallel_replicate", "data_parallel_shard", "ring", "ulysses")`` plus three flattened ones:
  ``"data_parallel"`` (replicate x shard), ``"context_parallel"`` (ring x ulysses) and ``"data_context_parallel"``
  (shard x ring x ulysses, the FSDP2 sharding group). The sampler shards data over ``"data_parallel"`` only, so the
  ranks of a CP group see the same batches. A replicate size above 1 is HSDP (Zhao et al., arXiv 2304.11277): FSDP2
  shards over ``"data_context_parallel"`` and keeps whole replicas of those shards along ``"data_parallel_replicate"``
  (``fully_shard`` on the 2-D mesh ``("data_parallel_replicate", "data_context_parallel")``), so gradients are
  reduce-scattered inside a replica and all-reduced across replicas (e.g. shard within a node, replicate across).
* :func:`~lit_videoalign.strategies.apply_fsdp2` (called by ``AlignmentModule.configure_model``) recognises this
  mesh (its ``"ulysses"`` dimension) and, if the backbone declares ``supports_context_parallel``, first applies CP
  to every denoiser copy (:func:`enable_context_parallel`), then ``fully_shard`` s it over ``"data_context_parallel"``
  (the order that works: hooks before sharding), replicated along ``"data_parallel_replicate"``.
* **Gradient scale.** diffusers does not rescale gradients: each CP rank's parameter gradient is the part that flows
  through its own tokens, and the full-sequence gradient is their *sum* over the CP group (the output gather's
  backward hands each rank its slice of the loss gradient). FSDP2 averages gradients over its group, so the divide
  factor of every sharded module is set to the data-parallel size: a sum over CP, a mean over data-parallel ranks.
* **Same randomness in a CP group.** After setup the strategy copies the random state (torch CPU and CUDA, numpy,
  Python ``random``) of each CP group's first rank to the others (:func:`synchronize_rng`): noise, sigmas, prompt
  dropout and data-loader seeds are then drawn identically, while data-parallel groups keep their own streams. The
  first forward of every CP denoiser checks it: ranks given different inputs stop with an error.

Checks that fail before any work (one clear error each): a CP degree that does not divide the world size, or a
replicate size that does not divide the data-parallel size (:func:`check_degrees`), a backbone whose
``supports_context_parallel`` is False (its denoiser class has no ``_cp_plan``), a head count the Ulysses degree does
not divide, an attention backend without CP or, for ``ring_degree > 1``, one that cannot return the log-sum-exp ring
attention needs (:func:`check_denoiser`), and, at the first forward, a token count the CP degree does not divide
(:func:`check_token_count`) unless the mesh splits unevenly (``uneven=True``: diffusers' ``*_anything`` modes, which
have no backward in diffusers 0.42, so for sampling only; gloo's missing uneven all-gather is filled in here).
"""

from __future__ import annotations

import random
import weakref
from datetime import timedelta
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from typing_extensions import override

MESH_DIMS = ("data_parallel_replicate", "data_parallel_shard", "ring", "ulysses")
DP_DIM, CP_DIM, SHARD_DIM, REPLICATE_DIM = "data_parallel", "context_parallel", "data_context_parallel", MESH_DIMS[0]
# Context-parallel attention backends whose forward cannot return the log-sum-exp that ring attention merges with.
_NO_LSE_BACKENDS = frozenset({"native", "_native_npu"})
# Meshes built with uneven=True (token counts the degree need not divide), by identity: meshes of equal layout compare
# equal, so a dict keyed by the mesh itself would mix them up. Read by enable_context_parallel.
_UNEVEN: dict[int, weakref.ref] = {}


# -- checks --------------------------------------------------------------------------------------------------------
def check_degrees(world_size: int, context_parallel_size: int, ring_degree: int = 1,
                  data_parallel_size: int | None = None,
                  data_parallel_replicate_size: int = 1) -> tuple[int, int, int, int]:
    """``(data_parallel_replicate, data_parallel_shard, ring, ulysses)`` sizes for ``world_size`` ranks, or a clear
    error.

    ``context_parallel_size = ring_degree * ulysses_degree``; ``data_parallel_size`` defaults to the rest of the world
    and is ``data_parallel_replicate_size * data_parallel_shard`` (HSDP when the replicate size is above 1).
    """
    for name, value in (("context_parallel_size", context_parallel_size), ("ring_degree", ring_degree),
                        ("data_parallel_replicate_size", data_parallel_replicate_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if world_size % context_parallel_size:
        raise ValueError(f"context_parallel_size={context_parallel_size} does not divide the world size {world_size}; "
                         "expected a divisor of the number of processes")
    if context_parallel_size % ring_degree:
        raise ValueError(f"ring_degree={ring_degree} does not divide context_parallel_size={context_parallel_size}; "
                         "expected context_parallel_size = ring_degree * ulysses_degree")
    dp = world_size // context_parallel_size
    if data_parallel_size is not None and data_parallel_size != dp:
        raise ValueError(f"data_parallel_size={data_parallel_size} times context_parallel_size={context_parallel_size} "
                         f"must equal the world size {world_size}; expected data_parallel_size={dp}")
    if dp % data_parallel_replicate_size:
        raise ValueError(f"data_parallel_replicate_size={data_parallel_replicate_size} does not divide the "
                         f"data-parallel size {dp} (world size {world_size} / context_parallel_size="
                         f"{context_parallel_size}); expected data_parallel_replicate_size x data_parallel_shard x "
                         "context_parallel_size = world size")
    return (data_parallel_replicate_size, dp // data_parallel_replicate_size, ring_degree,
            context_parallel_size // ring_degree)


def _backend_name(denoiser: nn.Module) -> str:
    """The attention backend the denoiser's processors dispatch to (the global default when they set none)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for module in denoiser.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            if processor._attention_backend is not None:
                return str(getattr(processor._attention_backend, "value", processor._attention_backend))
            break
    return _AttentionBackendRegistry.get_active_backend()[0].value


def check_denoiser(denoiser: nn.Module, ring_degree: int, ulysses_degree: int, uneven: bool = False,
                   supported: bool | None = None) -> None:
    """Refuse a denoiser that diffusers' context parallelism cannot split ``ring_degree x ulysses_degree`` ways
    (``uneven``: diffusers pads heads, so any head count goes). ``supported``: the backbone's
    ``supports_context_parallel``; None for a bare diffusers model, whose own ``_cp_plan`` declaration decides."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    name = type(denoiser).__name__
    if supported is None:
        supported = getattr(type(denoiser), "_cp_plan", None) is not None
    if not supported:
        raise ValueError(f"{name} has no _cp_plan, so diffusers cannot split its tokens; context parallelism needs a "
                         "transformer that defines one (Wan, LTX-Video, LTX-2 in diffusers 0.42)")
    heads = getattr(getattr(denoiser, "config", None), "num_attention_heads", None)
    if ulysses_degree > 1 and not uneven and heads is not None and heads % ulysses_degree:
        raise ValueError(f"{name} has {heads} attention heads, which ulysses_degree={ulysses_degree} does not divide; "
                         "expected a divisor of the head count (or use ring_degree)")
    backend = _backend_name(denoiser)
    if backend not in _AttentionBackendRegistry._supports_context_parallel:
        raise ValueError(f"attention backend {backend!r} does not support context parallelism; expected one of "
                         f"{sorted(_AttentionBackendRegistry._supports_context_parallel)} (set_attention_backend)")
    if ring_degree > 1 and backend in _NO_LSE_BACKENDS:
        raise ValueError(f"ring_degree={ring_degree} needs an attention backend that returns the log-sum-exp, got "
                         f"{backend!r}; use ulysses (ring_degree=1) or set_attention_backend('flash' or "
                         "'_native_cudnn')")


def token_count(denoiser: nn.Module, hidden_states: Tensor) -> int:
    """Tokens the denoiser makes of ``hidden_states``: ``T'/pt * H'/ph * W'/pw`` of ``[B, C, T', H', W']`` latents
    (Wan's ``patch_size``), or ``S`` of already packed ``[B, S, C]`` tokens (LTX-Video)."""
    if hidden_states.ndim == 3:
        return hidden_states.shape[1]
    if hidden_states.ndim != 5:
        raise ValueError(f"hidden_states must be [B, C, T, H, W] latents or [B, S, C] tokens, got shape "
                         f"{tuple(hidden_states.shape)}")
    config = denoiser.config
    patch = config.get("patch_size", 1)
    pt, ph, pw = tuple(patch) if isinstance(patch, (list, tuple)) else (config.get("patch_size_t") or 1, patch, patch)
    t, h, w = hidden_states.shape[2:]
    return (t // pt) * (h // ph) * (w // pw)


def check_token_count(denoiser: nn.Module, hidden_states: Tensor, degree: int) -> None:
    """Refuse a sequence the context-parallel ``degree`` does not divide (diffusers splits it into equal parts)."""
    n = token_count(denoiser, hidden_states)
    if n % degree:
        raise ValueError(f"the video has {n} tokens (latent {tuple(hidden_states.shape[2:])} in patches of "
                         f"{denoiser.config.get('patch_size')}), which context-parallel degree {degree} does not "
                         "divide; choose frames/resolution whose token count is a multiple of the degree, or split "
                         "unevenly (ContextParallelStrategy(uneven=True))")


# -- the mesh ------------------------------------------------------------------------------------------------------
def context_parallel_mesh(world_size: int, context_parallel_size: int, ring_degree: int = 1,
                          device_type: str = "cpu", data_parallel_size: int | None = None, uneven: bool = False,
                          data_parallel_replicate_size: int = 1):
    """The device mesh ``("data_parallel_replicate", "data_parallel_shard", "ring", "ulysses")`` with the flattened
    ``"data_parallel"``, ``"context_parallel"`` and ``"data_context_parallel"`` dimensions (needs an initialised
    process group).

    ``uneven=True`` lets denoisers CP'd on this mesh split token counts the degree does not divide (diffusers'
    ``ulysses_anything`` / ``ring_anything``: unequal parts, nothing padded into attention), for sampling only:
    diffusers 0.42 has no backward for it.
    """
    from torch.distributed.device_mesh import init_device_mesh

    shape = check_degrees(world_size, context_parallel_size, ring_degree, data_parallel_size,
                          data_parallel_replicate_size)
    if uneven and 1 < ring_degree < context_parallel_size:
        raise ValueError(f"uneven=True needs pure ulysses or pure ring, got ring_degree={ring_degree} of "
                         f"context_parallel_size={context_parallel_size}")
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    mesh[MESH_DIMS[:2]]._flatten(DP_DIM)  # the sampler's data-parallel rank (Lightning reads mesh["data_parallel"])
    cp_mesh(mesh), shard_mesh(mesh)  # create their process groups now, on every rank together
    if uneven:
        _UNEVEN[id(mesh)] = weakref.ref(mesh)
    return mesh


def _is_uneven(mesh) -> bool:
    ref = _UNEVEN.get(id(mesh))
    return ref is not None and ref() is mesh


def cp_mesh(mesh):
    """The flattened ``"context_parallel"`` (ring x ulysses) mesh of ``mesh``: the ranks that share one video."""
    return mesh["ring", "ulysses"]._flatten(CP_DIM)  # cached after the first call (no new process group)


def shard_mesh(mesh):
    """The flattened ``"data_context_parallel"`` (shard x ring x ulysses) mesh of ``mesh``: one FSDP2 sharding group
    (every rank without HSDP)."""
    return mesh[MESH_DIMS[1:]]._flatten(SHARD_DIM)


def fsdp_mesh(mesh):
    """The mesh ``fully_shard`` takes: the 1-D sharding mesh (:func:`shard_mesh`), or under HSDP the 2-D mesh
    ``("data_parallel_replicate", "data_context_parallel")`` (replicate across the first, shard along the second)."""
    shards = shard_mesh(mesh)
    if mesh[REPLICATE_DIM].size() == 1:
        return shards
    return mesh[REPLICATE_DIM, SHARD_DIM]


def context_parallel_size(mesh) -> int:
    """The CP degree of ``mesh`` (1 for a mesh without a ``"context_parallel"`` dimension, or None)."""
    if mesh is None or "ulysses" not in (mesh.mesh_dim_names or ()):
        return 1
    return mesh["ring"].size() * mesh["ulysses"].size()


# -- applying it ---------------------------------------------------------------------------------------------------
def enable_context_parallel(denoiser: nn.Module, mesh, supported: bool | None = None) -> bool:
    """Apply diffusers' context parallelism to ``denoiser`` on ``mesh``'s ring and ulysses dimensions, after
    :func:`check_denoiser` (``supported``: the backbone's ``supports_context_parallel``); also installs the
    first-forward checks. Returns False if it was already applied.

    ``ModelMixin.enable_parallelism`` places the model on ``torch.device(accelerator, rank % device_count)``, which
    divides by zero on a machine without an accelerator; the mesh is resolved here instead, on the mesh's device.
    """
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    if getattr(denoiser, "_parallel_config", None) is not None:
        return False
    ring, ulysses = mesh["ring"].size(), mesh["ulysses"].size()
    uneven = _is_uneven(mesh)
    check_denoiser(denoiser, ring, ulysses, uneven, supported)
    if uneven:
        _install_uneven_gathers()
    config = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, mesh=mesh,
                                   ulysses_anything=uneven and ulysses > 1, ring_anything=uneven and ring > 1)

    def resolve(cp_config):
        parallel = ParallelConfig(context_parallel_config=cp_config)
        device = torch.device(mesh.device_type, torch.accelerator.current_device_index()) \
            if mesh.device_type != "cpu" else torch.device("cpu")
        parallel.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
        denoiser._parallel_config = parallel
        return parallel

    denoiser._resolve_parallel_config = resolve  # an instance attribute shadows the method for this one call
    try:
        denoiser.enable_parallelism(config=config)
    finally:
        del denoiser._resolve_parallel_config
    denoiser.register_forward_pre_hook(_FirstForwardCheck(cp_mesh(mesh).get_group(), ring * ulysses, uneven),
                                       with_kwargs=True)
    return True


def _gather_sizes(size: int, group) -> list[int]:
    """Every rank's ``size``, gathered on the device the group's backend moves (CPU for gloo)."""
    device = torch.accelerator.current_accelerator() if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor([size], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


def _all_gather_uneven(tensor: Tensor, dim: int, group) -> Tensor:
    """All-gather parts of unequal length along ``dim`` with equal-size collectives (gloo has no uneven
    all-gather): pad each part to the longest, gather, cut the padding off."""
    tensor = tensor.contiguous()
    sizes = _gather_sizes(tensor.shape[dim], group)
    pad = list(tensor.shape)
    pad[dim] = max(sizes) - tensor.shape[dim]
    padded = torch.cat([tensor, tensor.new_zeros(pad)], dim=dim)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part.narrow(dim, 0, n) for part, n in zip(parts, sizes)], dim=dim)


def _install_uneven_gathers() -> None:
    """Route diffusers' uneven (``*_anything``) size and tensor gathers through :func:`_gather_sizes` and
    :func:`_all_gather_uneven`. diffusers 0.42 gathers sizes on an accelerator unless the backend string contains
    "cpu" (so a plain gloo group on a CPU machine fails) and gathers unequal tensors with ``dist.all_gather``, which
    gloo refuses; both replacements compute the same values."""
    import diffusers.hooks.context_parallel as hooks
    import diffusers.models.attention_dispatch as dispatch

    hooks._all_gather_anything = _all_gather_uneven
    hooks.gather_size_by_comm = dispatch.gather_size_by_comm = _gather_sizes


class _FirstForwardCheck:
    """Forward pre-hook of a CP denoiser: at its first call, the token count divides the degree and every rank of the
    CP group was given the same inputs (a sum and sum of squares of each tensor argument, compared across ranks).
    Under ``uneven`` splitting it refuses every forward that could be differentiated: diffusers 0.42 has no backward
    for its uneven (``*_anything``) attention, so uneven splits serve sampling only."""

    def __init__(self, group, degree: int, uneven: bool = False) -> None:
        self.group, self.degree, self.uneven, self.done = group, degree, uneven, False

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.uneven and torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            raise ValueError("uneven context-parallel splits run without gradients only (diffusers 0.42 has no "
                             "backward for them); train on token counts the degree divides, with uneven=False")
        if self.done:
            return
        tensors = [*args, *kwargs.values()]
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hidden, Tensor) and not self.uneven:
            check_token_count(module, hidden, self.degree)
        stats = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
                             for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]).flatten()
        gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, stats, group=self.group)
        if any(not torch.allclose(g, gathered[0], rtol=1e-6, atol=1e-6) for g in gathered):
            raise RuntimeError("ranks of one context-parallel group were given different denoiser inputs; every "
                               "rank of the group must draw the same batch, noise, sigmas and dropout "
                               "(ContextParallelStrategy shards data over data_parallel only and synchronises the "
                               "random state)")
        self.done = True


def synchronize_rng(group) -> None:
    """Copy the random state (torch CPU and current CUDA device, numpy, Python ``random``) of ``group``'s first rank
    to its other ranks, so they draw identical noise, sigmas and dropout from then on."""

    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"  # NCCL moves only device tensors

    def broadcast(t: Tensor) -> Tensor:
        t = t.to(device)
        dist.broadcast(t, group=group, group_src=0)
        return t.cpu()

    torch.set_rng_state(broadcast(torch.get_rng_state()))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(broadcast(torch.cuda.get_rng_state()))
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    packed = broadcast(torch.tensor([*keys.astype(np.int64), pos, has_gauss], dtype=torch.int64))
    gauss_t = broadcast(torch.tensor([gauss], dtype=torch.float64))
    np.random.set_state((kind, packed[:-2].numpy().astype(np.uint32), int(packed[-2]), int(packed[-1]),
                         float(gauss_t[0])))
    version, internal, _ = random.getstate()
    py = broadcast(torch.tensor(internal, dtype=torch.int64))
    random.setstate((version, tuple(int(v) for v in py), None))


# -- the Lightning strategy -----------------------------------------------------------------------------------------
class ContextParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with a context-parallel axis: FSDP2 over all ranks (or HSDP: whole replicas of
    shards, ``data_parallel_replicate_size > 1``), each video's tokens split over ``context_parallel_size`` of them,
    data sharded over the remaining ``data_parallel`` axis.

    Args:
        context_parallel_size: ranks that share one video (``ring_degree * ulysses_degree``); 1: none (FSDP2 or HSDP
            alone).
        ring_degree: the ring-attention part of it (needs a backend that returns the log-sum-exp, not SDPA); the rest
            is Ulysses all-to-all, which runs on any CP backend, CPU SDPA with gloo included.
        data_parallel_size: defaults to ``world_size // context_parallel_size``.
        data_parallel_replicate_size: HSDP: whole replicas of the sharded model along this many ranks of the data
            axis (a divisor of the data-parallel size); each replica is sharded over the remaining
            ``data_parallel_size / data_parallel_replicate_size`` x ``context_parallel_size`` ranks. 1: plain FSDP2.
        uneven: split token counts the degree does not divide into unequal parts (diffusers' ``*_anything``
            modes; sampling only, no gradients); otherwise such a sequence is refused at the first forward.
        save_distributed_checkpoint, process_group_backend, timeout: as for ``ModelParallelStrategy``.
    """

    def __init__(
        self,
        context_parallel_size: int = 2,
        ring_degree: int = 1,
        data_parallel_size: int | Literal["auto"] = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
        uneven: bool = False,
        data_parallel_replicate_size: int = 1,
        **kwargs: Any,
    ) -> None:
        from torch.distributed.constants import default_pg_timeout

        # types and ring | cp, before launch (the world size is known at setup)
        for name, value in (("context_parallel_size", context_parallel_size),
                            ("data_parallel_replicate_size", data_parallel_replicate_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        dp = data_parallel_size if isinstance(data_parallel_size, int) else data_parallel_replicate_size
        check_degrees(context_parallel_size * dp, context_parallel_size, ring_degree, dp,
                      data_parallel_replicate_size=data_parallel_replicate_size)
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout or default_pg_timeout, **kwargs)
        self.context_parallel_size, self.ring_degree, self.uneven = context_parallel_size, ring_degree, uneven
        self.data_parallel_replicate_size = data_parallel_replicate_size

    @override
    def setup_environment(self) -> None:
        super(ModelParallelStrategy, self).setup_environment()
        self._setup_distributed()
        dp = None if self._data_parallel_size == "auto" else self._data_parallel_size
        self._device_mesh = context_parallel_mesh(self.world_size, self.context_parallel_size, self.ring_degree,
                                                  self.root_device.type, dp, uneven=self.uneven,
                                                  data_parallel_replicate_size=self.data_parallel_replicate_size)
        self._data_parallel_size = self._device_mesh[DP_DIM].size()
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @override
    def setup(self, trainer) -> None:
        super().setup(trainer)
        synchronize_rng(cp_mesh(self._device_mesh).get_group())
