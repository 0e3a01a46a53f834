"""Post-training methods, one per file (arXiv id on its first line, pure losses, then the LightningModule), on
:class:`~lit_videoalign.objectives.base.AlignmentModule`. Names load lazily; configs name full class paths
(``lit_videoalign.objectives.grpo.GRPO``).
"""

from lit_videoalign._exports import lazy_exports

_EXPORTS = {
    "AlignmentModule": "lit_videoalign.objectives.base",
    "SFT": "lit_videoalign.objectives.sft",
    "RejectionSFT": "lit_videoalign.objectives.rejection_sft",
    "DPO": "lit_videoalign.objectives.dpo",
    "GRPO": "lit_videoalign.objectives.grpo",
    "DiffusionNFT": "lit_videoalign.objectives.nft",
    "RewardGradient": "lit_videoalign.objectives.reward_gradient",
    "DMD": "lit_videoalign.objectives.dmd",
    "ConsistencyDistillation": "lit_videoalign.objectives.consistency",
    # pure losses (DESIGN.md section 4.3)
    "flow_matching_loss": "lit_videoalign.objectives.sft",
    "flow_dpo_loss": "lit_videoalign.objectives.dpo",
    "group_advantages": "lit_videoalign.objectives.grpo",
    "grpo_policy_loss": "lit_videoalign.objectives.grpo",
    "nft_loss": "lit_videoalign.objectives.nft",
    "dmd_generator_loss": "lit_videoalign.objectives.losses",
    "consistency_loss": "lit_videoalign.objectives.consistency",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
