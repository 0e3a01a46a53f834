"""Sharded training driven by the backbone's transformer blocks (PyTorch FSDP, Zhao et al., arXiv 2304.11277).

Two ways to shard a post-training run, both through Lightning's own strategies:

* **FSDP** (``lightning.pytorch.strategies.FSDPStrategy``, CUDA only): :func:`fsdp_strategy` builds one from a list of
  block classes; :class:`BlockFSDPStrategy` is the YAML form, which reads the block classes from
  ``model.backbone.block_classes`` when training starts. Every transformer block of every denoiser copy is its own
  FSDP unit and activation-checkpointing unit, compute runs in bf16 with float32 gradient reduction, and checkpoints
  are sharded (one file per rank).
* **FSDP2** (``lightning.pytorch.strategies.ModelParallelStrategy``; CPU with gloo or CUDA with NCCL):
  :meth:`AlignmentModule.configure_model <lit_videoalign.objectives.base.AlignmentModule.configure_model>` calls
  :func:`apply_fsdp2`, which applies ``torch.distributed.fsdp.fully_shard`` to every block, then to the root, of every
  copy of the denoiser: the trainable one, the frozen reference copy of full fine-tuning, and any teacher or critic an
  objective builds. Under LoRA the reference is the adapter-disabled denoiser itself, so nothing is duplicated.
  Parameters become ``DTensor`` shards; the optimizer is created after sharding, as Lightning requires.
* **FSDP2 x context parallelism** (:class:`~lit_videoalign.context_parallel.ContextParallelStrategy`, a
  ``ModelParallelStrategy``): the same, after diffusers' context parallelism is applied to every copy, sharded over
  data parallel x context parallel, or HSDP (``data_parallel_replicate_size > 1``: replicas of those shards); see
  :mod:`lit_videoalign.context_parallel`.

Plus what a sharded run needs around it: :func:`compile_blocks` (per-block ``torch.compile``, after sharding) and
:func:`load_sharded_checkpoint` / :func:`consolidate_sharded_checkpoint`, which read a checkpoint folder written by
``N`` processes back into one process (or into one safetensors file) without any process group.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from typing_extensions import override

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- what gets sharded -------------------------------------------------------------------------------------------------
def denoiser_copies(module: nn.Module) -> list[nn.Module]:
    """Every module in ``module`` of the same class as ``module.backbone.denoiser``, in registration order.

    That is the trainable denoiser plus any frozen reference copy, teacher or critic an objective built with
    ``copy.deepcopy`` or from the same pipeline: all of them are sharded the same way.
    """
    backbone = getattr(module, "backbone", None)
    if backbone is None or not isinstance(getattr(backbone, "denoiser", None), nn.Module):
        raise TypeError(f"{type(module).__name__} has no backbone.denoiser; expected an AlignmentModule")
    from torch.distributed.fsdp import FSDPModule

    # fully_shard swaps a module's class for a subclass of (FSDPModule, original class); look through it.
    cls = next(c for c in type(backbone.denoiser).__mro__ if not issubclass(c, FSDPModule))
    copies, seen = [], set()
    for sub in module.modules():
        if isinstance(sub, cls) and id(sub) not in seen:
            copies.append(sub)
            seen.add(id(sub))
    return copies


def block_classes_of(backbone_or_classes: Any) -> set[type[nn.Module]]:
    """The set of block classes from a backbone (its ``block_classes``) or an iterable of classes."""
    classes = getattr(backbone_or_classes, "block_classes", backbone_or_classes)
    if isinstance(classes, type):
        classes = (classes,)
    classes = set(classes or ())
    bad = [c for c in classes if not (isinstance(c, type) and issubclass(c, nn.Module))]
    if bad:
        raise TypeError(f"block classes must be nn.Module subclasses, got {bad}")
    if not classes:
        raise ValueError(f"no transformer block classes found in {type(backbone_or_classes).__name__}; FSDP needs them "
                         "as wrap units (diffusers models list them in _no_split_modules)")
    return classes


def frozen_block_classes(backbone: nn.Module) -> set[type[nn.Module]]:
    """Block classes of the frozen text encoders (their ``_no_split_modules``): FSDP units, never checkpointed."""
    found = set()
    for encoder in getattr(backbone, "text_encoders", []):
        names = set(getattr(encoder, "_no_split_modules", None) or ())
        found |= {type(m) for m in encoder.modules() if type(m).__name__ in names}
    return found


# -- FSDP (Lightning FSDPStrategy, CUDA) -------------------------------------------------------------------------------
def _mixed_precision(param_dtype: str | None, reduce_dtype: str | None):
    from torch.distributed.fsdp import MixedPrecision

    for key, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if value is not None and value not in _DTYPES:
            raise ValueError(f"{key} must be one of {list(_DTYPES)} or None, got {value!r}")
    if param_dtype is None:
        return None
    # Buffers (RoPE tables, latent statistics) keep their dtype: positions of long videos need more than bf16.
    return MixedPrecision(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype or param_dtype])


def fsdp_strategy(
    block_classes: Any,
    *,
    activation_checkpointing: bool = True,
    param_dtype: str | None = "bfloat16",
    reduce_dtype: str | None = "float32",
    state_dict_type: str = "sharded",
    **kwargs: Any,
) -> FSDPStrategy:
    """A Lightning ``FSDPStrategy`` whose wrap and activation-checkpointing units are the transformer blocks.

    Args:
        block_classes: a backbone (its ``block_classes`` are checkpointed; they and its text encoders' blocks are
            wrapped) or the block classes themselves.
        activation_checkpointing: recompute each block in the backward pass.
        param_dtype: compute dtype of the gathered parameters (``"bfloat16"``); None keeps the parameters' dtype.
        reduce_dtype: dtype of the gradient reduce-scatter (``"float32"`` keeps reductions exact).
        state_dict_type: ``"sharded"`` (one checkpoint file per rank) or ``"full"``.
        **kwargs: other ``FSDPStrategy`` arguments (``sharding_strategy``, ``cpu_offload``, ...).
    """
    classes = block_classes_of(block_classes)
    wrap = classes | (frozen_block_classes(block_classes) if isinstance(block_classes, nn.Module) else set())
    return FSDPStrategy(auto_wrap_policy=wrap,
                        activation_checkpointing_policy=set(classes) if activation_checkpointing else None,
                        mixed_precision=_mixed_precision(param_dtype, reduce_dtype), state_dict_type=state_dict_type,
                        **kwargs)


class BlockFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` that wraps (and checkpoints) the backbone's transformer blocks, found when training starts; the
    frozen text encoders' blocks are wrapped too, so no rank ever holds a whole text encoder.

    The YAML form of :func:`fsdp_strategy`: the model is not built yet when the Trainer is, so the block classes are
    read from ``lightning_module.backbone.block_classes`` just before FSDP wraps the model.

    Args:
        activation_checkpointing: recompute each block in the backward pass.
        param_dtype: compute dtype of the gathered parameters; None keeps the parameters' dtype.
        reduce_dtype: dtype of the gradient reduce-scatter.
        state_dict_type: ``"sharded"`` (one file per rank) or ``"full"``.
        **kwargs: other ``FSDPStrategy`` arguments (``sharding_strategy``, ``cpu_offload``, ...).
    """

    def __init__(
        self,
        activation_checkpointing: bool = True,
        param_dtype: str | None = "bfloat16",
        reduce_dtype: str | None = "float32",
        state_dict_type: str = "sharded",
        **kwargs: Any,
    ) -> None:
        if "auto_wrap_policy" in kwargs or "activation_checkpointing_policy" in kwargs:
            raise ValueError("BlockFSDPStrategy sets auto_wrap_policy and activation_checkpointing_policy from the "
                             "backbone's block classes; use lightning's FSDPStrategy to pass your own")
        super().__init__(mixed_precision=_mixed_precision(param_dtype, reduce_dtype), state_dict_type=state_dict_type,
                         **kwargs)
        self.activation_checkpointing = activation_checkpointing

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        from lightning.fabric.strategies.fsdp import _activation_checkpointing_kwargs, _auto_wrap_policy_kwargs

        backbone = self.lightning_module.backbone
        classes = block_classes_of(backbone)
        self.kwargs = _auto_wrap_policy_kwargs(classes | frozen_block_classes(backbone), self.kwargs)
        if self.activation_checkpointing:
            self._activation_checkpointing_kwargs = _activation_checkpointing_kwargs(None, set(classes))
        return super()._setup_model(model)


