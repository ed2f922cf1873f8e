"""llama.cpp (llama-cpp-python, built from source by `make venv`) loads our GGUF files and computes
what a Transformers model holding the same dequantized weights computes.

llama.cpp multiplies quantized weights with activations it rounds to Q8_0, so its logits sit about
1% (RMS) from the exact product; the test asks that they sit much closer to the file's own weights
than to the float model's, which only holds if every code, scale and row order was read as written.
"""

import numpy as np
import pytest
import torch
from llama_cpp import GGML_TYPE_F32, Llama
from transformers import AutoModelForCausalLM

from gptq_plugins.config import QuantizeConfig
from gptq_plugins.gguf_types import GGUF_TYPES
from gptq_plugins.pipeline import quantize_model
from gptq_plugins.testing import build_tiny_model, gguf_reference_model

PROMPT = list(range(5, 69))
# RMS(llama.cpp - file's weights) at most this fraction of RMS(llama.cpp - float weights); Q8_0's
# weight error is itself close to llama.cpp's activation rounding.
CLOSER_THAN_FLOAT = {"Q8_0": 0.75}


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
    return build_tiny_model(tmp_path_factory.mktemp("llama_cpp") / "llama", hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("type_name", sorted(GGUF_TYPES))
def test_llama_cpp_computes_what_the_file_holds(tiny, tmp_path, type_name):
    out = quantize_model(tiny, tmp_path / f"tiny-{type_name}.gguf",
                         QuantizeConfig.from_options(gguf_type=type_name, num_samples=8, seq_len=128), progress=False)
    got = llama_cpp_logits(out)
    reference = _logits(gguf_reference_model(tiny, out))
    float_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval())
    to_file, to_float = _rms(got - reference), _rms(got - float_logits)
    assert to_file <= 0.015 * _rms(reference), (to_file, _rms(reference))
    assert to_file <= CLOSER_THAN_FLOAT.get(type_name, 0.25) * to_float, (to_file, to_float)
