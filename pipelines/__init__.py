"""The retraining pipeline (retrain.py) and its compiled YAML (retrain.yaml)."""
