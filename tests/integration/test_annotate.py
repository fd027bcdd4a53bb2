"""`cellpuzzles annotate` on real files: scanpy's pbmc68k_reduced as shipped (11 `louvain`
clusters, X_umap, a scaled X beside raw.X) with the 10 `bulk_labels` types as candidates,
through a local model folder and through a real `cellpuzzles serve`, with the tiny model and
the production-shaped one. The models are untrained: the checks are about the path (rules
kept, local and endpoint agreeing, files written, failures reported), not about accuracy
(benchmarks/annotate_agreement.py measures that with a trained model)."""

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cellpuzzles.annotate.api import annotate
from cellpuzzles.annotate.assignment import assign_columns
from cellpuzzles.annotate.options import AnnotateOptions, Assignment

from helpers.cli import run_cli
from helpers.models import as_scaffold_model, build_world
from helpers.net import free_port
from helpers.production import build_production_model, names_split
from helpers.serving import Server

pytestmark = pytest.mark.slow
TOKEN = "annotate-test-token"
KEY = "cellpuzzles_type"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Untrained tiny and production-shaped models (8 genes per cell) and the analyst's file."""
    import scanpy as sc

    root = tmp_path_factory.mktemp("annotate")
    w = build_world(root, genes_per_cell=8, train_per_n=12, test_per_n=2)
    puzzles, traces = [p for p, _ in w["pairs"]], [t for _, t in w["pairs"]]
    # both marked as trained on the scaffold traces, like the pipeline's models (constrained
    # decoding then needs no free text first)
    tiny = as_scaffold_model(w["folder"], root / "tiny", genes_per_cell=8, restated_genes=6)
    prod = as_scaffold_model(build_production_model(puzzles, traces, root / "prod-init", genes_per_cell=8),
                             root / "prod", genes_per_cell=8, restated_genes=6)
    pbmc = sc.datasets.pbmc68k_reduced()
    f = root / "pbmc68k_reduced.h5ad"
    pbmc.write_h5ad(f)
    cands = sorted(pbmc.obs["bulk_labels"].astype(str).unique())
    (root / "candidates.txt").write_text("\n".join(cands) + "\n")
    return {"root": root, "models": {"tiny": tiny, "production": prod}, "file": f, "cands": cands}


@pytest.fixture(scope="module", params=["tiny", "production"])
def served(request, world):
    """(model name, folder, a real `cellpuzzles serve` of it with a bearer token)."""
    name = request.param
    folder = world["models"][name]
    s = Server(["serve", "--model", str(folder), "--max-batch-size", "8", "--max-wait-ms", "20"],
               world["root"] / f"serve-{name}.log", env={"CELLPUZZLES_API_TOKEN": TOKEN})
    s.wait()
    yield name, folder, s
    s.stop()


def pbmc(world, drop: list[str] = ()):
    x = ad.read_h5ad(world["file"])
    if drop:
        x = x[~x.obs["louvain"].isin(drop)].copy()
        x.obs["louvain"] = x.obs["louvain"].cat.remove_unused_categories()
    return x


def used(table: pd.DataFrame) -> pd.Series:
    return table["assigned_type"].value_counts()


def scores_of(res) -> np.ndarray:
    return res.scores[res.candidates].to_numpy()


def test_local_model_every_assignment_rule(world, served):
    """11 clusters, 10 candidates: capacity=2 by default, scored in two square puzzles; the
    assignment over the combined scores keeps each rule; the production model's names span tokens."""
    name, folder, _ = served
    if name == "production":
        assert sum(n >= 2 for n in names_split(folder, world["cands"]).values()) >= 9  # names of several tokens
    x = pbmc(world)
    res = annotate(x, world["cands"], groupby="louvain", model=folder)
    t = res.table
    assert res.params["assignment"] == "capacity=2" and len(t) == 11 and (t["status"] == "ok").all()
    assert used(t).max() <= 2 and set(t["assigned_type"]) <= set(world["cands"])
    assert t["puzzle"].nunique() == 2 and np.isfinite(scores_of(res)).all()
    assert all(len(s.split(", ")) == 9 for s in t["shared_with"])  # square puzzles: 9 other groups each
    s = scores_of(res)
    chosen = s[np.arange(11), [world["cands"].index(c) for c in t["assigned_type"]]].sum()
    best_single = s.max(1).sum()
    assert chosen <= best_single + 1e-9
    # the same scores under the other rules (deterministic decoding gives the same matrix)
    ind = annotate(x, world["cands"], groupby="louvain", model=folder, assignment="independent")
    assert np.allclose(scores_of(ind), s)
    assert list(ind.table["assigned_type"]) == [world["cands"][j] for j in s.argmax(1)]
    six = pbmc(world, drop=list(x.obs["louvain"].cat.categories[6:]))  # 6 groups, 10 candidates: rectangular
    one = annotate(six, world["cands"], groupby="louvain", model=folder, assignment="one-to-one")
    assert len(one.table) == 6 and used(one.table).max() == 1 and one.table["puzzle"].nunique() == 1
    assert np.isfinite(scores_of(one)).all()
    cols = assign_columns(scores_of(one), Assignment("one-to-one", 1))
    assert list(one.table["assigned_type"]) == [world["cands"][j] for j in cols]
    # to_adata: a categorical obs column following the clusters, the table and request in uns
    out = res.to_adata(KEY, copy=True)
    assert isinstance(out.obs[KEY].dtype, pd.CategoricalDtype)
    by_cluster = dict(zip(t["group"], t["assigned_type"]))
    assert (out.obs[KEY].astype(str) == out.obs["louvain"].astype(str).map(by_cluster)).all()
    assert out.uns[KEY]["params"]["groupby"] == "louvain" and out.uns[KEY]["scores"].shape == (11, 10)


