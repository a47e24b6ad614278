"""Wiring of the quantize stage: the recipe's last model (healed, decayed or baseline) in,
``models/quantized`` and its report out."""

from kedro.pipeline import Node, Pipeline

from . import nodes


def create_pipeline(source: str | None = None, **kwargs) -> Pipeline:
    """The quantize node reading ``source`` (a model dataset); empty when ``source`` is None
    (quantization off)."""
    if source is None:
        return Pipeline([])
    return Pipeline(
        [
            Node(
                nodes.quantize_model,
                [source, "blocks", "general", "parameters"],
                ["quantized_model", "quantize_report", "quantize_plot", "quantize_summary", "quantize_metrics"],
                name="quantize",
            )
        ]
    )
