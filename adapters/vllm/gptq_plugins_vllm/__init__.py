"""vLLM adapter of gptq-plugins: serves GPTQ artifacts with `--quantization gptq_plugins`.

This module is light on purpose: `import gptq_plugins` loads it (entry-point group
`gptq_plugins`) in every CLI call, so vLLM is imported only when vLLM itself calls `register()`.
"""

from __future__ import annotations

import importlib.util

from gptq_plugins.hookspecs import hookimpl


def register() -> None:
    """vLLM `general_plugins` entry point: make `gptq_plugins` a quantization method here.

    vLLM calls it in every process it starts, possibly more than once; the registration happens
    when `gptq_plugins_vllm.config` is first imported, so later calls change nothing.
    """
    import gptq_plugins_vllm.config  # noqa: F401


@hookimpl
def gptq_plugins_describe():
    found = "vLLM found" if importlib.util.find_spec("vllm") else "vLLM not installed"
    return f"vLLM: --quantization gptq_plugins (2/3/4/8-bit, act-order, asymmetric, tensor parallel, MoE experts; {found})"
