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
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editexp.cache import atomic_write, cache_root, file_sha256
from editexp.errors import UserError

log = logging.getLogger(__name__)

ORDERS = ("seeded", "file", "case_ids")
SPLITS = ("all", "tuning", "evaluation")
TUNING_EVERY = 5  # the tuning split: the facts whose case id is a multiple of 5


class CounterFactError(UserError):
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


def _check_template(prompt: str, case: Any) -> None:
    """The rewrite prompt is filled with ``prompt.format(subject)``: exactly one ``{}`` and no
    other brace (``{x}``, ``{0}`` or a lone ``{`` would fail or fill the wrong slot)."""
    if (
        prompt.count("{}") != 1
        or "{" in prompt.replace("{}", "")
        or "}" in prompt.replace("{}", "")
    ):
        raise CounterFactError(
            f"CounterFact record case_id={case}: field 'requested_rewrite.prompt' must hold "
            f"exactly one '{{}}' (the subject's slot) and no other brace, got {prompt!r}"
        )


def parse_record(record: dict, index: int | None = None) -> Fact:
    """Validate one record of the original format and turn it into a :class:`Fact`."""
    where = "" if index is None else f" #{index}"
    if not isinstance(record, dict):
        raise CounterFactError(
            f"CounterFact record{where} must be a JSON object, got {type(record).__name__}"
        )
    case = _require(record, "case_id", f"?{where}")
    if not isinstance(case, int) or isinstance(case, bool):
        raise CounterFactError(
            f"CounterFact record{where} case_id={case!r}: case_id must be an integer"
        )
    prompt = _nonempty_str(_require(record, "requested_rewrite.prompt", case), "prompt", case)
    _check_template(prompt, case)
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
    facts = [parse_record(record, index) for index, record in enumerate(records)]
    seen: set[int] = set()
    for fact in facts:
        if fact.case_id in seen:
            raise CounterFactError(f"CounterFact: case_id={fact.case_id} occurs twice")
        seen.add(fact.case_id)
    return facts


NO_DATA_HINT = (
    "set data.dir to a folder holding counterfact/counterfact.json (or data.counterfact to "
    "the file; $EDITEXP_DATA_DIR sets data.dir)"
)


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
        try:
            _read_records(path)
            return path
        except CounterFactError as error:  # a damaged download: fetch it again
            log.warning("cached CounterFact %s is bad (%s); downloading it again", path, error)
            path.unlink(missing_ok=True)
    return _download(data_cfg, path)


def _download(data_cfg: Any, path: Path) -> Path:
    """The canonical file, else the ``datasets`` copy; checked before it is cached."""
    url = data_cfg.get("download_url")
    hf_name = data_cfg.get("hf_dataset")
    try:
        log.info("Downloading CounterFact from %s", url)
        with urllib.request.urlopen(url, timeout=30) as response:
            payload = response.read()
        _records_from_text(payload.decode("utf-8"), url)
        return atomic_write(path, lambda tmp: tmp.write_bytes(payload))
    except (OSError, UnicodeDecodeError, CounterFactError, ValueError) as error:
        url_error = error
    if isinstance(url_error, urllib.error.URLError) and not isinstance(
        url_error, urllib.error.HTTPError
    ):  # no connection at all (DNS, refused, timeout): the hub would only retry and fail
        raise CounterFactError(
            f"no CounterFact data: downloading {url} failed ({_reason(url_error)}), no "
            f"network?; {NO_DATA_HINT}"
        ) from url_error
    log.warning("Download of %s failed (%s); trying datasets %s", url, url_error, hf_name)
    try:
        return _from_hf_dataset(hf_name, path)
    except Exception as error:  # datasets raises many kinds: connection, missing data set
        raise CounterFactError(
            f"no CounterFact data: downloading {url} failed ({_reason(url_error)}) and so did "
            f"datasets {hf_name!r} ({_reason(error)}); {NO_DATA_HINT}"
        ) from error


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    return " ".join(f"{type(error).__name__}: {reason}".split())[:200]


def _from_hf_dataset(name: str, path: Path) -> Path:
    import datasets

    records: list[dict] = []
    splits = datasets.load_dataset(name)
    for split in splits.values():
        records.extend(dict(row) for row in split)
    records.sort(key=lambda r: r["case_id"])
    parse_records(records)
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(records)))


