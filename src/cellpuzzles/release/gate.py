"""The promotion gate: may a registered version become the ``champion``?

It passes only if, in the served decoding mode, the version's batch accuracy and format
ratio reach their floors, and, when a champion exists, a paired bootstrap (challenger −
champion, per puzzle; resampling test cells when the records carry them, see
evaluation/compare.py) shows it not worse than the champion by more than ``tolerance``
(lower bound of the mean difference >= −tolerance), or better by ``margin`` when one is set
(lower bound >= +margin). Both must have been scored on the same test puzzles (same
``test_sha256``). The per-puzzle quantity is the batch-level exact match (the reference
evaluator's rule), so the mean difference is the batch-accuracy difference.

The report places the challenger beside the champion, the classical peer (logistic regression
on expression, one-to-one), the ceiling of its own input (the same classifier on the gene names
its prompt shows), the marker solver and random, overall and per N — the baselines the puzzles
step scored on the same test puzzles (``baselines.json`` in the evaluation record). With
``peer_tolerance`` set, a challenger below the peer by more than that is refused; it is off by
default because the tiny CPU model is far below the peer (0.33 vs 0.84 on the bundled data) and
would never ship; set it (e.g. 0.05) for a production model that should earn its cost.

On pass, ``champion`` moves to the version and the old champion becomes ``previous``; on
fail nothing moves. Either way the decision is written as ``gate.*`` version tags, as a
markdown report logged to the version's run (``gate/report_v<version>.md``), and into the
version's description, the model card a reviewer reads (release/model_card.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.core.tracking import logged
from cellpuzzles.evaluation.compare import paired_bootstrap, record_weights, solved
from cellpuzzles.evaluation.peers import PEER
from cellpuzzles.release.model_card import comparison, comparison_markdown, model_card
from cellpuzzles.release.registry import (
    CHAMPION,
    DEFAULT_NAME,
    PREVIOUS,
    alias_version,
    read_version_evaluation,
    resolve_version,
    runs_link,
)

REQUIRED = ("batch_accuracy", "format_ratio")


@dataclass
class GateOptions:
    """What the gate demands. The metrics are those of ``mode``, the served decoding mode."""

    min_batch_accuracy: float = 0.1  # floor, above the random baseline (measured: docs/data.md)
    min_format_ratio: float = 0.95
    mode: str = "constrained"
    tolerance: float = 0.02  # largest allowed drop in batch accuracy against the champion
    margin: float | None = None  # required gain instead of 'not worse' (lower bound >= +margin)
    n_boot: int = 2000
    confidence: float = 0.95
    seed: int = 0
    peer_tolerance: float | None = None  # refuse when batch accuracy < the classical peer's - this (None: off)

    def check(self) -> None:
        if not 0.0 < self.confidence < 1.0:
            raise CellPuzzlesError(f"--confidence {self.confidence}: must be between 0 and 1, e.g. 0.95")
        if self.n_boot < 100:
            raise CellPuzzlesError(f"--n-boot {self.n_boot}: use at least 100 bootstrap resamples")
        if self.tolerance < 0:
            raise CellPuzzlesError(f"--tolerance {self.tolerance}: a drop must be >= 0 (e.g. 0.02)")
        if self.peer_tolerance is not None and self.peer_tolerance < 0:
            raise CellPuzzlesError(f"peer_tolerance {self.peer_tolerance}: must be >= 0 (e.g. 0.05), or unset to turn it off")
        if self.mode not in ("constrained", "free"):
            raise CellPuzzlesError(f"--mode {self.mode!r}: choose 'constrained' or 'free'")


@dataclass
class GateDecision:
    passed: bool
    version: str
    reasons: list[str]
    evidence: dict
    report: str = ""
    moved: dict[str, str] = field(default_factory=dict)  # alias -> version, the aliases this call moved


def decide(challenger: dict, champion: dict | None, options: GateOptions,
           genes_shown: int | None = None) -> tuple[list[str], dict]:
    """Failure reasons (empty: pass) and evidence, from two evaluation records (``genes_shown``:
    the genes per cell the challenger's prompt shows, to pick its input ceiling)."""
    o, reasons = options, []
    ev: dict = {"mode": o.mode, "test_sha256": challenger.get("test_sha256")}
    mode = challenger["modes"].get(o.mode)
    metrics = (mode or {}).get("metrics", {})
    if mode is None:
        reasons.append(f"no '{o.mode}' evaluation (modes: {', '.join(challenger['modes']) or 'none'})")
    for k in REQUIRED:
        if mode is not None and not isinstance(metrics.get(k), (int, float)):
            reasons.append(f"metric {o.mode}.{k} is missing")
    ba, fr = metrics.get("batch_accuracy"), metrics.get("format_ratio")
    ev.update(batch_accuracy=ba, format_ratio=fr)
    if isinstance(ba, (int, float)) and ba < o.min_batch_accuracy:
        reasons.append(f"batch accuracy {ba:.4f} < floor {o.min_batch_accuracy}")
    if isinstance(fr, (int, float)) and fr < o.min_format_ratio:
        reasons.append(f"format ratio {fr:.4f} < floor {o.min_format_ratio}")
    if mode is not None:
        ev["comparison"] = comparison(challenger, champion, o.mode, genes_shown)
        peer = (challenger.get("baselines") or {}).get(PEER)
        ev["peer_batch_accuracy"] = peer.get("batch_accuracy") if peer else None
        if o.peer_tolerance is not None and isinstance(ba, (int, float)):
            if peer is None:
                reasons.append("no classical peer scored on these test puzzles (baselines.json from the puzzles step); "
                               "rerun the pipeline, or unset peer_tolerance")
            elif ba < peer["batch_accuracy"] - o.peer_tolerance:
                reasons.append(f"batch accuracy {ba:.4f} < classical peer {peer['batch_accuracy']:.4f} "
                               f"- tolerance {o.peer_tolerance} (logistic regression, one-to-one)")
    if champion is None or mode is None:
        return reasons, ev
    if champion.get("test_sha256") != challenger.get("test_sha256"):
        reasons.append(f"different test sets: challenger test_sha256 {str(challenger.get('test_sha256'))[:12]} vs "
                       f"champion {str(champion.get('test_sha256'))[:12]}; evaluate both on the same test puzzles")
        return reasons, ev
    cmode = champion["modes"].get(o.mode)
    if cmode is None:
        reasons.append(f"the champion has no '{o.mode}' evaluation to compare with")
        return reasons, ev
    new, old = solved(mode), solved(cmode)
    ids = sorted(old)
    if not ids or set(new) != set(old):
        reasons.append("per-puzzle rewards do not cover the same puzzles; re-evaluate with the evaluation step")
        return reasons, ev
    diff = np.asarray([new[i] - old[i] for i in ids])
    weights, scheme = record_weights(challenger, ids, o.n_boot, o.seed)
    delta, lo, hi = paired_bootstrap(diff, o.n_boot, o.confidence, o.seed, weights)
    need = o.margin if o.margin is not None else -o.tolerance
    ev.update(champion_batch_accuracy=float(np.mean([old[i] for i in ids])), delta=delta, ci_low=lo, ci_high=hi,
              resampled=scheme,
              required_ci_low=need, n_paired=len(ids), wins=int((diff > 0).sum()), losses=int((diff < 0).sum()))
    if lo < need:
        test = f"better by {o.margin}" if o.margin is not None else f"not worse by more than {o.tolerance}"
        reasons.append(f"batch accuracy vs champion: delta {delta:+.4f}, {o.confidence:.0%} CI [{lo:+.4f}, {hi:+.4f}]; "
                       f"lower bound < {need:+.4f} (needs {test})")
    return reasons, ev


def report_markdown(name: str, version: str, passed: bool, reasons: list[str], ev: dict, options: GateOptions,
                    rl_vs_sft: dict[str, str] | None = None) -> str:
    lines = [f"# Gate: {name} version {version} — {'PASS' if passed else 'FAIL'}", "",
             f"- mode: `{options.mode}`; test set `{str(ev.get('test_sha256'))[:16]}`",
             f"- champion before: {ev.get('champion_version') or 'none'}", ""]
    lines += ["| check | value | required |", "|---|---|---|"]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines.append(f"| batch accuracy | {fmt(ev.get('batch_accuracy'))} | >= {options.min_batch_accuracy} |")
    lines.append(f"| format ratio | {fmt(ev.get('format_ratio'))} | >= {options.min_format_ratio} |")
    if "delta" in ev:
        lines.append(f"| champion batch accuracy | {fmt(ev['champion_batch_accuracy'])} | |")
        lines.append(f"| delta (paired, {ev['n_paired']} puzzles; {ev['wins']} won, {ev['losses']} lost; "
                     f"resampling test {ev.get('resampled', 'puzzles')}) | "
                     f"{ev['delta']:+.4f} [{ev['ci_low']:+.4f}, {ev['ci_high']:+.4f}] | "
                     f"lower bound >= {ev['required_ci_low']:+.4f} |")
    peer = ev.get("peer_batch_accuracy")
    lines.append(f"| classical peer batch accuracy | {fmt(peer) if peer is not None else 'not scored'} | "
                 + (f">= peer - {options.peer_tolerance} |" if options.peer_tolerance is not None
                    else "off (peer_tolerance unset) |"))
    lines += comparison_markdown(ev.get("comparison"))
    if rl_vs_sft:  # the version's own recipe: did RL improve on its SFT model? (paired, same test puzzles)
        lines += ["", "| RL vs SFT (batch accuracy, paired) | difference [95% CI] |", "|---|---|"]
        lines += [f"| {mode} | {value} |" for mode, value in sorted(rl_vs_sft.items())]
    lines += ["", "## Reasons" if reasons else "All checks passed.", *[f"- {r}" for r in reasons], "",
              f"Options: `{json.dumps(asdict(options))}`", ""]
    return "\n".join(lines)


def genes_shown(tags: dict) -> int | None:
    """Genes per cell the version's prompt shows (its ``config`` tag holds the prompt options)."""
    try:
        k = json.loads(tags.get("config") or "{}").get("prompt", {}).get("genes_per_cell")
    except (json.JSONDecodeError, AttributeError):
        return None
    return k if isinstance(k, int) else None


def gate(name: str = DEFAULT_NAME, version: str | int = "challenger", options: GateOptions | None = None,
         *, tracking_uri: str | None = None) -> GateDecision:
    """Decide whether ``version`` (a number or an alias) becomes the champion; move aliases on pass."""
    from cellpuzzles.release.registry import client

    options = options or GateOptions()
    options.check()
    c = client(tracking_uri)
    mv = resolve_version(c, name, version)
    v = str(mv.version)
    record = read_version_evaluation(c, mv)
    with logged(f"the lookup of the aliases of '{name}'"):
        champ_v = alias_version(c, name, CHAMPION)
    rerun = champ_v == v
    # already champion: compare with the champion it replaced, the same evidence as when it was promoted
    base_v = mv.tags.get("gate.champion_version") if rerun else champ_v
    base_v = base_v if base_v and base_v not in ("none", v) else None
    base = read_version_evaluation(c, resolve_version(c, name, base_v)) if base_v else None
    reasons, ev = decide(record, base, options, genes_shown(mv.tags))
    ev["champion_version"] = base_v
    passed = not reasons
    moved: dict[str, str] = {}
    with logged(f"the recording of the gate decision for '{name}' version {v}"):
        if passed and not rerun:
            if champ_v:
                c.set_registered_model_alias(name, PREVIOUS, champ_v)
                moved[PREVIOUS] = champ_v
            c.set_registered_model_alias(name, CHAMPION, v)
            moved[CHAMPION] = v
        rl_vs_sft = {k.removeprefix("rl_vs_sft."): val for k, val in mv.tags.items() if k.startswith("rl_vs_sft.")}
        report = report_markdown(name, v, passed, reasons, ev, options, rl_vs_sft)
        tags = {"gate.decision": "pass" if passed else "fail", "gate.reasons": "; ".join(reasons)[:5000] or "-",
                "gate.champion_version": base_v or "none", "gate.mode": options.mode,
                "gate.options": json.dumps(asdict(options))}
        for k in ("delta", "ci_low", "ci_high", "batch_accuracy", "format_ratio", "peer_batch_accuracy"):
            if isinstance(ev.get(k), (int, float)):
                tags[f"gate.{k}"] = repr(float(ev[k]))
        for k, val in tags.items():
            c.set_model_version_tag(name, v, k, val)
        card = model_card(name, v, record, dict(mv.tags), options.mode, champion=base, genes_shown=genes_shown(mv.tags),
                          decision={"passed": passed, "reasons": reasons, "evidence": ev},
                          runs_url=runs_link(c, mv.run_id) if mv.run_id else None)
        c.update_model_version(name, v, description=card)  # what the reviewer reads on the version page
        if mv.run_id:
            c.log_text(mv.run_id, report, f"gate/report_v{v}.md")
    return GateDecision(passed=passed, version=v, reasons=reasons, evidence=ev, report=report, moved=moved)
