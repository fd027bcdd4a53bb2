"""Verify a deployment before it takes traffic: evaluate the new service over HTTP on a
sample of the registered test puzzles (stratified by N), and compare with the evaluation the
version was registered (and gated) with.

It fails when
  * the served batch accuracy on the sample is below the gate's floor (GateOptions, the one
    definition of the floors), or
  * the served answers disagree with the registered ones on more than ``tolerance`` of the
    sampled puzzles (a puzzle disagrees when its served labels differ from the registered
    completion's, ``predictions_<mode>.jsonl`` of the version's evaluation; a record without
    completions compares the puzzle's reward): the service does not run the model that was
    evaluated (other weights, prompt options, tokenizer or decoding).

``deploy_checked`` rolls back an applied deployment to the ``previous`` version when
verification fails. The pipeline's deploy step (steps/release.py::deploy_step) goes through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.evaluation.compare import score_puzzles
from cellpuzzles.evaluation.endpoint import EndpointOptions, served_completions
from cellpuzzles.evaluation.record import puzzles_sha256
from cellpuzzles.evaluation.subset import stratified
from cellpuzzles.release.gate import GateOptions
from cellpuzzles.task.puzzle import Puzzle, extract_answer, split_labels
from cellpuzzles.task.reward import batch_reward


@dataclass
class VerifyOptions:
    # the new service's V1 route (cellpuzzles serve, or serve-transformer in front of vLLM); None: the
    # applied InferenceService's own URL (deploy_checked reads it from the ready service)
    url: str | None = None
    puzzles: str | None = None  # the test split the version was evaluated on (deploy_checked reads it)
    sample: int = 24  # test puzzles sent, stratified by N
    mode: str = "constrained"  # the served mode the gate decided on
    tolerance: float = 0.1  # largest share of sampled puzzles whose served answer may differ from the registered
    min_batch_accuracy: float = field(default_factory=lambda: GateOptions().min_batch_accuracy)
    concurrency: int = 4

    def check(self) -> None:
        if self.sample < 1:
            raise CellPuzzlesError(f"--verify-sample {self.sample}: must be at least 1")
        if not 0 <= self.tolerance <= 1:
            raise CellPuzzlesError(f"--verify-tolerance {self.tolerance}: must be between 0 and 1")


@dataclass
class Verification:
    passed: bool
    reasons: list[str]
    batch_accuracy: float
    registered_batch_accuracy: float
    disagreement: float
    n: int

    def summary(self) -> str:
        state = "passed" if self.passed else "FAILED: " + "; ".join(self.reasons)
        return (f"verification on {self.n} test puzzles: batch accuracy {self.batch_accuracy:.3f} served vs "
                f"{self.registered_batch_accuracy:.3f} registered, {self.disagreement:.0%} of puzzles answered "
                f"differently; {state}")


def labels(completion: str) -> list[str]:
    """The answer's labels as the metrics compare them (case and spacing aside)."""
    return [x.strip().lower() for x in split_labels(extract_answer(completion) or "")]


def verify(opt: VerifyOptions, test: Sequence[Puzzle], record: dict,
           registered: dict[str, str] | None = None) -> Verification:
    """Evaluate the service at ``opt.url`` on a stratified sample of ``test`` (the puzzles of the
    registered evaluation ``record``, from read_evaluation) and decide; ``registered`` holds the
    recorded completions by puzzle id, when the record kept them."""
    opt.check()
    mode = (record.get("modes") or {}).get(opt.mode)
    if not mode or not isinstance(mode.get("rewards"), dict):
        raise CellPuzzlesError(f"the registered evaluation has no '{opt.mode}' mode to verify against; "
                               "verify the mode it was evaluated in")
    if record.get("test_sha256") != puzzles_sha256(test):
        # an evaluation limited to a stratified subset of the split (the pipeline's eval_options
        # limit) recorded that subset: the split's puzzles it evaluated, in the split's order
        test = [p for p in test if p.puzzle_id in mode["rewards"]]
    if record.get("test_sha256") != puzzles_sha256(test):
        raise CellPuzzlesError("--verify-puzzles: not the test set the version was evaluated on (its sha256 differs); "
                               "pass that test.jsonl")
    sample = stratified(list(test), opt.sample)
    completions = served_completions(EndpointOptions(url=opt.url, concurrency=opt.concurrency), sample, opt.mode)
    acc = float(score_puzzles(sample, completions, n_boot=0)["batch_accuracy"])
    rewards, exact = mode["rewards"], mode.get("exact") or {}
    if registered:
        differ = [p.puzzle_id for p, c in zip(sample, completions)
                  if p.puzzle_id not in registered or labels(c) != labels(registered[p.puzzle_id])]
    else:  # NaN (a puzzle missing from the record) never counts as the same
        differ = [p.puzzle_id for p, c in zip(sample, completions)
                  if not abs(batch_reward(c, p.answer_text) - float(rewards.get(p.puzzle_id, "nan"))) < 1e-9]
    share = len(differ) / len(sample)
    reasons = []
    if acc < opt.min_batch_accuracy:
        reasons.append(f"served batch accuracy {acc:.3f} < the gate's floor {opt.min_batch_accuracy}")
    if share > opt.tolerance:
        reasons.append(f"{len(differ)} of {len(sample)} puzzles answered differently from the registered evaluation "
                       f"({share:.0%} > tolerance {opt.tolerance:.0%}; e.g. {differ[0]})")
    reg_acc = sum(bool(exact.get(p.puzzle_id)) for p in sample) / len(sample)
    return Verification(not reasons, reasons, acc, reg_acc, share, len(sample))


