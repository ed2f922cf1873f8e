"""llama.cpp (llama-cpp-python, built from source by `make venv`) loads our GGUF files and computes
what a Transformers model holding the same dequantized weights computes; Transformers itself
loads the files too (`from_pretrained(dir, gguf_file=...)`, also `gptq-plugins eval FILE.gguf`).

llama.cpp multiplies quantized weights with activations it rounds to Q8_0 (Q8_K for the K-quants),
so its logits sit 1-1.6% (RMS) from the exact product, for llama.cpp's own files as for ours; the
test asks that they sit much closer to the file's own weights than to the float model's, which
only holds if every code, scale and row order was read as written.
"""

import numpy as np
import pytest
import torch
from llama_cpp import GGML_TYPE_F32, Llama
from transformers import AutoModelForCausalLM

from gguf import GGUFReader

from gptq_plugins.config import QuantizeConfig
from gptq_plugins.gguf_export import write_float_gguf
from gptq_plugins.gguf_types import GGUF_MIXTURES, GGUF_TYPES
from gptq_plugins.pipeline import quantize_model
from gptq_plugins.testing import build_tiny_model, gguf_reference_model, llama_cpp_quantize

PROMPT = list(range(5, 69))
# RMS(llama.cpp - file's weights) at most this fraction of RMS(llama.cpp - float weights); the
# weight error of Q6_K and Q8_0 is itself close to llama.cpp's activation rounding.
CLOSER_THAN_FLOAT = {"Q6_K": 0.4, "Q8_0": 0.75}


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].numpy()


def llama_cpp_logits(path) -> np.ndarray:
    llm = Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)  # an F32 KV cache: only weights differ
    try:
        llm.eval(PROMPT)
        return np.array(llm.scores[:len(PROMPT)])
    finally:
        llm.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Hidden 256 and 512: every Linear holds whole K-quant super-blocks; 8 blocks: mixtures vary by layer.
    return build_tiny_model(tmp_path_factory.mktemp("llama_cpp") / "llama", hidden_size=256, intermediate_size=512,
                            num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)


def _quantize(model_dir, out, type_name):
    return quantize_model(model_dir, out, QuantizeConfig.from_options(gguf_type=type_name, num_samples=8, seq_len=128),
                          progress=False)


@pytest.mark.parametrize("type_name", sorted(GGUF_TYPES) + sorted(GGUF_MIXTURES))
def test_llama_cpp_computes_what_the_file_holds(tiny, tmp_path, type_name):
    out = _quantize(tiny, tmp_path / f"tiny-{type_name}.gguf", type_name)
    got = llama_cpp_logits(out)
    reference = _logits(gguf_reference_model(tiny, out))
    float_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval())
    to_file, to_float = _rms(got - reference), _rms(got - float_logits)
    assert to_file <= 0.02 * _rms(reference), (to_file, _rms(reference))
    assert to_file <= CLOSER_THAN_FLOAT.get(type_name, 0.25) * to_float, (to_file, to_float)


@pytest.mark.parametrize("type_name", sorted(GGUF_MIXTURES))
def test_mixture_gives_each_tensor_the_type_llama_quantize_gives_it(tiny, tmp_path, type_name):
    ours = _quantize(tiny, tmp_path / "ours.gguf", type_name)
    theirs = tmp_path / "theirs.gguf"
    llama_cpp_quantize(write_float_gguf(tiny, tmp_path / "float.gguf"), theirs, type_name)
    types = [{t.name: t.tensor_type.name for t in GGUFReader(path).tensors} for path in (ours, theirs)]
    assert types[0] == types[1]
    assert {"Q6_K", GGUF_MIXTURES[type_name][0]} <= set(types[0].values())


def test_transformers_reads_the_file_and_its_tokenizer_as_written(tiny, tmp_path):
    from transformers import AutoTokenizer

    from gptq_plugins.evaluate import load_for_eval

    out = _quantize(tiny, tmp_path / "tiny-Q4_K_M.gguf", "Q4_K_M")
    model, tokenizer, quantization = load_for_eval(out)
    assert quantization["gguf_type"] == "Q4_K_M"
    assert np.array_equal(_logits(model), _logits(gguf_reference_model(tiny, out)))
    text = "GPTQ: 12 blocks of 32 inputs, quantized; llama.cpp reads them."
    assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(tiny)(text)["input_ids"]
