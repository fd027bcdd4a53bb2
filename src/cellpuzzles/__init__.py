"""CellPuzzles: data, reward, training, gating and serving for batch-level cell-type annotation."""

import os

__version__ = "0.1.0"
# nothing phones home: MLflow's usage telemetry (on by default, fetched in the background) stays off
# unless the user set it explicitly (the images set the same variable)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def __getattr__(name: str):
    # cellpuzzles.annotate(adata, ...): imported on first use, so `import cellpuzzles` stays light
    if name == "annotate":
        import importlib

        return importlib.import_module("cellpuzzles.annotate")  # a callable module (see its __init__)
    raise AttributeError(f"module 'cellpuzzles' has no attribute {name!r}")
