"""lit-videoalign: post-training and alignment of video generators, as PyTorch Lightning modules.

The public names are importable from the package (``from lit_videoalign import GRPO, DiffusersVideoBackbone``) and
load lazily, so ``import lit_videoalign`` imports neither torch, Lightning nor diffusers; each name is defined in the
module listed below, which is also the class path configs use (``lit_videoalign.objectives.grpo.GRPO``). Sub-packages
export their own names: :mod:`lit_videoalign.objectives`, :mod:`~lit_videoalign.backbones`,
:mod:`~lit_videoalign.data`, :mod:`~lit_videoalign.callbacks`, :mod:`~lit_videoalign.schedules`,
:mod:`~lit_videoalign.inference`.
"""

from lit_videoalign._exports import lazy_exports

_EXPORTS = {
    # methods (objectives/, one per file) and their base
    "AlignmentModule": "lit_videoalign.objectives.base",
    "SFT": "lit_videoalign.objectives.sft",
    "DPO": "lit_videoalign.objectives.dpo",
    "GRPO": "lit_videoalign.objectives.grpo",
    "DiffusionNFT": "lit_videoalign.objectives.nft",
    "DMD": "lit_videoalign.objectives.dmd",
    "ConsistencyDistillation": "lit_videoalign.objectives.consistency",
    "RewardGradient": "lit_videoalign.objectives.reward_gradient",
    "RejectionSFT": "lit_videoalign.objectives.rejection_sft",
    # video models
    "VideoBackbone": "lit_videoalign.backbones.base",
    "Conditioning": "lit_videoalign.backbones.base",
    "DiffusersVideoBackbone": "lit_videoalign.backbones.diffusers",
    # data modules
    "ToyWorldDataModule": "lit_videoalign.data.toyworld",
    "ToyWorldPairsDataModule": "lit_videoalign.data.toyworld_pairs",
    "VideoFolderDataModule": "lit_videoalign.data.video_folder",
    "PreferenceDataModule": "lit_videoalign.data.preference",
    "PromptFileDataModule": "lit_videoalign.data.prompts",
    # generation, inference-time alignment, evaluation
    "generate_videos": "lit_videoalign.generation",
    "best_of_n": "lit_videoalign.inference.best_of_n",
    "noise_search": "lit_videoalign.inference.noise_search",
    "reward_guided_sample": "lit_videoalign.inference.reward_guidance",
    "evaluate_sets": "lit_videoalign.evaluation",
    # checkpoints and errors
    "load_weights": "lit_videoalign.checkpoint_io",
    "UsageError": "lit_videoalign.errors",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
