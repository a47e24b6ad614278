#!/usr/bin/env bash
# Writes pipelines/airflow/ (or $1): an Airflow DAG per bird-bone pipeline, made by
# kedro-airflow from the registered pipelines with conf/ as it is (the decay DAG has one
# task group per wave the recipe can need). kedro-airflow names every DAG "birdbone";
# here each stage's DAG gets its own id (birdbone_<stage>), the full pipeline keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-pipelines/airflow}
KEDRO_DISABLE_TELEMETRY=true .venv/bin/kedro airflow create --all --target-dir "$out" --group-by memory >/dev/null
for file in "$out"/birdbone_*_dag.py; do
  id=$(basename "$file" _dag.py)
  sed -i "s/dag_id=\"birdbone\"/dag_id=\"$id\"/; s/^def birdbone():/def $id():/; s/^birdbone()/$id()/" "$file"
done