def test_endpoint_gives_the_local_answer(world, served):
    """10 clusters and 10 candidates make one square puzzle: the server's one-to-one answer is
    the local model's (same groups' genes, same context, same decoding)."""
    name, folder, server = served
    x = pbmc(world, drop=[pbmc(world).obs["louvain"].cat.categories[-1]])
    local = annotate(x, world["cands"], groupby="louvain", model=folder, assignment="one-to-one")
    remote = annotate(x, world["cands"], groupby="louvain", endpoint=server.url, token=TOKEN, assignment="one-to-one")
    assert (remote.table["status"] == "ok").all()
    assert list(remote.table["assigned_type"]) == list(local.table["assigned_type"])
    assert remote.scores is None and remote.params["endpoint"] == server.url


def test_cli_through_the_endpoint_writes_file_table_and_plots(world, served, tmp_path):
    name, _, server = served
    if name != "tiny":
        pytest.skip("the CLI's files are the same for both models; the production one is checked above")
    out = tmp_path / "out"
    env = {"CELLPUZZLES_API_TOKEN": TOKEN, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = run_cli("annotate", world["file"], "--groupby", "louvain", "--candidates", world["root"] / "candidates.txt",
                "--endpoint", server.url, "--assignment", "capacity=2", "--out", out, "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    h5 = out / "pbmc68k_reduced.annotated.h5ad"
    back = ad.read_h5ad(h5)
    assert isinstance(back.obs[KEY].dtype, pd.CategoricalDtype) and back.obs[KEY].notna().all()
    table = pd.read_csv(out / "groups.csv")
    assert len(table) == 11 and table["assigned_type"].value_counts().max() <= 2
    assert list(back.uns[KEY]["table"]["assigned_type"]) == list(table["assigned_type"])
    for png in ("umap_cellpuzzles_type.png", "dotplot_cellpuzzles_type.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert "11/11 groups annotated" in r.stdout
    assert not [p for p in out.rglob("*.tmp")]
    # without the token the server refuses: one line, nothing written
    r = run_cli("annotate", world["file"], "--groupby", "louvain", "--candidates", ",".join(world["cands"]),
                "--endpoint", server.url, "--assignment", "capacity=2", "--out", tmp_path / "no-token", "--no-progress",
                env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "CELLPUZZLES_API_TOKEN" in r.stderr
    assert not (tmp_path / "no-token").exists()


class FlakyGateway:
    """A stand-in for a flaky gateway in front of the real server (the one thing here that is
    not the real server): POSTs listed in ``plan`` get that status instead of being forwarded."""

    def __init__(self, target: str, plan: dict[int, int]):
        self.target, self.plan, self.posts = target, plan, 0
        gw = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _forward(self, body=None):
                req = urllib.request.Request(gw.target + self.path, data=body, method=self.command,
                                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                try:
                    with urllib.request.urlopen(req, timeout=120) as r:
                        code, data = r.status, r.read()
                except urllib.error.HTTPError as e:
                    code, data = e.code, e.read()
                self._reply(code, data)

            def _reply(self, code, data):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._forward()

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                gw.posts += 1
                if gw.posts in gw.plan:
                    return self._reply(gw.plan[gw.posts], json.dumps({"error": "gateway says no"}).encode())
                self._forward(body)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def test_endpoint_retries_and_never_loses_a_group(world, served, tmp_path):
    """429/503 are retried; a request that still fails marks only its own groups failed."""
    name, _, server = served
    if name != "tiny":
        pytest.skip("retries are the client's; one model suffices")
    x = pbmc(world)
    gw = FlakyGateway(server.url, {1: 429, 2: 503})  # the first request succeeds on its third try
    try:
        opt = AnnotateOptions(groupby="louvain", assignment="capacity=2", batch_size=1, concurrency=1, retries=3,
                              progress=False)
        res = annotate(x, world["cands"], endpoint=gw.url, token=TOKEN, options=opt)
        assert (res.table["status"] == "ok").all() and gw.posts == 4  # 3 tries + 1
        gw.posts, gw.plan = 0, {2: 503, 3: 503}  # the second puzzle fails twice, with one retry allowed
        opt.retries = 1
        res = annotate(x, world["cands"], endpoint=gw.url, token=TOKEN, options=opt)
    finally:
        gw.close()
    t = res.table
    failed = t[t["status"] != "ok"]
    assert len(t) == 11 and len(failed) == 1 and failed["status"].iloc[0].startswith("failed: endpoint answered HTTP 503")
    assert failed["assigned_type"].isna().all() and t.loc[t["status"] == "ok", "assigned_type"].notna().all()
    annotated = res.to_adata(KEY, copy=True)
    assert annotated.obs[KEY].isna().sum() == (x.obs["louvain"] == failed["group"].iloc[0]).sum()
    annotated.write_h5ad(tmp_path / "partial.h5ad")  # a failed group still writes
    back = ad.read_h5ad(tmp_path / "partial.h5ad").uns[KEY]["table"]
    assert list(back["status"]) == list(t["status"]) and (back["assigned_type"] == "").sum() == 1


def test_free_mode_says_when_the_prompt_is_not_square(world, served):
    name, folder, _ = served
    if name != "tiny":
        pytest.skip("free text is parsed by the same code for both models")
    three = pbmc(world, drop=list(pbmc(world).obs["louvain"].cat.categories[3:]))
    res = annotate(three, world["cands"], groupby="louvain", model=folder, mode="free", assignment="one-to-one")
    assert len(res.table) == 3 and res.scores is None
    assert any("3 groups and 10 candidates, unlike the square puzzles" in n for n in res.notes)
    ok = res.table["status"] == "ok"  # an untrained model's text: labels kept where they name a candidate
    assert set(res.table.loc[ok, "assigned_type"]) <= set(world["cands"])


def write_bad(world, tmp_path, case: str):
    x = pbmc(world)
    if case == "scaled":
        del x.raw  # X alone is the scaled matrix
    f = tmp_path / f"{case}.h5ad"
    x.write_h5ad(f)
    return f


@pytest.mark.parametrize("case, args, message", [
    ("groupby", ["--groupby", "leiden"], "--groupby leiden: obs has no column 'leiden'"),
    ("scaled", [], "X has negative values (scaled data)"),
    ("unreachable", ["--endpoint", "http://127.0.0.1:{port}"], "unreachable"),
])  # the other bad inputs (duplicates, too few candidates, an empty group): tests/unit/test_annotate_groups.py
def test_bad_input_one_line_nothing_written(world, tmp_path, case, args, message):
    f = write_bad(world, tmp_path, case) if case == "scaled" else world["file"]
    args = [a.format(port=free_port()) for a in args]
    base = {"--groupby": "louvain", "--candidates": ",".join(world["cands"])}
    if "--endpoint" not in args:
        base["--model"] = str(world["models"]["tiny"])
    for a, v in zip(args[::2], args[1::2]):
        base[a] = v
    out = tmp_path / "out"
    r = run_cli("annotate", f, *[x for kv in base.items() for x in kv], "--out", out, "--no-progress")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0 and message in r.stderr
    assert not out.exists()


def test_local_scoring_is_decode_constrained(world, served):
    """On square puzzles the scorer annotate uses (which also takes rectangular ones) gives
    exactly decode.constrained's scores and answers: one decoding rule, no drift."""
    from cellpuzzles.annotate.groups import build_groups
    from cellpuzzles.annotate.local import score_puzzles
    from cellpuzzles.annotate.plan import plan_donor
    from cellpuzzles.inference.decode import constrained
    from cellpuzzles.inference.folder import load_model

    _, folder, _ = served
    model, tok, prompt = load_model(folder)
    g = build_groups(pbmc(world), "louvain", 8)
    ctx = g.contexts[g.donors()[0]]
    ps = [prompt.apply(pp.puzzle) for pp in plan_donor("d", list(range(8)), g.genes, ctx, world["cands"][:4], size=4)]
    got = score_puzzles(model, tok, ps, ["", ""], prompt.restated_genes)
    for p, (text, scores, _) in zip(ps, got):
        want_text, want = constrained(model, tok, p, "", prompt.restated_genes)
        assert np.allclose(scores, want, atol=1e-4) and text == want_text
    rect = score_puzzles(model, tok, [prompt.apply(plan_donor("d", [0, 1, 2], g.genes, ctx, world["cands"], 10)[0].puzzle)],
                         [""], prompt.restated_genes)[0]
    assert rect[1].shape == (3, 10) and np.isfinite(rect[1]).all() and len(set(rect[2])) == 3