# -- FSDP2 (Lightning ModelParallelStrategy; CPU or CUDA) --------------------------------------------------------------
def _data_parallel_mesh(mesh):
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        size = mesh["tensor_parallel"].size()
        raise NotImplementedError(f"tensor parallelism is not supported, got tensor_parallel_size={size}; use "
                                  "ModelParallelStrategy(tensor_parallel_size=1)")
    if "ulysses" in names:  # ContextParallelStrategy's mesh: shard over data parallel x context parallel (HSDP: 2-D)
        from lit_videoalign.context_parallel import fsdp_mesh

        return fsdp_mesh(mesh)
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def apply_fsdp2(
    module: nn.Module,
    mesh,
    *,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> list[nn.Module]:
    """Shard every copy of the denoiser in ``module`` with FSDP2: each transformer block, then the copy's root.

    Frozen components (text encoders, VAE) stay replicated: they hold no optimizer state. Already-sharded copies are
    left alone, so calling this twice (``fit`` then ``validate``) is safe.

    Args:
        module: an ``AlignmentModule`` (anything with ``backbone.denoiser`` and ``backbone.block_classes``).
        mesh: the device mesh (``LightningModule.device_mesh``); its ``"data_parallel"`` dimension is used. A mesh of
            :class:`~lit_videoalign.context_parallel.ContextParallelStrategy` first gets context parallelism applied
            to every copy (:func:`~lit_videoalign.context_parallel.enable_context_parallel`; the backbone must declare
            ``supports_context_parallel``), then is sharded over ``"data_context_parallel"`` (replicated along
            ``"data_parallel_replicate"`` under HSDP) with gradients summed over the CP group and averaged over data
            parallel.
        reshard_after_forward: free gathered parameters after each block's forward (ZeRO-3); False keeps them until
            the backward (ZeRO-2 like, more memory, less communication).
        param_dtype: compute dtype of gathered parameters (e.g. ``torch.bfloat16``); None keeps theirs.
        reduce_dtype: dtype of the gradient reduce-scatter; None follows ``param_dtype``.

    Returns:
        The denoiser copies that are now sharded.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from lit_videoalign.context_parallel import context_parallel_size, enable_context_parallel

    if module.backbone.is_quantized:
        raise NotImplementedError("FSDP2 cannot shard a bitsandbytes-quantized denoiser; train QLoRA with a single "
                                  "device or DDP (strategy: ddp)")
    cp = context_parallel_size(mesh)
    if cp > 1 and not module.backbone.supports_context_parallel:
        raise ValueError(f"{type(module.backbone).__name__} with a {type(module.backbone.denoiser).__name__} denoiser "
                         f"does not support context parallelism (supports_context_parallel is False: no _cp_plan), "
                         f"got context_parallel_size={cp}; use a Wan or LTX-Video backbone, or context_parallel_size=1")
    ours = "ulysses" in (mesh.mesh_dim_names or ())  # ContextParallelStrategy's mesh (CP and/or HSDP)
    dp_mesh = _data_parallel_mesh(mesh)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype or param_dtype)
    block_classes = tuple(block_classes_of(module.backbone))
    sharded = []
    for denoiser in denoiser_copies(module):
        if isinstance(denoiser, FSDPModule):
            continue
        if cp > 1:  # hooks before sharding (NeMo Automodel's order); each CP rank's gradient is a part of the sum
            enable_context_parallel(denoiser, mesh, supported=True)
        units = [m for m in denoiser.modules() if isinstance(m, block_classes)] + [denoiser]
        for unit in units:
            fully_shard(unit, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
            if ours:  # sum over the CP ranks, mean over the data-parallel ones (replicate x shard)
                unit.set_gradient_divide_factor(float(mesh["data_parallel"].size()))
                # NCCL divides inside the reduction (PREMUL_SUM), which gloo lacks, as it lacks AVG for HSDP's
                # all-reduce: there, sum and divide apart.
                unit.set_force_sum_reduction_for_comms(mesh.device_type == "cpu")
        sharded.append(denoiser)
    return sharded


# -- torch.compile -----------------------------------------------------------------------------------------------------
def compile_blocks(module: nn.Module, **compile_kwargs: Any) -> int:
    """``torch.compile`` the ``forward`` of every transformer block of every denoiser copy in ``module``.

    Only ``forward`` is compiled, so FSDP's hooks stay outside the graph and parameter names (checkpoint keys) do not
    change. Already-compiled blocks are skipped. Returns the number of blocks compiled now.
    """
    block_classes = tuple(block_classes_of(module.backbone))
    count = 0
    for denoiser in denoiser_copies(module):
        for block in [m for m in denoiser.modules() if isinstance(m, block_classes)]:
            if is_compiled(block):
                continue
            block.forward = torch.compile(block.forward, **compile_kwargs)
            count += 1
    return count


def is_compiled(block: nn.Module) -> bool:
    """Whether :func:`compile_blocks` compiled this block's ``forward``."""
    return hasattr(block.__dict__.get("forward"), "_torchdynamo_orig_callable")


# -- sharded checkpoints -----------------------------------------------------------------------------------------------
# torch.distributed.checkpoint pickles its index (``.metadata``); these are the only objects such an index holds.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _METADATA_GLOBALS.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint index: only "
                                         "torch.distributed.checkpoint metadata is read")
        return super().find_class(module, name)


