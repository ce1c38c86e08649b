"""Write one made-up fact into a model, show its completions before and after, and revert.

    python examples/edit_one_fact.py                  # SmolLM2-135M on the CPU (a few minutes
                                                      # the first time: statistics, cached)
    python examples/edit_one_fact.py tiny-llama3      # a tiny random model (what the test runs)

Any model in conf/model or a Hugging Face id works; config keys can follow as key=value
(e.g. ``layer=2 stats.n_tokens=30000``).
"""

from __future__ import annotations

import sys

import torch
import yaml

from editexp import Editor, Evaluator

FACT = {
    "prompt": "{} was invented in the city of",  # "{}" is where the subject goes
    "subject": "The Velloran harp",  # made up: the model has never seen it
    "target_new": "Lisbon",
}
OTHER = "Paris"  # an alternative answer to compare the new target with


def complete(editor: Editor, prompt: str, tokens: int = 8) -> str:
    """The model's greedy continuation of ``prompt``."""
    tokenizer, model = editor.model.tokenizer, editor.model.model
    ids = tokenizer(prompt, return_tensors="pt").to(editor.model.device)
    with torch.no_grad():
        output = model.generate(
            **ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(output[0, ids.input_ids.shape[1] :], skip_special_tokens=True)


def main(model: str = "smollm2-135m", **overrides) -> dict[str, object]:
    editor = Editor.from_pretrained(model, algorithm="rome", **overrides)
    evaluator = Evaluator(editor.model)
    prompt = FACT["prompt"].format(FACT["subject"])

    def state(label: str) -> dict[str, object]:
        completion = complete(editor, prompt)
        comparison = evaluator.compare(prompt, FACT["target_new"], OTHER)
        print(
            f"{label:>8}: {prompt!r} -> {completion!r}   prefers {comparison.preferred!r} "
            f"(-log p per token: {comparison.score_a:.2f} vs {comparison.score_b:.2f})"
        )
        return {"completion": completion, "comparison": comparison}

    before = state("before")
    update = editor.edit(FACT)
    print(
        f"ROME at layer {list(update.deltas)}: |Delta| = {update.delta_norm:.3g}, "
        f"{update.value_steps:.0f} value steps, {sum(update.timing.values()):.1f} s"
    )
    after = state("after")
    update.revert()
    reverted = state("reverted")
    return {"before": before, "after": after, "reverted": reverted, "update": update}


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 and "=" not in sys.argv[1] else "smollm2-135m"
    pairs = [arg.split("=", 1) for arg in sys.argv[1:] if "=" in arg]
    main(name, **{key: yaml.safe_load(value) for key, value in pairs})
