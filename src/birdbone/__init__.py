"""bird-bone: compress Hugging Face causal language models through a reproducible Kedro pipeline."""

import os

# Nothing bird-bone runs may phone home: MLflow 3 and the Hugging Face hub send usage
# telemetry unless told not to (Kedro's is refused by the project's .telemetry file).
# setdefault: a user who wants telemetry can still set these variables.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
