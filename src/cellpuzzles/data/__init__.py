"""Data: .h5ad ingest, validation, the cells table, puzzle sampling, synthetic and bundled data."""
