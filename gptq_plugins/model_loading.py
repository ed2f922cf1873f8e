"""Loading what a run reads: the float model (whole, or as an empty skeleton to stream from), its
tokenizer, and calibration windows sized to the model's context."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gptq_plugins.calibration import CalibrationError, CalibrationSet, degenerate_calibration
from gptq_plugins.config import QuantizeConfig
from gptq_plugins.plugins import load_calibration
from gptq_plugins.streaming import SourceCheckpoint, empty_model

log = logging.getLogger("gptq_plugins")


def load_model(path: str | os.PathLike, *, trust_remote_code: bool = False):
    """The float model and its tokenizer (None when the directory has none) from a local directory."""
    return load_float_model(path, trust_remote_code=trust_remote_code), load_tokenizer(
        path, trust_remote_code=trust_remote_code)


def load_float_model(path: str | os.PathLike, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """The whole float model from a local directory, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    model.eval()
    return model


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False):
    """The tokenizer saved with a model, or None when there is none (a dataset of token ids needs none)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None


@dataclass
class SourceModel:
    """The model a run quantizes, with where it came from."""

    model: torch.nn.Module
    directory: Path | None  # the model directory, when given one
    checkpoint: SourceCheckpoint | None  # streaming: the safetensors the blocks are read from
    trust_remote_code: bool = False

    @functools.cached_property
    def tokenizer(self):
        """The directory's tokenizer (None without one), loaded only when calibration text needs it."""
        if self.directory is None:
            return None
        return load_tokenizer(self.directory, trust_remote_code=self.trust_remote_code)

    def origin(self) -> Path | None:
        """The directory the model came from (also for a model the caller loaded), which its
        artifact must not overwrite."""
        loaded_from = getattr(self.model, "name_or_path", None)
        return self.directory or (Path(loaded_from) if loaded_from and Path(loaded_from).is_dir() else None)


def open_source(model_or_path, *, streaming: bool, trust_remote_code: bool = False) -> SourceModel:
    """A loaded model as given, or a model directory: streamed (an empty skeleton) or loaded whole."""
    if not isinstance(model_or_path, (str, os.PathLike)):
        return SourceModel(model_or_path, None, None)
    directory = Path(model_or_path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: not a model directory (no config.json)")
    if not streaming:
        return SourceModel(load_float_model(directory, trust_remote_code=trust_remote_code), directory, None,
                           trust_remote_code)
    model = empty_model(directory, trust_remote_code=trust_remote_code)
    return SourceModel(model, directory, SourceCheckpoint(directory, model.base_model_prefix), trust_remote_code)


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def calibration_for(model, config: QuantizeConfig, tokenizer) -> CalibrationSet:
    """The calibration windows `config` names, capped at the model's context length."""
    seq_len = config.seq_len
    limit = context_length(model)
    if limit and seq_len > limit:
        log.warning("seq_len %d exceeds the model's context length %d: using %d", seq_len, limit, limit)
        seq_len = limit
    return load_calibration(config, tokenizer, seq_len)


def given_calibration(calibration: CalibrationSet | torch.Tensor, model) -> CalibrationSet:
    """Calibration a caller passed in, refused when it cannot calibrate `model` (see `degenerate_calibration`)."""
    calibration = CalibrationSet.of(calibration)
    problem = degenerate_calibration(calibration.token_ids, getattr(model.config, "pad_token_id", None),
                                     "calibration")
    if problem:
        raise CalibrationError(problem)
    return calibration
