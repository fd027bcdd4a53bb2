"""`python -m cellpuzzles.serving` takes KServe's own arguments plus the server's options, and
KServe's import-time argument parsing can never capture one of ours (no argv swapping)."""

import subprocess
import sys

import pytest


def test_module_entry_point_extends_kserves_parser():
    r = subprocess.run([sys.executable, "-m", "cellpuzzles.serving", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--http_port", "--timeout-keep-alive", "--model", "--max-batch-size", "--max-body-bytes"):
        assert flag in r.stdout


@pytest.mark.parametrize("command", ["serve", "serve-transformer"])
def test_our_serve_flags_are_not_abbreviations_of_kserve_flags(command):
    """KServe parses sys.argv when imported (allowing abbreviations): a flag of ours that is a
    prefix of one of its flags (e.g. --timeout of --timeout-keep-alive) would silently set it."""
    from kserve.model_server import parser as kserve_parser

    from cellpuzzles.cli.main import build_parser

    theirs = [o for a in kserve_parser._actions for o in a.option_strings]
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices[command]
    ours = [o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    # --model and --mode abbreviate --model_name, which only KServe's own __main__ reads (not ModelServer)
    captured = {o: t for o in ours for t in theirs if t.startswith(o) and t != o and t != "--model_name"}
    assert captured == {}
