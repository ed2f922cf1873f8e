"""Calibration data: token windows drawn from text every CPython ships, or from a user's file.

`builtin` needs no network and ships no copied text: prose from the documentation topics of
`pydoc_data.topics` and the sources of the standard library. Every tenth document is held out
for evaluation and never used for calibration. Sources are found by name through the plugin hook
(`plugins.load_calibration`), whose core implementation calls this module.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from gptq_plugins.config import ConfigError, QuantizeConfig

BUILTIN = "builtin"
# What `meta.calibration.dataset` says of token ids a caller passed in (no dataset, no seed).
GIVEN_TOKEN_IDS = "token_ids"
HELD_OUT_EVERY = 10
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class CalibrationError(ValueError):
    """Calibration data is missing, unreadable or too short."""


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration token ids and what they were drawn from, so the artifact records what was used."""

    token_ids: torch.Tensor  # LongTensor [num_samples, seq_len]
    dataset: str             # 'builtin', a file path, or GIVEN_TOKEN_IDS
    seed: int | None         # the window draw's seed; None for given ids

    @classmethod
    def of(cls, calibration: "CalibrationSet | torch.Tensor") -> "CalibrationSet":
        """`calibration` itself, or token ids a caller passed in, described as such."""
        if isinstance(calibration, CalibrationSet):
            return calibration
        return cls(calibration, GIVEN_TOKEN_IDS, None)

    def meta(self) -> dict:
        """The `meta.calibration` entries this set decides: source, seed and the actual window shape."""
        rows, columns = self.token_ids.shape
        described = {"dataset": self.dataset, "num_samples": int(rows), "seq_len": int(columns)}
        return described if self.seed is None else {**described, "seed": self.seed}


def builtin_documents(split: str = "calibration") -> list[str]:
    """Documents of the builtin corpus in a fixed order; `split` is 'calibration' or 'eval'."""
    if split not in ("calibration", "eval"):
        raise ValueError(f"split: expected 'calibration' or 'eval', got {split!r}")
    from pydoc_data.topics import topics

    docs = [topics[key] for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for source in sorted(stdlib.glob("*.py")):
        try:
            docs.append(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    held_out = split == "eval"
    return [doc for i, doc in enumerate(docs) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out]


def tokenize_documents(documents, tokenizer, *, max_tokens: int | None = None) -> torch.Tensor:
    """One token stream of documents separated by EOS (or a blank line); stops past `max_tokens`."""
    if tokenizer is None:
        raise CalibrationError("the model has no tokenizer: add tokenizer files to the model "
                               "directory, or pass a dataset with an 'input_ids' column")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.extend([eos] if eos is not None else tokenizer("\n\n", add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def added_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before every text (Llama's and Gemma's do), else None.

    Such a model only ever sees text after BOS, and its first position is an attention sink with
    outsized activations: windows cut from a document's middle must still start with it, or the
    Hessians describe inputs the model never gets.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def prepend_bos(rows: torch.Tensor, bos: int) -> torch.Tensor:
    """`rows [n, length]` with a column of `bos` in front: `[n, length + 1]`."""
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype), rows], dim=1)


def windows(stream: torch.Tensor, num_samples: int, seq_len: int, seed: int, source: str,
            bos: int | None = None) -> torch.Tensor:
    """`num_samples` distinct non-overlapping windows of `seq_len` tokens, chosen by `seed`; with
    `bos`, each is that token and `seq_len - 1` tokens of the stream."""
    if bos is not None:
        return prepend_bos(windows(stream, num_samples, seq_len - 1, seed, source), bos)
    available = stream.numel() // seq_len
    if available < num_samples:
        raise CalibrationError(
            f"{source}: {stream.numel()} tokens give {available} windows of {seq_len} tokens, "
            f"need num_samples={num_samples} (lower --num-samples or --seq-len, or add text)")
    chunks = stream[: available * seq_len].view(available, seq_len)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(available, generator=generator)[:num_samples].sort().values
    return chunks[pick].clone()


def _shuffled(documents: list[str], seed: int) -> list[str]:
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed))
    return [documents[i] for i in order.tolist()]


