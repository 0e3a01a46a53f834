"""Lightning callbacks of lit-videoalign, one per file; configs name them by full class path, Python code may import
them from the package (``from lit_videoalign.callbacks import RewardHackingMonitor``; loaded lazily).

- ``video_sample_logger.VideoSampleLogger``: fixed prompts and seeds every N steps -> MP4/GIF + TensorBoard video.
- ``reward_evaluation.RewardEvaluation``: scores those samples with zoo rewards and held-out gold rewards.
- ``reward_hacking_monitor.RewardHackingMonitor``: training reward up while gold goes down, or diversity collapse ->
  warn, stop, or restore the best weights.
- ``adapter_export.AdapterExport``: the LoRA adapter as ``pytorch_lora_weights.safetensors`` (diffusers format).
- ``pipeline_export.PipelineExport``: the whole pipeline (LoRA merged) as a diffusers folder.
- ``push_to_hub.PushToHub``: adapter or pipeline plus a model card to the Hugging Face Hub.
- ``progress_bar.VideoAlignProgressBar`` and ``run_summary.RunSummary``: console output (``videoalign fit`` adds both).

Every callback keeps its state in ``state_dict()``, so ``fit --ckpt_path`` resumes it. Example (``trainer:``)::

    callbacks:
      - class_path: lit_videoalign.callbacks.video_sample_logger.VideoSampleLogger
        init_args: {every_n_steps: 10, num_inference_steps: 20}
      - class_path: lit_videoalign.callbacks.reward_evaluation.RewardEvaluation
        init_args: {rewards: [newton, quality], gold_rewards: [physics_learned, flicker]}
      - class_path: lit_videoalign.callbacks.reward_hacking_monitor.RewardHackingMonitor
        init_args: {train_metric: train/reward/newton/overall, window: 4, action: stop}
      - class_path: lit_videoalign.callbacks.adapter_export.AdapterExport
        init_args: {dirpath: outputs/grpo/adapter}

**EMA** uses Lightning's own ``EMAWeightAveraging``; add it to ``trainer.callbacks``::

      - class_path: lightning.pytorch.callbacks.EMAWeightAveraging
        init_args: {decay: 0.999, device: cpu}     # device: cpu keeps the averaged copy off the GPU

It averages every parameter after each optimizer step (a full copy of the module: use ``device: cpu`` for large
models; it does not support sharded FSDP models), swaps the average in for validation, saves it as the checkpoint's
``state_dict`` (the live weights under ``current_model_state``), and copies it into the model when training ends.
List it *before* the export callbacks (``AdapterExport``, ``PipelineExport``, ``PushToHub``), whose ``on_train_end``
then exports the averaged weights. Samples logged during training come from the live weights.
"""

from lit_videoalign._exports import lazy_exports

_EXPORTS = {
    "VideoSampleLogger": "lit_videoalign.callbacks.video_sample_logger",
    "VideoSamples": "lit_videoalign.callbacks.video_sample_logger",
    "RewardEvaluation": "lit_videoalign.callbacks.reward_evaluation",
    "RewardHackingMonitor": "lit_videoalign.callbacks.reward_hacking_monitor",
    "AdapterExport": "lit_videoalign.callbacks.adapter_export",
    "PipelineExport": "lit_videoalign.callbacks.pipeline_export",
    "PushToHub": "lit_videoalign.callbacks.push_to_hub",
    "VideoAlignProgressBar": "lit_videoalign.callbacks.progress_bar",
    "RunSummary": "lit_videoalign.callbacks.run_summary",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
