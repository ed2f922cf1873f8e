"""Quantizing models larger than memory: blocks read from disk one at a time, activations on disk.

The model is built as an empty skeleton (parameters on the meta device, buffers real), then each
decoder block is filled from the source safetensors (memory-mapped) only while it is worked on.
Hidden states between blocks live in memory or, with offloading, in `.npy` files that double as
the resume state.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from gptq_plugins.artifact import read_headers, read_weight_map


class SourceCheckpoint:
    """Tensors of a model directory's safetensors files, read by the model's names.

    A checkpoint saved from the base model (the Hub's original GPT-2: `h.0.attn.c_attn.weight`)
    lacks the causal-LM wrapper's `base_model_prefix` on every name. Transformers adds it when
    loading, and so does this: `weight_map` and `tensors` name every tensor under the prefix, as
    the model does, so the artifact is written under the model's names like any other;
    `stored_name` gives the name in the file (for reading it, and for messages).

    Each read opens the files it needs and closes them again: a mapping kept open would keep
    every page read so far resident, and the process's memory would grow with the model's depth.
    """

    def __init__(self, path: str | os.PathLike, base_model_prefix: str):
        self.path = Path(path)
        stored = read_weight_map(self.path)
        prefix = f"{base_model_prefix}." if base_model_prefix else ""
        saved_from_base_model = bool(prefix) and not any(name.startswith(prefix) for name in stored)
        self.added_prefix = prefix if saved_from_base_model else ""
        self.weight_map = {self.added_prefix + name: file for name, file in stored.items()}

    def stored_name(self, name: str) -> str:
        """Model tensor `name` as the checkpoint spells it."""
        return name.removeprefix(self.added_prefix)

    def headers(self) -> dict[str, tuple[str, list[int]]]:
        """`{model name: (dtype, shape)}` of every tensor, from the file headers alone."""
        return {self.added_prefix + name: header
                for name, header in read_headers(self.path, self.weight_map.values()).items()}

    def tensors(self, names) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise KeyError(f"{self.path}: tensor {self.stored_name(name)!r} is not in the checkpoint")
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(str(self.path / file), framework="pt") as f:
                out.update({name: f.get_tensor(self.stored_name(name)) for name in file_names})
        return out


def empty_model(path: str | os.PathLike, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's skeleton: parameters on the meta device (no memory), buffers computed for real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or torch.float32
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def materialize(module: torch.nn.Module, prefix: str, checkpoint: SourceCheckpoint, device,
                skip: tuple[str, ...] = (), rename=None) -> None:
    """Fill `module`'s parameters and persistent buffers from the checkpoint (names under `prefix`).

    `rename` maps a model tensor name to the checkpoint's where they differ (a layout's
    `checkpoint_name`).
    """
    from accelerate.utils import set_module_tensor_to_device

    rename = rename or (lambda name: name)
    names = {name: rename(f"{prefix}{name}") for name in module.state_dict() if not f"{prefix}{name}".startswith(skip)}
    values = checkpoint.tensors(names.values())
    for name, stored in names.items():
        set_module_tensor_to_device(module, name, device, value=values.pop(stored))


def release(module: torch.nn.Module) -> None:
    """Drop `module`'s tensors back to the meta device, freeing their memory."""
    from accelerate.utils import set_module_tensor_to_device

    for name in module.state_dict():
        set_module_tensor_to_device(module, name, "meta")


class ActivationStore:
    """Hidden states at block boundaries, float32 `[samples, seq, hidden]`.

    In memory, or (`offload=True`) in `.npy` files under `scratch`. `persist` makes a boundary
    durable for resume; with offloading it is already on disk and only flushed.
    """

    def __init__(self, scratch: Path | None, *, offload: bool = False, device="cpu"):
        if offload and scratch is None:
            raise ValueError("offloading activations needs a scratch directory")
        self.scratch, self.offload, self.device = scratch, offload, torch.device(device)
        self._arrays: dict[int, np.ndarray] = {}

    def sibling(self, name: str) -> "ActivationStore":
        """Another stream of hidden states kept like this one, under `scratch/name`."""
        return ActivationStore(None if self.scratch is None else self.scratch / name, offload=self.offload,
                               device=self.device)

    def file(self, index: int) -> Path:
        return self.scratch / f"hidden-{index:05d}.npy"

    def new(self, index: int, shape) -> torch.Tensor:
        if not self.offload:
            return torch.empty(shape, dtype=torch.float32, device=self.device)
        self.scratch.mkdir(parents=True, exist_ok=True)
        array = np.lib.format.open_memmap(self.file(index), mode="w+", dtype=np.float32, shape=tuple(shape))
        self._arrays[index] = array
        return torch.from_numpy(array)

    def persist(self, index: int, hidden: torch.Tensor) -> str:
        if self.offload:
            self._arrays[index].flush()
        else:
            self.scratch.mkdir(parents=True, exist_ok=True)
            tmp = self.scratch / f".hidden-{index:05d}.tmp.npy"
            np.save(tmp, hidden.cpu().numpy(), allow_pickle=False)
            os.replace(tmp, self.file(index))
        return self.file(index).name

    def load(self, index: int) -> torch.Tensor:
        if self.offload:
            array = np.load(self.file(index), mmap_mode="r+", allow_pickle=False)
            self._arrays[index] = array
            return torch.from_numpy(array)
        return torch.from_numpy(np.load(self.file(index), allow_pickle=False)).to(self.device)

    def drop(self, index: int) -> None:
        self._arrays.pop(index, None)
        if self.scratch is not None:
            self.file(index).unlink(missing_ok=True)
