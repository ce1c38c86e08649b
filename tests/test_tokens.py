"""Text to ids in one place: BOS exactly once (Llama-3) or none (GPT-2 style), targets with their
leading space, the subject's last token, padding and positions.
"""

from __future__ import annotations

from editexp.tokens import encode_prompt, encode_target, pad_sequences, subject_last_index

BOS = 128000


def test_llama3_tokenizer_adds_bos_exactly_once(tiny_llama3):
    tokenizer = tiny_llama3.tokenizer
    ids = encode_prompt(tokenizer, "The Eiffel Tower is in")
    assert ids[0] == BOS and ids.count(BOS) == 1
    prefixed = encode_prompt(tokenizer, "Some context. The Eiffel Tower is in")
    assert prefixed.count(BOS) == 1
    target = encode_target(tokenizer, "The Eiffel Tower is in", "Paris")
    assert BOS not in target and target == encode_target(
        tokenizer, "The Eiffel Tower is in", " Paris"
    )
    assert tokenizer.decode(target) == " Paris"


def test_gpt2_style_tokenizer_adds_no_bos(tiny_gpt2):
    ids = encode_prompt(tiny_gpt2.tokenizer, "The Eiffel Tower is in")
    assert BOS not in ids and tiny_gpt2.tokenizer.decode(ids) == "The Eiffel Tower is in"


def test_subject_last_index(tiny_llama3):
    tokenizer = tiny_llama3.tokenizer
    text = "The mother tongue of Danielle Darrieux is"
    ids = encode_prompt(tokenizer, text)
    index = subject_last_index(tokenizer, text, "Danielle Darrieux")
    assert tokenizer.decode(ids[: index + 1]).endswith("Darrieux")
    assert not tokenizer.decode(ids[:index]).endswith("Darrieux")


def test_pad_sequences_aligns_and_positions():
    batch = pad_sequences([[1, 2, 3], [4, 5]], pad_id=0, left_lengths=[1, 2])
    assert batch.input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 0, 1, 2], [0, 1, 1, 1]]
    assert batch.attention_mask.tolist() == [[0, 1, 1, 1], [1, 1, 0, 0]]
