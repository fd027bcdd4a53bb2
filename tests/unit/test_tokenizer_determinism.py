"""The tiny model's tokenizer gives every piece the same id in every process: its ids decide the
model's initial weights, so two fresh runs of the same seed must build the same tokenizer
(Python's string hashing, and with it the order of sets, changes from process to process)."""

import json
import os
import subprocess
import sys

SCRIPT = """
import json
from cellpuzzles.train.tokenizer import train_tokenizer
genes = {f"GENE{i}" for i in range(40)}  # each once: ties in frequency, in set order
texts = [f"Cell {k}: " + ", ".join(sorted(genes)[k::7]) + " -> B cell" for k in range(1, 8)]
tok = train_tokenizer(texts, {"B cell", "T cell", "NK cell"}, genes)
print(json.dumps(tok.get_vocab(), sort_keys=True))
"""


def _vocab(hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_tiny_tokenizer_ids_do_not_depend_on_the_process():
    first = _vocab("1")
    assert len(first) > 40 and all(_vocab(seed) == first for seed in ("2", "3"))
