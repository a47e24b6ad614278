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

    @task(task_id="build-blocks")
    def build_blocks():
        _run_kedro_node(node_names=["build_blocks"])

    @task(task_id="import-model")
    def import_model():
        _run_kedro_node(node_names=["import_model"])

    @task(task_id="cache-heal-teacher")
    def cache_heal_teacher():
        _run_kedro_node(node_names=["cache_heal_teacher"])

    @task(task_id="cache-teacher")
    def cache_teacher():
        _run_kedro_node(node_names=["cache_teacher"])

    @task(task_id="generate-general")
    def generate_general():
        _run_kedro_node(node_names=["generate_general"])

    @task(task_id="measure-size")
    def measure_size():
        _run_kedro_node(node_names=["measure_size"])

    @task(task_id="measure-speed")
    def measure_speed():
        _run_kedro_node(node_names=["measure_speed"])

    @task(task_id="profile-model")
    def profile_model():
        _run_kedro_node(node_names=["profile_model"])

    @task(task_id="scan-spectra")
    def scan_spectra():
        _run_kedro_node(node_names=["scan_spectra"])

    @task(task_id="score-tasks")
    def score_tasks():
        _run_kedro_node(node_names=["score_tasks"])

    @task(task_id="measure-quality")
    def measure_quality():
        _run_kedro_node(node_names=["measure_quality"])

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

    @task(task_id="wave-3-decay-wave-3-heal-wave-3-regrow-wave-3-evaluate-wave-3-recover-wave-3-gate")
    def wave_3_decay_wave_3_heal_wave_3_regrow_wave_3_evaluate_wave_3_recover_wave_3_gate():
        _run_kedro_node(node_names=["wave_3.decay", "wave_3.heal", "wave_3.regrow", "wave_3.evaluate", "wave_3.recover", "wave_3.gate"])

    @task(task_id="wave-4-decay-wave-4-heal-wave-4-regrow-wave-4-evaluate-wave-4-recover-wave-4-gate")
    def wave_4_decay_wave_4_heal_wave_4_regrow_wave_4_evaluate_wave_4_recover_wave_4_gate():
        _run_kedro_node(node_names=["wave_4.decay", "wave_4.heal", "wave_4.regrow", "wave_4.evaluate", "wave_4.recover", "wave_4.gate"])

    @task(task_id="wave-5-decay-wave-5-heal-wave-5-regrow-wave-5-evaluate-wave-5-recover-wave-5-gate")
    def wave_5_decay_wave_5_heal_wave_5_regrow_wave_5_evaluate_wave_5_recover_wave_5_gate():
        _run_kedro_node(node_names=["wave_5.decay", "wave_5.heal", "wave_5.regrow", "wave_5.evaluate", "wave_5.recover", "wave_5.gate"])

    @task(task_id="wave-6-decay-wave-6-heal-wave-6-regrow-wave-6-evaluate-wave-6-recover-wave-6-gate")
    def wave_6_decay_wave_6_heal_wave_6_regrow_wave_6_evaluate_wave_6_recover_wave_6_gate():
        _run_kedro_node(node_names=["wave_6.decay", "wave_6.heal", "wave_6.regrow", "wave_6.evaluate", "wave_6.recover", "wave_6.gate"])

    @task(task_id="wave-7-decay-wave-7-heal-wave-7-regrow-wave-7-evaluate-wave-7-recover-wave-7-gate")
    def wave_7_decay_wave_7_heal_wave_7_regrow_wave_7_evaluate_wave_7_recover_wave_7_gate():
        _run_kedro_node(node_names=["wave_7.decay", "wave_7.heal", "wave_7.regrow", "wave_7.evaluate", "wave_7.recover", "wave_7.gate"])

    @task(task_id="wave-8-decay-wave-8-heal-wave-8-regrow-wave-8-evaluate-wave-8-recover-wave-8-gate")
    def wave_8_decay_wave_8_heal_wave_8_regrow_wave_8_evaluate_wave_8_recover_wave_8_gate():
        _run_kedro_node(node_names=["wave_8.decay", "wave_8.heal", "wave_8.regrow", "wave_8.evaluate", "wave_8.recover", "wave_8.gate"])

    @task(task_id="wave-9-decay-wave-9-heal-wave-9-regrow-wave-9-evaluate-wave-9-recover-wave-9-gate")
    def wave_9_decay_wave_9_heal_wave_9_regrow_wave_9_evaluate_wave_9_recover_wave_9_gate():
        _run_kedro_node(node_names=["wave_9.decay", "wave_9.heal", "wave_9.regrow", "wave_9.evaluate", "wave_9.recover", "wave_9.gate"])

    @task(task_id="wave-10-decay-wave-10-heal-wave-10-regrow-wave-10-evaluate-wave-10-recover-wave-10-gate")
    def wave_10_decay_wave_10_heal_wave_10_regrow_wave_10_evaluate_wave_10_recover_wave_10_gate():
        _run_kedro_node(node_names=["wave_10.decay", "wave_10.heal", "wave_10.regrow", "wave_10.evaluate", "wave_10.recover", "wave_10.gate"])

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
        "build-blocks": build_blocks(),
        "import-model": import_model(),
        "cache-heal-teacher": cache_heal_teacher(),
        "cache-teacher": cache_teacher(),
        "generate-general": generate_general(),
        "measure-size": measure_size(),
        "measure-speed": measure_speed(),
        "profile-model": profile_model(),
        "scan-spectra": scan_spectra(),
        "score-tasks": score_tasks(),
        "measure-quality": measure_quality(),
        "plot-profile": plot_profile(),
        "report-baseline": report_baseline(),
        "wave-0-start": wave_0_start(),
        "summarize": summarize(),
        "wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate": wave_1_decay_wave_1_heal_wave_1_regrow_wave_1_evaluate_wave_1_recover_wave_1_gate(),
        "wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate": wave_2_decay_wave_2_heal_wave_2_regrow_wave_2_evaluate_wave_2_recover_wave_2_gate(),
        "wave-3-decay-wave-3-heal-wave-3-regrow-wave-3-evaluate-wave-3-recover-wave-3-gate": wave_3_decay_wave_3_heal_wave_3_regrow_wave_3_evaluate_wave_3_recover_wave_3_gate(),
        "wave-4-decay-wave-4-heal-wave-4-regrow-wave-4-evaluate-wave-4-recover-wave-4-gate": wave_4_decay_wave_4_heal_wave_4_regrow_wave_4_evaluate_wave_4_recover_wave_4_gate(),
        "wave-5-decay-wave-5-heal-wave-5-regrow-wave-5-evaluate-wave-5-recover-wave-5-gate": wave_5_decay_wave_5_heal_wave_5_regrow_wave_5_evaluate_wave_5_recover_wave_5_gate(),
        "wave-6-decay-wave-6-heal-wave-6-regrow-wave-6-evaluate-wave-6-recover-wave-6-gate": wave_6_decay_wave_6_heal_wave_6_regrow_wave_6_evaluate_wave_6_recover_wave_6_gate(),
        "wave-7-decay-wave-7-heal-wave-7-regrow-wave-7-evaluate-wave-7-recover-wave-7-gate": wave_7_decay_wave_7_heal_wave_7_regrow_wave_7_evaluate_wave_7_recover_wave_7_gate(),
        "wave-8-decay-wave-8-heal-wave-8-regrow-wave-8-evaluate-wave-8-recover-wave-8-gate": wave_8_decay_wave_8_heal_wave_8_regrow_wave_8_evaluate_wave_8_recover_wave_8_gate(),
        "wave-9-decay-wave-9-heal-wave-9-regrow-wave-9-evaluate-wave-9-recover-wave-9-gate": wave_9_decay_wave_9_heal_wave_9_regrow_wave_9_evaluate_wave_9_recover_wave_9_gate(),
        "wave-10-decay-wave-10-heal-wave-10-regrow-wave-10-evaluate-wave-10-recover-wave-10-gate": wave_10_decay_wave_10_heal_wave_10_regrow_wave_10_evaluate_wave_10_recover_wave_10_gate(),
        "compact-decay": compact_decay(),
        "heal-final": heal_final(),
        "report-decay": report_decay(),
        "quantize": quantize(),
        "export": export(),
    }
    tasks["build-blocks"] >> tasks["import-model"]
    tasks["build-blocks"] >> tasks["cache-heal-teacher"]
    tasks["import-model"] >> tasks["cache-heal-teacher"]
    tasks["build-blocks"] >> tasks["cache-teacher"]
    tasks["import-model"] >> tasks["cache-teacher"]
    tasks["import-model"] >> tasks["generate-general"]
    tasks["import-model"] >> tasks["measure-size"]
    tasks["build-blocks"] >> tasks["measure-speed"]
    tasks["import-model"] >> tasks["measure-speed"]
    tasks["build-blocks"] >> tasks["profile-model"]
    tasks["import-model"] >> tasks["profile-model"]
    tasks["import-model"] >> tasks["scan-spectra"]
    tasks["import-model"] >> tasks["score-tasks"]
    tasks["build-blocks"] >> tasks["measure-quality"]
    tasks["import-model"] >> tasks["measure-quality"]
    tasks["generate-general"] >> tasks["measure-quality"]
    tasks["profile-model"] >> tasks["plot-profile"]
    tasks["build-blocks"] >> tasks["report-baseline"]
    tasks["measure-size"] >> tasks["report-baseline"]
    tasks["measure-speed"] >> tasks["report-baseline"]
    tasks["scan-spectra"] >> tasks["report-baseline"]
    tasks["score-tasks"] >> tasks["report-baseline"]
    tasks["measure-quality"] >> tasks["report-baseline"]
    tasks["build-blocks"] >> tasks["wave-0-start"]
    tasks["import-model"] >> tasks["wave-0-start"]
    tasks["measure-quality"] >> tasks["wave-0-start"]
    tasks["report-baseline"] >> tasks["summarize"]
    tasks["build-blocks"] >> tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"]
    tasks["cache-heal-teacher"] >> tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"]
    tasks["cache-teacher"] >> tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"]
    tasks["generate-general"] >> tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"]
    tasks["profile-model"] >> tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"]
    tasks["wave-0-start"] >> tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"]
    tasks["build-blocks"] >> tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"]
    tasks["cache-heal-teacher"] >> tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"]
    tasks["cache-teacher"] >> tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"]
    tasks["generate-general"] >> tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"]
    tasks["profile-model"] >> tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"]
    tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"] >> tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"]
    tasks["build-blocks"] >> tasks["wave-3-decay-wave-3-heal-wave-3-regrow-wave-3-evaluate-wave-3-recover-wave-3-gate"]
    tasks["cache-heal-teacher"] >> tasks["wave-3-decay-wave-3-heal-wave-3-regrow-wave-3-evaluate-wave-3-recover-wave-3-gate"]
    tasks["cache-teacher"] >> tasks["wave-3-decay-wave-3-heal-wave-3-regrow-wave-3-evaluate-wave-3-recover-wave-3-gate"]
    tasks["generate-general"] >> tasks["wave-3-decay-wave-3-heal-wave-3-regrow-wave-3-evaluate-wave-3-recover-wave-3-gate"]
    tasks["profile-model"] >> tasks["wave-3-decay-wave-3-heal-wave-3-regrow-wave-3-evaluate-wave-3-recover-wave-3-gate"]
    tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"] >> tasks["wave-3-decay-wave-3-heal-wave-3-regrow-wave-3-evaluate-wave-3-recover-wave-3-gate"]
    tasks["build-blocks"] >> tasks["wave-4-decay-wave-4-heal-wave-4-regrow-wave-4-evaluate-wave-4-recover-wave-4-gate"]
    tasks["cache-heal-teacher"] >> tasks["wave-4-decay-wave-4-heal-wave-4-regrow-wave-4-evaluate-wave-4-recover-wave-4-gate"]
    tasks["cache-teacher"] >> tasks["wave-4-decay-wave-4-heal-wave-4-regrow-wave-4-evaluate-wave-4-recover-wave-4-gate"]
    tasks["generate-general"] >> tasks["wave-4-decay-wave-4-heal-wave-4-regrow-wave-4-evaluate-wave-4-recover-wave-4-gate"]
    tasks["profile-model"] >> tasks["wave-4-decay-wave-4-heal-wave-4-regrow-wave-4-evaluate-wave-4-recover-wave-4-gate"]
    tasks["wave-3-decay-wave-3-heal-wave-3-regrow-wave-3-evaluate-wave-3-recover-wave-3-gate"] >> tasks["wave-4-decay-wave-4-heal-wave-4-regrow-wave-4-evaluate-wave-4-recover-wave-4-gate"]
    tasks["build-blocks"] >> tasks["wave-5-decay-wave-5-heal-wave-5-regrow-wave-5-evaluate-wave-5-recover-wave-5-gate"]
    tasks["cache-heal-teacher"] >> tasks["wave-5-decay-wave-5-heal-wave-5-regrow-wave-5-evaluate-wave-5-recover-wave-5-gate"]
    tasks["cache-teacher"] >> tasks["wave-5-decay-wave-5-heal-wave-5-regrow-wave-5-evaluate-wave-5-recover-wave-5-gate"]
    tasks["generate-general"] >> tasks["wave-5-decay-wave-5-heal-wave-5-regrow-wave-5-evaluate-wave-5-recover-wave-5-gate"]
    tasks["profile-model"] >> tasks["wave-5-decay-wave-5-heal-wave-5-regrow-wave-5-evaluate-wave-5-recover-wave-5-gate"]
    tasks["wave-4-decay-wave-4-heal-wave-4-regrow-wave-4-evaluate-wave-4-recover-wave-4-gate"] >> tasks["wave-5-decay-wave-5-heal-wave-5-regrow-wave-5-evaluate-wave-5-recover-wave-5-gate"]
    tasks["build-blocks"] >> tasks["wave-6-decay-wave-6-heal-wave-6-regrow-wave-6-evaluate-wave-6-recover-wave-6-gate"]
    tasks["cache-heal-teacher"] >> tasks["wave-6-decay-wave-6-heal-wave-6-regrow-wave-6-evaluate-wave-6-recover-wave-6-gate"]
    tasks["cache-teacher"] >> tasks["wave-6-decay-wave-6-heal-wave-6-regrow-wave-6-evaluate-wave-6-recover-wave-6-gate"]
    tasks["generate-general"] >> tasks["wave-6-decay-wave-6-heal-wave-6-regrow-wave-6-evaluate-wave-6-recover-wave-6-gate"]
    tasks["profile-model"] >> tasks["wave-6-decay-wave-6-heal-wave-6-regrow-wave-6-evaluate-wave-6-recover-wave-6-gate"]
    tasks["wave-5-decay-wave-5-heal-wave-5-regrow-wave-5-evaluate-wave-5-recover-wave-5-gate"] >> tasks["wave-6-decay-wave-6-heal-wave-6-regrow-wave-6-evaluate-wave-6-recover-wave-6-gate"]
    tasks["build-blocks"] >> tasks["wave-7-decay-wave-7-heal-wave-7-regrow-wave-7-evaluate-wave-7-recover-wave-7-gate"]
    tasks["cache-heal-teacher"] >> tasks["wave-7-decay-wave-7-heal-wave-7-regrow-wave-7-evaluate-wave-7-recover-wave-7-gate"]
    tasks["cache-teacher"] >> tasks["wave-7-decay-wave-7-heal-wave-7-regrow-wave-7-evaluate-wave-7-recover-wave-7-gate"]
    tasks["generate-general"] >> tasks["wave-7-decay-wave-7-heal-wave-7-regrow-wave-7-evaluate-wave-7-recover-wave-7-gate"]
    tasks["profile-model"] >> tasks["wave-7-decay-wave-7-heal-wave-7-regrow-wave-7-evaluate-wave-7-recover-wave-7-gate"]
    tasks["wave-6-decay-wave-6-heal-wave-6-regrow-wave-6-evaluate-wave-6-recover-wave-6-gate"] >> tasks["wave-7-decay-wave-7-heal-wave-7-regrow-wave-7-evaluate-wave-7-recover-wave-7-gate"]
    tasks["build-blocks"] >> tasks["wave-8-decay-wave-8-heal-wave-8-regrow-wave-8-evaluate-wave-8-recover-wave-8-gate"]
    tasks["cache-heal-teacher"] >> tasks["wave-8-decay-wave-8-heal-wave-8-regrow-wave-8-evaluate-wave-8-recover-wave-8-gate"]
    tasks["cache-teacher"] >> tasks["wave-8-decay-wave-8-heal-wave-8-regrow-wave-8-evaluate-wave-8-recover-wave-8-gate"]
    tasks["generate-general"] >> tasks["wave-8-decay-wave-8-heal-wave-8-regrow-wave-8-evaluate-wave-8-recover-wave-8-gate"]
    tasks["profile-model"] >> tasks["wave-8-decay-wave-8-heal-wave-8-regrow-wave-8-evaluate-wave-8-recover-wave-8-gate"]
    tasks["wave-7-decay-wave-7-heal-wave-7-regrow-wave-7-evaluate-wave-7-recover-wave-7-gate"] >> tasks["wave-8-decay-wave-8-heal-wave-8-regrow-wave-8-evaluate-wave-8-recover-wave-8-gate"]
    tasks["build-blocks"] >> tasks["wave-9-decay-wave-9-heal-wave-9-regrow-wave-9-evaluate-wave-9-recover-wave-9-gate"]
    tasks["cache-heal-teacher"] >> tasks["wave-9-decay-wave-9-heal-wave-9-regrow-wave-9-evaluate-wave-9-recover-wave-9-gate"]
    tasks["cache-teacher"] >> tasks["wave-9-decay-wave-9-heal-wave-9-regrow-wave-9-evaluate-wave-9-recover-wave-9-gate"]
    tasks["generate-general"] >> tasks["wave-9-decay-wave-9-heal-wave-9-regrow-wave-9-evaluate-wave-9-recover-wave-9-gate"]
    tasks["profile-model"] >> tasks["wave-9-decay-wave-9-heal-wave-9-regrow-wave-9-evaluate-wave-9-recover-wave-9-gate"]
    tasks["wave-8-decay-wave-8-heal-wave-8-regrow-wave-8-evaluate-wave-8-recover-wave-8-gate"] >> tasks["wave-9-decay-wave-9-heal-wave-9-regrow-wave-9-evaluate-wave-9-recover-wave-9-gate"]
    tasks["build-blocks"] >> tasks["wave-10-decay-wave-10-heal-wave-10-regrow-wave-10-evaluate-wave-10-recover-wave-10-gate"]
    tasks["cache-heal-teacher"] >> tasks["wave-10-decay-wave-10-heal-wave-10-regrow-wave-10-evaluate-wave-10-recover-wave-10-gate"]
    tasks["cache-teacher"] >> tasks["wave-10-decay-wave-10-heal-wave-10-regrow-wave-10-evaluate-wave-10-recover-wave-10-gate"]
    tasks["generate-general"] >> tasks["wave-10-decay-wave-10-heal-wave-10-regrow-wave-10-evaluate-wave-10-recover-wave-10-gate"]
    tasks["profile-model"] >> tasks["wave-10-decay-wave-10-heal-wave-10-regrow-wave-10-evaluate-wave-10-recover-wave-10-gate"]
    tasks["wave-9-decay-wave-9-heal-wave-9-regrow-wave-9-evaluate-wave-9-recover-wave-9-gate"] >> tasks["wave-10-decay-wave-10-heal-wave-10-regrow-wave-10-evaluate-wave-10-recover-wave-10-gate"]
    tasks["wave-10-decay-wave-10-heal-wave-10-regrow-wave-10-evaluate-wave-10-recover-wave-10-gate"] >> tasks["compact-decay"]
    tasks["build-blocks"] >> tasks["heal-final"]
    tasks["cache-heal-teacher"] >> tasks["heal-final"]
    tasks["generate-general"] >> tasks["heal-final"]
    tasks["wave-10-decay-wave-10-heal-wave-10-regrow-wave-10-evaluate-wave-10-recover-wave-10-gate"] >> tasks["heal-final"]
    tasks["compact-decay"] >> tasks["heal-final"]
    tasks["build-blocks"] >> tasks["report-decay"]
    tasks["generate-general"] >> tasks["report-decay"]
    tasks["wave-10-decay-wave-10-heal-wave-10-regrow-wave-10-evaluate-wave-10-recover-wave-10-gate"] >> tasks["report-decay"]
    tasks["compact-decay"] >> tasks["report-decay"]
    tasks["build-blocks"] >> tasks["quantize"]
    tasks["generate-general"] >> tasks["quantize"]
    tasks["heal-final"] >> tasks["quantize"]
    tasks["build-blocks"] >> tasks["export"]
    tasks["import-model"] >> tasks["export"]
    tasks["generate-general"] >> tasks["export"]
    tasks["quantize"] >> tasks["export"]


birdbone()