def _reader(path: Path):
    """A ``FileSystemReader`` whose index is read with an allow-list unpickler (tensors load ``weights_only``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            with open(path / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeReader(path)


def _check_sharded(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir() or not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a sharded checkpoint folder (expected a directory with a .metadata "
                                "file, as written by FSDPStrategy/ModelParallelStrategy with sharded state dicts)")
    return path


def load_sharded_checkpoint(module: nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Load the weights of a sharded Lightning checkpoint folder into an unsharded ``module``, in one process.

    The folder may have been written by any number of ranks; no process group is needed. Tensors are read with
    ``weights_only`` and the index with an allow-list unpickler; Lightning's pickled ``meta.pt`` is never opened.
    """
    import torch.distributed.checkpoint as dcp

    path = _check_sharded(path)
    state = dict(module.state_dict())
    wanted = set(state)
    stored = {k.removeprefix("state_dict.") for k in _reader(path).read_metadata().state_dict_metadata
              if k.startswith("state_dict.")}
    missing, unexpected = sorted(wanted - stored), sorted(stored - wanted)
    if strict and (missing or unexpected):
        raise KeyError(f"checkpoint {path} does not match {type(module).__name__}: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    to_load = {"state_dict": {k: state[k] for k in wanted & stored}}
    dcp.load(to_load, storage_reader=_reader(path), no_dist=True)
    module.load_state_dict({**state, **to_load["state_dict"]}, strict=strict)


def consolidate_sharded_checkpoint(path: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the model weights of a sharded checkpoint folder as one ``.safetensors`` file (full tensors).

    The file loads with ``videoalign generate --ckpt_path FILE`` and ``load_state_dict``.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path, output = _check_sharded(path), Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file, got {output}")
    metadata = _reader(path).read_metadata().state_dict_metadata
    state = {k.removeprefix("state_dict."): torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in metadata.items() if k.startswith("state_dict.") and isinstance(m, TensorStorageMetadata)}
    if not state:
        raise ValueError(f"checkpoint {path} holds no model weights under 'state_dict'")
    holder = {"state_dict": state}
    dcp.load(holder, storage_reader=_reader(path), no_dist=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in holder["state_dict"].items()}, str(output))
    return output


def parameter_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes held by this process for ``params`` (the local shard of a ``DTensor``, packed bytes of 4-bit weights)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in params:
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total
