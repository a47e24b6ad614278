"""Wiring of the export stage: the recipe's last model and the dense baseline in,
``export.path`` (GGUF, safetensors) and the export report out."""

from kedro.pipeline import Node, Pipeline

from birdbone.pipelines.export import nodes


def create_pipeline(source: str | None = None, **kwargs) -> Pipeline:
    """The export node reading ``source`` (a model dataset); empty when ``source`` is None
    (export off)."""
    if source is None:
        return Pipeline([])
    return Pipeline(
        [
            Node(
                nodes.export,
                [source, "baseline_model", "blocks", "general", "parameters"],
                ["export_report", "export_summary", "export_metrics"],
                name="export",
            )
        ]
    )
