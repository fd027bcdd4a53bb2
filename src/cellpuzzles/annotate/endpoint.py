"""Answering puzzles through the endpoint (`cellpuzzles serve`, its V1 route).

Instances go in batches (the server micro-batches them), at most ``concurrency`` requests in
flight; a request answered 429 or 5xx (or a dropped connection) is retried with exponential
backoff (urllib3's ``Retry``, honouring Retry-After). A batch that still fails is reported on
its puzzles' groups; the others are kept. The V1 route answers each instance with a one-to-one
assignment (no scores), so every puzzle must have one candidate per group."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from cellpuzzles.annotate.answers import PuzzleAnswer, shape_note
from cellpuzzles.core.errors import CellPuzzlesError, short_reason
from cellpuzzles.task.puzzle import Puzzle, parse_context

# the server's names (serving/protocol.py MODEL_NAME, serving/http.py TOKEN_ENV); annotate may
# not import serving, tests/unit/test_annotate_groups.py checks they agree
MODEL_NAME = "cellpuzzles"
TOKEN_ENV = "CELLPUZZLES_API_TOKEN"
RETRY_STATUS = (429, 500, 502, 503, 504)


def instance(p: Puzzle, mode: str) -> dict:
    """The V1 instance of a puzzle: context fields, ranked genes per group, candidates."""
    return {"context": parse_context(p.context) or p.context,
            "cells": [{"id": cid, "genes": list(g)} for cid, g in zip(p.cell_ids, p.genes)],
            "candidates": list(p.candidates), "mode": mode}


class Endpoint:
    def __init__(self, url: str, token: str | None = None, batch_size: int = 8, concurrency: int = 2,
                 retries: int = 4, timeout_s: float = 300.0, backoff_s: float = 0.5):
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.batch_size, self.concurrency, self.timeout_s = batch_size, concurrency, timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self._local = threading.local()

    def _session(self):
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            retry = Retry(total=self.retries, connect=self.retries, read=0, status=self.retries,
                          backoff_factor=self.backoff_s, status_forcelist=RETRY_STATUS,
                          allowed_methods=None, respect_retry_after_header=True, raise_on_status=False)
            s.mount("http://", HTTPAdapter(max_retries=retry))
            s.mount("https://", HTTPAdapter(max_retries=retry))
            if self.token:
                s.headers["Authorization"] = f"Bearer {self.token}"
            self._local.session = s
        return s

    def check(self) -> None:
        """The model route answers and the model is loaded; else one clear line."""
        import requests

        where = f"--endpoint {self.url}"
        try:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            r = requests.get(f"{self.url}/v1/models/{MODEL_NAME}", headers=headers, timeout=min(self.timeout_s, 30))
        except requests.RequestException as e:
            raise CellPuzzlesError(f"{where}: unreachable ({short_reason(e, 120)}); start `cellpuzzles serve` "
                                   "or check the URL") from None
        if r.status_code == 401:
            raise CellPuzzlesError(f"{where}: 401 unauthorised; set {TOKEN_ENV} to the server's token")
        if r.status_code == 404:
            raise CellPuzzlesError(f"{where}: no model '{MODEL_NAME}' there (404); point at a `cellpuzzles serve` endpoint")
        if r.status_code != 200:
            raise CellPuzzlesError(f"{where}: model not ready (HTTP {r.status_code}); wait for it to load and retry")

    def check_puzzles(self, puzzles: Sequence[Puzzle]) -> None:
        """Every puzzle has one candidate per group (what the V1 route takes); else one clear line."""
        for p in puzzles:
            if p.n != len(p.candidates):
                raise CellPuzzlesError(
                    f"--endpoint: a puzzle of donor '{p.donor_id}' has {p.n} groups and {len(p.candidates)} candidates; "
                    "the V1 route takes one candidate per group: use --model for rectangular puzzles, or give as many "
                    "candidates as the donor has groups")

    def answer(self, puzzles: Sequence[Puzzle], mode: str) -> list[PuzzleAnswer]:
        self.check_puzzles(puzzles)
        batches = [list(range(s, min(len(puzzles), s + self.batch_size))) for s in range(0, len(puzzles), self.batch_size)]
        out: list[PuzzleAnswer | None] = [None] * len(puzzles)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for idx, answers in zip(batches, pool.map(lambda b: self._post([puzzles[i] for i in b], mode), batches)):
                for i, a in zip(idx, answers):
                    out[i] = a
        return out  # type: ignore[return-value]

    def _post(self, puzzles: list[Puzzle], mode: str) -> list[PuzzleAnswer]:
        import requests

        def failed(why: str) -> list[PuzzleAnswer]:
            return [PuzzleAnswer(labels=[None] * p.n, error=why) for p in puzzles]

        body = {"instances": [instance(p, mode) for p in puzzles], "mode": mode}
        try:
            r = self._session().post(f"{self.url}/v1/models/{MODEL_NAME}:predict", json=body, timeout=self.timeout_s)
        except requests.RequestException as e:
            return failed(f"endpoint request failed after {self.retries} retries: {short_reason(e, 120)}")
        if r.status_code in (401, 403):  # not transient: stop, nothing is written
            raise CellPuzzlesError(f"--endpoint {self.url}: HTTP {r.status_code} on predict; set {TOKEN_ENV} to the "
                                   "server's token")
        if r.status_code != 200:
            try:
                detail = r.json().get("error") or r.json().get("detail") or r.text
            except ValueError:
                detail = r.text
            return failed(f"endpoint answered HTTP {r.status_code}: {short_reason(ValueError(str(detail)), 160)}")
        preds = r.json().get("predictions") or []
        if len(preds) != len(puzzles):
            return failed(f"endpoint returned {len(preds)} predictions for {len(puzzles)} puzzles")
        out = []
        for p, pred in zip(puzzles, preds):
            got = pred.get("assignments") or {}
            labels = [got.get(cid) for cid in p.cell_ids]
            said = pred.get("answer") or []
            if not got and len(said) == p.n:  # a free answer that is not a valid assignment: keep its known labels
                canon = {c.lower(): c for c in p.candidates}
                labels = [canon.get(str(x).strip().lower()) for x in said]
            notes = [n for n in ((shape_note(p) if mode == "free" else None),
                                 (None if pred.get("valid") else f"answer not valid: {pred.get('reason')}")) if n]
            out.append(PuzzleAnswer(labels=labels, completion=pred.get("completion") or "", notes=notes))
        return out
