"""Transformers adapter of gptq-plugins: `GPTQPluginsConfig` and its `HfQuantizer`.

`import gptq_plugins` registers both with Transformers (through this distribution's
`gptq_plugins` entry point), after which `from_pretrained` loads `quant_method: gptq_plugins`
artifacts and accepts `quantization_config=GPTQPluginsConfig(...)` to quantize on load.
"""


def __getattr__(name):
    # Lazy, so that the entry point (gptq_plugins_transformers.plugin) decides when Transformers is imported.
    if name == "GPTQPluginsConfig":
        from gptq_plugins_transformers.config import GPTQPluginsConfig

        return GPTQPluginsConfig
    if name == "GPTQPluginsHfQuantizer":
        from gptq_plugins_transformers.quantizer import GPTQPluginsHfQuantizer

        return GPTQPluginsHfQuantizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GPTQPluginsConfig", "GPTQPluginsHfQuantizer"]
