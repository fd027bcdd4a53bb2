"""Synthetic CELLxGENE-schema .h5ad files, for testing context fields and scale.

``synthesize(out, cells=..., genes=...)`` writes raw integer counts (float32 CSR) with
cell-type marker structure, a donor effect, lognormal library sizes and a chosen
sparsity, plus CELLxGENE-style obs/var columns. The matrix is generated and written in
chunks, so a million cells need a few hundred MB of memory.

Model, per cell: a library of ``L`` reads (lognormal around a per-type mean that is
calibrated so the expected fraction of non-zero entries is ``density``) is drawn from a
mixture of three gene profiles: the cell's type profile (base expression with the type's
~20 markers boosted), its donor's profile (base expression with donor-specific gene
noise) and a mitochondrial profile (a per-cell share, like real stressed cells). Counts
are the per-gene tallies of the draws. Generation blocks of cells have their own random
streams, so X depends on ``seed`` and the shape only, not on ``chunk_size``.

Each donor has a fixed sex, age, ethnicity, disease, tissue and batch, and a random
subset (3 to all) of the cell types with unequal proportions (some types are rare).
Every donor gets at least 3 types whenever ``cells >= 3 * donors``.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem
from tqdm.auto import tqdm

from cellpuzzles.core.atomic import atomic_path
from cellpuzzles.core.errors import CellPuzzlesError

# (name, Cell Ontology id, real marker symbols). Marker symbols are unique across types.
CELL_TYPES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("CD4-positive, alpha-beta T cell", "CL:0000624", ("CD3E", "CD3D", "CD4", "IL7R", "CCR7")),
    ("B cell", "CL:0000236", ("MS4A1", "CD79A", "CD79B", "CD19", "BANK1")),
    ("natural killer cell", "CL:0000623", ("NKG7", "GNLY", "KLRD1", "KLRF1", "NCAM1")),
    ("classical monocyte", "CL:0000860", ("LYZ", "CD14", "S100A8", "S100A9", "VCAN")),
    ("CD8-positive, alpha-beta T cell", "CL:0000625", ("CD8A", "CD8B", "GZMK", "CD3G", "LAG3")),
    ("non-classical monocyte", "CL:0000875", ("FCGR3A", "MS4A7", "CDKN1C", "LST1", "IFITM3")),
    ("plasmacytoid dendritic cell", "CL:0000784", ("LILRA4", "IL3RA", "CLEC4C", "IRF7", "TCF4")),
    ("conventional dendritic cell", "CL:0000990", ("FCER1A", "CD1C", "CLEC10A", "HLA-DQA1", "CLEC9A")),
    ("platelet", "CL:0000233", ("PPBP", "PF4", "GP9", "ITGA2B", "TUBB1")),
    ("plasma cell", "CL:0000786", ("JCHAIN", "MZB1", "IGHG1", "XBP1", "SDC1")),
    ("regulatory T cell", "CL:0000815", ("FOXP3", "IL2RA", "CTLA4", "IKZF2", "TIGIT")),
    ("mucosal invariant T cell", "CL:0000940", ("SLC4A10", "KLRB1", "TRAV1-2", "ZBTB16", "RORC")),
    ("gamma-delta T cell", "CL:0000798", ("TRDC", "TRGC1", "TRGC2", "TRDV2", "TRGV9")),
    ("erythrocyte", "CL:0000232", ("HBB", "HBA1", "HBA2", "ALAS2", "CA1")),
    ("hematopoietic stem cell", "CL:0000037", ("CD34", "PROM1", "CRHBP", "AVP", "SPINK2")),
    ("naive B cell", "CL:0000788", ("TCL1A", "IGHD", "FCER2", "IL4R", "YBX3")),
    ("memory B cell", "CL:0000787", ("CD27", "AIM2", "TNFRSF13B", "SSPN", "COCH")),
    ("neutrophil", "CL:0000775", ("CSF3R", "FCGR3B", "CXCR2", "MNDA", "S100A12")),
    ("mast cell", "CL:0000097", ("TPSAB1", "CPA3", "KIT", "MS4A2", "HDC")),
)
MT_GENES = ("MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3",
            "MT-ND3", "MT-ND4L", "MT-ND4", "MT-ND5", "MT-ND6", "MT-CYB")
RIBO_GENES = ("RPL3", "RPL4", "RPS2", "RPS3", "RPL5", "RPS3A", "RPL6", "RPS4X", "RPL7",
              "RPS5", "RPL7A", "RPS6", "RPL8", "RPS8", "RPL9", "RPS12", "RPL10", "RPS18",
              "RPL11", "RPL13")
HOUSEKEEPING = ("MALAT1", "B2M", "TMSB4X", "ACTB", "GAPDH")

TISSUES = (("blood", "UBERON:0000178", 0.7), ("bone marrow", "UBERON:0002371", 0.1),
           ("spleen", "UBERON:0002106", 0.1), ("lymph node", "UBERON:0000029", 0.1))
DISEASES = (("normal", "PATO:0000461", 0.6), ("COVID-19", "MONDO:0100096", 0.2),
            ("systemic lupus erythematosus", "MONDO:0007915", 0.1),
            ("type 2 diabetes mellitus", "MONDO:0005148", 0.1))
SEXES = (("female", "PATO:0000383", 0.5), ("male", "PATO:0000384", 0.5))
ETHNICITIES = (("European", "HANCESTRO:0005", 0.4), ("Han Chinese", "HANCESTRO:0027", 0.15),
               ("African American", "HANCESTRO:0568", 0.15), ("Japanese", "HANCESTRO:0019", 0.1),
               ("Hispanic or Latin American", "HANCESTRO:0014", 0.1),
               ("South Asian", "HANCESTRO:0006", 0.05), ("unknown", "unknown", 0.05))
ASSAYS = (("10x 3' v3", "EFO:0009922", 0.6), ("10x 3' v2", "EFO:0009899", 0.25),
          ("10x 5' v2", "EFO:0009900", 0.15))

MARKERS_PER_TYPE = 20
DONOR_SHARE = 0.15      # share of a cell's reads drawn from its donor profile
TALLY_PER_BLOCK = 8_000_000  # bounds the per-block dense tally (cells_in_block * genes)
DRAWS_PER_BLOCK = 4_000_000  # bounds the per-block read draws (cells_in_block * mean library)
LIBSIZE_SIGMA = 0.5     # per-cell lognormal library-size spread
SCHEMA_VERSION = "5.2.0"


def _check(name: str, ok: bool, got, fix: str) -> None:
    if not ok:
        raise CellPuzzlesError(f"synthesize: {name}={got!r} is invalid; {fix}")


def _validate(cells, genes, donors, types, density, chunk_size) -> None:
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    _check("cells", is_int(cells) and cells >= 1, cells, "pass cells=1 or more")
    _check("genes", is_int(genes) and genes >= 50, genes, "pass genes=50 or more")
    _check("donors", is_int(donors) and donors >= 1, donors, "pass donors=1 or more")
    _check("types", is_int(types) and types >= 3, types, "pass types=3 or more")
    _check("chunk_size", is_int(chunk_size) and chunk_size >= 1, chunk_size, "pass chunk_size=1 or more")
    ok = isinstance(density, (int, float, np.floating)) and not isinstance(density, bool) and 0.0 < float(density) < 1.0
    _check("density", ok, density, "pass a fraction strictly between 0 and 1, e.g. density=0.05")


def _pick(rng: np.random.Generator, table, n: int) -> np.ndarray:
    p = np.array([row[-1] for row in table], dtype=float)
    return rng.choice(len(table), size=n, p=p / p.sum())


def _type_table(types: int) -> list[tuple[str, str, tuple[str, ...]]]:
    out = list(CELL_TYPES[:types])
    width = max(3, len(str(types)))
    for i in range(len(out), types):
        out.append((f"synthetic cell type {i + 1:0{width}d}", f"CL:9{i + 1:06d}", ()))
    return out


# ---------------------------------------------------------------- genes


def _make_genes(rng: np.random.Generator, genes: int, type_table):
    """Symbols, and the gene profiles: type (types x G), donor base, mitochondrial."""
    n_types = len(type_table)
    n_mt = min(len(MT_GENES), max(2, genes // 40))
    n_rp = min(len(RIBO_GENES), max(2, genes // 40))
    n_hk = min(len(HOUSEKEEPING), genes // 100)
    n_special = n_mt + n_rp + n_hk
    n_avail = genes - n_special
    per_type = max(1, min(MARKERS_PER_TYPE, n_avail // n_types))

    # gene positions are shuffled so gene families are not contiguous
    pos = rng.permutation(genes)
    mt_idx = pos[:n_mt]
    rp_idx = pos[n_mt:n_mt + n_rp]
    hk_idx = pos[n_mt + n_rp:n_special]
    rest = pos[n_special:]
    # markers: per_type consecutive genes of `rest` per type (wrapping round if genes are short)
    marker_idx = np.stack([rest[(t * per_type + np.arange(per_type)) % n_avail] for t in range(n_types)])

    symbols = np.array([f"SYNG{i + 1:05d}" for i in range(genes)], dtype=object)
    symbols[mt_idx] = MT_GENES[:n_mt]
    symbols[rp_idx] = RIBO_GENES[:n_rp]
    symbols[hk_idx] = HOUSEKEEPING[:n_hk]
    named = np.zeros(genes, dtype=bool)
    for t, (_, _, real) in enumerate(type_table):
        for g, sym in zip(marker_idx[t], real):
            if not named[g]:
                symbols[g] = sym
                named[g] = True

    # base expression: heavy-tailed, with ribosomal/housekeeping high and MT moderate
    base = rng.lognormal(0.0, 1.5, genes)
    base[rp_idx] *= rng.uniform(60, 200, n_rp)
    base[hk_idx] *= rng.uniform(100, 300, n_hk)
    base[mt_idx] *= rng.uniform(5, 20, n_mt)
    markers_all = np.unique(marker_idx)
    base[markers_all] *= 0.2  # markers are low outside their type
    floor = base.mean() * 0.05  # no gene is vanishingly rare, so any density is reachable
    base = base + floor

    type_prof = np.tile(base, (n_types, 1))
    for t in range(n_types):
        # strongest boosts go to the first markers, which carry the real symbols
        boost = np.sort(rng.lognormal(math.log(60.0), 0.6, per_type))[::-1]
        type_prof[t, marker_idx[t]] *= boost
    type_prof /= type_prof.sum(axis=1, keepdims=True)

    mt_prof = np.full(genes, 0.0)
    mt_prof[mt_idx] = base[mt_idx]
    mt_prof /= mt_prof.sum()
    return symbols, base, type_prof, mt_prof, marker_idx


def _alias(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker alias tables (prob float32, alias int32) for each row of p (rows sum to 1)."""
    k, n = p.shape
    prob = np.ones((k, n), dtype=np.float64)
    alias = np.tile(np.arange(n, dtype=np.int32), (k, 1))
    for r in range(k):
        q = p[r] * n
        small = [i for i in range(n) if q[i] < 1.0]
        large = [i for i in range(n) if q[i] >= 1.0]
        while small and large:
            s = small.pop()
            lg = large[-1]
            prob[r, s] = q[s]
            alias[r, s] = lg
            q[lg] = q[lg] + q[s] - 1.0
            if q[lg] < 1.0:
                large.pop()
                small.append(lg)
        # leftovers (numerical noise) keep prob 1 / alias self
    return prob.astype(np.float32), alias


