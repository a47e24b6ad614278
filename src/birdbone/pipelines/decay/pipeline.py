"""Wiring of the decay pipeline: the teacher cache and wave 0, then one wave pipeline
(decay -> heal -> regrow -> evaluate -> gate) instantiated per wave under the namespace
``wave_<k>``. Waves hand over through ``wave_<k>.state`` (a directory under
``models/waves``), never through memory; inside a wave the state passes by reference."""

from kedro.pipeline import Node, Pipeline

from . import nodes

SHARED = {"blocks", "teacher", "profile_tensors"}
PARAMS = {"params:decay", "params:run"}


def wave_template() -> Pipeline:
    return Pipeline(
        [
            Node(
                nodes.decay_wave,
                ["previous", "resume", "blocks", "profile_tensors", "params:decay", "params:run"],
                "live_decayed",
                name="decay",
            ),
            Node(nodes.heal_wave, "live_decayed", "live_healed", name="heal"),
            Node(nodes.regrow_wave, "live_healed", "live_regrown", name="regrow"),
            Node(
                nodes.evaluate_wave,
                ["live_regrown", "blocks", "teacher", "params:decay", "params:run"],
                "live_evaluated",
                name="evaluate",
            ),
            Node(nodes.gate_wave, ["live_evaluated", "params:decay"], ["state", "wave_metrics"], name="gate"),
        ]
    )


def create_pipeline(waves: int = 0, **kwargs) -> Pipeline:
    """``waves`` wave namespaces (0: an empty pipeline, decay off)."""
    if waves <= 0:
        return Pipeline([])
    parts = [
        Node(
            nodes.cache_teacher,
            ["baseline_model", "blocks", "params:decay", "params:run"],
            "teacher",
            name="cache_teacher",
        ),
        Pipeline(
            [
                Node(
                    nodes.start_decay,
                    ["baseline_model", "baseline_quality", "blocks", "resume", "params:decay"],
                    "state",
                    name="start",
                )
            ],
            namespace="wave_0",
            inputs={"baseline_model", "baseline_quality", "blocks"},
            parameters={"params:decay"},
        ),
    ]
    template = wave_template()
    for k in range(1, waves + 1):
        parts.append(
            Pipeline(
                template,
                namespace=f"wave_{k}",
                inputs={"previous": f"wave_{k - 1}.state", **{name: name for name in SHARED}},
                parameters=PARAMS,
            )
        )
    compact = Node(nodes.compact_decay, "last_wave", "decayed_model", name="compact_decay")
    report = Node(
        nodes.report_decay,
        ["last_wave", "decayed_model", "blocks", "parameters", "params:run"],
        ["decay_report", "decay_plot", "decay_summary", "decay_metrics"],
        name="report_decay",
    )
    parts.append(Pipeline([compact, report], inputs={"last_wave": f"wave_{waves}.state", "blocks": "blocks"}))
    return Pipeline(parts)