def registered_completions(c, mv, mode: str) -> dict[str, str] | None:
    """The completions a version was evaluated with (its run's evaluation/predictions_<mode>.jsonl),
    or None when the run did not keep them."""
    import tempfile

    from cellpuzzles.core.records import read_jsonl
    from cellpuzzles.release.registry import EVAL_ARTIFACT

    name = f"predictions_{mode}.jsonl"
    if not mv.run_id or not any(a.path.endswith(name) for a in c.list_artifacts(mv.run_id, EVAL_ARTIFACT)):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = c.download_artifacts(mv.run_id, f"{EVAL_ARTIFACT}/{name}", tmp)
        return {rec["puzzle_id"]: rec["completion"] for _, rec in read_jsonl(local)
                if isinstance(rec, dict) and isinstance(rec.get("completion"), str)}


def deploy_checked(verification: VerifyOptions | None, options):
    """``release.deploy.deploy``, then, with ``verification``, the new service is evaluated before
    it is trusted (at ``verification.url``, or the applied InferenceService's own URL): when it
    fails, an applied deployment is rolled back to the ``previous`` version, and either way the
    deploy ends with one error line saying why. On success the verification's summary ends the
    result's message."""
    import sys

    from cellpuzzles.release.deploy import _render_version, apply_and_wait, deploy, kserve_client, service_url
    from cellpuzzles.release.registry import PREVIOUS, alias_version, client, read_version_evaluation, resolve_version
    from cellpuzzles.task.puzzle import read_puzzles

    if verification is not None:
        verification.check()
        if not verification.puzzles:
            raise CellPuzzlesError("--verify needs --verify-puzzles TEST.jsonl, the test split the version was "
                                   "evaluated on")
        if not verification.url and not options.apply:
            raise CellPuzzlesError("verification needs the service's URL: give it, or apply the deployment so "
                                   "the InferenceService's own URL is verified")
        test = read_puzzles(verification.puzzles)
    result = deploy(options)
    if verification is None or (result.applied and not result.ready):
        return result
    o = options
    c = client(o.tracking_uri)
    mv = resolve_version(c, o.name, result.version)
    url = verification.url or service_url(kserve_client(o.kubeconfig), o.namespace, o.service)

    def fail(why: str):
        if not result.applied:
            raise CellPuzzlesError(f"{why}; nothing was applied, so nothing was rolled back")
        prev = alias_version(c, o.name, PREVIOUS)
        if not prev or prev == str(mv.version):
            raise CellPuzzlesError(f"{why}; no 'previous' version to roll back to")
        _, back, _ = _render_version(o, resolve_version(c, o.name, prev))
        ok = apply_and_wait(kserve_client(o.kubeconfig), back, o.timeout_s, o.poll_s)
        state = "ready" if ok else f"NOT ready within {o.timeout_s}s"
        raise CellPuzzlesError(f"{why}; rolled back {o.namespace}/{o.service} to the previous version {prev} ({state})")

    if not url:
        fail(f"InferenceService {o.namespace}/{o.service} is ready but reports no URL (status.address.url, "
             "status.url) to verify; give the verify URL")
    try:
        v = verify(replace(verification, url=url), test, read_version_evaluation(c, mv),
                   registered_completions(c, mv, verification.mode))
    except CellPuzzlesError as e:  # unreachable, or answering with errors: not verified either
        if not result.applied:
            raise
        fail(f"{url} could not be verified: {e}")
    if not v.passed:
        fail(f"{url} {v.summary()}")
    print(v.summary(), file=sys.stderr)
    result.message += f"; {url} {v.summary()}"
    return result
