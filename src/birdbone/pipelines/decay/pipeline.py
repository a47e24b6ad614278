"""Wiring of the decay pipeline: the teacher cache and wave 0, then one wave pipeline
(decay -> heal -> regrow -> evaluate -> recover -> gate) instantiated per wave under the namespace
``wave_<k>``. Waves hand over through ``wave_<k>.state`` (a directory under
``models/waves``), never through memory; inside a wave the state passes by reference."""

from kedro.pipeline import Node, Pipeline

from birdbone.pipelines.heal import nodes as heal_nodes

from . import nodes

SHARED = {"blocks", "teacher", "heal_teacher", "dense_ref", "general", "profile_tensors"}
PARAMS = {"params:decay", "params:heal", "params:regrow", "params:run"}


def wave_template() -> Pipeline:
    return Pipeline(
        [
            Node(
                nodes.decay_wave,
                [
                    "previous",
                    "resume",
                    "blocks",
                    "profile_tensors",
                    "params:decay",
                    "params:heal",
                    "params:regrow",
                    "params:run",
                ],
                "live_decayed",
                name="decay",
            ),
            Node(
                heal_nodes.heal_wave,
                ["live_decayed", "blocks", "heal_teacher", "dense_ref", "params:heal", "params:decay", "params:run"],
                "live_healed",
                name="heal",
            ),
            Node(
                nodes.regrow_wave,
                ["live_healed", "blocks", "params:regrow", "params:run"],
                "live_regrown",
                name="regrow",
            ),
            Node(
                nodes.evaluate_wave,
                ["live_regrown", "blocks", "teacher", "general", "params:decay", "params:run"],
                "live_evaluated",
                name="evaluate",
            ),
            Node(
                nodes.recover_wave,
                [
                    "live_evaluated",
                    "blocks",
                    "teacher",
                    "heal_teacher",
                    "dense_ref",
                    "general",
                    "params:decay",
                    "params:heal",
                    "params:run",
                ],
                "live_recovered",
                name="recover",
            ),
            Node(
                nodes.gate_wave,
                ["live_recovered", "params:decay", "params:heal", "params:regrow"],
                ["state", "wave_metrics"],
                name="gate",
            ),
        ]
    )


def create_pipeline(waves: int = 0, final_heal: bool = False, **kwargs) -> Pipeline:
    """``waves`` wave namespaces, then the compaction, the report, and with ``final_heal``
    the final heal of the compacted model. Without waves (decay off): with ``final_heal``
    the heal of the dense model (a fake-quant heal learns the quantize grids), else nothing."""
    heal_teacher = Node(
        heal_nodes.cache_heal_teacher,
        ["baseline_model", "blocks", "params:heal", "params:run"],
        "heal_teacher",
        name="cache_heal_teacher",
    )
    if waves <= 0:
        if not final_heal:
            return Pipeline([])
        heal = Node(
            heal_nodes.heal_dense,
            ["baseline_model", "baseline_quality", "blocks", "heal_teacher", "dense_ref", "general", "parameters"],
            ["healed_model", "heal_report", "heal_plot", "heal_summary", "heal_metrics"],
            name="heal_final",
        )
        return Pipeline([heal_teacher, heal])
    parts = [
        Node(
            nodes.cache_teacher,
            ["baseline_model", "blocks", "params:decay", "params:run"],
            "teacher",
            name="cache_teacher",
        ),
        heal_teacher,
        Pipeline(
            [
                Node(
                    nodes.start_decay,
                    [
                        "baseline_model",
                        "baseline_quality",
                        "blocks",
                        "resume",
                        "params:decay",
                        "params:heal",
                        "params:regrow",
                        "params:quantize",
                    ],
                    "state",
                    name="start",
                )
            ],
            namespace="wave_0",
            inputs={"baseline_model", "baseline_quality", "blocks"},
            parameters={"params:decay", "params:heal", "params:regrow", "params:quantize"},
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
    compact = Node(
        nodes.compact_decay,
        ["last_wave", "baseline_quality", "blocks", "general"],
        "decayed_model",
        name="compact_decay",
    )
    report = Node(
        nodes.report_decay,
        ["last_wave", "decayed_model", "blocks", "general", "parameters", "params:run"],
        ["decay_report", "decay_plot", "decay_summary", "decay_metrics"],
        name="report_decay",
    )
    shared = {"last_wave": f"wave_{waves}.state", "blocks": "blocks", "general": "general"}
    parts.append(Pipeline([compact, report], inputs=shared))
    if final_heal:
        heal = Node(
            heal_nodes.heal_final,
            ["decayed_model", "last_wave", "blocks", "heal_teacher", "dense_ref", "general", "parameters"],
            ["healed_model", "heal_report", "heal_plot", "heal_summary", "heal_metrics"],
            name="heal_final",
        )
        parts.append(Pipeline([heal], inputs={"last_wave": f"wave_{waves}.state"}))
    return Pipeline(parts)
