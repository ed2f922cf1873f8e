"""Hook specifications of gptq-plugins (pluggy project name ``gptq_plugins``).

Plugins are modules or objects with functions marked ``@gptq_plugins.hookimpl`` and named as
below. Third-party packages expose them through the ``gptq_plugins`` entry-point group; the core
registers its own implementations (``gptq_plugins.builtin``) first, so any plugin can add to or
override what the core provides.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("gptq_plugins")
hookimpl = pluggy.HookimplMarker("gptq_plugins")


@hookspec
def gptq_plugins_model_layouts():
    """Return a list of :class:`gptq_plugins.layouts.ModelLayout` this plugin knows.

    A layout names the ``model_type`` values it serves, where the decoder blocks live, the
    Linear layers of a block in true-sequential groups and the modules that stay in float. The
    pipeline picks the layout whose ``model_types`` contains the model's ``config.model_type``;
    later-registered plugins win, so a plugin can replace a built-in layout.
    """


@hookspec(firstresult=True)
def gptq_plugins_calibration_source(name: str, config, tokenizer, seq_len: int):
    """Return calibration token ids ``LongTensor [num_samples, seq_len]`` for source ``name``.

    Return None when ``name`` is not yours; the first non-None result is used. The core serves
    ``builtin`` and file paths (.txt, .jsonl, .parquet).
    """


@hookspec
def gptq_plugins_export_formats():
    """Return a dict ``{format_name: gptq_plugins.export_format.ExportFormat}`` of formats this plugin writes.

    An ``ExportFormat`` names the assembly class (or its ``"module:attribute"`` name) that turns
    a run into output: built as
    ``assembly(writer, model, layout, config, progress=...)`` around an ``ArtifactWriter`` (which
    owns output-path safety, the partial directory and resume), it offers ``next_block``,
    ``resumed_calibration()``, ``begin(calibration, store)``, ``add_block(index, results, rows,
    next_hidden)`` and ``finish(source, blocks, device)`` returning the output path (see
    ``gptq_plugins.assembly.ArtifactAssembly``). ``single_file`` says the output is one file. The
    core writes ``gptq_plugins`` and ``gptq`` (GPTQ v1 directories that differ only in
    ``quant_method``) and ``gguf`` (one file for llama.cpp). Later-registered plugins override a
    name; ``QuantizeConfig.format`` accepts the core's names.
    """


@hookspec
def gptq_plugins_kernel_backends():
    """Return a list of kernel backends for :class:`gptq_plugins.quant_linear.QuantLinear`.

    A backend has ``name``, ``priority``, ``supports(device_type, bits, group_size, desc_act,
    dtype)``, ``prepare(layer)`` returning per-layer state (kept as ``layer.kernel_state``) and
    ``apply(layer, x)`` computing ``x [M, in] @ W.T`` without bias in ``x``'s dtype.
    ``QuantLinear.post_init`` uses the supported backend with the highest priority (later-registered
    plugins win ties); ``prepare`` may raise ``gptq_plugins.kernels.BackendUnsupported`` to pass the
    layer to the next candidate. The torch reference backend supports everything and has the
    lowest priority.
    """


@hookspec
def gptq_plugins_layer_quantized(name: str, result, record: dict):
    """Called after each Linear is quantized (an event; return values are ignored).

    ``name`` is the module's path in the model, ``result`` the solver's ``QuantizedWeight`` and
    ``record`` the row written to ``quantization_report.json`` (error, damping, tokens, seconds).
    """


@hookspec
def gptq_plugins_describe():
    """Return a one-line description of what this plugin provides (shown by ``gptq-plugins doctor``)."""