def builtin_calibration(config: QuantizeConfig, tokenizer, seq_len: int) -> torch.Tensor:
    docs = _shuffled(builtin_documents("calibration"), config.seed)
    # Twice what is needed gives the window draw room to choose; the whole corpus is ~10M tokens.
    stream = tokenize_documents(docs, tokenizer, max_tokens=2 * config.num_samples * seq_len)
    return windows(stream, config.num_samples, seq_len, config.seed, "builtin calibration text",
                   bos=added_bos(tokenizer))


def file_calibration(path: str, config: QuantizeConfig, tokenizer, seq_len: int) -> torch.Tensor:
    """Windows from a .txt/.jsonl/.parquet file: `input_ids` rows used as is (less the positions an
    `attention_mask` column marks as padding), else `text` tokenized."""
    file = Path(path)
    builder = FILE_BUILDERS.get(file.suffix)
    if builder is None:
        raise ConfigError("dataset", f"{path}: expected 'builtin' or a file ending in "
                          f"{', '.join(FILE_BUILDERS)}")
    if not file.is_file():
        raise ConfigError("dataset", f"{path}: no such file")
    if file.stat().st_size == 0:
        raise CalibrationError(f"{path}: empty file; expected text or input_ids for num_samples="
                               f"{config.num_samples} x seq_len={seq_len} tokens")
    import datasets

    try:
        data = datasets.load_dataset(builder, data_files=str(file), split="train", keep_in_memory=True)
    except Exception as err:  # datasets raises many types for unreadable files
        raise CalibrationError(f"{path}: cannot read as {builder} ({type(err).__name__}: {err})") from None
    if "input_ids" in data.column_names:
        rows = data["input_ids"]
        if "attention_mask" in data.column_names:  # padded rows: only the real tokens are kept
            rows = [[t for t, keep in zip(row, mask) if keep] for row, mask in zip(rows, data["attention_mask"])]
        rows = [row[:seq_len] for row in rows if len(row) >= seq_len]
        if len(rows) < config.num_samples:
            raise CalibrationError(f"{path}: {len(rows)} rows of input_ids have at least {seq_len} "
                                   f"tokens, need num_samples={config.num_samples}")
        generator = torch.Generator().manual_seed(config.seed)
        pick = torch.randperm(len(rows), generator=generator)[: config.num_samples].sort().values
        return torch.tensor([rows[i] for i in pick.tolist()], dtype=torch.long)
    if "text" not in data.column_names:
        raise CalibrationError(f"{path}: expected a 'text' or 'input_ids' column, found {data.column_names}")
    texts = [t for t in data["text"] if t and t.strip()]
    if not texts:
        raise CalibrationError(f"{path}: no non-empty text")
    stream = tokenize_documents(texts, tokenizer)
    return windows(stream, config.num_samples, seq_len, config.seed, path, bos=added_bos(tokenizer))


def degenerate_calibration(ids: torch.Tensor, pad_token_id: int | None, source: str) -> str | None:
    """Why `ids` cannot calibrate anything, or None.

    A single repeated token gives every position the same first-block input; the pad token's
    embedding is usually zero, so its activations (and Hessians) are all zero, and GPTQ would
    zero every weight without any numerical error to notice.
    """
    if ids.numel() == 0:
        return f"dataset {source!r}: no calibration tokens; expected num_samples x seq_len token ids"
    distinct = torch.unique(ids)
    if distinct.numel() > 1:
        return None
    token = int(distinct[0])
    what = " (the pad token, whose activations are all zero)" if token == pad_token_id else ""
    return (f"dataset {source!r}: all {ids.numel()} calibration tokens are id {token}{what}; "
            "expected varied text or token ids")
