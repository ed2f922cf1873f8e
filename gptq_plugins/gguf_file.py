"""One complete GGUF file for llama.cpp, written with the `gguf` package: the architecture's
metadata, the tokenizer, llama.cpp's tensor names and row order, and each tensor's data.

Quantized Linears arrive already packed (`gguf_packing`); what stays float is written as
llama.cpp's converter writes it: 1-D tensors (norms, biases) as F32, embeddings and the output
head as Q8_0 (F16 where a row is not a whole number of blocks).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import (GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, MODEL_ARCH,
                  MODEL_ARCH_NAMES, TokenType, get_tensor_name_map, quant_shape_to_byte_shape)
from gguf.quants import quantize
from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

from gptq_plugins.gguf_types import FILE_TYPES

log = logging.getLogger("gptq_plugins")

# model_type -> (llama.cpp architecture, whether q/k rows go from rotate-half to interleaved order)
ARCHITECTURES = {
    "llama": (MODEL_ARCH.LLAMA, True),
    "mistral": (MODEL_ARCH.LLAMA, True),
    "qwen2": (MODEL_ARCH.QWEN2, False),
    "qwen3": (MODEL_ARCH.QWEN3, False),
}
FLOAT_MATRIX_TYPE = GGMLQuantizationType.Q8_0
# tokenizer.json pre-tokenizers llama.cpp knows by name (`tokenizer.ggml.pre`).
_GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "use_regex": True}


class GGUFExportError(ValueError):
    """The model cannot be written as a GGUF file llama.cpp would load correctly."""


@dataclass(frozen=True)
class GGUFTensor:
    """A tensor of the file: its llama.cpp name, logical shape `[rows, cols]`, type and bytes."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    load: Callable[[], np.ndarray]  # the data as stored (rows in llama.cpp's order)

    @property
    def nbytes(self) -> int:
        if self.ggml_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return int(np.prod(self.shape)) * (4 if self.ggml_type == GGMLQuantizationType.F32 else 2)
        return int(np.prod(quant_shape_to_byte_shape(self.shape, self.ggml_type)))