def _calibrate(prof: np.ndarray, density: float, genes: int) -> np.ndarray:
    """Mean library size per profile row so the expected non-zero fraction is `density`.

    Expected distinct genes for L draws from p: sum_g 1 - (1 - p_g)^L, averaged over the
    lognormal library-size spread (a fixed quantile grid).
    """
    z = np.linspace(-2.5, 2.5, 21)
    w = np.exp(-0.5 * z * z)
    w /= w.sum()
    f = np.exp(LIBSIZE_SIGMA * z - 0.5 * LIBSIZE_SIGMA**2)
    target = density * genes
    out = np.empty(prof.shape[0])
    for r0 in range(0, prof.shape[0], 32):
        logq = np.log1p(-np.clip(prof[r0:r0 + 32], 0, 1 - 1e-12))  # (k, G)
        lo = np.full(logq.shape[0], math.log(1.0))
        hi = np.full(logq.shape[0], math.log(1e9))
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            L = np.exp(mid)[:, None, None] * f[None, :, None]  # (k, 21, 1)
            d = (1.0 - np.exp(L * logq[:, None, :])).sum(axis=2) @ w
            up = d < target
            lo = np.where(up, mid, lo)
            hi = np.where(up, hi, mid)
        out[r0:r0 + 32] = np.exp(0.5 * (lo + hi))
    return out


