"""Up-front checks of a quantization run's inputs, before the model is loaded.

A run can take hours: a bad option, a corrupt shard or a NaN found at layer 70 wastes them. These
checks read `config.json`, the safetensors headers and, one tensor at a time, the weights; they
build the model's skeleton on the meta device (no memory) to know the shape of every tensor the run
will read, and draw the calibration windows (which the run then reuses). Every problem is reported at once,
one line each, naming the file, tensor or option and the expected value.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from gptq_plugins.artifact import ArtifactError, output_problem, read_model_config
from gptq_plugins.plugins import export_format
from gptq_plugins.calibration import CalibrationError, CalibrationSet, degenerate_calibration
from gptq_plugins.config import ConfigError, QuantizeConfig
from gptq_plugins.layouts import ModelLayout, UnsupportedModelError, find_layout
from gptq_plugins.linear_weights import features
from gptq_plugins.model_loading import calibration_for, load_tokenizer
from gptq_plugins.streaming import SourceCheckpoint, empty_model

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SCAN_CHUNK_ELEMENTS = 1 << 24  # bound on the slice of a tensor held while scanning for NaN/inf
MAX_LISTED_PROBLEMS = 12


class ValidationError(ValueError):
    """The inputs of a run have problems; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = self.problems[:MAX_LISTED_PROBLEMS]
        if len(self.problems) == 1:
            text = shown[0]
        else:
            more = len(self.problems) - len(shown)
            text = f"{len(self.problems)} problems with the inputs:\n" + "\n".join(f"  - {p}" for p in shown)
            text += f"\n  ... and {more} more" if more else ""
        super().__init__(text)


@dataclass(frozen=True)
class CheckedInputs:
    """What the checks established, for the run to reuse."""

    model_dir: Path
    out_dir: Path
    layout: ModelLayout
    calibration: CalibrationSet  # the windows drawn, and from what


def check_quantize_inputs(model_dir: str | os.PathLike, out_dir: str | os.PathLike, config: QuantizeConfig, *,
                          trust_remote_code: bool = False, overwrite: bool = False,
                          resume: bool = False) -> CheckedInputs:
    """Check everything a run of `config` from `model_dir` to `out_dir` needs; raise `ValidationError`.

    Touches nothing at `out_dir`. The slowest part is one streaming read of the weights for NaN/inf,
    small next to quantization.
    """
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    problem = output_problem(out_dir, source=model_dir, overwrite=overwrite, resume=resume,
                             file_output=export_format(config.format).single_file)
    problems = [problem] if problem else []
    if not model_dir.is_dir():
        raise ValidationError(problems + [f"model directory {model_dir}: does not exist"])
    layout, reference, config_problems = _architecture(model_dir, trust_remote_code)
    problems += config_problems
    calibration = None
    if reference is not None:
        problems += _weight_problems(model_dir, reference, layout, config)
        calibration, calibration_problems = _calibration(model_dir, reference, config, trust_remote_code)
        problems += calibration_problems
    if problems:
        raise ValidationError(problems)
    return CheckedInputs(model_dir, out_dir, layout, calibration)


