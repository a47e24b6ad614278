"""Wiring of the profile pipeline (reads the baseline's model and token blocks)."""

from kedro.pipeline import Node, Pipeline

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                nodes.profile_model,
                ["baseline_model", "blocks", "params:profile", "params:run"],
                ["profile_tensors", "profile_summary"],
                name="profile_model",
            ),
            Node(nodes.plot_profile, "profile_summary", ["profile_plot", "profile_metrics"], name="plot_profile"),
        ]
    )
