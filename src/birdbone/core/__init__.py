"""Library code: plain torch/transformers, no Kedro, no MLflow."""
