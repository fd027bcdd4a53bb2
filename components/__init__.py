"""Kubeflow components: one per pipeline step, each a thin wrapper over a library function."""
