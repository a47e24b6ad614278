"""Baseline mapping: perplexity, task accuracy, size, speed and spectra of the model as it comes."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
