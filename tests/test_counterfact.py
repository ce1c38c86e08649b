"""CounterFact loading, validation and selection: bad records name their case and field, the shared
file loads, selection is deterministic, listed case ids are taken as listed.
"""

from __future__ import annotations

import json

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from editexp.data.counterfact import (
    CounterFactError,
    load_counterfact,
    parse_records,
    select_facts,
    split_facts,
)


def record(case_id=1, **rewrite):
    base = {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "relation_id": "P103",
    }
    base.update(rewrite)
    return {
        "case_id": case_id,
        "requested_rewrite": base,
        "paraphrase_prompts": ["Danielle Darrieux spoke"],
        "neighborhood_prompts": ["Léon Blum's mother tongue is"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }


@pytest.mark.parametrize(
    "broken,message",
    [
        ({"prompt": "The mother tongue of Danielle is"}, r"case_id=7.*exactly one '\{\}'"),
        ({"target_new": {"str": "  ", "id": "x"}}, r"case_id=7.*target_new.str"),
        (
            {"target_true": {"id": "x"}},
            r"case_id=7: missing field 'requested_rewrite.target_true.str'",
        ),
        ({"subject": ""}, r"case_id=7.*subject"),
    ],
)
def test_invalid_records_name_case_and_field(broken, message):
    with pytest.raises(CounterFactError, match=message):
        parse_records([record(7, **broken)])


def test_missing_top_level_field_and_duplicates():
    bad = record(3)
    del bad["requested_rewrite"]
    with pytest.raises(
        CounterFactError, match="case_id=3: missing field 'requested_rewrite.prompt'"
    ):
        parse_records([bad])
    with pytest.raises(CounterFactError, match="case_id=1 occurs twice"):
        parse_records([record(1), record(1)])


def test_shared_counterfact_loads_and_validates():
    facts, digest = load_counterfact(compose_config().data)
    assert len(facts) == 2758 and len(digest) == 64
    assert all("{}" in fact.prompt for fact in facts)


def test_selection_is_deterministic_and_reproducible(tmp_path):
    facts, _ = load_counterfact(compose_config().data)
    first = [f.case_id for f in select_facts(facts, 20, seed=0)]
    assert first == [f.case_id for f in select_facts(facts, 20, seed=0)]
    assert first != [f.case_id for f in select_facts(facts, 20, seed=1)]
    assert [f.case_id for f in select_facts(facts, 3, order="file")] == [
        f.case_id for f in facts[:3]
    ]
    wanted = [facts[10].case_id, facts[2].case_id]
    assert [f.case_id for f in select_facts(facts, 2, order="case_ids", case_ids=wanted)] == wanted
    id_file = tmp_path / "ids.txt"
    id_file.write_text("\n".join(map(str, wanted)))
    chosen = select_facts(facts, 2, order="case_ids", case_ids=str(id_file))
    assert [f.case_id for f in chosen] == wanted
    unique = select_facts(facts, 200, seed=0)
    assert len({f.subject for f in unique}) == 200
    with pytest.raises(CounterFactError, match="not in the data set"):
        select_facts(facts, 1, order="case_ids", case_ids=[999999])
    with pytest.raises(CounterFactError, match="only"):
        select_facts(facts, 5000)


def test_listed_case_ids_are_never_skipped_and_extra_ones_are_named(caplog):
    facts, _ = load_counterfact(compose_config().data)
    by_subject: dict[str, list[int]] = {}
    for fact in facts:
        by_subject.setdefault(fact.subject, []).append(fact.case_id)
    first, second = next(ids for ids in by_subject.values() if len(ids) > 1)[:2]
    other = facts[0].case_id if facts[0].case_id not in (first, second) else facts[1].case_id
    with pytest.raises(CounterFactError, match=rf"subject .* case_ids \[{second}\]; drop them"):
        select_facts(facts, 3, order="case_ids", case_ids=[first, other, second])
    kept = select_facts(
        facts, 3, order="case_ids", case_ids=[first, other, second], unique_subjects=False
    )
    assert [f.case_id for f in kept] == [first, other, second]
    # more listed ids than edits: the first n_edits, said in the log; a repeat beyond them is
    # not edited, so it is not refused
    with caplog.at_level("WARNING", logger="editexp"):
        chosen = select_facts(facts, 2, order="case_ids", case_ids=[first, other, second])
    assert [f.case_id for f in chosen] == [first, other]
    assert "data.case_ids lists 3 facts; n_edits=2 edits the first 2 of them" in caplog.text


def test_explicit_counterfact_file(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([record(5)]))
    facts, _ = load_counterfact(OmegaConf.create({"counterfact": str(path), "dir": None}))
    assert facts[0].case_id == 5 and facts[0].rewrite_prompt.endswith("Darrieux is")
    with pytest.raises(CounterFactError, match="does not exist"):
        load_counterfact(OmegaConf.create({"counterfact": str(tmp_path / "none.json")}))


def test_tuning_and_evaluation_splits_are_disjoint_by_case_id_and_cover_the_file():
    facts, _ = load_counterfact(compose_config().data)
    tuning, evaluation = split_facts(facts, "tuning"), split_facts(facts, "evaluation")
    assert (len(tuning), len(evaluation)) == (532, 2226)
    assert all(fact.case_id % 5 == 0 for fact in tuning)
    assert {f.case_id for f in tuning} | {f.case_id for f in evaluation} == {
        f.case_id for f in facts
    }
    assert not {f.case_id for f in tuning} & {f.case_id for f in evaluation}
    assert split_facts(facts, "all") == facts
    # the same set whatever else the file holds: a fact's split reads its case id only
    assert split_facts(facts[::2], "tuning") == [f for f in tuning if f in facts[::2]]
    with pytest.raises(CounterFactError, match=r"data.split='train'; expected one of \('all'"):
        split_facts(facts, "train")


def test_fact_sets_are_disjoint_blocks_of_the_same_order():
    facts, _ = load_counterfact(compose_config().data)
    first_300 = select_facts(facts, 300, seed=0)
    blocks = [select_facts(facts, 100, seed=0, fact_set=k) for k in range(3)]
    assert [f for block in blocks for f in block] == first_300  # the order, cut into blocks
    assert len({f.subject for block in blocks for f in block}) == 300  # subjects disjoint too
    listed = [f.case_id for f in first_300[:4]]
    chosen = select_facts(facts, 2, order="case_ids", case_ids=listed, fact_set=1)
    assert [f.case_id for f in chosen] == listed[2:]
    with pytest.raises(CounterFactError, match=r"n_edits=1000 x 3 fact sets \(data.fact_set=2"):
        select_facts(facts, 1000, seed=0, fact_set=2)
    with pytest.raises(CounterFactError, match="lists 4 facts; 6 are needed"):
        select_facts(facts, 2, order="case_ids", case_ids=listed, fact_set=2)
    with pytest.raises(CounterFactError, match="data.fact_set=-1; expected 0, 1, 2"):
        select_facts(facts, 2, fact_set=-1)


def test_split_and_fact_set_join_the_run_identity_only_when_set():
    from editexp.run_dir import comparable_config

    default = comparable_config(compose_config())
    assert "split" not in default["data"] and "fact_set" not in default["data"]
    tuning = comparable_config(compose_config("data.split=tuning", "data.fact_set=1"))
    assert (tuning["data"]["split"], tuning["data"]["fact_set"]) == ("tuning", 1)