def _architecture(model_dir: Path, trust_remote_code: bool):
    """(layout, meta-device model, problems): whether the directory describes a model we can quantize."""
    from gptq_plugins.plugins import model_layouts

    config_file = model_dir / "config.json"
    try:
        model_config = read_model_config(model_dir)
    except ArtifactError as err:
        return None, None, [str(err)]
    if not isinstance(model_config, dict):
        return None, None, [f"{config_file}: expected a JSON object, got {type(model_config).__name__}"]
    problems = []
    existing = model_config.get("quantization_config")
    if existing is not None:
        method = existing.get("quant_method") if isinstance(existing, dict) else existing
        problems.append(f"{config_file}: already quantized (quantization_config with quant_method "
                        f"{method!r}); expected a float model")
    model_type = model_config.get("model_type")
    if not isinstance(model_type, str):
        return None, None, problems + [f"{config_file}: no model_type; expected the architecture name, e.g. 'llama'"]
    try:
        layout = find_layout(model_type, model_layouts())
    except UnsupportedModelError as err:
        return None, None, problems + [f"{config_file}: {err}"]
    try:
        reference = empty_model(model_dir, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types for configs it cannot build
        if "auto_map" in model_config and not trust_remote_code:
            problem = (f"{config_file}: model_type {model_type!r} is implemented by code in the model "
                       "directory (auto_map), which is not run unless asked; expected "
                       "--trust-remote-code (Python: trust_remote_code) if you trust it")
        else:
            problem = f"{config_file}: transformers cannot build a {model_type!r} model from it ({err})"
        return None, None, problems + [problem]
    return layout, reference, problems


def _weight_problems(model_dir: Path, reference: torch.nn.Module, layout: ModelLayout,
                     config: QuantizeConfig) -> list[str]:
    """Every tensor the run reads present with the shape the config gives it and a float dtype,
    every tensor finite, and every quantized Linear storable with the options."""
    try:
        layout.prepare(reference)
        linears = layout.linears(reference)
    except (UnsupportedModelError, ValueError) as err:
        return [str(err)]
    problems = _option_problems(linears, config)
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    try:
        checkpoint = SourceCheckpoint(model_dir, reference.base_model_prefix)
    except ArtifactError as err:
        if not pickles:
            return problems + [str(err)]
        return problems + [f"{model_dir}: weights only in {', '.join(pickles)}; expected safetensors files "
                           "(pickle files are never unpickled: convert them with safetensors first)"]
    headers = checkpoint.headers()
    kept_float = tuple(f"{module}." for module in layout.keep_float)  # never read (e.g. a tied head)
    for model_name, tensor in reference.state_dict().items():
        name = layout.checkpoint_name(model_name)
        if name not in headers:
            if not name.startswith(kept_float):
                problems.append(f"{model_dir}: tensor {checkpoint.stored_name(name)!r} is missing; expected a "
                                f"tensor {list(tensor.shape)} (from config.json)")
            continue
        dtype, shape = headers[name]
        where = f"{model_dir / checkpoint.weight_map[name]}: tensor {checkpoint.stored_name(name)!r}"
        if list(shape) != list(tensor.shape):
            problems.append(f"{where} is {list(shape)}, expected {list(tensor.shape)} (from config.json)")
        elif tensor.is_floating_point() and dtype not in FLOAT_DTYPES:
            problems.append(f"{where} is {dtype}, expected a float tensor ({', '.join(FLOAT_DTYPES)})")
    if not problems:
        problems += _non_finite_problems(checkpoint, headers)
    return problems


def _option_problems(linears: dict[str, torch.nn.Module], config: QuantizeConfig) -> list[str]:
    """One line per option that some quantized Linear cannot be stored with."""
    failures: dict[str, list[ConfigError]] = {}
    for path, layer in linears.items():
        try:
            config.check_layer(*features(layer), name=path)
        except ConfigError as err:
            failures.setdefault(err.option, []).append(err)
    problems = []
    for option, errors in failures.items():
        problems.append(str(errors[0]) + (f" (and {len(errors) - 1} more layers)" if len(errors) > 1 else ""))
    return problems


def _non_finite_problems(checkpoint: SourceCheckpoint, headers: dict[str, tuple[str, list[int]]]) -> list[str]:
    """Every float tensor with NaN or inf values, read one slice at a time.

    The file is opened again for each tensor: a mapping kept open would keep every page read so
    far resident, and this scan alone would need memory the size of the model.
    """
    problems = []
    for name, file in sorted(checkpoint.weight_map.items(), key=lambda item: (item[1], item[0])):
        dtype, shape = headers[name]
        if dtype not in FLOAT_DTYPES:
            continue
        stored = checkpoint.stored_name(name)
        with safe_open(str(checkpoint.path / file), framework="pt") as f:
            bad = _count_non_finite(f, stored, shape)
        if bad:
            problems.append(f"{checkpoint.path / file}: tensor {stored!r} has {bad} non-finite values "
                            f"(NaN or inf) of {math.prod(shape)}; expected finite weights")
    return problems


def _count_non_finite(f, name: str, shape: list[int]) -> int:
    """NaN/inf entries of one tensor, read in row slices of at most SCAN_CHUNK_ELEMENTS."""
    if not shape:
        return int(not torch.isfinite(f.get_tensor(name)).all())
    tensor_slice = f.get_slice(name)
    row_elements = max(1, math.prod(shape[1:]))
    step = max(1, SCAN_CHUNK_ELEMENTS // row_elements)
    bad = 0
    for start in range(0, shape[0], step):
        chunk = tensor_slice[start:start + step]
        if chunk.numel() and not (torch.isfinite(chunk.amax()) and torch.isfinite(chunk.amin())):
            bad += int((~torch.isfinite(chunk)).sum())
    return bad


def _calibration(model_dir: Path, reference: torch.nn.Module, config: QuantizeConfig, trust_remote_code: bool):
    """(CalibrationSet, problems): the calibration windows the run will use, drawn now."""
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    try:
        calibration = calibration_for(reference, config, tokenizer)
    except CalibrationError as err:
        return None, [f"dataset {config.dataset!r}: {err}"]
    except ConfigError as err:
        return None, [str(err)]
    problem = degenerate_calibration(calibration.token_ids, getattr(reference.config, "pad_token_id", None),
                                     config.dataset)
    return calibration, [problem] if problem else []
