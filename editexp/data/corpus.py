"""The text corpus for layer statistics: documents, token windows and padded batches.

Where the text comes from (each model config names its default, ``model.stats``):

- ``stats.corpus.files``: a list of text files; a bare file name is looked up in
  ``<data.dir>/corpus`` (SmolLM2's default: ``[wikitext-2-raw-test.txt]``, Wikipedia text as
  UME's C0);
- or ``stats.corpus.dataset``: a ``datasets`` corpus (``dataset_config``, ``split``,
  ``text_field``; streamed; the large models' default is WikiText-103 train);
- with neither set, every ``<data.dir>/corpus/*.txt`` (sorted by name; ``data.dir`` defaults
  to ``$EDITEXP_DATA_DIR``).

Setting both files and a dataset is an error (one of them would be silently ignored).

A document is a paragraph: one non-blank line of a file or of a dataset record. Paragraphs are
tokenized without special tokens as running text (each followed by its newline) and their ids
are concatenated into one stream. The stream is cut into windows of ``seq_len`` tokens, each
encoded as the tokenizer encodes any text: with its BOS when it adds one (Llama-3), without
when it does not (GPT-2, SmolLM2). Every window therefore looks like an edited prompt: at most
one BOS, at its start (see ``editexp.tokens``). Windows are deterministic: window ``i`` always
holds the same tokens, whatever ``n_tokens`` or the batch size.
"""

from __future__ import annotations

import codecs
import itertools
import logging
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from editexp.cache import file_sha256
from editexp.errors import UserError
from editexp.tokens import pad_sequences

log = logging.getLogger(__name__)

# Bump when the way text becomes windows changes: it is part of every statistics cache key.
WINDOW_FORMAT = "paragraph-lines/window-bos/v1"
_TOKENIZE_CHUNK = 256  # paragraphs per call of the (batched, fast) tokenizer


class CorpusError(UserError):
    """No usable corpus: the message names the path or setting and what would be accepted."""


@dataclass(frozen=True)
class CorpusSource:
    """Where the statistics text comes from: local files or a ``datasets`` corpus."""

    files: tuple[Path, ...] = ()
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    documents: bool = False  # each paragraph its own sequence (UME), not running-text windows

    @classmethod
    def from_config(cls, stats_cfg: Any, data_cfg: Any) -> CorpusSource:
        corpus_cfg = stats_cfg.get("corpus") or {}
        data_dir = data_cfg.get("dir") if data_cfg is not None else None
        documents = corpus_cfg.get("documents", False)
        if not isinstance(documents, bool):
            raise CorpusError(f"stats.corpus.documents={documents!r}; expected true or false")
        if corpus_cfg.get("files") and corpus_cfg.get("dataset"):
            raise CorpusError(
                f"stats.corpus.files={list(corpus_cfg['files'])} and "
                f"stats.corpus.dataset={corpus_cfg['dataset']!r} are both set; set the other "
                "one to null (e.g. stats.corpus.files=null stats.corpus.dataset=...)"
            )
        if corpus_cfg.get("files"):
            files = tuple(_existing_file(path, data_dir) for path in corpus_cfg["files"])
            return cls(files=files, documents=documents)
        if corpus_cfg.get("dataset"):
            return cls(
                dataset=str(corpus_cfg["dataset"]),
                dataset_config=corpus_cfg.get("dataset_config"),
                split=str(corpus_cfg.get("split") or "train"),
                text_field=str(corpus_cfg.get("text_field") or "text"),
                documents=documents,
            )
        if data_dir:
            corpus_dir = Path(data_dir).expanduser() / "corpus"
            files = sorted(corpus_dir.glob("*.txt"))
            if not files:
                raise CorpusError(
                    f"no statistics corpus: {corpus_dir} has no *.txt files "
                    f"(data.dir={data_dir!r}); "
                    "put text files there, or set stats.corpus.files=[...] or "
                    "stats.corpus.dataset (e.g. wikitext)"
                )
            return cls(files=tuple(files), documents=documents)
        raise CorpusError(
            "no statistics corpus configured: set stats.corpus.files (a list of .txt files), "
            "stats.corpus.dataset (a datasets corpus such as wikitext), or data.dir / "
            "$EDITEXP_DATA_DIR (a folder holding corpus/*.txt)"
        )

    def check(self) -> None:
        """Refuse files that are not text, before any model is loaded (a ``datasets`` corpus is
        checked when it is read)."""
        for path in self.files:
            check_text_file(path)

    def check_tokens(self, tokenizer: PreTrainedTokenizerBase, d_k: int) -> None:
        """Refuse local files with fewer than ``d_k`` tokens in all (C0 would be singular),
        before any model is loaded; only the first ``d_k`` tokens are read. A ``datasets``
        corpus is counted when the statistics read it."""
        if not self.files:
            return
        count = sum(1 for _ in itertools.islice(token_stream(tokenizer, self), d_k))
        if count < d_k:
            raise CorpusError(
                f"the statistics corpus ({self.describe()}) holds {count} tokens, fewer than "
                f"d_k={d_k}, so C0 would be singular; give it more text (stats.corpus.files, "
                "<data.dir>/corpus)"
            )

    def identity(self) -> str:
        """Names what the text is (file names and contents, or dataset coordinates) and how
        it becomes sequences."""
        layout = f"{WINDOW_FORMAT}|documents" if self.documents else WINDOW_FORMAT
        if self.files:
            parts = [f"{path.name}:{file_sha256(path)}" for path in self.files]
            return f"files[{','.join(parts)}]|{layout}"
        return (
            f"dataset[{self.dataset}:{self.dataset_config}:{self.split}:{self.text_field}]|{layout}"
        )

    def describe(self) -> str:
        layout = ", paragraph by paragraph" if self.documents else ""
        if self.files:
            return ", ".join(str(path) for path in self.files) + layout
        return f"datasets {self.dataset} ({self.dataset_config}, split {self.split}){layout}"

    def paragraphs(self) -> Iterator[str]:
        """Every non-blank line of the corpus, stripped, in a fixed order."""
        texts = self._file_texts() if self.files else self._dataset_texts()
        for text in texts:
            for line in text.splitlines():
                line = line.strip()
                if line:
                    yield line

    def _file_texts(self) -> Iterator[str]:
        for path in self.files:
            with _existing_file(path).open(encoding="utf-8", errors="replace") as handle:
                yield from handle

    def _dataset_texts(self) -> Iterator[str]:
        import datasets

        try:
            records = datasets.load_dataset(
                self.dataset, self.dataset_config, split=self.split, streaming=True
            )
        except Exception as error:  # many kinds: missing dataset, config, network
            raise CorpusError(
                f"cannot load stats.corpus.dataset={self.dataset!r} "
                f"(dataset_config={self.dataset_config!r}, split={self.split!r}): {error}; "
                "or use local text files with stats.corpus.files / data.dir"
            ) from error
        for record in records:
            if self.text_field not in record:
                raise CorpusError(
                    f"stats.corpus.text_field={self.text_field!r} is not a field of "
                    f"{self.dataset!r}; its fields are {sorted(record)}"
                )
            yield record[self.text_field]


