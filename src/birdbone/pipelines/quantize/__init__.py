"""Quantization (and, later, low-rank merge) after decay and healing."""

from birdbone.pipelines.quantize.pipeline import create_pipeline

__all__ = ["create_pipeline"]
