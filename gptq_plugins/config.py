"""`QuantizeConfig`: the one place where quantization options are defined and validated.

Every entry point (CLI, Optimum command, Transformers config, vLLM config) converts to and
from this object; none of them validates an option a second time.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field, fields
from typing import Any

from gptq_plugins.foreign_keys import KNOWN_FOREIGN_KEYS, loading_problem
from gptq_plugins.gguf_types import GGUF_MIXTURES, GGUF_TYPES, base_type, layer_type
from gptq_plugins.packed_words import whole_words_problem

log = logging.getLogger("gptq_plugins")

SUPPORTED_BITS = (2, 3, 4, 8)
FORMATS = ("gptq_plugins", "gptq", "gguf")
HESSIAN_DTYPES = ("auto", "float32", "bfloat16")
# Run options recorded under `meta.calibration` of `quantization_config` (they shape the result).
CALIBRATION_META_KEYS = ("dataset", "num_samples", "seq_len", "seed", "hessian_dtype", "act_group_aware", "gptaq")
QUANT_METHOD = "gptq_plugins"
# Our entry in `meta.quantizer`: it marks an artifact as ours (only ours may be replaced).
WRITER_MARK = "gptq-plugins:"

# Keys we write into `quantization_config` that are not options (always accepted on read).
_METADATA_KEYS = {"quant_method", "checkpoint_format", "meta", "modules_not_to_convert"}


class ConfigError(ValueError):
    """An option has a value outside what it accepts; the message names the option."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(f"{option}: {message}")


def _option(default, help: str, *, artifact: bool = True, cli: str | None = None, **extra):
    """A config field with the help text shared by every command-line front end.

    `artifact` says whether the option is written into `quantization_config`; calibration and
    run options are not (they are recorded under `meta`).
    """
    return field(default=default, metadata={"help": help, "artifact": artifact, "cli": cli, **extra})


