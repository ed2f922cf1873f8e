"""gptq-plugins: GPTQ post-training weight quantization for vLLM, Transformers and Optimum.

Importing the package loads installed plugins (entry-point group ``gptq_plugins``), so host
adapters such as the Transformers one register themselves on ``import gptq_plugins``.
"""

from gptq_plugins.config import ConfigError, QuantizeConfig
from gptq_plugins.hookspecs import hookimpl
from gptq_plugins.version import __version__


def quantize_model(*args, **kwargs):
    """See `gptq_plugins.pipeline.quantize_model` (imported lazily: it pulls in transformers)."""
    from gptq_plugins.pipeline import quantize_model as run

    return run(*args, **kwargs)


__all__ = ["ConfigError", "QuantizeConfig", "hookimpl", "quantize_model", "__version__"]

from gptq_plugins.plugins import get_plugin_manager as _get_plugin_manager  # noqa: E402

_get_plugin_manager()