def _records_from_text(text: str, source: str | Path) -> list[dict]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise CounterFactError(
            f"{source} is not valid JSON ({error.msg} at line {error.lineno} column "
            f"{error.colno}); is the file complete? CounterFact is a JSON list of records"
        ) from None
    if not isinstance(records, list):
        raise CounterFactError(
            f"{source}: expected a JSON list of CounterFact records, got a JSON "
            f"{type(records).__name__}"
        )
    return records


def _read_records(path: Path) -> list[Fact]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CounterFactError(f"cannot read CounterFact file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise CounterFactError(
            f"CounterFact file {path} is not UTF-8 text (byte {error.start}): expected a JSON "
            "list of records"
        ) from None
    try:
        return parse_records(_records_from_text(text, path))
    except CounterFactError as error:
        message = str(error)
        raise CounterFactError(message if str(path) in message else f"{path}: {message}") from None


def load_counterfact(data_cfg: Any) -> tuple[list[Fact], str]:
    """All facts of the configured file, validated, and the file's sha256."""
    path = counterfact_path(data_cfg)
    return _read_records(path), file_sha256(path)


def _read_case_ids(case_ids: Any) -> list[int]:
    """``data.case_ids``: a list of integers or a file of integers (commas or white space)."""
    if isinstance(case_ids, str):
        path = Path(case_ids).expanduser()
        if not path.is_file():
            raise CounterFactError(f"data.case_ids={case_ids!r} is neither a list nor a file")
        try:
            tokens = path.read_text().replace(",", " ").split()
        except (OSError, UnicodeDecodeError) as error:
            raise CounterFactError(f"cannot read data.case_ids file {path}: {error}") from None
        bad = [token for token in tokens if not token.lstrip("-").isdigit()]
        if bad:
            raise CounterFactError(
                f"data.case_ids file {path} holds {bad[0]!r}; expected integer case_ids "
                "separated by white space or commas"
            )
        wanted = [int(token) for token in tokens]
    else:
        wanted = list(case_ids)
        bad = [item for item in wanted if not isinstance(item, int) or isinstance(item, bool)]
        if bad:
            raise CounterFactError(f"data.case_ids has {bad[0]!r}; expected integer case_ids")
    if not wanted:
        raise CounterFactError(f"data.case_ids={case_ids!r} names no case_id")
    repeated = sorted(case_id for case_id, n in Counter(wanted).items() if n > 1)
    if repeated:
        raise CounterFactError(
            f"data.case_ids repeats {repeated[:10]}; each fact may be edited once per run"
        )
    return wanted


def check_prompt_lengths(
    facts: Sequence[Fact], tokenizer: Any, max_positions: int | None, reserve: int = 0
) -> None:
    """Every scored or edited text of ``facts`` (prompt plus its longer target, after a context
    prefix of up to ``reserve`` tokens) must fit the model's ``max_positions``."""
    if not max_positions:
        return
    for fact in facts:
        target = max((fact.target_new, fact.target_true), key=len)
        prompts = [fact.rewrite_prompt, *fact.paraphrase_prompts, *fact.neighborhood_prompts]
        texts = [f"{prompt} {target}" for prompt in prompts]
        lengths = [len(ids) for ids in tokenizer(texts).input_ids]
        longest = max(range(len(texts)), key=lengths.__getitem__)
        if lengths[longest] + reserve > max_positions:
            raise CounterFactError(
                f"CounterFact record case_id={fact.case_id}: the prompt {prompts[longest][:60]!r}"
                f" with its target is {lengths[longest]} tokens (+{reserve} for a context "
                f"prefix), more than the model's {max_positions} positions; leave this fact out "
                "(data.case_ids) or shorten the prompt"
            )


def split_facts(facts: list[Fact], split: str) -> list[Fact]:
    """The facts of ``split`` (``data.split``), in the file's order: ``tuning`` holds the
    facts whose case id is a multiple of :data:`TUNING_EVERY` (on the shared 2,758 records: 532,
    all with distinct subjects), for a study's choices (layer, lambda); ``evaluation`` the
    others (2,226), which its comparisons then edit; ``all`` every fact. The rule reads only
    the case id, so a split is the same set whatever the order, the seed or the file's
    other records."""
    if split not in SPLITS:
        raise CounterFactError(f"data.split={split!r}; expected one of {SPLITS}")
    if split == "all":
        return facts
    tuning = split == "tuning"
    return [fact for fact in facts if (fact.case_id % TUNING_EVERY == 0) == tuning]