def _existing_file(path: str | Path, data_dir: str | None = None) -> Path:
    """``path`` itself, or for a bare file name not found here, ``<data.dir>/corpus/<name>``."""
    path = Path(path).expanduser()
    if not path.is_file() and data_dir and path.name == str(path):
        in_data_dir = Path(data_dir).expanduser() / "corpus" / path.name
        if in_data_dir.is_file():
            return in_data_dir
        path = in_data_dir
    if not path.is_file():
        raise CorpusError(
            f"statistics corpus file {path} does not exist; stats.corpus.files takes a list "
            "of existing text files or names of files in <data.dir>/corpus (or leave it null "
            "to use <data.dir>/corpus/*.txt)"
        )
    return path


_TEXT_PROBE_BYTES = 1 << 16


def check_text_file(path: Path) -> None:
    """A corpus file must be readable UTF-8 text with some words in it (its first 64 KiB are
    checked: no NUL byte, valid UTF-8, not only white space)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_TEXT_PROBE_BYTES)
    except OSError as error:
        raise CorpusError(f"cannot read statistics corpus file {path}: {error.strerror}") from None
    problem = None
    if not head.strip():
        problem = "it is empty"
    elif b"\0" in head:
        problem = "it holds NUL bytes (a binary file?)"
    else:
        try:  # incremental: a character cut at the end of the probe is not an error
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as error:
            problem = f"it is not UTF-8 text (byte {error.start})"
    if problem is not None:
        raise CorpusError(
            f"statistics corpus file {path} is not usable: {problem}; the corpus is plain "
            "text files (stats.corpus.files, or <data.dir>/corpus/*.txt)"
        )


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before any text (Llama-3: [BOS]; GPT-2, SmolLM2: [])."""
    probe = "corpus"
    with_special = list(tokenizer(probe).input_ids)
    plain = list(tokenizer(probe, add_special_tokens=False).input_ids)
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def paragraph_ids(tokenizer: PreTrainedTokenizerBase, source: CorpusSource) -> Iterator[list[int]]:
    """The ids of every paragraph followed by its newline, without special tokens."""
    chunk: list[str] = []
    for paragraph in source.paragraphs():
        chunk.append(paragraph + "\n")
        if len(chunk) == _TOKENIZE_CHUNK:
            yield from tokenizer(chunk, add_special_tokens=False).input_ids
            chunk = []
    if chunk:
        yield from tokenizer(chunk, add_special_tokens=False).input_ids


