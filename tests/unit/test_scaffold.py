"""The per-cell scaffold: which traces count as scaffolds, and how many genes they restate."""

from cellpuzzles.task.puzzle import format_completion, make_puzzle
from cellpuzzles.task.scaffold import cell_line, restated_genes, think_lines


def _puzzle(genes):
    return make_puzzle(genes, [f"type {i}" for i in range(len(genes))], {"tissue": "blood"}, donor_id="d")


def test_scaffold_traces_are_recognised_with_their_gene_count():
    p = _puzzle([["A", "B", "C", "D"], ["E", "F"], ["G", "H", "I"]])
    trace = format_completion(think_lines(p, 3, p.answer), p.answer)
    assert trace.startswith("<think>Cell 1: A, B, C -> type 0\nCell 2: E, F -> type 1\nCell 3: G, H, I -> type 2")
    assert restated_genes([(p, trace)]) == 3
    # evidence after the type does not matter; a cell with fewer genes restates all it has
    q = _puzzle([["E", "F"], ["A", "B", "C", "D"]])
    lines = [cell_line(i, g, 3) + f"type {i}: {g[0]}" for i, g in enumerate(q.genes)]
    assert restated_genes([(q, format_completion("\n".join(lines), q.answer))]) == 3


def test_other_traces_are_not_scaffolds():
    p = _puzzle([["A", "B", "C"], ["D", "E", "F"]])
    free_text = format_completion("Cell 1 looks like type 0 because of A; cell 2 has D.", p.answer)
    wrong_gene = format_completion("Cell 1: A, B -> type 0\nCell 2: D, X -> type 1", p.answer)
    wrong_order = format_completion("Cell 1: B, A -> type 0\nCell 2: D, E -> type 1", p.answer)
    too_few_lines = format_completion("Cell 1: A, B -> type 0", p.answer)
    good = format_completion(think_lines(p, 2, p.answer), p.answer)
    assert restated_genes([(p, good)]) == 2
    for bad in (free_text, wrong_gene, wrong_order, too_few_lines):
        assert restated_genes([(p, good), (p, bad)]) is None
    assert restated_genes([]) is None
