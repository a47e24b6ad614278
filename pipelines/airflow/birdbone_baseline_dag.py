from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import dag, task

from kedro.framework.session import KedroSession
from kedro.framework.project import configure_project

# Kedro settings required to run your pipeline
env = "local"
pipeline_name = "baseline"
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
    dag_id="birdbone_baseline",
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
def birdbone_baseline():

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

    @task(task_id="measure-quality")
    def measure_quality():
        _run_kedro_node(node_names=["measure_quality"])

    @task(task_id="measure-speed")
    def measure_speed():
        _run_kedro_node(node_names=["measure_speed"])

    @task(task_id="report-baseline")
    def report_baseline():
        _run_kedro_node(node_names=["report_baseline"])

    @task(task_id="summarize")
    def summarize():
        _run_kedro_node(node_names=["summarize"])

    tasks = {
        "build-blocks-import-model-add-generated-generate-general": build_blocks_import_model_add_generated_generate_general(),
        "measure-size": measure_size(),
        "scan-spectra": scan_spectra(),
        "score-tasks": score_tasks(),
        "measure-quality": measure_quality(),
        "measure-speed": measure_speed(),
        "report-baseline": report_baseline(),
        "summarize": summarize(),
    }
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["measure-size"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["scan-spectra"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["score-tasks"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["measure-quality"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["measure-speed"]
    tasks["build-blocks-import-model-add-generated-generate-general"] >> tasks["report-baseline"]
    tasks["measure-size"] >> tasks["report-baseline"]
    tasks["scan-spectra"] >> tasks["report-baseline"]
    tasks["score-tasks"] >> tasks["report-baseline"]
    tasks["measure-quality"] >> tasks["report-baseline"]
    tasks["measure-speed"] >> tasks["report-baseline"]
    tasks["report-baseline"] >> tasks["summarize"]


birdbone_baseline()