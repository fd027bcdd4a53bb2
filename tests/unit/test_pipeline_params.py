"""`cellpuzzles pipeline` in-process: the cron conversion KFP needs and the typing of
--param values against a compiled package's declared inputs. (The commands against a KFP
API stand-in: tests/integration/test_pipeline_client.py.)"""

import re

import pytest

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.pipelines.remote import kfp_cron, parse_params

from helpers.tiny_pipeline import compile_tiny


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return compile_tiny(tmp_path_factory.mktemp("pkg") / "tiny.yaml")


def test_kfp_cron_conversion():
    assert kfp_cron("0 3 * * 1") == "0 0 3 * * 1"
    assert kfp_cron("  */15  2-4 1,15 JAN-mar mon-fri ") == "0 */15 2-4 1,15 JAN-mar mon-fri"
    assert kfp_cron("30 0 9 ? * 2-6") == "30 0 9 ? * 2-6"
    assert kfp_cron("@every 1h30m") == "@every 1h30m"
    for bad, expected in [("0 3 * *", "4 fields"), ("0 3 * * 7", "day-of-week field '7' is outside 0-6"),
                          ("@fortnightly", "unknown descriptor"), ("", "0 fields"),
                          ("0 3-1 * * *", "runs backwards"), ("*/0 * * * *", "bad step"),
                          ("0 3 * * 1 2 3", "7 fields"), ("@every soon", "unknown descriptor"),
                          ("0 3 * FOO *", "not a number")]:
        with pytest.raises(CellPuzzlesError, match=re.escape(expected)):
            kfp_cron(bad)


def test_parse_params_types_against_declared_inputs(package):
    from cellpuzzles.pipelines.remote import package_inputs

    declared = package_inputs(package)
    assert parse_params(["data_uri=[1, 2]", "lr=1", "max_steps=3", "dry_run=false"], declared) == {
        "data_uri": "[1, 2]", "lr": 1.0, "max_steps": 3, "dry_run": False}  # STRING keeps the text as typed
    for bad, expected in [("max_steps=abc", "max_steps is NUMBER_INTEGER; give an integer"),
                          ("max_steps=2.5", "give an integer"), ("max_steps=true", "give an integer"),
                          ("dry_run=yes", "dry_run is BOOLEAN; give true or false"), ("lr=fast", "give a number"),
                          ("=3", "expected KEY=VALUE")]:
        with pytest.raises(CellPuzzlesError, match=re.escape(expected)):
            parse_params(["data_uri=a", bad], declared)
    with pytest.raises(CellPuzzlesError, match="given twice"):
        parse_params(["data_uri=a", "data_uri=b"], declared)
