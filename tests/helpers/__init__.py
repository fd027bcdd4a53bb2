"""Helpers shared by the tests (not tests themselves): stand-ins for what cannot run here
(an OpenAI-compatible chat endpoint, the KFP API, the Kubernetes API), real-server launchers
(MLflow, `cellpuzzles serve`), data builders and small utilities.

Imported as ``helpers.<module>``: pyproject's ``[tool.pytest.ini_options] pythonpath``
puts tests/ on sys.path, so this works from the repository root (``python -m pytest``,
``pytest tests/unit``) and in xdist workers alike.
"""
