"""`optimum-cli export gptq` (adapters/optimum) against `gptq-plugins quantize`, both as subprocesses.

The two front ends share one option definition and one quantize function, so with the same
options they must write the same artifact, tensor for tensor, byte for byte.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptq_plugins.artifact import read_artifact
from gptq_plugins.testing import build_tiny_model

OPTIMUM_CLI = shutil.which("optimum-cli", path=str(Path(sys.executable).parent))
GPTQ_PLUGINS_CLI = [sys.executable, "-m", "gptq_plugins.cli"]
# Non-default values for every option kind (int, float, store_true, store_false, choice), so a
# front end that dropped or renamed one would write a different artifact.
OPTIONS = ["--bits", "4", "--group-size", "64", "--desc-act", "--asym", "--damp", "0.02",
           "--format", "gptq", "--num-samples", "8", "--seq-len", "64", "--seed", "3"]

pytestmark = pytest.mark.skipif(OPTIMUM_CLI is None, reason="optimum-cli is not installed beside this Python")


def run(command, check=True):
    proc = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{command[:4]} exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def both_artifacts(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    run([OPTIMUM_CLI, "export", "gptq", "-m", model_dir, out / "optimum", *OPTIONS])
    run([*GPTQ_PLUGINS_CLI, "quantize", model_dir, out / "cli", *OPTIONS])
    return out / "optimum", out / "cli"


def test_export_help_lists_gptq_beside_optimum_exporters():
    proc = run([OPTIMUM_CLI, "export", "--help"])
    assert "gptq" in proc.stdout.split("positional arguments:")[1]


def test_adapter_is_discovered_as_a_gptq_plugins_entry_point():
    from gptq_plugins.plugins import describe_plugins

    assert any(dist.startswith("gptq-plugins-optimum ") and "optimum-cli export gptq" in text
               for _, dist, text in describe_plugins())


def test_gptq_help_shows_the_shared_options_without_importing_torch():
    """optimum-cli builds every registered parser on each start: this adapter must not pull in torch.

    Only this adapter's `gptq_plugins` entry point is loaded, so the check is about its own imports
    (another adapter may import its host when `import gptq_plugins` loads it).
    """
    probe = ("import sys, pluggy\n"
             "load = pluggy.PluginManager.load_setuptools_entrypoints\n"
             "pluggy.PluginManager.load_setuptools_entrypoints = "
             "lambda self, group, name=None: load(self, group, name='optimum')\n"
             "from optimum.commands.optimum_cli import main\n"
             "sys.argv = ['optimum-cli', 'export', 'gptq', '--help']\n"
             "try:\n    main()\n"
             "except SystemExit:\n    pass\n"
             "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'TORCH_NOT_IMPORTED')\n")
    proc = run([sys.executable, "-c", probe])
    for flag in ("--model", "--trust-remote-code", "--dataset", "--num-samples", "--bits", "--group-size",
                 "--desc-act", "--asym", "--damp", "--seq-len", "--format"):
        assert flag in proc.stdout, flag
    assert proc.stdout.rstrip().endswith("TORCH_NOT_IMPORTED")


def test_export_writes_the_same_artifact_as_gptq_plugins_quantize(both_artifacts):
    optimum_dir, cli_dir = both_artifacts
    optimum_artifact, cli_artifact = read_artifact(optimum_dir), read_artifact(cli_dir)
    optimum_qc = optimum_artifact.model_config["quantization_config"]
    assert optimum_qc == cli_artifact.model_config["quantization_config"]
    # The options reached the job (not two runs that both fell back to defaults).
    assert (optimum_qc["quant_method"], optimum_qc["bits"], optimum_qc["group_size"], optimum_qc["desc_act"],
            optimum_qc["sym"], optimum_qc["damp_percent"]) == ("gptq", 4, 64, True, False, 0.02)
    assert optimum_qc["meta"]["calibration"] == {"dataset": "builtin", "num_samples": 8, "seq_len": 64, "seed": 3,
                                                 "hessian_dtype": "float32", "act_group_aware": False,
                                                 "gptaq": False}
    optimum_tensors, cli_tensors = optimum_artifact.state_dict(), cli_artifact.state_dict()
    assert sorted(optimum_tensors) == sorted(cli_tensors)
    assert len(optimum_artifact.modules) == 14
    for name, tensor in optimum_tensors.items():
        other = cli_tensors[name]
        assert (tensor.dtype, tensor.shape) == (other.dtype, other.shape), name
        assert torch.equal(tensor.contiguous().view(torch.uint8), other.contiguous().view(torch.uint8)), name
    assert json.loads((optimum_dir / "model.safetensors.index.json").read_text())["weight_map"] == \
        json.loads((cli_dir / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.parametrize("options, message", [
    # Rejected by the shared parser's choices.
    (["--bits", "5"], "argument --bits: invalid choice: 5 (choose from 2, 3, 4, 8)"),
    # Rejected by QuantizeConfig before any model is loaded.
    (["--group-size", "0"], "group_size: expected -1 or a positive integer, got 0"),
])
def test_bad_options_fail_clearly_and_leave_nothing(model_dir, tmp_path, options, message):
    proc = run([OPTIMUM_CLI, "export", "gptq", "-m", model_dir, tmp_path / "artifact", *options,
                "--num-samples", "8", "--seq-len", "64"], check=False)
    assert proc.returncode == 2
    assert f"optimum-cli export gptq: error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_outputs_that_would_delete_the_users_files(model_dir, tmp_path):
    """The guard of every writer (tests/test_output_safety.py) holds behind optimum-cli too."""
    from gptq_plugins.testing import tree_digest

    models = tmp_path / "models"
    shutil.copytree(model_dir, models / "tiny")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    before = tree_digest(tmp_path)
    for output, message in ((models, "contains the source directory"),
                            (models / "tiny" / "out", "is inside the source directory"),
                            (tmp_path / "mine", "holds thesis.tex, which is not an artifact written by gptq-plugins")):
        proc = run([OPTIMUM_CLI, "export", "gptq", "-m", models / "tiny", output, "--overwrite",
                    "--num-samples", "8", "--seq-len", "64"], check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert tree_digest(tmp_path) == before