def select_facts(
    facts: list[Fact],
    n_edits: int,
    order: str = "seeded",
    seed: int = 0,
    case_ids: Any = None,
    unique_subjects: bool = True,
    fact_set: int = 0,
) -> list[Fact]:
    """Choose ``n_edits`` facts deterministically.

    ``order=seeded`` shuffles with ``seed``; ``file`` keeps the file's order; ``case_ids``
    takes exactly the first ``n_edits`` listed facts in the listed order (to reproduce another
    study's sample). With ``unique_subjects`` a fact whose subject was already chosen is
    skipped; a listed fact is never skipped: one that repeats a subject is refused.
    ``fact_set=k`` takes the k-th block of ``n_edits`` facts of that order instead of the first
    (``data.fact_set``): blocks are disjoint, in facts and (with ``unique_subjects``) subjects,
    so repeats of a comparison can edit different facts.
    """
    order = _effective_order(order, case_ids)
    if n_edits < 1:
        raise CounterFactError(f"n_edits={n_edits}; expected a positive number of facts")
    if fact_set < 0:
        raise CounterFactError(f"data.fact_set={fact_set}; expected 0, 1, 2, ...")
    wanted = n_edits * (fact_set + 1)
    if order == "case_ids":
        return _listed_facts(facts, case_ids, wanted, unique_subjects)[-n_edits:]
    candidates = list(facts)
    if order == "seeded":
        random.Random(seed).shuffle(candidates)
    chosen: list[Fact] = []
    subjects: set[str] = set()
    for fact in candidates:
        if unique_subjects and fact.subject in subjects:
            continue
        chosen.append(fact)
        subjects.add(fact.subject)
        if len(chosen) == wanted:
            return chosen[-n_edits:]
    block = f" x {fact_set + 1} fact sets (data.fact_set={fact_set})" if fact_set else ""
    raise CounterFactError(
        f"n_edits={n_edits}{block} but only {len(chosen)} facts are available "
        f"(order={order}, unique_subjects={unique_subjects}, {len(facts)} records)"
    )


def _effective_order(order: str, case_ids: Any) -> str:
    """``order``, checked; ``data.case_ids`` implies ``case_ids`` over the seeded order."""
    if order not in ORDERS:
        raise CounterFactError(f"data.order={order!r}; expected one of {ORDERS}")
    if case_ids is None or order == "case_ids":
        return order
    if order == "file":
        raise CounterFactError(
            "data.case_ids is set but data.order=file; data.case_ids implies "
            "data.order=case_ids (set it, or leave data.case_ids null)"
        )
    log.info("data.case_ids is set: taking the facts in its order (data.order=case_ids)")
    return "case_ids"


def _listed_facts(
    facts: list[Fact], case_ids: Any, n_edits: int, unique_subjects: bool
) -> list[Fact]:
    """The first ``n_edits`` facts listed in ``case_ids``, in the listed order; with
    ``unique_subjects`` one that repeats an earlier listed fact's subject is refused."""
    if case_ids is None:
        raise CounterFactError("data.order=case_ids needs data.case_ids (a list or a file)")
    by_id = {fact.case_id: fact for fact in facts}
    wanted = _read_case_ids(case_ids)
    missing = [case_id for case_id in wanted if case_id not in by_id]
    if missing:
        raise CounterFactError(f"data.case_ids: not in the data set: {missing[:10]}")
    if len(wanted) < n_edits:
        raise CounterFactError(
            f"data.case_ids lists {len(wanted)} facts; {n_edits} are needed (n_edits, times "
            "data.fact_set + 1)"
        )
    candidates = [by_id[case_id] for case_id in wanted[:n_edits]]
    if unique_subjects:
        seen: set[str] = set()
        repeats = []
        for fact in candidates:
            if fact.subject in seen:
                repeats.append(fact.case_id)
            seen.add(fact.subject)
        if repeats:
            raise CounterFactError(
                f"data.case_ids lists facts whose subject an earlier listed fact already has: "
                f"case_ids {repeats[:10]}; drop them, or set data.unique_subjects=false to "
                "edit them all"
            )
    if len(wanted) > n_edits:
        log.warning(
            "data.case_ids lists %d facts; n_edits=%d edits the first %d of them",
            len(wanted),
            n_edits,
            n_edits,
        )
    return candidates