@dataclass(frozen=True)
class QuantizeConfig:
    """Options of one GPTQ run and of the artifact it writes."""

    bits: int = _option(4, "bits per weight: 2, 3, 4 or 8", choices=SUPPORTED_BITS)
    group_size: int = _option(128, "input columns sharing one scale/zero (-1: one group per row)")
    sym: bool = _option(True, "symmetric grid (zero point fixed at the middle)", cli="--asym")
    desc_act: bool = _option(False, "act-order: quantize columns by decreasing Hessian diagonal")
    static_groups: bool = _option(False, "with act-order, fix group parameters before reordering "
                                  "so g_idx stays contiguous (no runtime gather cost)")
    act_group_aware: bool = _option(False, "group-aware act-order: quantize whole groups by "
                                    "decreasing summed Hessian diagonal, the columns of each group "
                                    "likewise; g_idx stays contiguous (no runtime gather cost)",
                                    artifact=False)
    gptaq: bool = _option(False, "asymmetric calibration (GPTAQ): fit each layer's output to the "
                          "float model's own, fed the float model's inputs, so errors of earlier "
                          "layers are corrected too (one more block forward per group)", artifact=False)
    damp_percent: float = _option(0.01, "dampening added to the Hessian diagonal, as a fraction "
                                  "of its mean; raised automatically when Cholesky fails",
                                  cli="--damp")
    block_size: int = _option(128, "columns per lazy-batch update of the solver")
    true_sequential: bool = _option(True, "quantize the Linears of a block in execution order, "
                                    "re-collecting inputs after each group")
    mse_clip: bool = _option(False, "search a per-group range shrink factor minimising the "
                             "quantization error")
    format: str = _option("gptq_plugins", "output format: gptq_plugins (our quant_method), gptq for "
                          "stock GPTQ loaders (both a directory), or gguf (one .gguf file for llama.cpp)",
                          choices=FORMATS, artifact=False)
    gguf_type: str | None = _option(None, "GGUF block type of --format gguf; it fixes bits, the group "
                                    "(blocks of 32 inputs) and symmetry (Q4_1/Q5_1 are asymmetric)",
                                    choices=tuple(GGUF_TYPES) + tuple(GGUF_MIXTURES), artifact=False, type=str)
    dataset: str = _option("builtin", "calibration data: builtin, or a .txt/.jsonl/.parquet path",
                           artifact=False)
    num_samples: int = _option(128, "calibration sequences", artifact=False)
    seq_len: int = _option(2048, "tokens per calibration sequence (capped at the model's "
                           "context length)", artifact=False)
    seed: int = _option(0, "seed for drawing calibration windows", artifact=False)
    hessian_dtype: str = _option("float32", "precision of the X^T X products: bfloat16 rounds the "
                                 "inputs and each batch's product (float32 running sum) and is about 3x "
                                 "faster where bfloat16 GEMMs are native (AVX512-BF16/AMX CPUs, GPUs), "
                                 "slow where they are emulated (AVX2); the rounded products can make a "
                                 "near-singular Hessian indefinite (damping is then raised). auto takes "
                                 "bfloat16 exactly where it is native; the artifact records which ran",
                                 choices=HESSIAN_DTYPES, artifact=False)

    def __post_init__(self):
        self._check_type("bits", int)
        if self.format == "gguf" or self.gguf_type is not None:
            self._check_gguf()
        elif self.bits not in SUPPORTED_BITS:
            raise ConfigError("bits", f"expected one of {list(SUPPORTED_BITS)}, got {self.bits}")
        self._check_type("group_size", int)
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError("group_size", f"expected -1 or a positive integer, got {self.group_size}")
        for name in ("sym", "desc_act", "static_groups", "act_group_aware", "gptaq", "true_sequential", "mse_clip"):
            self._check_type(name, bool)
        self._check_type("damp_percent", (int, float))
        if not 0 < self.damp_percent < 1:
            raise ConfigError("damp_percent", f"expected a fraction in (0, 1), got {self.damp_percent}")
        self._check_type("block_size", int)
        if self.block_size <= 0:
            raise ConfigError("block_size", f"expected a positive integer, got {self.block_size}")
        if self.static_groups and not self.desc_act:
            raise ConfigError("static_groups", "only meaningful with desc_act=True (act-order)")
        if self.act_group_aware and self.desc_act:
            raise ConfigError("act_group_aware", "choose one order: desc_act reorders single columns "
                              "(g_idx permuted), act_group_aware reorders whole groups (g_idx contiguous)")
        if self.format not in FORMATS:
            raise ConfigError("format", f"expected one of {list(FORMATS)}, got {self.format!r}")
        self._check_type("dataset", str)
        if not self.dataset:
            raise ConfigError("dataset", "expected 'builtin' or a file path, got an empty string")
        for name in ("num_samples", "seq_len"):
            self._check_type(name, int)
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"expected a positive integer, got {getattr(self, name)}")
        self._check_type("seed", int)
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise ConfigError("hessian_dtype", f"expected one of {list(HESSIAN_DTYPES)}, got {self.hessian_dtype!r}")

    def _check_gguf(self):
        if self.gguf_type not in GGUF_TYPES and self.gguf_type not in GGUF_MIXTURES:
            raise ConfigError("gguf_type", f"--format gguf needs a block type, one of "
                              f"{list(GGUF_TYPES) + list(GGUF_MIXTURES)}; got {self.gguf_type!r}")
        if self.format != "gguf":
            raise ConfigError("gguf_type", f"only meaningful with format='gguf', got format={self.format!r}")
        implied = gguf_options(self.gguf_type)
        for name in ("bits", "group_size", "sym"):
            if getattr(self, name) != implied[name]:
                raise ConfigError(name, f"GGUF {self.gguf_type} stores {implied['bits']}-bit codes in blocks of "
                                  f"{implied['group_size']} inputs, {'symmetric' if implied['sym'] else 'asymmetric'}; "
                                  f"got {name}={getattr(self, name)!r} (leave it unset)")
        if self.desc_act:
            raise ConfigError("desc_act", "GGUF has no g_idx, so its blocks must stay positional; "
                              "use act_group_aware (group-aware act-order) instead")

    @classmethod
    def from_options(cls, **given) -> "QuantizeConfig":
        """A config from the options a user gave: a GGUF type fills in the bits, group size,
        symmetry and format it implies (given ones must agree with it)."""
        if given.get("gguf_type") is not None:
            given = {**gguf_options(given["gguf_type"]), **given}
        return cls(**given)

    def _check_type(self, name: str, expected):
        value = getattr(self, name)
        # bool is an int subclass: reject True for bits, and 1 for sym.
        bad_bool = isinstance(value, bool) and expected is not bool and bool not in (
            expected if isinstance(expected, tuple) else (expected,))
        if bad_bool or not isinstance(value, expected):
            kind = expected.__name__ if isinstance(expected, type) else \
                " or ".join(t.__name__ for t in expected)
            raise ConfigError(name, f"expected {kind}, got {value!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def maxq(self) -> int:
        """Largest integer code."""
        return (1 << self.bits) - 1

    def groups_for(self, in_features: int) -> int:
        """Number of groups of a layer with `in_features` inputs: `ceil(in / group_size)`, as the
        Hub's GPTQ v1 checkpoints count them (a group size that does not divide the input leaves a
        last, shorter group)."""
        self.check_layer(in_features)
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, in_features: int, out_features: int | None = None, name: str = "layer"):
        """Raise `ConfigError` when a layer of this shape cannot be stored with these options."""
        if self.format == "gguf":
            # A K-quant row that is not whole super-blocks falls back to a legacy type (blocks of 32).
            if in_features % GGUF_TYPES["Q8_0"].block_size:
                raise ConfigError("gguf_type", f"{name}: input size {in_features} is not a multiple of "
                                  f"32, the block length of GGUF {self.gguf_type}")
            return
        problem = whole_words_problem(in_features, self.bits, f"{name}: input size {in_features}")
        if out_features is not None and not problem:
            problem = whole_words_problem(out_features, self.bits, f"{name}: output size {out_features}",
                                          " (qzeros packing)")
        if problem:
            raise ConfigError("bits", problem)

    def for_layer(self, module_name: str, block_index: int, n_blocks: int, in_features: int) -> "QuantizeConfig":
        """The options one Linear is quantized with: a GGUF mixture (or a K-quant's fallback) gives
        each layer its own type; every other config is the same for all layers."""
        if self.format != "gguf":
            return self
        chosen = layer_type(self.gguf_type, module_name, block_index, n_blocks, in_features)
        return self if chosen == self.gguf_type else self.replace(gguf_type=chosen, **gguf_options(chosen))

    def replace(self, **changes) -> "QuantizeConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ serialisation
    def to_quantization_config(self, *, version: str | None = None, extra_meta: dict | None = None,
                               modules_not_to_convert: list[str] | None = None) -> dict[str, Any]:
        """The `quantization_config` block of `config.json` (JSON-clean)."""
        if version is None:
            from gptq_plugins.version import __version__ as version
        out: dict[str, Any] = {"quant_method": QUANT_METHOD if self.format == "gptq_plugins" else "gptq"}
        for f in fields(self):
            if f.metadata["artifact"]:
                out[f.name] = getattr(self, f.name)
        out["checkpoint_format"] = "gptq"
        meta = {"quantizer": [f"{WRITER_MARK}{version}"],
                "calibration": {key: getattr(self, key) for key in CALIBRATION_META_KEYS}}
        meta.update(extra_meta or {})
        out["meta"] = meta
        if modules_not_to_convert:
            out["modules_not_to_convert"] = list(modules_not_to_convert)
        return out

    @classmethod
    def from_quantization_config(cls, qc: dict[str, Any], *, source: str = "quantization_config",
                                 strict: bool = True) -> "QuantizeConfig":
        """Parse a `quantization_config` dict written by us or by a stock GPTQ writer.

        Keys of the common GPTQ writers (`foreign_keys`) are accepted; those that would change how
        the tensors are read are checked, and refused where this project cannot read them. Other
        unknown keys raise `ConfigError` when `strict` (our own artifacts) and are logged as a
        warning otherwise.
        """
        if not isinstance(qc, dict):
            raise ConfigError(source, f"expected a JSON object, got {type(qc).__name__}")
        method = qc.get("quant_method", QUANT_METHOD)
        if method not in (QUANT_METHOD, "gptq"):
            raise ConfigError(f"{source}.quant_method",
                              f"expected 'gptq_plugins' or 'gptq', got {method!r}")
        problem = loading_problem(qc)
        if problem:
            raise ConfigError(f"{source}.{problem[0]}", problem[1])
        option_names = {f.name for f in fields(cls) if f.metadata["artifact"]}
        unknown = sorted(set(qc) - option_names - _METADATA_KEYS - KNOWN_FOREIGN_KEYS)
        if unknown and strict:
            raise ConfigError(source, f"unknown keys {unknown}; known: {sorted(option_names)}")
        if unknown:
            log.warning("%s: ignoring unknown keys %s (not GPTQ options known to gptq-plugins)", source, unknown)
        kwargs = {k: qc[k] for k in option_names if k in qc and qc[k] is not None}
        if "damp_percent" in kwargs:
            kwargs["damp_percent"] = float(kwargs["damp_percent"])
        kwargs["format"] = "gptq_plugins" if method == QUANT_METHOD else "gptq"
        meta = qc.get("meta") or {}
        calib = meta.get("calibration") if isinstance(meta, dict) else None
        if isinstance(calib, dict):
            for key in CALIBRATION_META_KEYS:
                if key in calib:
                    kwargs[key] = calib[key]
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}.{err.option}", str(err).split(": ", 1)[1]) from None

    def to_dict(self) -> dict[str, Any]:
        """All options as a flat JSON-clean dict (inverse of `QuantizeConfig(**d)`)."""
        return dataclasses.asdict(self)


def gguf_options(type_name: str) -> dict[str, Any]:
    """The options a GGUF block type (or a mixture's base type) fixes."""
    if type_name not in GGUF_TYPES and type_name not in GGUF_MIXTURES:
        raise ConfigError("gguf_type", f"expected one of {list(GGUF_TYPES) + list(GGUF_MIXTURES)}, got {type_name!r}")
    gguf_type = base_type(type_name)
    return {"format": "gguf", "bits": gguf_type.bits, "group_size": gguf_type.block_size, "sym": not gguf_type.affine}


def foreign_entries(qc: dict[str, Any]) -> dict[str, Any]:
    """The keys of a `quantization_config` block that another writer put there (kept as they are)."""
    ours = {f.name for f in fields(QuantizeConfig) if f.metadata["artifact"]} | _METADATA_KEYS
    return {key: value for key, value in qc.items() if key not in ours}


def option_fields():
    """The fields of `QuantizeConfig`, for front ends that build parsers from them."""
    return fields(QuantizeConfig)
