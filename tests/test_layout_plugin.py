"""A layout shipped by another package is found through the `gptq_plugins` entry point and used.

The package is a real installed distribution as far as `importlib.metadata` can tell: a module and
a `.dist-info` with `entry_points.txt` in a directory put on `sys.path`, so the plugin manager
discovers it through `load_setuptools_entrypoints`, exactly as it finds the host adapters.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from gptq_plugins import plugins
from gptq_plugins.layouts import UnsupportedModelError, find_layout

PLUGIN_MODULE = "mlp_only_layouts"
PLUGIN_DIST = "mlp-only-layouts"


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """Install a distribution whose layout covers a new model type and replaces the Llama one."""
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(textwrap.dedent('''
        from gptq_plugins import hookimpl
        from gptq_plugins.layouts import ModelLayout

        MLP_ONLY = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


        @hookimpl
        def gptq_plugins_model_layouts():
            return [ModelLayout(name="llama-mlp-only", model_types=("llama",), blocks="model.layers",
                                sequential=MLP_ONLY),
                    ModelLayout(name="my-family", model_types=("my_family",), blocks="model.layers",
                                sequential=MLP_ONLY)]
    '''))
    dist_info = tmp_path / "mlp_only_layouts-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PLUGIN_DIST}\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[gptq_plugins]\nmlp_only = {PLUGIN_MODULE}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.get_plugin_manager.cache_clear()
    yield
    plugins.get_plugin_manager.cache_clear()  # later tests get a manager without it
    sys.modules.pop(PLUGIN_MODULE, None)


def test_entry_point_layout_is_discovered_and_overrides_the_core(installed_plugin):
    assert ("mlp_only", f"{PLUGIN_DIST} 1.0") in {(name, dist) for name, dist, _ in plugins.describe_plugins()}
    layouts = plugins.model_layouts()
    assert find_layout("my_family", layouts).name == "my-family"
    assert find_layout("llama", layouts).name == "llama-mlp-only"
    assert find_layout("mistral", layouts).name == "mistral"  # the core's layouts are still there


def test_pipeline_quantizes_what_the_plugin_layout_names(installed_plugin):
    from transformers import AutoModelForCausalLM

    from gptq_plugins.config import QuantizeConfig
    from gptq_plugins.pipeline import quantize_modules
    from gptq_plugins.testing import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=2, num_attention_heads=2)).eval()
    calibration = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    results, report = quantize_modules(model, QuantizeConfig(bits=4, group_size=32, num_samples=4, seq_len=16),
                                       calibration, progress=False)
    assert report["layout"] == "llama-mlp-only"
    assert set(results) == {f"model.layers.{i}.mlp.{name}" for i in range(2)
                            for name in ("gate_proj", "up_proj", "down_proj")}


def test_without_the_plugin_the_type_is_refused_with_how_to_add_a_layout():
    with pytest.raises(UnsupportedModelError, match=r"'my_family' has no GPTQ layout .*"
                                                    r"gptq_plugins_model_layouts.*'gptq_plugins' entry-point group"):
        find_layout("my_family", plugins.model_layouts())
