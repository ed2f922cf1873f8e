"""The GGUF export format: a run's GPTQ-solved Linears packed into llama.cpp's blocks, one .gguf file.

The run is the same as for the GPTQ v1 artifact (streamed blocks, checkpoints, `--resume`): each
block's packed rows go into the partial directory's shards as it finishes; at the end the file is
written there from the shards and the float tensors, then renamed to the output path.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gptq_plugins.assembly import ArtifactAssembly
from gptq_plugins.artifact import GGUF_REPORT_KEY, GGUF_WRITER_KEY
from gptq_plugins.config import WRITER_MARK
from gptq_plugins.gguf_file import GGUFExportError, GGUFTensor, float_tensor, gguf_name, row_order, write_gguf
from gptq_plugins.gguf_packing import pack_blocks
from gptq_plugins.model_loading import SourceModel
from gptq_plugins.report import run_report
from gptq_plugins.solver import QuantizedWeight
from gptq_plugins.version import __version__

BLOCKS_MARK = ".gguf_blocks."  # shard name of a Linear's packed rows: `<checkpoint path>.gguf_blocks.<type>`


def write_float_gguf(model_dir: str | Path, out_path: str | Path, *, file_type: str = "F32") -> Path:
    """The float model of `model_dir` as one F32 (or F16) GGUF file: what llama.cpp's own
    quantizer takes as input (benchmarks/gguf.py compares against it). Written beside `out_path`
    and renamed, never over an existing file."""
    from gguf import GGMLQuantizationType
    from safetensors import safe_open
    from transformers import AutoConfig

    from gptq_plugins.artifact import read_weight_map

    model_dir, out_path = Path(model_dir), Path(out_path)
    if out_path.exists():
        raise FileExistsError(f"output: {out_path} already exists; expected a new path")
    model_config = AutoConfig.from_pretrained(model_dir)
    tensors = []
    for name, file in sorted(read_weight_map(model_dir).items()):
        if name == "lm_head.weight" and getattr(model_config, "tie_word_embeddings", False):
            continue
        with safe_open(model_dir / file, framework="pt") as f:
            tensors.append(float_tensor(name, f.get_tensor(name), model_config, GGMLQuantizationType[file_type]))
    tensors.sort(key=lambda t: _file_order(t.name))
    # A fresh name of our own (never a file the user has), so the cleanup removes only what we wrote.
    handle, name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent)
    os.close(handle)
    partial = Path(name)
    try:
        write_gguf(partial, model_config, model_dir, tensors, name=model_dir.name, file_type=file_type,
                   metadata={GGUF_WRITER_KEY: f"{WRITER_MARK}{__version__}"})
        partial.rename(out_path)
    finally:
        partial.unlink(missing_ok=True)
    return out_path


def _file_order(name: str) -> tuple:
    """token_embd first, then blocks in order, then the output norm and head (as llama.cpp's converter)."""
    block = re.match(r"blk\.(\d+)\.", name)
    return (1, int(block.group(1)), name) if block else (0 if name.startswith("token_embd") else 2, 0, name)


class GGUFAssembly(ArtifactAssembly):
    """A run's .gguf file in the making (see `ArtifactAssembly` for the run's checkpoints)."""

    def layer_tensors(self, path: str, result: QuantizedWeight, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        tensors = {path + BLOCKS_MARK + result.grid.type.name: torch.from_numpy(pack_blocks(result))}
        if bias is not None:
            tensors[f"{path}.bias"] = bias.detach()
        return tensors

    def _quantized_tensor(self, stored: str, shape: list[int], in_features: dict[str, int]) -> GGUFTensor:
        from gguf import GGMLQuantizationType

        path, type_name = stored.split(BLOCKS_MARK)
        weight = path + ".weight"
        order = row_order(weight, self.model.config)

        def rows():
            data = self.writer.written_tensor(stored).numpy()
            return data if order is None else data[order]

        return GGUFTensor(gguf_name(weight, self.model.config), (shape[0], in_features[path]),
                          GGMLQuantizationType[type_name], rows)

    def finish(self, source: SourceModel, blocks: torch.nn.ModuleList, device) -> Path:
        """Write the file from the packed shards and the float tensors, then move it to the output path."""
        config, model_config = self.config, self.model.config
        in_features = {self.layout.checkpoint_name(path): module.in_features
                       for path, module in self.model.named_modules() if isinstance(module, torch.nn.Linear)}
        tensors = []
        for stored, shape in self.writer.written_shapes().items():
            if BLOCKS_MARK in stored:
                tensors.append(self._quantized_tensor(stored, shape, in_features))
            else:  # a quantized Linear's bias
                tensors.append(float_tensor(stored, self.writer.written_tensor(stored), model_config))
        for name, tensor in self.float_tensors(source, blocks).items():
            if name == "lm_head.weight" and getattr(model_config, "tie_word_embeddings", False):
                continue  # llama.cpp reads a tied head from token_embd
            tensors.append(float_tensor(name, tensor, model_config))
        tensors.sort(key=lambda t: _file_order(t.name))
        report = run_report(config, self.layout, self.rows, device)
        metadata = {GGUF_WRITER_KEY: f"{WRITER_MARK}{__version__}", GGUF_REPORT_KEY: json.dumps(report)}
        origin = source.origin()
        if origin is None:
            raise GGUFExportError("GGUF export needs the model's tokenizer files: quantize a model directory "
                                  "(or a model loaded from one)")
        built = self.writer.tmp_dir / "model.gguf"
        with tqdm(total=len(tensors), desc="writing GGUF", unit="tensor", disable=not self.progress) as bar:
            write_gguf(built, model_config, origin, tensors, name=origin.name, file_type=config.gguf_type,
                       metadata=metadata, progress=lambda _tensor: bar.update())
        return self.writer.finish_file(built)
