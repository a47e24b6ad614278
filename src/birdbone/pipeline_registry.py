"""Project pipelines."""

from kedro.pipeline import Pipeline

from birdbone.pipelines import baseline, profile


def register_pipelines() -> dict[str, Pipeline]:
    """``kedro run`` runs ``__default__``; ``kedro run --pipeline NAME`` one stage."""
    pipelines = {"baseline": baseline.create_pipeline(), "profile": profile.create_pipeline()}
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    return pipelines
