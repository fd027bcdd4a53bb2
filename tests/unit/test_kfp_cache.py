"""`cellpuzzles run`'s guard on kfp.local's step cache, in-process."""


def test_cached_steps_made_by_other_code_are_dropped(tmp_path, capsys):
    """kfp.local's cache key does not cover the code behind a step: `cellpuzzles run` forgets
    cached steps when the code fingerprint changed (or is unknown), and keeps them otherwise."""
    from cellpuzzles.pipelines.local import code_fingerprint, drop_stale_cache

    fp = code_fingerprint()
    assert fp == code_fingerprint() and len(fp) == 16
    cache = tmp_path / ".kfp_cache"
    cache.mkdir()
    (cache / "step.json").write_text("{}")
    assert drop_stale_cache(tmp_path, fp)  # a cache of unknown provenance
    assert not cache.exists() and "running every step again" in capsys.readouterr().out
    cache.mkdir()
    (cache / "step.json").write_text("{}")
    assert not drop_stale_cache(tmp_path, fp)  # same code: reused
    assert (cache / "step.json").is_file()
    assert drop_stale_cache(tmp_path, "0" * 16)  # other code
    assert not cache.exists() and (tmp_path / ".code_fingerprint").read_text().strip() == "0" * 16
