"""The core's own hook implementations, registered first in the plugin manager."""

from __future__ import annotations

from gptq_plugins.hookspecs import hookimpl


@hookimpl
def gptq_plugins_model_layouts():
    from gptq_plugins.layouts import BUILTIN_LAYOUTS

    return BUILTIN_LAYOUTS


@hookimpl
def gptq_plugins_calibration_source(name, config, tokenizer, seq_len):
    from gptq_plugins import calibration

    if name == calibration.BUILTIN:
        return calibration.builtin_calibration(config, tokenizer, seq_len)
    return calibration.file_calibration(name, config, tokenizer, seq_len)


@hookimpl
def gptq_plugins_export_formats():
    from gptq_plugins.export_format import ExportFormat

    v1 = "gptq_plugins.assembly:ArtifactAssembly"
    return {"gptq_plugins": ExportFormat(v1, description="GPTQ v1 tensors, quant_method gptq_plugins"),
            "gptq": ExportFormat(v1, description="GPTQ v1 tensors, quant_method gptq (stock loaders)"),
            "gguf": ExportFormat("gptq_plugins.gguf_export:GGUFAssembly", single_file=True,
                                 description="one .gguf file for llama.cpp")}


@hookimpl
def gptq_plugins_kernel_backends():
    from gptq_plugins.kernels import builtin_kernel_backends

    return builtin_kernel_backends()


@hookimpl
def gptq_plugins_describe():
    return ("core: layouts for Llama, Mistral, Qwen2/3, Gemma2/3, Phi3, OPT, GPT-NeoX, GPT-2, Mixtral, "
            "Qwen2/3-MoE, builtin and file calibration, gptq_plugins/gptq/gguf formats, torch/CPU-int4/Triton kernels")
