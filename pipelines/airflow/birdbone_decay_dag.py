from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import dag, task

from kedro.framework.session import KedroSession
from kedro.framework.project import configure_project

# Kedro settings required to run your pipeline
env = "local"
pipeline_name = "decay"
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
    dag_id="birdbone_decay",
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
def birdbone_decay():

    @task(task_id="cache-heal-teacher")
    def cache_heal_teacher():
        _run_kedro_node(node_names=["cache_heal_teacher"])

    @task(task_id="cache-teacher")
    def cache_teacher():
        _run_kedro_node(node_names=["cache_teacher"])

    @task(task_id="wave-0-start")
    def wave_0_start():
        _run_kedro_node(node_names=["wave_0.start"])

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

    tasks = {
        "cache-heal-teacher": cache_heal_teacher(),
        "cache-teacher": cache_teacher(),
        "wave-0-start": wave_0_start(),
        "wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate": wave_1_decay_wave_1_heal_wave_1_regrow_wave_1_evaluate_wave_1_recover_wave_1_gate(),
        "wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate": wave_2_decay_wave_2_heal_wave_2_regrow_wave_2_evaluate_wave_2_recover_wave_2_gate(),
        "compact-decay": compact_decay(),
        "heal-final": heal_final(),
        "report-decay": report_decay(),
    }
    tasks["cache-heal-teacher"] >> tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"]
    tasks["cache-teacher"] >> tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"]
    tasks["wave-0-start"] >> tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"]
    tasks["cache-heal-teacher"] >> tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"]
    tasks["cache-teacher"] >> tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"]
    tasks["wave-1-decay-wave-1-heal-wave-1-regrow-wave-1-evaluate-wave-1-recover-wave-1-gate"] >> tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"]
    tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"] >> tasks["compact-decay"]
    tasks["cache-heal-teacher"] >> tasks["heal-final"]
    tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"] >> tasks["heal-final"]
    tasks["compact-decay"] >> tasks["heal-final"]
    tasks["wave-2-decay-wave-2-heal-wave-2-regrow-wave-2-evaluate-wave-2-recover-wave-2-gate"] >> tasks["report-decay"]
    tasks["compact-decay"] >> tasks["report-decay"]


birdbone_decay()