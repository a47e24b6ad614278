"""Usage profiling: activation norms and frequency, gradients, block influence, head importance."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
