from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import dag, task

from kedro.framework.session import KedroSession
from kedro.framework.project import configure_project

# Kedro settings required to run your pipeline
env = "local"
pipeline_name = "__default__"
project_path = Path.cwd()
package_name = "birdbone"
conf_source = "" or Path.cwd() / "conf"


def _run_kedro_node(node_names=None, namespaces=None):
    """Run a Kedro pipeline slice. Pass node_names for regular node groups or namespaces for namespace groups."""
    configure_project(package_name)
    with KedroSession.create(project_path=project_path, env=env, conf_source=conf_source) as session:
        if namespaces is not None:
            session.run(pipeline_names=[pipeline_name], namespaces=namespaces)
        else:
            session.run(pipeline_names=[pipeline_name], node_names=node_names)


@dag(
    dag_id="birdbone",
    start_date=datetime(2023,1,1),
    max_active_runs=3,
    schedule="@once",
    catchup=False,
    default_args=dict(
        owner="airflow",
        depends_on_past=False,
        email_on_failure=False,
        email_on_retry=False,
        retries=1,
        retry_delay=timedelta(minutes=5)
    ),
)
def birdbone():

    @task(task_id="build-blocks-import-model-add-generated-generate-general")
    def build_blocks_import_model_add_generated_generate_general():
        _run_kedro_node(node_names=["build_blocks", "import_model", "add_generated", "generate_general"])

    @task(task_id="measure-size")
    def measure_size():
        _run_kedro_node(node_names=["measure_size"])

    @task(task_id="scan-spectra")
    def scan_spectra():
        _run_kedro_node(node_names=["scan_spectra"])

    @task(task_id="score-tasks")
    def score_tasks():
        _run_kedro_node(node_names=["score_tasks"])

    @task(task_id="cache-heal-teacher")
    def cache_heal_teacher():
        _run_kedro_node(node_names=["cache_heal_teacher"])

    @task(task_id="cache-teacher")
    def cache_teacher():
        _run_kedro_node(node_names=["cache_teacher"])

    @task(task_id="measure-quality")
    def measure_quality():
        _run_kedro_node(node_names=["measure_quality"])

    @task(task_id="measure-speed")
    def measure_speed():
        _run_kedro_node(node_names=["measure_speed"])

    @task(task_id="profile-model")
    def profile_model():
        _run_kedro_node(node_names=["profile_model"])

    @task(task_id="plot-profile")
    def plot_profile():
        _run_kedro_node(node_names=["plot_profile"])

    @task(task_id="report-baseline")
    def report_baseline():
        _run_kedro_node(node_names=["report_baseline"])

    @task(task_id="wave-0-start")
    def wave_0_start():
        _run_kedro_node(node_names=["wave_0.start"])

    @task(task_id="summarize")
    def summarize():
        _run_kedro_node(node_names=["summarize"])

    @task(task_id="wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate")
    def wave_1_decay_wave_1_heal_wave_1_regrow_wave_1_evaluate_wave_1_recover_wave_1_gate():
        _run_kedro_node(node_names=["wave_1.decay", "wave_1.heal", "wave_1.regrow", "wave_1.evaluate", "wave_1.recover", "wave_1.gate"])

    @task(task_id="wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate")
    def wave_2_decay_wave_2_heal_wave_2_regrow_wave_2_evaluate_wave_2_recover_wave_2_gate():
        _run_kedro_node(node_names=["wave_2.decay", "wave_2.heal", "wave_2.regrow", "wave_2.evaluate", "wave_2.recover", "wave_2.gate"])

    @task(task_id="compact-decay")
    def compact_decay():
        _run_kedro_node(node_names=["compact_decay"])

    @task(task_id="heal-final")
    def heal_final():
        _run_kedro_node(node_names=["heal_final"])

    @task(task_id="report-decay")
    def report_decay():
        _run_kedro_node(node_names=["report_decay"])

    @task(task_id="quantize")
    def quantize():
        _run_kedro_node(node_names=["quantize"])

    @task(task_id="export")
    def export():
        _run_kedro_node(node_names=["export"])

    tasks = {
        "build-blocks-import-model-add-generated-generate-general": build_blocks_import_model_add_generated_generate_general(),
        "measure-size": measure_size(),
        "scan-spectra": scan_spectra(),
        "score-tasks": score_tasks(),
        "cache-heal-teacher": cache_heal_teacher(),
        "cache-teacher": cache_teacher(),
        "measure-quality": measure_quality(),
        "measure-speed": measure_speed(),
        "profile-model": profile_model(),
        "plot-profile": plot_profile(),
        "report-baseline": report_baseline(),
        "wave-0-start": wave_0_start(),
        "summarize": summarize(),
        "wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate": wave_1_decay_wave_1_heal_wave_1_regrow_wave_1_evaluate_wave_1_recover_wave_1_gate(),
        "wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate": wave_2_decay_wave_2_heal_wave_2_regrow_wave_2_evaluate_wave_2_recover_wave_2_gate(),
        "compact-decay": compact_decay(),
        "heal-final": heal_final(),
        "report-decay": report_decay(),
        "quantize": quantize(),
        "export": export(),
    }
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["measure-size"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["scan-spectra"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["score-tasks"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["cache-heal-teacher"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["cache-teacher"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["measure-quality"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["measure-speed"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["profile-model"]
    tasks["profile-model"] >> tasks["plot-profile"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["report-baseline"]
    tasks["measure-size"] >> tasks["report-baseline"]
    tasks["scan-spectra"] >> tasks["report-baseline"]
    tasks["score-tasks"] >> tasks["report-baseline"]
    tasks["measure-quality"] >> tasks["report-baseline"]
    tasks["measure-speed"] >> tasks["report-baseline"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["wave-0-start"]
    tasks["measure-quality"] >> tasks["wave-0-start"]
    tasks["report-baseline"] >> tasks["summarize"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"]
    tasks["cache-heal-teacher"] >> tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"]
    tasks["cache-teacher"] >> tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"]
    tasks["profile-model"] >> tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"]
    tasks["wave-0-start"] >> tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"]
    tasks["cache-heal-teacher"] >> tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"]
    tasks["cache-teacher"] >> tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"]
    tasks["profile-model"] >> tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"]
    tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"] >> tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["compact-decay"]
    tasks["measure-quality"] >> tasks["compact-decay"]
    tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"] >> tasks["compact-decay"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["heal-final"]
    tasks["cache-heal-teacher"] >> tasks["heal-final"]
    tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"] >> tasks["heal-final"]
    tasks["compact-decay"] >> tasks["heal-final"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["report-decay"]
    tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"] >> tasks["report-decay"]
    tasks["compact-decay"] >> tasks["report-decay"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["quantize"]
    tasks["heal-final"] >> tasks["quantize"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["export"]
    tasks["quantize"] >> tasks["export"]


birdbone()