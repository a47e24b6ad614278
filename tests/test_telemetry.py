"""The project sends no telemetry: Kedro's, MLflow's and the Hugging Face hub's are off."""

from pathlib import Path

import birdbone  # noqa: F401  (sets the opt-outs)

ROOT = Path(__file__).resolve().parents[1]


def test_kedro_telemetry_consent_is_refused_by_the_project():
    from kedro_telemetry.plugin import _check_for_telemetry_consent

    assert _check_for_telemetry_consent(ROOT) is False


def test_mlflow_and_hub_telemetry_are_off(monkeypatch):
    import os

    from mlflow.telemetry.utils import is_telemetry_disabled

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    assert is_telemetry_disabled()
