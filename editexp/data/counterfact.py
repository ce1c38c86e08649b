"""CounterFact (Meng et al., 2022): loading, validation and deterministic fact selection.

The file is the original ROME/MEMIT JSON list. Where it comes from, in order:
``data.counterfact`` (a path), ``<data.dir>/counterfact/counterfact.json`` (``data.dir``
defaults to ``$EDITEXP_DATA_DIR``), the canonical download cached under the editexp cache, or
the Hugging Face data set ``azhx/counterfact``.
"""

from __future__ import annotations

import json
import logging
import random
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editexp.cache import atomic_write, cache_root, file_sha256

log = logging.getLogger(__name__)

ORDERS = ("seeded", "file", "case_ids")


class CounterFactError(ValueError):
    """A record or a selection that cannot be used, naming the case and the field."""


@dataclass(frozen=True)
class Fact:
    case_id: int
    subject: str
    prompt: str  # with a "{}" slot for the subject
    target_new: str
    target_true: str
    relation_id: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)


def _require(record: dict, path: str, case: Any) -> Any:
    value: Any = record
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise CounterFactError(f"CounterFact record case_id={case}: missing field {path!r}")
        value = value[key]
    return value


def _nonempty_str(value: Any, path: str, case: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CounterFactError(
            f"CounterFact record case_id={case}: field {path!r} must be a non-empty string, "
            f"got {value!r}"
        )
    return value


def _prompt_list(record: dict, key: str, case: Any) -> tuple[str, ...]:
    prompts = record.get(key, [])
    if not isinstance(prompts, list):
        raise CounterFactError(f"CounterFact record case_id={case}: {key!r} must be a list")
    return tuple(_nonempty_str(p, f"{key}[{i}]", case) for i, p in enumerate(prompts))


def parse_record(record: dict) -> Fact:
    """Validate one record of the original format and turn it into a :class:`Fact`."""
    if not isinstance(record, dict):
        raise CounterFactError(f"CounterFact record must be a JSON object, got {type(record)}")
    case = _require(record, "case_id", "?")
    if not isinstance(case, int):
        raise CounterFactError(f"CounterFact record case_id={case!r}: case_id must be an int")
    prompt = _nonempty_str(_require(record, "requested_rewrite.prompt", case), "prompt", case)
    if "{}" not in prompt:
        raise CounterFactError(
            f"CounterFact record case_id={case}: field 'requested_rewrite.prompt' has no '{{}}' "
            f"slot for the subject: {prompt!r}"
        )
    subject = _nonempty_str(_require(record, "requested_rewrite.subject", case), "subject", case)
    target_new = _require(record, "requested_rewrite.target_new.str", case)
    target_true = _require(record, "requested_rewrite.target_true.str", case)
    _nonempty_str(target_new, "requested_rewrite.target_new.str", case)
    _nonempty_str(target_true, "requested_rewrite.target_true.str", case)
    return Fact(
        case_id=case,
        subject=subject,
        prompt=prompt,
        target_new=target_new.strip(),
        target_true=target_true.strip(),
        relation_id=str(record["requested_rewrite"].get("relation_id", "")),
        paraphrase_prompts=_prompt_list(record, "paraphrase_prompts", case),
        neighborhood_prompts=_prompt_list(record, "neighborhood_prompts", case),
        generation_prompts=_prompt_list(record, "generation_prompts", case),
    )


def parse_records(records: list[dict]) -> list[Fact]:
    facts = [parse_record(r) for r in records]
    seen: set[int] = set()
    for fact in facts:
        if fact.case_id in seen:
            raise CounterFactError(f"CounterFact: case_id={fact.case_id} occurs twice")
        seen.add(fact.case_id)
    return facts


def counterfact_path(data_cfg: Any) -> Path:
    """The local file to read, downloading the canonical one into the cache if needed."""
    if data_cfg.get("counterfact"):
        path = Path(data_cfg.counterfact).expanduser()
        if not path.is_file():
            raise CounterFactError(f"data.counterfact={str(path)!r} does not exist")
        return path
    if data_cfg.get("dir"):
        path = Path(data_cfg.dir).expanduser() / "counterfact" / "counterfact.json"
        if not path.is_file():
            raise CounterFactError(
                f"data.dir={data_cfg.dir!r} has no counterfact/counterfact.json; "
                "set data.counterfact to the file or unset data.dir to download it"
            )
        return path
    path = cache_root() / "data" / "counterfact.json"
    if path.is_file():
        return path
    url = data_cfg.get("download_url")
    try:
        log.info("Downloading CounterFact from %s", url)

        def download(tmp: Path) -> None:
            with urllib.request.urlopen(url, timeout=60) as response:
                tmp.write_bytes(response.read())

        return atomic_write(path, download)
    except OSError as error:
        hf_name = data_cfg.get("hf_dataset")
        log.warning("Download of %s failed (%s); trying datasets %s", url, error, hf_name)
        return _from_hf_dataset(hf_name, path)


def _from_hf_dataset(name: str, path: Path) -> Path:
    import datasets

    records: list[dict] = []
    splits = datasets.load_dataset(name)
    for split in splits.values():
        records.extend(dict(row) for row in split)
    records.sort(key=lambda r: r["case_id"])
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(records)))


