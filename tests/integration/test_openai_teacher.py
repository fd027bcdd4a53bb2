"""OpenAITeacher against a local stand-in chat-completions server (no real API is reachable)."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("openai")

from cellpuzzles.core.errors import CellPuzzlesError  # noqa: E402
from cellpuzzles.distill.teachers.openai_teacher import OpenAITeacher, OpenAITeacherConfig  # noqa: E402
from cellpuzzles.task.puzzle import is_well_formed, make_puzzle  # noqa: E402
from cellpuzzles.task.reward import batch_reward  # noqa: E402

from helpers.chat_standin import ChatStandin  # noqa: E402
from helpers.net import free_port  # noqa: E402

CTX = {"sex": "female", "development_stage": "40-year-old stage", "self_reported_ethnicity": "unknown",
       "tissue": "blood", "disease": "normal"}


def puzzles(n: int = 4):
    out = []
    for k in range(n):
        out.append(make_puzzle(genes=[["CD3E", f"G{k}"], ["MS4A1"], ["LYZ"]], types=["T cell", "B cell", "monocyte"],
                               context=CTX, donor_id=f"d{k}", cell_ids=["a", "b", "c"]))
    return out


@pytest.fixture
def server():
    s = ChatStandin(puzzles=puzzles(8)).start()
    yield s
    s.stop()


def teacher(server_or_url, tmp_path, **kw) -> OpenAITeacher:
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.base_url
    cfg = dict(base_url=url, model="standin-model", concurrency=4, timeout_s=5.0, max_retries=2,
               cache_dir=tmp_path / "cache")
    cfg.update(kw)
    return OpenAITeacher(OpenAITeacherConfig(**cfg))


def test_correct_answers_and_usage(server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # localhost: a dummy key is fine
    ps = puzzles(4)
    t = teacher(server, tmp_path)
    replies = t.complete_many([(p, 0) for p in ps])
    assert t.name == "openai"
    assert [r.puzzle_id for r in replies] == [p.puzzle_id for p in ps]
    for p, r in zip(ps, replies):
        assert r.error is None and not r.cached
        assert is_well_formed(r.text) and batch_reward(r.text, p.answer_text) == 1.0
        assert r.prompt_tokens > 0 and r.completion_tokens > 0
    assert server.calls == 4
    assert t.usage["calls"] == 4 and t.usage["cached"] == 0 and t.usage["errors"] == 0
    assert t.usage["prompt_tokens"] == sum(r.prompt_tokens for r in replies)
    assert t.usage["completion_tokens"] == sum(r.completion_tokens for r in replies)
    req = server.requests[0]
    assert req["model"] == "standin-model" and req["seed"] == 0 and req["max_tokens"] == 4096
    assert [m["role"] for m in req["messages"]] == ["system", "user"]


def test_wrong_answers_come_back_as_text(server, tmp_path):
    server.mode = "wrong"
    ps = puzzles(2)
    replies = teacher(server, tmp_path).complete_many([(p, 0) for p in ps])
    for p, r in zip(ps, replies):
        assert r.error is None and is_well_formed(r.text)
        assert batch_reward(r.text, p.answer_text) < 1.0


def test_429_and_500_are_retried_by_the_client(server, tmp_path):
    server.script = ["429", "429", "500"]
    t = teacher(server, tmp_path, concurrency=1, max_retries=3)
    t0 = time.monotonic()
    [r] = t.complete_many([(puzzles(1)[0], 0)])
    assert r.error is None and is_well_formed(r.text)
    assert server.calls == 4  # three failures, then the answer
    assert t.usage["calls"] == 1 and t.usage["errors"] == 0
    assert time.monotonic() - t0 < 10


def test_persistent_500_ends_as_error_reply_and_is_not_cached(server, tmp_path):
    server.mode = "500"
    t = teacher(server, tmp_path, max_retries=1)
    [r] = t.complete_many([(puzzles(1)[0], 0)])
    assert r.text is None and r.error.startswith("HTTP 500") and not r.cached
    assert server.calls == 2 and t.usage["errors"] == 1
    # a rerun tries it again (failures are not cached) and now succeeds
    server.mode = "correct"
    [r2] = teacher(server, tmp_path).complete_many([(puzzles(1)[0], 0)])
    assert r2.error is None and not r2.cached and server.calls == 3


@pytest.mark.slow
def test_hang_beyond_timeout_is_retried_then_an_error(server, tmp_path):
    server.mode, server.hang_s = "hang", 5.0
    t = teacher(server, tmp_path, timeout_s=0.4, max_retries=1)
    t0 = time.monotonic()
    [r] = t.complete_many([(puzzles(1)[0], 0)])
    assert time.monotonic() - t0 < 4
    assert r.text is None and "timeout" in r.error
    assert server.calls == 2  # the first try and one retry
    # a hang that ends within the retries: the second try answers
    server.script, server.mode = ["hang"], "correct"
    [r2] = teacher(server, tmp_path, timeout_s=0.4, max_retries=1).complete_many([(puzzles(2)[1], 0)])
    assert r2.error is None and is_well_formed(r2.text)


@pytest.mark.parametrize("mode", ["empty", "null"])
def test_empty_content_is_an_error_reply(server, tmp_path, mode):
    server.mode = mode
    t = teacher(server, tmp_path)
    [r] = t.complete_many([(puzzles(1)[0], 0)])
    assert r.text is None and r.error == "empty completion"
    assert t.usage["empty"] == 1 and t.usage["errors"] == 1
    # it was paid for: a rerun does not ask again
    [r2] = teacher(server, tmp_path).complete_many([(puzzles(1)[0], 0)])
    assert r2.cached and r2.text is None and r2.error == "empty completion" and server.calls == 1


def test_garbage_content_is_returned_as_text(server, tmp_path):
    server.mode = "garbage"
    p = puzzles(1)[0]
    [r] = teacher(server, tmp_path).complete_many([(p, 0)])
    assert r.error is None and r.text and not is_well_formed(r.text)
    assert batch_reward(r.text, p.answer_text) == -1.0


def test_second_run_is_served_from_cache(server, tmp_path):
    items = [(p, a) for p in puzzles(3) for a in range(2)]
    first = teacher(server, tmp_path).complete_many(items)
    assert server.calls == 6
    t2 = teacher(server, tmp_path)
    second = t2.complete_many(items)
    assert server.calls == 6  # no HTTP call at all
    assert [r.text for r in second] == [r.text for r in first]
    assert all(r.cached for r in second) and not any(r.cached for r in first)
    assert [(r.prompt_tokens, r.completion_tokens) for r in second] == [(r.prompt_tokens, r.completion_tokens) for r in first]
    assert t2.usage["calls"] == 0 and t2.usage["cached"] == 6 and t2.usage["prompt_tokens"] == 0
    # layout: cache_dir/<2-char prefix>/<key>.json holding the text and usage
    files = sorted((tmp_path / "cache").glob("*/*.json"))
    assert len(files) == 6
    for f in files:
        assert f.parent.name == f.stem[:2]
        entry = json.loads(f.read_text())
        assert entry["key"] == f.stem and entry["text"] and entry["completion_tokens"] > 0


def test_interrupted_run_only_calls_for_the_missing(server, tmp_path):
    items = [(p, 0) for p in puzzles(6)]
    teacher(server, tmp_path).complete_many(items[:3])  # the "crash" after half the items
    assert server.calls == 3
    asked_before = {r["messages"][1]["content"] for r in server.requests}
    t = teacher(server, tmp_path)
    replies = t.complete_many(items)
    assert server.calls == 6
    asked_now = [r["messages"][1]["content"] for r in server.requests[3:]]
    assert sorted(asked_now) == sorted(p.user_msg for p, _ in items[3:])
    assert not asked_before & set(asked_now)
    assert [r.cached for r in replies] == [True] * 3 + [False] * 3
    assert all(r.error is None for r in replies)
    assert t.usage["calls"] == 3 and t.usage["cached"] == 3


def test_attempts_are_distinct_cache_entries_with_distinct_seeds(server, tmp_path):
    p = puzzles(1)[0]
    t = teacher(server, tmp_path)
    assert len({t.cache_key(p, a) for a in range(3)}) == 3
    other = teacher("http://localhost:9/v1", tmp_path)
    assert other.cache_key(p, 0) != t.cache_key(p, 0)  # another endpoint is another entry
    t.complete_many([(p, 0), (p, 1), (p, 2)])
    assert server.calls == 3 and sorted(r["seed"] for r in server.requests) == [0, 1, 2]
    [r] = teacher(server, tmp_path).complete_many([(p, 3)])
    assert not r.cached and server.calls == 4


def test_concurrency_is_bounded(server, tmp_path):
    server.delay_s = 0.15
    t = teacher(server, tmp_path, concurrency=3)
    replies = t.complete_many([(p, a) for p in puzzles(4) for a in range(3)])
    assert all(r.error is None for r in replies)
    assert server.calls == 12
    assert server.max_inflight == 3  # parallel, but never more than asked


def test_unreachable_endpoint_raises_one_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused
    t = teacher(url, tmp_path, max_retries=0, concurrency=2)
    with pytest.raises(CellPuzzlesError) as e:
        t.complete_many([(p, a) for p in puzzles(8) for a in range(4)])
    msg = str(e.value)
    assert url in msg and "check base_url" in msg and "\n" not in msg
    assert t.usage["calls"] < 32  # it gave up early instead of trying every item


def test_wrong_route_raises(server, tmp_path):
    t = teacher(server.base_url.replace("/v1", "/nope"), tmp_path, max_retries=0)
    with pytest.raises(CellPuzzlesError, match="check base_url"):
        t.complete_many([(p, 0) for p in puzzles(3)])


def test_missing_key_for_remote_url(tmp_path, monkeypatch):
    monkeypatch.delenv("MY_TEACHER_KEY", raising=False)
    with pytest.raises(CellPuzzlesError, match="MY_TEACHER_KEY"):
        teacher("https://api.example.com/v1", tmp_path, api_key_env="MY_TEACHER_KEY")
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-test")
    assert teacher("https://api.example.com/v1", tmp_path, api_key_env="MY_TEACHER_KEY").name == "openai"
