"""Decay waves: prune a capped share per wave, evaluate, and let the stop-loss gate judge."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