# ---------------------------------------------------------------- obs


def _make_obs(rng: np.random.Generator, cells: int, donors: int, type_table, n_batches: int):
    n_types = len(type_table)
    width = max(2, len(str(donors)))
    donor_names = [f"donor{d + 1:0{width}d}" for d in range(donors)]

    # per-donor fixed metadata
    sex = _pick(rng, SEXES, donors)
    age = rng.integers(20, 81, donors)
    eth = _pick(rng, ETHNICITIES, donors)
    dis = _pick(rng, DISEASES, donors)
    tis = _pick(rng, TISSUES, donors)
    batch_of_donor = rng.integers(0, n_batches, donors)
    assay_of_batch = _pick(rng, ASSAYS, n_batches)

    # global type abundance: unequal, the last ~quarter of types are rare
    abundance = rng.lognormal(0.0, 0.8, n_types)
    rare = rng.permutation(n_types)[: max(1, n_types // 4)]
    abundance[rare] *= 0.03

    # donor sizes: at least 3 cells each when possible, the rest Dirichlet-multinomial
    reserve = 3 if cells >= 3 * donors else 0
    sizes = reserve + rng.multinomial(cells - reserve * donors, rng.dirichlet(np.full(donors, 3.0)))

    donor_codes = np.repeat(np.arange(donors), sizes)
    type_codes = np.empty(cells, dtype=np.int64)
    within = np.empty(cells, dtype=np.int64)
    start = 0
    for d in range(donors):
        n = int(sizes[d])
        k = int(rng.integers(3, n_types + 1))
        subset = np.sort(rng.choice(n_types, size=k, replace=False))
        props = abundance[subset] * rng.lognormal(0.0, 0.5, k)
        props /= props.sum()
        t = subset[rng.choice(k, size=n, p=props)]
        if reserve:  # three distinct types guaranteed
            t[:3] = rng.choice(subset, size=3, replace=False)
        type_codes[start:start + n] = t
        within[start:start + n] = np.arange(n)
        start += n

    order = rng.permutation(cells)
    donor_codes, type_codes, within = donor_codes[order], type_codes[order], within[order]

    cw = max(6, len(str(int(sizes.max()) if donors else 1)))
    index = [f"syn-{donor_names[d]}-{i:0{cw}d}" for d, i in zip(donor_codes.tolist(), within.tolist())]

    def cat(codes_per_donor, table, j=0):
        names = [row[j] for row in table]
        return pd.Categorical.from_codes(np.asarray(codes_per_donor)[donor_codes], categories=names)

    batch_names = [f"batch{b + 1:02d}" for b in range(n_batches)]
    cell_batch = batch_of_donor[donor_codes]
    obs = pd.DataFrame(index=pd.Index(index, dtype=object))
    obs["donor_id"] = pd.Categorical.from_codes(donor_codes, categories=donor_names)
    obs["cell_type"] = pd.Categorical.from_codes(type_codes, categories=[r[0] for r in type_table])
    obs["cell_type_ontology_term_id"] = pd.Categorical.from_codes(type_codes, categories=[r[1] for r in type_table])
    obs["tissue"] = cat(tis, TISSUES)
    obs["tissue_ontology_term_id"] = cat(tis, TISSUES, 1)
    obs["disease"] = cat(dis, DISEASES)
    obs["disease_ontology_term_id"] = cat(dis, DISEASES, 1)
    obs["sex"] = cat(sex, SEXES)
    obs["sex_ontology_term_id"] = cat(sex, SEXES, 1)
    ages = sorted(set(age.tolist()))
    obs["development_stage"] = pd.Categorical.from_codes(
        np.searchsorted(ages, age)[donor_codes], categories=[f"{a}-year-old stage" for a in ages])
    obs["self_reported_ethnicity"] = cat(eth, ETHNICITIES)
    obs["self_reported_ethnicity_ontology_term_id"] = cat(eth, ETHNICITIES, 1)
    obs["assay"] = pd.Categorical.from_codes(assay_of_batch[cell_batch], categories=[r[0] for r in ASSAYS])
    obs["assay_ontology_term_id"] = pd.Categorical.from_codes(assay_of_batch[cell_batch], categories=[r[1] for r in ASSAYS])
    obs["batch"] = pd.Categorical.from_codes(cell_batch, categories=batch_names)
    obs["suspension_type"] = pd.Categorical.from_codes(np.zeros(cells, dtype=np.int8), categories=["cell"])
    obs["is_primary_data"] = np.ones(cells, dtype=bool)
    for c in obs.columns:
        if isinstance(obs[c].dtype, pd.CategoricalDtype):
            obs[c] = obs[c].cat.remove_unused_categories()
    return obs, donor_codes, type_codes


# ---------------------------------------------------------------- X


class _Model:
    def __init__(self, type_prof, donor_prof, mt_prof, mean_lib, donor_depth, cell_type, cell_donor, seed):
        self.G = type_prof.shape[1]
        self.n_types = type_prof.shape[0]
        self.n_donors = donor_prof.shape[0]
        profiles = np.vstack([type_prof, donor_prof, mt_prof[None, :]])
        prob, alias = _alias(profiles)
        self.prob = prob.ravel()
        self.alias = alias.ravel()
        self.mean_lib = mean_lib
        self.donor_depth = donor_depth
        self.cell_type = cell_type
        self.cell_donor = cell_donor
        self.seed = seed
        self.block = int(max(1, min(8192, TALLY_PER_BLOCK // self.G, DRAWS_PER_BLOCK // (mean_lib.max() * 1.5))))

    def n_blocks(self, cells: int) -> int:
        return -(-cells // self.block)

    def block_csr(self, b: int, cells: int) -> sp.csr_matrix:
        G = self.G
        a, z = b * self.block, min(cells, (b + 1) * self.block)
        n = z - a
        rng = np.random.default_rng([self.seed, 1, b])
        t = self.cell_type[a:z]
        d = self.cell_donor[a:z]
        lib = self.mean_lib[t] * self.donor_depth[d] * rng.lognormal(-0.5 * LIBSIZE_SIGMA**2, LIBSIZE_SIGMA, n)
        L = np.maximum(rng.poisson(lib), 1)
        mt = rng.beta(1.5, 40.0, n)
        shares = np.stack([np.full(n, 1.0 - DONOR_SHARE) * (1.0 - mt), np.full(n, DONOR_SHARE) * (1.0 - mt), mt], axis=1)
        comp = rng.multinomial(L, shares)  # (n, 3) draws per component
        prof = np.stack([t, self.n_types + d, np.full(n, self.n_types + self.n_donors)], axis=1)
        flat_counts = comp.ravel()
        prof_of_draw = np.repeat(prof.ravel().astype(np.int32), flat_counts)
        cell_of_draw = np.repeat(np.repeat(np.arange(n, dtype=np.int32), 3), flat_counts)
        T = prof_of_draw.size
        j = rng.integers(0, G, T, dtype=np.int32)
        u = rng.random(T, dtype=np.float32)
        slot = prof_of_draw.astype(np.int64) * G + j
        del prof_of_draw
        gene = np.where(u < self.prob[slot], j, self.alias[slot])
        del slot, u, j
        key = cell_of_draw.astype(np.int64) * G + gene
        del cell_of_draw, gene
        tally = np.bincount(key, minlength=n * G)
        del key
        nz = np.flatnonzero(tally)
        data = tally[nz].astype(np.float32)
        del tally
        rows = nz // G
        indices = (nz - rows * G).astype(np.int32)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return sp.csr_matrix((data, indices, indptr), shape=(n, G))


def _stack(blocks: list[sp.csr_matrix], index_dtype) -> sp.csr_matrix:
    if len(blocks) == 1:
        m = blocks[0]
    else:
        data = np.concatenate([b.data for b in blocks])
        indices = np.concatenate([b.indices for b in blocks])
        offs = np.cumsum([0] + [b.nnz for b in blocks[:-1]])
        indptr = np.concatenate([[0]] + [b.indptr[1:] + o for b, o in zip(blocks, offs)]).astype(np.int64)
        m = sp.csr_matrix((data, indices, indptr), shape=(sum(b.shape[0] for b in blocks), blocks[0].shape[1]))
    # indptr and indices share one dtype (scipy needs that; anndata reads them back as stored)
    m.indptr = m.indptr.astype(index_dtype, copy=False)
    m.indices = m.indices.astype(index_dtype, copy=False)
    return m


# ---------------------------------------------------------------- main


def synthesize(
    out: str | os.PathLike,
    cells: int = 5000,
    genes: int = 2000,
    donors: int = 4,
    types: int = 10,
    seed: int = 0,
    chunk_size: int = 50_000,
    density: float = 0.05,
    *,
    progress: bool | None = None,
) -> dict:
    """Write a synthetic CELLxGENE-schema .h5ad to ``out`` (atomically); return a summary.

    X holds raw integer counts as float32 CSR. ``density`` is the expected fraction of
    non-zero entries. ``chunk_size`` is cells per write (rounded to whole generation
    blocks); it bounds memory and does not change the data. ``progress``: show a tqdm
    bar (default: only when stderr is a terminal).

    Returns ``{"path", "cells", "genes", "donors", "types", "nnz", "density"}`` where
    donors/types count those present in the file and density is the achieved one.
    ``uns["synthetic"]["markers"]`` records each type's marker genes (ground truth).
    Bad arguments raise :class:`CellPuzzlesError`.
    """
    _validate(cells, genes, donors, types, density, chunk_size)
    cells, genes, donors, types, seed = int(cells), int(genes), int(donors), int(types), int(seed)
    density = float(density)
    out = Path(out)

    rng = np.random.default_rng([seed, 0])
    type_table = _type_table(types)
    symbols, base, type_prof, mt_prof, marker_idx = _make_genes(rng, genes, type_table)
    n_batches = max(1, math.ceil(donors / 2))
    obs, cell_donor, cell_type = _make_obs(rng, cells, donors, type_table, n_batches)

    donor_prof = base[None, :] * rng.lognormal(0.0, 0.6, (donors, genes))
    donor_prof /= donor_prof.sum(axis=1, keepdims=True)
    donor_depth = rng.lognormal(0.0, 0.15, donors)
    mean_donor = donor_prof.mean(axis=0)
    mix = (1 - DONOR_SHARE) * (1 - 0.036) * type_prof + DONOR_SHARE * (1 - 0.036) * mean_donor + 0.036 * mt_prof
    mean_lib = _calibrate(mix, density, genes)

    var = pd.DataFrame(index=pd.Index([f"ENSG{i + 1:011d}" for i in range(genes)], dtype=object))
    var["feature_name"] = pd.Categorical(symbols.astype(str))
    var["feature_reference"] = pd.Categorical.from_codes(np.zeros(genes, dtype=np.int8), categories=["NCBITaxon:9606"])
    var["feature_biotype"] = pd.Categorical.from_codes(np.zeros(genes, dtype=np.int8), categories=["gene"])
    var["feature_is_filtered"] = np.zeros(genes, dtype=bool)
    uns = {
        "schema_version": SCHEMA_VERSION,
        "title": f"Synthetic CELLxGENE-style dataset (seed {seed})",
        "organism": "Homo sapiens",
        "organism_ontology_term_id": "NCBITaxon:9606",
        "synthetic": {"seed": seed, "cells": cells, "genes": genes, "donors": donors,
                      "types": types, "density": density,
                      # ground truth: each type's boosted genes (feature_name), strongest first
                      "markers": {name: symbols[marker_idx[t]].astype(str) for t, (name, _, _) in enumerate(type_table)}},
    }

    model = _Model(type_prof, donor_prof, mt_prof, mean_lib, donor_depth,
                   cell_type.astype(np.int64), cell_donor.astype(np.int64), seed)
    n_blocks = model.n_blocks(cells)
    per_chunk = max(1, chunk_size // model.block)
    chunks = [range(s, min(n_blocks, s + per_chunk)) for s in range(0, n_blocks, per_chunk)]
    if progress is None:
        progress = sys.stderr.isatty()

    # int32 indices/indptr whenever even a full matrix would fit, as scipy would choose
    index_dtype = np.int32 if cells * genes < np.iinfo(np.int32).max else np.int64

    nnz = 0
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            write_elem(f, "obs", obs)
            write_elem(f, "var", var)
            for key in ("obsm", "varm", "obsp", "varp", "layers"):
                write_elem(f, key, {})
            write_elem(f, "uns", uns)
            bar = tqdm(total=cells, desc="synth X", unit="cell", disable=not progress, unit_scale=True)
            try:
                for i, blocks in enumerate(chunks):
                    m = _stack([model.block_csr(b, cells) for b in blocks], index_dtype)
                    if i == 0:
                        write_elem(f, "X", m)
                        xds = sparse_dataset(f["X"])
                    else:
                        xds.append(m)
                    nnz += m.nnz
                    bar.update(m.shape[0])
                    del m
            finally:
                bar.close()
    return {
        "path": str(out),
        "cells": cells,
        "genes": genes,
        "donors": int(obs["donor_id"].nunique()),
        "types": int(obs["cell_type"].nunique()),
        "nnz": int(nnz),
        "density": nnz / (cells * genes),
    }
