"""gptq-plugins for Optimum: `optimum-cli export gptq`.

Optimum finds the command through `optimum/commands/register/gptq_plugins_export.py`; this module
is the `gptq_plugins` entry point and stays light (it imports nothing of Optimum).
"""

from gptq_plugins.hookspecs import hookimpl


@hookimpl
def gptq_plugins_describe():
    return "optimum: `optimum-cli export gptq` (same options as `gptq-plugins quantize`)"
