"""`GPTQPluginsConfig`: the `quantization_config` Transformers sees, a view of the core `QuantizeConfig`.

It holds one `QuantizeConfig` and nothing else of substance: parsing and validation are the
core's (`QuantizeConfig.from_quantization_config`), so a bad value raises the core's
`ConfigError` with the core's message, and `to_dict()` is the core's `quantization_config` block.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from gptq_plugins.config import CALIBRATION_META_KEYS, QUANT_METHOD, ConfigError, QuantizeConfig, foreign_entries
from gptq_plugins.kernels import AUTO
from gptq_plugins.quant_linear import check_backend

SOURCE = "GPTQPluginsConfig"


class GPTQPluginsConfig(QuantizationConfigMixin):
    """`from_pretrained(path, quantization_config=GPTQPluginsConfig(bits=4, group_size=128))`.

    Keyword arguments are the `QuantizeConfig` options (`bits`, `group_size`, `sym`, `desc_act`,
    ..., and `dataset`, `num_samples`, `seq_len`, `seed`, `hessian_dtype` for a quantize-on-load)
    and every key of a block we write, so `GPTQPluginsConfig(**c.to_dict())` rebuilds `c` (blocks
    holding other writers' keys are read with `from_dict`). Options read and write through to the held `QuantizeConfig` (`c.bits = 3`
    validates like the constructor).

    Keys other GPTQ writers left in a converted checkpoint's block (`foreign`, filled by
    `from_dict`) are kept and written back as they were.

    `backend` is a loading attribute, never saved: the kernel backend of every quantized Linear
    (`auto`, the default, or a name such as `dense` or `cpu_int4`; see `gptq-plugins doctor`).
    Pass it with `from_pretrained(artifact, quantization_config=GPTQPluginsConfig(backend="dense"))`.
    """

    def __init__(self, *, quant_method: str = QUANT_METHOD, format: str = QUANT_METHOD,
                 meta: dict | None = None, modules_not_to_convert: list[str] | None = None,
                 backend: str = AUTO, foreign: dict | None = None, **options):
        if quant_method != QUANT_METHOD:
            raise ConfigError(f"{SOURCE}.quant_method", f"expected {QUANT_METHOD!r}, got {quant_method!r} "
                              "(convert a stock GPTQ checkpoint with `gptq-plugins convert IN OUT`)")
        if format != QUANT_METHOD:
            raise ConfigError(f"{SOURCE}.format", f"Transformers saves {QUANT_METHOD!r} artifacts, got "
                              f"{format!r} (write a stock GPTQ copy with `gptq-plugins convert`)")
        meta = dict(meta or {})
        calibration = {**(meta.pop("calibration", None) or {}),
                       **{key: options.pop(key) for key in CALIBRATION_META_KEYS if key in options}}
        block = {**options, "quant_method": QUANT_METHOD, "meta": {"calibration": calibration}}
        self.quant_method = QUANT_METHOD
        check_backend(backend)
        self.backend = backend
        self.quantize_config = QuantizeConfig.from_quantization_config(block, source=SOURCE, strict=True)
        self.modules_not_to_convert = list(modules_not_to_convert) if modules_not_to_convert else None
        # Provenance written by the quantizer (version, token count); calibration is rebuilt from
        # the options on output so that it always says what the options say.
        self.meta = meta
        self.foreign = dict(foreign or {})

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        """Read a `quantization_config` block the way the core reads an artifact's.

        The core parses (and refuses what it cannot read); keys of other GPTQ writers, some named
        like our options (`dataset`, `format`), are set apart as `foreign` and kept.
        """
        QuantizeConfig.from_quantization_config(config_dict, source=SOURCE, strict=True)
        foreign = foreign_entries(config_dict)
        block = {key: value for key, value in config_dict.items() if key not in foreign}
        return super().from_dict({**block, "foreign": foreign}, return_unused_kwargs=return_unused_kwargs,
                                 **kwargs)

    def get_loading_attributes(self) -> dict[str, Any]:
        """What a config passed to `from_pretrained` of an artifact overrides (Transformers' protocol)."""
        return {"backend": self.backend}

    def to_dict(self) -> dict[str, Any]:
        """The `quantization_config` block of `config.json`: the core's, with other writers' keys kept."""
        block = self.quantize_config.to_quantization_config(
            extra_meta=self.meta, modules_not_to_convert=self.modules_not_to_convert)
        return {**self.foreign, **block}

    def __iter__(self):
        yield from self.to_dict().items()


def _option_property(name: str) -> property:
    def get(self):
        return getattr(self.quantize_config, name)

    def set(self, value):
        try:
            self.quantize_config = self.quantize_config.replace(**{name: value})
        except ConfigError as err:
            raise ConfigError(f"{SOURCE}.{err.option}", str(err).split(": ", 1)[1]) from None

    return property(get, set, doc=f"`QuantizeConfig.{name}`")


# `format` stays a constructor-only guard: this config always writes our quant_method.
for _field in fields(QuantizeConfig):
    if _field.name != "format":
        setattr(GPTQPluginsConfig, _field.name, _option_property(_field.name))
