"""The export stage: the recipe's last model as GGUF and safetensors, verified and timed."""

from birdbone.pipelines.export.pipeline import create_pipeline

__all__ = ["create_pipeline"]
