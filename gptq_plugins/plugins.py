"""The one pluggy plugin manager of gptq-plugins, with entry-point discovery."""

from __future__ import annotations

import functools

import pluggy

from gptq_plugins import hookspecs
from gptq_plugins.export_format import ExportFormat

ENTRY_POINT_GROUP = "gptq_plugins"


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """Build the manager once: core implementations first, then every installed plugin."""
    from gptq_plugins import builtin

    pm = pluggy.PluginManager("gptq_plugins")
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name="gptq_plugins.builtin")
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


def model_layouts():
    """Every layout from every plugin, core first (so later plugins override)."""
    layouts = []
    # pluggy calls implementations last-registered first; reverse to registration order.
    for provided in reversed(get_plugin_manager().hook.gptq_plugins_model_layouts()):
        layouts.extend(provided)
    return layouts


def export_formats() -> dict[str, ExportFormat]:
    """Format name -> `ExportFormat`, from every plugin (later-registered ones override)."""
    formats: dict[str, ExportFormat] = {}
    for provided in reversed(get_plugin_manager().hook.gptq_plugins_export_formats()):
        formats.update(provided)
    return formats


def export_format(name: str) -> ExportFormat:
    from gptq_plugins.config import ConfigError

    formats = export_formats()
    if name not in formats:
        raise ConfigError("format", f"no export format named {name!r}; known: {sorted(formats)}")
    return formats[name]


def describe_plugins() -> list[tuple[str, str, str]]:
    """(name, distribution, description) for each registered plugin, for `doctor`."""
    pm = get_plugin_manager()
    dists = {id(plugin): f"{dist.project_name} {dist.version}"
             for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in pm.list_name_plugin():
        impl = getattr(plugin, "gptq_plugins_describe", None)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        text = impl() if impl else "hooks: " + ", ".join(hooks)
        rows.append((name, dists.get(id(plugin), "gptq-plugins (core)"), text))
    return rows


def load_calibration(config, tokenizer, seq_len: int | None = None):
    """Calibration token ids `[num_samples, seq_len]` from the source the config names, as a
    `CalibrationSet`; sources are a hook (`gptq_plugins_calibration_source`), so plugins can add theirs."""
    from gptq_plugins.calibration import CalibrationSet
    from gptq_plugins.config import ConfigError

    seq_len = seq_len or config.seq_len
    ids = get_plugin_manager().hook.gptq_plugins_calibration_source(
        name=config.dataset, config=config, tokenizer=tokenizer, seq_len=seq_len)
    if ids is None:
        raise ConfigError("dataset", f"no calibration source named {config.dataset!r}")
    return CalibrationSet(ids, config.dataset, config.seed)
