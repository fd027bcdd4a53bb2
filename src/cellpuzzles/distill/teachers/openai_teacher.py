"""A teacher over any OpenAI-compatible chat-completions endpoint (o1-class APIs, a vLLM
server, a KServe OpenAI route).

* Calls go through the official ``openai`` client, whose built-in retry (exponential
  backoff with jitter, honouring ``Retry-After``) handles 429s, 5xx, timeouts and dropped
  connections; ``max_retries`` and ``timeout_s`` are passed straight to it. There is no
  hand-written retry loop here.
* At most ``concurrency`` requests are in flight (a ThreadPoolExecutor of that size).
* Every answered call is written at once to an on-disk cache, one JSON file per
  (base_url, model, puzzle_id, sha256 of the request messages, attempt) under
  ``cache_dir/<first 2 hex chars of the key>/<key>.json`` (atomic write). A cache hit makes
  no HTTP call and returns ``cached=True``, so a crashed or interrupted run loses nothing
  already answered and a rerun repeats no paid call. Calls that failed after the client's
  retries are not cached (a rerun tries them again) and come back as
  ``Reply(text=None, error=...)``. An empty answer is an answer (it was paid for): it is
  cached and comes back as ``Reply(text=None, error="empty completion")``. A non-empty but
  ill-formed answer is returned as text; the reward rejects it downstream.
* Attempt k of a puzzle is its own cache entry and is sent with ``seed=k`` so sampled
  attempts differ on endpoints that honour the seed (others ignore it).
* Unreachable endpoint rule: while no call of this ``complete_many`` has reached the
  server, the first ``min(concurrency, calls to make)`` calls to finish all failing with
  a connection error (refused, DNS, TLS; *not* a timeout, which means the server accepted
  the connection) or with HTTP 401/403/404 (bad key, no such model or route) raise
  :class:`CellPuzzlesError` naming the base_url, instead of returning hundreds of error
  replies. Anything already answered stays in the cache.

Usage totals are in ``teacher.usage``: ``calls`` (requests made by this object, each
counting once whatever the client retried), ``cached`` (cache hits), ``errors`` (replies
with no text, empty answers included), ``empty`` (empty answers), ``prompt_tokens`` and
``completion_tokens`` (summed over the calls this object paid for; a cached Reply carries
the usage stored with it but does not add to the totals).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cellpuzzles.core import atomic
from cellpuzzles.core.errors import CellPuzzlesError, short_reason
from cellpuzzles.distill.teachers.base import Reply
from cellpuzzles.task.puzzle import Puzzle

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
DUMMY_KEY = "EMPTY"  # what vLLM and KServe accept when they run without auth
CACHE_VERSION = 1


@dataclass
class OpenAITeacherConfig:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 5
    # None leaves the parameter out of the request (some reasoning models accept only the default).
    temperature: float | None = 1.0
    max_tokens: int | None = 4096
    # OpenAI's o1/o3-class models reject "max_tokens" and want "max_completion_tokens";
    # vLLM accepts both, older servers only "max_tokens".
    max_tokens_param: str = "max_tokens"
    send_seed: bool = True  # seed=attempt; set False for an endpoint that rejects the parameter
    cache_dir: str | os.PathLike = field(default_factory=lambda: Path("work") / "teacher_cache")
    extra_body: dict[str, Any] | None = None  # endpoint-specific fields (e.g. vLLM's top_k)


def is_local_url(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return host in LOCAL_HOSTS or host.endswith(".localhost")


def messages_sha(messages: list[dict[str, str]]) -> str:
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class _Outcome:
    """What one request came to (never raised: the main thread decides)."""

    text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    answered: bool = False  # the server produced a completion (it is cached)
    reached: bool = False  # the server was reached at all
    fatal: str | None = None  # "connect" | "auth" | "not_found": counts toward the unreachable rule


class OpenAITeacher:
    name = "openai"

    def __init__(self, config: OpenAITeacherConfig, client: Any = None):
        if config.concurrency < 1:
            raise CellPuzzlesError(f"teacher concurrency must be at least 1, got {config.concurrency}")
        if not config.base_url or not urlparse(config.base_url).scheme.startswith("http"):
            raise CellPuzzlesError(f"teacher base_url {config.base_url!r} is not an http(s) URL; "
                                   f"give e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.cache_dir = Path(config.cache_dir)
        self.usage = {"calls": 0, "cached": 0, "errors": 0, "empty": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._lock = threading.Lock()
        try:
            import openai
        except ImportError:
            raise CellPuzzlesError("the openai teacher needs the openai package: pip install openai") from None
        self._openai = openai
        if client is None:
            key = os.environ.get(config.api_key_env, "").strip()
            if not key:
                if not is_local_url(self.base_url):
                    raise CellPuzzlesError(
                        f"no API key: environment variable {config.api_key_env} is unset or empty "
                        f"(needed for {self.base_url}); export it or set api_key_env to the variable holding the key")
                key = DUMMY_KEY
            client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=config.timeout_s,
                                   max_retries=config.max_retries)
        self._client = client

    # ---- cache ----
    def cache_key(self, puzzle: Puzzle, attempt: int) -> str:
        parts = {
            "base_url": self.base_url,
            "model": self.config.model,
            "puzzle_id": puzzle.puzzle_id,
            "messages_sha": messages_sha(puzzle.messages()),
            "attempt": int(attempt),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def cache_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> dict | None:
        path = self.cache_path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable (hand-edited?): treat as a miss; the next answer overwrites it
        if not isinstance(entry, dict) or entry.get("key") != key or "text" not in entry:
            return None
        return entry

    def _cache_put(self, key: str, puzzle: Puzzle, attempt: int, out: _Outcome, finish_reason: str | None) -> None:
        atomic.write_json(self.cache_path(key), {
            "version": CACHE_VERSION,
            "key": key,
            "base_url": self.base_url,
            "model": self.config.model,
            "puzzle_id": puzzle.puzzle_id,
            "attempt": int(attempt),
            "messages_sha": messages_sha(puzzle.messages()),
            "text": out.text,
            "error": out.error,
            "finish_reason": finish_reason,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })

    # ---- one request ----
    def _request_kwargs(self, puzzle: Puzzle, attempt: int) -> dict[str, Any]:
        cfg = self.config
        kwargs: dict[str, Any] = {"model": cfg.model, "messages": puzzle.messages()}
        if cfg.temperature is not None:
            kwargs["temperature"] = cfg.temperature
        if cfg.max_tokens is not None:
            kwargs[cfg.max_tokens_param] = cfg.max_tokens
        if cfg.send_seed:
            kwargs["seed"] = int(attempt)
        if cfg.extra_body:
            kwargs["extra_body"] = dict(cfg.extra_body)
        return kwargs

    def _call(self, puzzle: Puzzle, attempt: int, key: str) -> _Outcome:
        oa = self._openai
        with self._lock:
            self.usage["calls"] += 1
        try:
            resp = self._client.chat.completions.create(**self._request_kwargs(puzzle, attempt))
        except oa.APITimeoutError:
            return _Outcome(error=f"timeout after {self.config.timeout_s:g} s "
                                  f"({self.config.max_retries} retries)", reached=True)
        except oa.APIConnectionError as e:
            cause = e.__cause__ or e
            return _Outcome(error=f"connection error: {type(cause).__name__}: {cause}"[:300], fatal="connect")
        except (oa.AuthenticationError, oa.PermissionDeniedError) as e:
            return _Outcome(error=f"HTTP {e.status_code}: {short_reason(e)}", fatal="auth")
        except oa.NotFoundError as e:
            return _Outcome(error=f"HTTP {e.status_code}: {short_reason(e)}", fatal="not_found")
        except oa.APIStatusError as e:
            return _Outcome(error=f"HTTP {e.status_code}: {short_reason(e)}", reached=True)
        except oa.OpenAIError as e:  # e.g. a response body the client could not validate
            return _Outcome(error=f"{type(e).__name__}: {short_reason(e)}", reached=True)

        choices = getattr(resp, "choices", None)
        if not choices:
            return _Outcome(error=f"unexpected response without choices: {str(resp)[:200]}", reached=True)
        choice = choices[0]
        msg = choice.message
        content = msg.content if msg is not None else None
        # Reasoning servers (vLLM's reasoning parsers, DeepSeek-style APIs) return the
        # thinking apart from the answer; put it back in the <think> layout the traces use.
        reasoning = getattr(msg, "reasoning_content", None) or getattr(msg, "reasoning", None)
        if isinstance(reasoning, str) and reasoning.strip() and content and "<think>" not in content:
            content = f"<think>{reasoning.strip()}</think>\n{content.strip()}"
        usage = getattr(resp, "usage", None)
        out = _Outcome(
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            answered=True,
            reached=True,
        )
        finish = getattr(choice, "finish_reason", None)
        if isinstance(content, str) and content.strip():
            out.text = content
        else:
            out.error = "empty completion" + (f" (finish_reason={finish})" if finish not in (None, "stop") else "")
        # Cache before anything else sees it: a crash from here on loses nothing paid for.
        self._cache_put(key, puzzle, attempt, out, finish)
        with self._lock:
            self.usage["prompt_tokens"] += out.prompt_tokens
            self.usage["completion_tokens"] += out.completion_tokens
        return out

    # ---- the Teacher protocol ----
    def complete_many(self, items: Sequence[tuple[Puzzle, int]]) -> list[Reply]:
        items = list(items)
        replies: list[Reply | None] = [None] * len(items)
        todo: dict[str, list[int]] = {}  # cache key -> indices of items (duplicates share one call)
        for i, (puzzle, attempt) in enumerate(items):
            key = self.cache_key(puzzle, attempt)
            entry = self._cache_get(key)
            if entry is not None:
                replies[i] = Reply(puzzle.puzzle_id, int(attempt), entry.get("text"),
                                   int(entry.get("prompt_tokens") or 0), int(entry.get("completion_tokens") or 0),
                                   cached=True, error=entry.get("error"))
                with self._lock:
                    self.usage["cached"] += 1
                    if replies[i].text is None:
                        self.usage["errors"] += 1
            else:
                todo.setdefault(key, []).append(i)
        if not todo:
            return replies  # type: ignore[return-value]

        first_wave = min(self.config.concurrency, len(todo))
        reached = False
        fatal: list[_Outcome] = []
        pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="openai-teacher")
        try:
            futures: dict[Future, str] = {}
            for key, idx in todo.items():
                puzzle, attempt = items[idx[0]]
                futures[pool.submit(self._call, puzzle, attempt, key)] = key
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    out = fut.result()
                    self._record(out, items, todo[futures[fut]], replies)
                    if out.reached:
                        reached = True
                    elif out.fatal:
                        fatal.append(out)
                if not reached and len(fatal) >= first_wave:
                    raise CellPuzzlesError(self._unreachable_message(fatal))
        except BaseException:
            # Ctrl-C or the unreachable rule: drop queued calls, let in-flight ones finish
            # (their answers still reach the cache), and do not wait for them.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return replies  # type: ignore[return-value]

    def _record(self, out: _Outcome, items, indices: list[int], replies: list) -> None:
        for n, i in enumerate(indices):
            puzzle, attempt = items[i]
            replies[i] = Reply(puzzle.puzzle_id, int(attempt), out.text, out.prompt_tokens, out.completion_tokens,
                               cached=n > 0, error=out.error)
        with self._lock:
            if out.text is None:
                self.usage["errors"] += len(indices)
                if out.answered:
                    self.usage["empty"] += 1
            if len(indices) > 1:
                self.usage["cached"] += len(indices) - 1

    def _unreachable_message(self, fatal: list[_Outcome]) -> str:
        last = fatal[-1]
        n = len(fatal)
        if last.fatal == "auth":
            return (f"teacher endpoint {self.base_url} refused the API key ({last.error}); "
                    f"check the key in ${self.config.api_key_env}")
        if last.fatal == "not_found":
            return (f"teacher endpoint {self.base_url} has no model {self.config.model!r} or no chat-completions "
                    f"route ({last.error}); check base_url (it usually ends in /v1) and the model name")
        return (f"teacher endpoint {self.base_url} is unreachable (first {n} calls failed to connect: "
                f"{last.error}); check base_url and that the server is running")
