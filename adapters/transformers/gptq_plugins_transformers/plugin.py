"""Entry point (group `gptq_plugins`): registers the config and quantizer with Transformers.

Transformers has no discovery of third-party quantizers, so registration happens when pluggy
loads this module on `import gptq_plugins`, and only when Transformers is installed.
"""

from __future__ import annotations

import importlib.util
import logging

from gptq_plugins.hookspecs import hookimpl

log = logging.getLogger("gptq_plugins")


def register_with_transformers() -> bool:
    """Register `quant_method: gptq_plugins`; False when Transformers is absent or cannot import."""
    if importlib.util.find_spec("transformers") is None:
        return False
    try:
        from gptq_plugins_transformers.quantizer import register
    except ImportError as err:
        log.warning("gptq-plugins-transformers: Transformers is installed but cannot be imported (%s); "
                    "from_pretrained will not know quant_method 'gptq_plugins'", err)
        return False
    register()
    return True


REGISTERED = register_with_transformers()


@hookimpl
def gptq_plugins_describe():
    if REGISTERED:
        return "transformers: GPTQPluginsConfig and its HfQuantizer (from_pretrained loads and quantizes on load)"
    return "transformers: not registered (Transformers is not importable)"
