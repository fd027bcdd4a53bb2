"""CellPuzzles: data, reward, training, gating and serving for batch-level cell-type annotation."""

__version__ = "0.1.0"
