"""Tiny local models for tests, the demo and benchmarks (nothing is downloaded from a hub).

A byte-level BPE tokenizer is trained with `tokenizers` on the builtin calibration text and saved
beside a randomly initialised Transformers model built from its config.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TOKENIZER_DOCS = 400


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the first documents of the builtin corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gptq_plugins.calibration import builtin_documents

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(builtin_documents("calibration")[:TOKENIZER_DOCS], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(model_type: str = "llama", *, hidden_size: int = 128, intermediate_size: int = 256,
                num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int | None = None,
                vocab_size: int = 512, max_position_embeddings: int = 512, bos_token_id: int = 0,
                eos_token_id: int = 1, pad_token_id: int | None = None, **config_overrides):
    """The Transformers config of a small `model_type` model; `config_overrides` win over the defaults."""
    from transformers import AutoConfig

    options = dict(
        hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads, vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return AutoConfig.for_model(model_type, **{**options, **config_overrides})


def build_tiny_model(path: str | os.PathLike, *, model_type: str = "llama", vocab_size: int = 512,
                     dtype: torch.dtype = torch.float32, seed: int = 0, with_tokenizer: bool = True,
                     **config_options) -> Path:
    """Save a randomly initialised causal LM of `model_type` (and a local tokenizer) at `path`.

    `config_options` go to `tiny_config` (widths, depth, heads, any config field).
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(vocab_size) if with_tokenizer else None
    if tokenizer is not None:
        config_options = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                          "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                          **config_options}
    config = tiny_config(model_type, **{"vocab_size": vocab_size, **config_options})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def greedy_tokens(model, prompt_ids: list[list[int]], n: int) -> list[list[int]]:
    """`n` arg-max continuation token ids per prompt, never stopping at EOS.

    The same rule as vLLM's `SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)`, so
    hosts can be compared token for token.
    """
    continuations = []
    for prompt in prompt_ids:
        ids = torch.tensor([prompt], device=model.device)
        for _ in range(n):
            next_id = model(input_ids=ids).logits[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
        continuations.append(ids[0, len(prompt):].tolist())
    return continuations


def greedy_tokens_transformers(artifact_dir: str | os.PathLike, prompt_ids: list[list[int]], n: int,
                               backend: str | None = None) -> list[list[int]]:
    """`greedy_tokens` of an artifact loaded by Transformers `from_pretrained` in float32 on CPU
    (with the kernel `backend` forced, when given)."""
    from transformers import AutoModelForCausalLM

    import gptq_plugins  # noqa: F401  (registers quant_method gptq_plugins with Transformers)

    options = {}
    if backend is not None:
        from gptq_plugins_transformers import GPTQPluginsConfig

        options["quantization_config"] = GPTQPluginsConfig(backend=backend)
    model = AutoModelForCausalLM.from_pretrained(artifact_dir, dtype=torch.float32, **options)
    return greedy_tokens(model, prompt_ids, n)


@torch.no_grad()
def dequantized_reference(model_dir: str | os.PathLike, artifact_dir: str | os.PathLike, dtype=torch.float32):
    """The float source model with each quantized Linear's weight replaced by its dequantized codes.

    What the artifact, loaded by any host, must compute.
    """
    from transformers import AutoModelForCausalLM

    from gptq_plugins.artifact import read_artifact
    from gptq_plugins.linear_weights import write_weight
    from gptq_plugins.packing import dequantize_packed
    from gptq_plugins.preparation import layout_for

    artifact = read_artifact(artifact_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    layout = layout_for(model)
    layout.prepare(model)
    for name in artifact.modules:
        packed = (artifact.tensor(f"{name}.{key}") for key in ("qweight", "qzeros", "scales", "g_idx"))
        write_weight(model.get_submodule(layout.module_name(name)), dequantize_packed(*packed, artifact.config.bits))
    return model


def write_token_dataset(path: Path, rows: int, seq_len: int, vocab: int, seed: int = 0) -> Path:
    """Random token ids as a `.jsonl` dataset with an `input_ids` column (needs no tokenizer)."""
    import json

    ids = torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(seed))
    path.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids.tolist()))
    return path


def read_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `directory` (no validation: tests corrupt them)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def rewrite_tensor(directory: str | os.PathLike, name: str, change) -> None:
    """Replace tensor `name` of a saved checkpoint by `change(tensor)`, in the shard that holds it.

    For tests that corrupt an artifact on purpose: the index and every other tensor stay as they are.
    """
    import json

    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    shard = directory / json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = change(tensors[name]).contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})


def tree_digest(root: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under `root` by relative path: equal digests mean nothing was touched."""
    import hashlib

    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def gguf_reference_model(model_dir: str | os.PathLike, gguf_path: str | os.PathLike, dtype=torch.float32):
    """The Transformers model of `model_dir` holding the weights of a GGUF file as `gguf`'s own
    dequantizer reads them (q/k rows back in Transformers' order): what llama.cpp should compute."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    from gptq_plugins.gguf_file import gguf_name, row_order

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    stored = {t.name: t for t in GGUFReader(gguf_path).tensors}
    state = {}
    for name, tensor in model.state_dict().items():
        tied = name == "lm_head.weight" and model.config.tie_word_embeddings
        entry = stored["token_embd.weight" if tied else gguf_name(name, model.config)]
        values = dequantize(entry.data, entry.tensor_type).reshape(tensor.shape)
        order = row_order(name, model.config)
        if order is not None:
            values = values[np.argsort(order)]
        state[name] = torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
    model.load_state_dict(state)
    return model.eval()


def llama_cpp_quantize(source, out, type_name: str, imatrix: dict | None = None, threads: int = 2) -> None:
    """llama.cpp's own quantizer (`llama-quantize`, through llama-cpp-python) from the float GGUF
    `source` to `out`; embeddings and head Q8_0 as ours. `imatrix`: GGUF tensor name -> float32
    importance per input column (what `llama-imatrix` computes)."""
    import ctypes

    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = threads
    params.token_embedding_type = llama_cpp.GGML_TYPE_Q8_0
    params.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
    keep = []  # the buffers must outlive the call
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            entries[i].name = name.encode()
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        entries[len(imatrix)].name = None  # the list ends at a null name
        params.imatrix = entries
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {type_name}")
