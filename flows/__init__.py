"""Prefect flows: thin orchestration over the library (one task per stage). ``prefect.yaml`` deploys them."""

from flows.alexnet_flow import POST_TRAINING_STAGES, PipelineState, StageFailed, alexnet_flow

__all__ = ["POST_TRAINING_STAGES", "PipelineState", "StageFailed", "alexnet_flow"]
