"""editexp's MEMIT edit of the 64 reference facts with C0 sampled as the paper's code sampled it
(docs/fidelity.md, "The remaining gap, fact by fact"), for several context-prefix seeds.

    python docs/fidelity_reference_c0.py --seeds 0 1 2 3 4 5 --out runs/reference-c0
    python docs/fidelity_reference_c0.py --seeds --ume-prefixes ume_prefixes.json --out R
    python docs/fidelity_per_fact.py ../shared/reference/ume-smollm2-memit-l1-post-64.json \
        seed0=runs/reference-c0/seed0 seed1=runs/reference-c0/seed1 ...

C0 as the reference run read it: the WikiText-2 test articles (split at their " = Title = "
lines) that fill the file's first 100k tokens, 21 of them, each one sequence from position 0
cut at 8192 tokens, C0 = sum of k k^T over their 85,787 tokens / 85,787 at the input of
``model.layers.1.mlp.down_proj``. Then, for each seed: an Editor with that prefix seed (MEMIT,
layer 1, lambda 1, the model's value settings) whose C0 is replaced by this one, one update of
the 64 facts, scored by editexp. Each seed writes ``<out>/seed<S>/facts.jsonl`` and
``batches.jsonl`` in a run's format; a seed whose files exist is skipped (resumable).
``--ume-prefixes FILE`` edits, instead of with editexp's prefixes, with given context
templates, UME's ``"<prefix>{}"`` strings as a JSON object ``{key: [template, ...]}`` (e.g.
the ones UME's ``generate_fast`` samples on this model), one run ``<out>/ume<key>`` per key.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import torch

from editexp.data.counterfact import Fact, load_counterfact, select_facts
from editexp.editing.editor import Editor
from editexp.editing.linalg import CovarianceFactor
from editexp.evaluation.evaluator import Evaluator
from editexp.models import LoadedModel

SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPUS = SHARED / "data" / "corpus" / "wikitext-2-raw-test.txt"
CASE_IDS = SHARED / "reference" / "ume-smollm2-case-ids-64.txt"
LAYER, FILE_TOKENS, MAX_LENGTH = 1, 100_000, 8192
TITLE = re.compile(r"^ = [^=].* = $")


def articles(tokenizer) -> list[str]:
    """The articles that fill the first FILE_TOKENS tokens of the corpus file."""
    ids = tokenizer(CORPUS.read_text(), add_special_tokens=False).input_ids
    lines = tokenizer.decode(ids[:FILE_TOKENS]).split("\n")
    starts = [i for i, line in enumerate(lines) if TITLE.match(line)] + [len(lines)]
    return ["\n".join(lines[a:b]) for a, b in zip(starts, starts[1:])]


@torch.no_grad()
def reference_c0(loaded: LoadedModel) -> torch.Tensor:
    """(d_k, d_k) float64: the mean of k k^T over every token of the articles."""
    total, count = None, 0

    def add(module: torch.nn.Module, args: tuple) -> None:
        nonlocal total, count
        keys = args[0][0].double()  # (T, d_k)
        total = keys.T @ keys if total is None else total + keys.T @ keys
        count += keys.shape[0]

    handle = loaded.edit_module(LAYER).register_forward_pre_hook(add)
    try:
        for article in articles(loaded.tokenizer):
            ids = loaded.tokenizer.encode(article, truncation=True, max_length=MAX_LENGTH)
            loaded.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    print(f"C0 over {count} tokens")
    return total / count


def reference_facts(editor: Editor) -> list[Fact]:
    """The 64 reference facts, in the listed order (``data.order=case_ids``)."""
    facts = load_counterfact(editor.cfg.data)[0]
    n_listed = len(CASE_IDS.read_text().split())
    return select_facts(
        facts, n_listed, order="case_ids", case_ids=str(CASE_IDS), unique_subjects=False
    )


def edit_with_seed(
    seed: int, c0: torch.Tensor | None, out: Path, templates: list[str] | None = None
) -> torch.Tensor:
    """One MEMIT update of the 64 facts with prefix seed ``seed`` (or UME's ``templates``) and
    the reference C0 (computed when ``c0`` is None), scored into ``out``; returns C0."""
    overrides = {"lambda": 1, "layer": LAYER, "editing.prefixes.seed": seed}
    overrides |= {"eval.held_out_keys": 0, "eval.generation_facts": 0}
    editor = Editor.from_pretrained("smollm2-135m", algorithm="memit", device="cpu", **overrides)
    if templates is not None:  # "<prefix>{}" -> "<prefix>", after the bare prompt
        editor.prefixes = ["", *(template.removesuffix("{}") for template in templates)]
    c0 = reference_c0(editor.model) if c0 is None else c0
    editor.covariances[LAYER] = CovarianceFactor(c0)
    facts = reference_facts(editor)
    update = editor.edit(facts)
    scores = Evaluator.from_config(editor.model, editor.cfg).score(facts)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"case_id": s.case_id, "post": s.metrics()}) for s in scores]
    (out / "facts.jsonl").write_text("\n".join(rows) + "\n")
    norm = float(update.deltas[LAYER].norm())
    (out / "batches.jsonl").write_text(json.dumps({"update": {"delta_norm": norm}}) + "\n")
    print(f"{out.name}: ||Delta|| {norm:.2f}", flush=True)
    return c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--ume-prefixes", type=Path, help="JSON {key: [UME template, ...]}")
    parser.add_argument("--out", type=Path, default=Path("runs/reference-c0"))
    args = parser.parse_args()
    os.environ.setdefault("EDITEXP_DATA_DIR", str(SHARED / "data"))
    runs: dict[str, tuple[int, list[str] | None]] = {f"seed{s}": (s, None) for s in args.seeds}
    if args.ume_prefixes:
        given = json.loads(args.ume_prefixes.read_text())
        runs |= {f"ume{key}": (0, templates) for key, templates in given.items()}
    c0 = None
    for name, (seed, templates) in runs.items():
        out = args.out / name
        if not (out / "batches.jsonl").is_file():
            c0 = edit_with_seed(seed, c0, out, templates)


if __name__ == "__main__":
    main()