def load_counterfact(data_cfg: Any) -> tuple[list[Fact], str]:
    """All facts of the configured file, validated, and the file's sha256."""
    path = counterfact_path(data_cfg)
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise CounterFactError(f"{path}: expected a JSON list of CounterFact records")
    return parse_records(records), file_sha256(path)


def _read_case_ids(case_ids: Any) -> list[int]:
    if isinstance(case_ids, str):
        path = Path(case_ids).expanduser()
        if not path.is_file():
            raise CounterFactError(f"data.case_ids={case_ids!r} is neither a list nor a file")
        tokens = path.read_text().replace(",", " ").split()
        return [int(token) for token in tokens]
    return [int(case_id) for case_id in case_ids]


def select_facts(
    facts: list[Fact],
    n_edits: int,
    order: str = "seeded",
    seed: int = 0,
    case_ids: Any = None,
    unique_subjects: bool = True,
) -> list[Fact]:
    """Choose ``n_edits`` facts deterministically.

    ``order=seeded`` shuffles with ``seed``; ``file`` keeps the file's order; ``case_ids``
    takes exactly the listed facts in the listed order (to reproduce another study's sample).
    With ``unique_subjects`` a fact whose subject was already chosen is skipped.
    """
    if order not in ORDERS:
        raise CounterFactError(f"data.order={order!r}; expected one of {ORDERS}")
    if n_edits < 1:
        raise CounterFactError(f"n_edits={n_edits}; expected a positive number of facts")
    if order == "case_ids":
        if case_ids is None:
            raise CounterFactError("data.order=case_ids needs data.case_ids (a list or a file)")
        by_id = {fact.case_id: fact for fact in facts}
        wanted = _read_case_ids(case_ids)
        missing = [case_id for case_id in wanted if case_id not in by_id]
        if missing:
            raise CounterFactError(f"data.case_ids: not in the data set: {missing[:10]}")
        candidates = [by_id[case_id] for case_id in wanted]
    elif order == "seeded":
        candidates = list(facts)
        random.Random(seed).shuffle(candidates)
    else:
        candidates = list(facts)
    chosen: list[Fact] = []
    subjects: set[str] = set()
    for fact in candidates:
        if unique_subjects and fact.subject in subjects:
            continue
        chosen.append(fact)
        subjects.add(fact.subject)
        if len(chosen) == n_edits:
            return chosen
    raise CounterFactError(
        f"n_edits={n_edits} but only {len(chosen)} facts are available "
        f"(order={order}, unique_subjects={unique_subjects}, {len(facts)} records)"
    )