def token_stream(tokenizer: PreTrainedTokenizerBase, source: CorpusSource) -> Iterator[int]:
    """The ids of the corpus as running text: every paragraph followed by its newline."""
    for ids in paragraph_ids(tokenizer, source):
        yield from ids


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    source: CorpusSource,
    seq_len: int,
    n_tokens: int,
    first_window: int = 0,
) -> Iterator[list[int]]:
    """Windows of ``seq_len`` ids (the tokenizer's BOS, then running text), starting at window
    ``first_window``, until ``n_tokens`` ids in total; the last window is cut short to fit.
    With ``source.documents``, one window per paragraph instead (see :func:`_document_windows`).

    Logs a warning if the corpus runs out first (the windows then hold fewer tokens).
    """
    prefix = special_prefix(tokenizer)
    if seq_len - len(prefix) < 1:
        raise CorpusError(f"stats.seq_len={seq_len} leaves no room for text after {prefix}")
    if n_tokens <= len(prefix):
        raise CorpusError(f"stats.n_tokens={n_tokens} is too small for one window of text")
    if source.documents:
        produced = yield from _document_windows(tokenizer, source, seq_len, n_tokens, first_window)
    else:
        produced = yield from _running_windows(tokenizer, source, seq_len, n_tokens, first_window)
    if produced < n_tokens:
        log.warning(
            "statistics corpus (%s) ran out after %d of %d tokens",
            source.describe(),
            produced,
            n_tokens,
        )


def _running_windows(
    tokenizer: PreTrainedTokenizerBase,
    source: CorpusSource,
    seq_len: int,
    n_tokens: int,
    first_window: int,
) -> Generator[list[int], None, int]:
    """Running text cut into windows; returns the number of ids produced."""
    prefix = special_prefix(tokenizer)
    text_len = seq_len - len(prefix)
    stream = token_stream(tokenizer, source)
    for _ in range(first_window * text_len):  # skip the windows before first_window
        if next(stream, None) is None:
            break
    produced = 0
    window = list(prefix)
    for token in stream:
        if produced >= n_tokens:
            return produced
        window.append(token)
        if len(window) == seq_len or produced + len(window) == n_tokens:
            produced += len(window)
            yield window
            window = list(prefix)
    if produced < n_tokens and len(window) > len(prefix):
        produced += len(window)
        yield window
    return produced


def _document_windows(
    tokenizer: PreTrainedTokenizerBase,
    source: CorpusSource,
    seq_len: int,
    n_tokens: int,
    first_window: int,
) -> Generator[list[int], None, int]:
    """Each paragraph its own sequence from position 0 (the tokenizer's BOS, then the paragraph
    cut at ``seq_len``), as UME's ``layer_stats`` reads a corpus record by record. The
    paragraphs that fill the first ``first_window * seq_len`` ids are skipped (held-out keys
    come after the C0 sample). Returns the number of ids produced."""
    prefix = special_prefix(tokenizer)
    text_len = seq_len - len(prefix)
    to_skip = first_window * text_len
    produced = 0
    for ids in paragraph_ids(tokenizer, source):
        ids = ids[:text_len]
        if to_skip > 0:
            to_skip -= len(ids)
            continue
        window = (prefix + ids)[: n_tokens - produced]
        if len(window) <= len(prefix):
            break
        produced += len(window)
        yield window
        if produced >= n_tokens:
            break
    return produced


def padded_batches(
    windows: Iterable[list[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Group windows into ``(input_ids, attention_mask)`` batches (B, T), padded on the right."""
    batch: list[list[int]] = []
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            padded = pad_sequences(batch, pad_id)
            yield padded.input_ids, padded.attention_mask
            batch = []
    if batch:
        padded = pad_sequences(batch, pad_id)
        yield padded.input_ids, padded.attention_mask


def corpus_batches(
    tokenizer: PreTrainedTokenizerBase,
    source: CorpusSource,
    seq_len: int,
    n_tokens: int,
    batch_size: int,
    first_window: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Padded batches of corpus windows (see :func:`token_windows`)."""
    windows = token_windows(tokenizer, source, seq_len, n_tokens, first_window)
    return padded_batches(windows, batch_size, _pad_id(tokenizer))


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    return int(pad_id) if pad_id is not None else 0