def architecture(model_config) -> tuple[MODEL_ARCH, bool]:
    model_type = getattr(model_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(f"model_type {model_type!r}: GGUF export knows {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def gguf_name(checkpoint_name: str, model_config) -> str:
    """llama.cpp's name of a checkpoint tensor (`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`)."""
    arch, _ = architecture(model_config)
    name = get_tensor_name_map(arch, model_config.num_hidden_layers).get_name(
        checkpoint_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise GGUFExportError(f"tensor {checkpoint_name!r} has no llama.cpp name for {MODEL_ARCH_NAMES[arch]}")
    return name


def row_order(checkpoint_name: str, model_config) -> np.ndarray | None:
    """The row permutation llama.cpp's rope needs for this tensor, or None.

    Transformers' Llama rotates halves (row i of a head pairs with i + head_dim/2); llama.cpp's
    rotates adjacent pairs, so q/k rows of each head are interleaved: new row 2i + j is old row
    j * head_dim/2 + i. Quantized rows move with their scales, so packed blocks permute as rows.
    """
    _, permute = architecture(model_config)
    match = re.search(r"\.(q|k)_proj\.(weight|bias)$", checkpoint_name)
    if not permute or match is None:
        return None
    heads = model_config.num_attention_heads if match.group(1) == "q" else model_config.num_key_value_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    half = np.arange(head_dim // 2)
    within = np.stack([half, half + head_dim // 2], axis=1).reshape(-1)
    return (np.arange(heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def float_tensor(checkpoint_name: str, tensor: torch.Tensor, model_config,
                 matrix_type: GGMLQuantizationType = FLOAT_MATRIX_TYPE) -> GGUFTensor:
    """A tensor that was not GPTQ-quantized, in the type llama.cpp's converter gives it (matrices
    in `matrix_type`: Q8_0 beside quantized layers, F32/F16 for a float file)."""
    name = gguf_name(checkpoint_name, model_config)
    order = row_order(checkpoint_name, model_config)

    def rows() -> np.ndarray:
        data = tensor.detach().float().cpu().numpy()
        return data if order is None else data[order]

    shape = tuple(tensor.shape)
    if tensor.dim() == 1 or matrix_type == GGMLQuantizationType.F32:
        return GGUFTensor(name, shape, GGMLQuantizationType.F32, rows)
    if matrix_type != GGMLQuantizationType.F16 and tensor.shape[-1] % 32 == 0:
        return GGUFTensor(name, shape, matrix_type, lambda: quantize(rows(), matrix_type))
    return GGUFTensor(name, shape, GGMLQuantizationType.F16, lambda: rows().astype(np.float16))


def _rope_theta(model_config) -> float:
    theta = getattr(model_config, "rope_theta", None)
    parameters = getattr(model_config, "rope_parameters", None) or {}
    if parameters.get("rope_type", "default") != "default":
        raise GGUFExportError(f"rope_type {parameters['rope_type']!r}: GGUF export writes only default rope")
    return float(theta if theta is not None else parameters.get("rope_theta", 10000.0))


def _add_architecture(writer: GGUFWriter, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _pre_tokenizer(tokenizer_json: dict) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if all(pre.get(key) == value for key, value in _GPT2_PRE_TOKENIZER.items()):
        return "gpt-2"
    log.warning("GGUF export: pre-tokenizer %s is not one llama.cpp is known to match; writing 'default' "
                "(llama.cpp may split text differently from Transformers)", json.dumps(pre)[:200])
    return "default"


def _add_tokenizer(writer: GGUFWriter, directory: Path, vocab_size: int) -> None:
    """Tokens, their types, merges and special ids from the model's tokenizer files (`gguf.vocab`)."""
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise GGUFExportError(f"{tokenizer_file}: missing; GGUF export needs the model's tokenizer.json")
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    try:
        vocab, model, pre = BpeVocab(directory), "gpt2", _pre_tokenizer(tokenizer_json)
    except FileNotFoundError:  # not byte-level BPE: a SentencePiece-style (byte-fallback) tokenizer
        vocab, model, pre = LlamaHfVocab(directory), "llama", None
    special = {entry["id"] for entry in tokenizer_json.get("added_tokens", []) if entry.get("special")}
    tokens, types = [], []
    for index, (text, _score, token_type) in enumerate(vocab.all_tokens()):
        tokens.append(text)
        types.append(TokenType.CONTROL if index in special else token_type)
    if len(tokens) > vocab_size:
        raise GGUFExportError(f"{tokenizer_file}: {len(tokens)} tokens, more than the model's vocab_size {vocab_size}")
    for index in range(len(tokens), vocab_size):  # embedding rows past the tokenizer: padding
        tokens.append(f"[PAD{index}]".encode())
        types.append(TokenType.UNUSED)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model == "llama":
        writer.add_token_scores([score for _text, score, _type in vocab.all_tokens()] +
                                [-1000.0] * (vocab_size - vocab.vocab_size))
    SpecialVocab(directory, load_merges=model == "gpt2", n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def write_gguf(path: Path, model_config, tokenizer_dir: Path, tensors: list[GGUFTensor], *, name: str,
               file_type: str, metadata: dict[str, str], progress: Callable[[GGUFTensor], None] | None = None) -> Path:
    """Write `tensors` (each loaded only when its turn comes) with the model's metadata at `path`."""
    arch, _ = architecture(model_config)
    writer = GGUFWriter(path, MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    _add_architecture(writer, model_config)
    file_type = FILE_TYPES.get(file_type, file_type)
    writer.add_file_type(LlamaFileType.ALL_F32 if file_type == "F32" else LlamaFileType[f"MOSTLY_{file_type}"])
    writer.add_quantization_version(GGML_QUANT_VERSION)
    for key, value in metadata.items():
        writer.add_string(key, value)
    _add_tokenizer(writer, Path(tokenizer_dir), model_config.vocab_size)
    for tensor in tensors:  # the logical shape: with a raw type, `gguf` takes it as given
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:
        data = tensor.load()
        if data.nbytes != tensor.nbytes:
            raise GGUFExportError(f"tensor {tensor.name}: {data.nbytes} bytes, expected {tensor.nbytes}")
        writer.write_tensor_data(data)
        if progress is not None:
            progress(tensor)
    writer.close()
    return path
