"""Perplexity on held-out text, for a float model or an artifact (`gptq-plugins eval`).

Held-out text is the builtin corpus's eval split, which calibration never draws from, or a
user's UTF-8 text file (`.txt` or no extension, such as Debian's /usr/share/common-licenses/*). The token stream is cut into non-overlapping windows of `seq_len`
tokens; perplexity is `exp` of the mean next-token negative log-likelihood over every predicted
token, the protocol of the GPTQ paper. Artifacts load through `AutoModelForCausalLM` and hence
through the Transformers adapter, so the number measures what users of that adapter run.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gptq_plugins.config import ConfigError, QuantizeConfig

DEFAULT_SEQ_LEN = 2048
TEXT_SUFFIXES = (".txt", "")
BATCH_TOKENS = 8192  # tokens per forward pass; bounds the float32 logits held at once


def heldout_tokens(dataset: str, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The held-out token stream: `builtin` (the eval split) or a text file, cut at `max_tokens`."""
    from gptq_plugins.calibration import BUILTIN, builtin_documents, tokenize_documents

    if dataset == BUILTIN:
        documents = builtin_documents("eval")
    else:
        path = Path(dataset)
        # A numeric "suffix" is a version, not a format (Apache-2.0, MPL-1.1 in common-licenses).
        if path.suffix not in TEXT_SUFFIXES and not path.suffix[1:].isdigit():
            raise ConfigError("dataset", f"{dataset}: expected 'builtin' or a UTF-8 text file (.txt or no extension)")
        if not path.is_file():
            raise ConfigError("dataset", f"{dataset}: no such file")
        try:
            documents = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as err:
            raise ConfigError("dataset", f"{dataset}: not UTF-8 text ({err})") from None
    if tokenizer is None:
        raise ConfigError("model", "the model directory has no tokenizer files to read the text with")
    stream = tokenize_documents(documents, tokenizer, max_tokens=max_tokens)
    return stream[:max_tokens] if max_tokens is not None else stream


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, bos: int | None = None) -> dict:
    """Perplexity of `model` on `tokens` (1-D) in non-overlapping windows of `seq_len` tokens;
    with `bos` (see `calibration.added_bos`) each window is BOS and `seq_len - 1` tokens."""
    if seq_len < 2 + (bos is not None):
        raise ConfigError("seq_len", f"expected at least {2 + (bos is not None)} tokens per window, got {seq_len}")
    width = seq_len - (bos is not None)
    count = tokens.numel() // width
    if count == 0:
        raise ConfigError("seq_len", f"the held-out text has {tokens.numel()} tokens, fewer than "
                          f"one window of {width}")
    windows = tokens[: count * width].view(count, width)
    if bos is not None:
        from gptq_plugins.calibration import prepend_bos

        windows = prepend_bos(windows, bos)
    device = next(model.parameters()).device
    total_nll, predicted = 0.0, 0
    for batch in windows.split(max(1, BATCH_TOKENS // seq_len)):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total_nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           reduction="sum"))
        predicted += targets.numel()
    nll = total_nll / predicted
    return {"perplexity": math.exp(nll), "nll": nll, "predicted_tokens": predicted,
            "windows": count, "seq_len": seq_len}


@torch.no_grad()
def quantize_rtn_in_place(model: torch.nn.Module, config: QuantizeConfig) -> None:
    """Round every Linear GPTQ would quantize to the nearest grid point: the baseline GPTQ must beat."""
    from gptq_plugins.linear_weights import read_weight, write_weight
    from gptq_plugins.preparation import prepare_blocks
    from gptq_plugins.solver import rtn

    layout, _blocks = prepare_blocks(model, config)
    for layer in layout.linears(model).values():
        write_weight(layer, rtn(read_weight(layer), config).dequantize())


def _quantization_config(path: Path) -> dict | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None  # load_model reports the missing or unreadable config.json
    return config.get("quantization_config")


def _load_gguf(path: Path):
    """A GGUF file as Transformers reads it: weights dequantized by `gguf` (the values llama.cpp
    multiplies with), tokenizer from the file's metadata."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq_plugins.artifact import ArtifactError, read_report

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    try:
        quantization = read_report(path)["config"]
    except ArtifactError:  # a GGUF file another tool wrote
        quantization = {"gguf_file": path.name}
    return model.eval(), tokenizer, quantization


def load_for_eval(path: str | os.PathLike, *, trust_remote_code: bool = False):
    """`(model, tokenizer, quantization_config or None)` for a float model, an artifact directory
    or a .gguf file.

    Artifacts are validated by the core reader first (errors name the file and tensor), then
    loaded by `AutoModelForCausalLM.from_pretrained`, which hands them to the Transformers adapter.
    """
    from gptq_plugins.artifact import ArtifactError, read_artifact
    from gptq_plugins.model_loading import load_model

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    quantization = _quantization_config(path)
    if quantization is None:
        model, tokenizer = load_model(path, trust_remote_code=trust_remote_code)
        return model, tokenizer, None
    read_artifact(path)
    try:
        model, tokenizer = load_model(path, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise ArtifactError(f"{path}: Transformers cannot load this artifact ({err}); artifacts load "
                            "through the Transformers adapter, installed by "
                            "`pip install --no-deps -e adapters/transformers`") from err
    return model, tokenizer, quantization


def evaluate(path: str | os.PathLike, *, dataset: str = "builtin", seq_len: int | None = None,
             max_tokens: int | None = None, trust_remote_code: bool = False) -> dict:
    """Perplexity of the model or artifact at `path` on held-out text, as a JSON-clean report."""
    from gptq_plugins.calibration import added_bos
    from gptq_plugins.model_loading import context_length

    if max_tokens is not None and max_tokens <= 0:
        raise ConfigError("max_tokens", f"expected a positive integer, got {max_tokens}")
    start = time.perf_counter()
    model, tokenizer, quantization = load_for_eval(path, trust_remote_code=trust_remote_code)
    limit = context_length(model)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
    elif limit and seq_len > limit:
        raise ConfigError("seq_len", f"{seq_len} exceeds the model's context length {limit}")
    tokens = heldout_tokens(dataset, tokenizer, max_tokens)
    result = perplexity(model, tokens, seq_len, bos=added_bos(tokenizer))
    kind = "gguf" if Path(path).suffix == ".gguf" else "artifact" if quantization else "float"
    return {"model": str(Path(path).resolve()), "kind": kind,
            "quantization_config": quantization, "dataset": dataset, **result,
            "seconds": round(time.perf_counter() - start, 2)}
