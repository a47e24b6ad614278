"""Wiring of the baseline pipeline."""

from kedro.pipeline import Node, Pipeline

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                nodes.build_blocks,
                ["params:model", "params:data"],
                ["user_blocks", "user_text_report", "general_text"],
                name="build_blocks",
            ),
            Node(
                nodes.import_model, ["params:model", "params:run", "user_blocks"], "baseline_model", name="import_model"
            ),
            Node(
                nodes.add_generated,
                ["baseline_model", "user_blocks", "user_text_report", "params:data", "params:run"],
                ["blocks", "text_report"],
                name="add_generated",
            ),
            Node(
                nodes.generate_general,
                ["baseline_model", "general_text", "params:data", "params:baseline", "params:run"],
                "general",
                name="generate_general",
            ),
            Node(
                nodes.measure_quality,
                ["baseline_model", "blocks", "general", "params:baseline", "params:run"],
                "baseline_quality",
                name="measure_quality",
            ),
            Node(
                nodes.score_tasks,
                ["baseline_model", "params:baseline", "params:run"],
                "baseline_tasks",
                name="score_tasks",
            ),
            Node(nodes.measure_size, "baseline_model", "baseline_size", name="measure_size"),
            Node(
                nodes.measure_speed,
                ["baseline_model", "blocks", "params:baseline", "params:run"],
                "baseline_speed",
                name="measure_speed",
            ),
            Node(
                nodes.scan_spectra,
                ["baseline_model", "params:baseline", "params:run"],
                "baseline_spectra",
                name="scan_spectra",
            ),
            Node(
                nodes.report_baseline,
                [
                    "text_report",
                    "baseline_quality",
                    "baseline_tasks",
                    "baseline_size",
                    "baseline_speed",
                    "baseline_spectra",
                    "params:model",
                ],
                ["baseline_report", "baseline_plot", "baseline_metrics"],
                name="report_baseline",
            ),
            Node(nodes.summarize, ["parameters", "baseline_report"], "summary", name="summarize"),
        ]
    )
