"""Nothing the user had is ever lost: every writer refuses outputs that would delete it.

One guard (`gptq_plugins.artifact.output_problem`, enforced by `ArtifactWriter`) serves the CLI,
the Python API and `convert`; the Optimum command goes through the CLI's path (tested in
integration/test_optimum.py). Each case digests every file under the test's directory, byte
for byte, and checks that a refused run changed none of them and left nothing beside the output.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptq_plugins.artifact import OutputPathError, output_problem, read_artifact
from gptq_plugins.cli import main
from gptq_plugins.config import QuantizeConfig
from gptq_plugins.convert import convert_checkpoint
from gptq_plugins.pipeline import quantize_model
from gptq_plugins.testing import build_tiny_model, tree_digest
from gptq_plugins.validate import ValidationError

torch.set_num_threads(1)

OPTIONS = {"group_size": 32, "num_samples": 2, "seq_len": 32}
CLI_OPTIONS = ["--group-size", "32", "--num-samples", "2", "--seq-len", "32"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """`models/` as users keep it: a float model, a stock GPTQ checkpoint and unrelated files."""
    root = tmp_path_factory.mktemp("pristine") / "models"
    model = build_tiny_model(root / "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
    quantize_model(model, root / "llama-gptq", QuantizeConfig(**OPTIONS, format="gptq"), progress=False)
    (root / "notes.txt").write_text("my notes")
    (root / "other-model").mkdir()
    (root / "other-model" / "weights.safetensors").write_bytes(b"not ours")
    return root


@pytest.fixture
def tree(models, tmp_path):
    """A fresh copy of `models/` for each case."""
    return Path(shutil.copytree(models, tmp_path / "models"))


def foreign_dir(tree: Path, _source: Path) -> Path:
    out = tree.parent / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    return out


# (name, output given the tree and the source, culprit)
CASES = [
    ("output_contains_source", lambda tree, source: tree, r"output: .*/models contains the source directory"),
    ("output_is_source", lambda tree, source: source, r"output: .* is the source directory"),
    ("output_inside_source", lambda tree, source: source / "out", r"output: .*/out is inside the source directory"),
    ("foreign_directory", foreign_dir, r"output: .*/mine holds thesis\.tex, which is not an artifact written by "
                                       r"gptq-plugins; --overwrite replaces only such an artifact"),
    ("foreign_file", lambda tree, source: tree / "notes.txt", r"output: .*notes\.txt is a file"),
    ("another_model", lambda tree, source: tree / "other-model", r"holds weights\.safetensors, which is not an artifact"),
]


def _check_untouched(tree, before, out):
    assert tree_digest(tree.parent) == before
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("name, make_out, culprit", CASES, ids=[c[0] for c in CASES])
def test_cli_quantize_refuses_with_exit_2(tree, capsys, name, make_out, culprit):
    source = tree / "llama"
    out = make_out(tree, source)
    before = tree_digest(tree.parent)
    code = main(["quantize", str(source), str(out), *CLI_OPTIONS, "--overwrite"])
    assert code == 2
    assert re.search(culprit, capsys.readouterr().err)
    _check_untouched(tree, before, out)


@pytest.mark.parametrize("name, make_out, culprit", CASES, ids=[c[0] for c in CASES])
def test_python_quantize_model_refuses(tree, name, make_out, culprit):
    source = tree / "llama"
    out = make_out(tree, source)
    before = tree_digest(tree.parent)
    with pytest.raises(OutputPathError, match=culprit):
        quantize_model(source, out, QuantizeConfig(**OPTIONS), overwrite=True, progress=False)
    _check_untouched(tree, before, out)


@pytest.mark.parametrize("name, make_out, culprit", CASES, ids=[c[0] for c in CASES])
def test_convert_refuses(tree, capsys, name, make_out, culprit):
    source = tree / "llama-gptq"
    out = make_out(tree, source)
    before = tree_digest(tree.parent)
    with pytest.raises(OutputPathError, match=culprit):
        convert_checkpoint(source, out, overwrite=True)
    assert main(["convert", str(source), str(out), "--overwrite"]) == 2
    assert re.search(culprit, capsys.readouterr().err)
    _check_untouched(tree, before, out)


def test_the_reported_data_loss_is_refused(tree, capsys):
    """`convert models/llama-gptq models --overwrite` once deleted every model in `models/`."""
    before = tree_digest(tree.parent)
    assert main(["convert", str(tree / "llama-gptq"), str(tree), "--overwrite"]) == 2
    assert "contains the source directory" in capsys.readouterr().err
    assert tree_digest(tree.parent) == before


def test_in_memory_model_cannot_overwrite_the_directory_it_came_from(tree):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tree / "llama")
    before = tree_digest(tree.parent)
    with pytest.raises(OutputPathError, match="is the source directory"):
        quantize_model(model, tree / "llama", QuantizeConfig(**OPTIONS), overwrite=True, progress=False)
    assert tree_digest(tree.parent) == before


def test_foreign_partial_directory_is_never_removed(tree):
    source, out = tree / "llama", tree.parent / "fresh"
    partial = tree.parent / ".fresh.partial"
    partial.mkdir()
    (partial / "draft.txt").write_text("someone's")
    before = tree_digest(tree.parent)
    with pytest.raises(OutputPathError, match=r"\.fresh\.partial holds draft\.txt, which is not what an interrupted"):
        quantize_model(source, out, QuantizeConfig(**OPTIONS), overwrite=True, progress=False)
    assert tree_digest(tree.parent) == before


def test_source_named_like_the_scratch_directory_is_refused(tree):
    source = tree.parent / ".out.partial"
    (tree / "llama").rename(source)
    problem = output_problem(tree.parent / "out", source=source, overwrite=True)
    assert problem and "the scratch directory" in problem and "is the source directory" in problem


def test_overwrite_replaces_our_own_artifact_and_an_empty_directory(tree):
    source = tree / "llama"
    own = tree / "llama-gptq"
    stale = json.loads((own / "config.json").read_text())["quantization_config"]
    assert stale["quant_method"] == "gptq"
    quantize_model(source, own, QuantizeConfig(**OPTIONS), overwrite=True, progress=False)
    assert read_artifact(own).model_config["quantization_config"]["quant_method"] == "gptq_plugins"
    empty = tree.parent / "empty"
    empty.mkdir()
    quantize_model(source, empty, QuantizeConfig(**OPTIONS), overwrite=True, progress=False)
    read_artifact(empty)
    converted = tree.parent / "converted"
    convert_checkpoint(own, converted)
    convert_checkpoint(tree / "llama-gptq", converted, to="gptq", overwrite=True)  # our convert output
    assert sorted(p.name for p in tree.parent.iterdir()) == ["converted", "empty", "models"]


def test_resume_is_checked_against_the_same_rules(tree):
    with pytest.raises(ValidationError, match="contains the source directory"):
        from gptq_plugins.validate import check_quantize_inputs

        check_quantize_inputs(tree / "llama", tree, QuantizeConfig(**OPTIONS), overwrite=True, resume=True)


def test_old_artifact_survives_a_run_killed_before_it_finished(tmp_path):
    """SIGKILL mid-run with --overwrite: the earlier artifact is still there, valid, byte for byte."""
    source = build_tiny_model(tmp_path / "deep", hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                              num_attention_heads=2, num_key_value_heads=1)
    out = quantize_model(source, tmp_path / "artifact", QuantizeConfig(**OPTIONS), progress=False)
    before = tree_digest(out)
    partial = tmp_path / ".artifact.partial" / "progress.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "gptq_plugins.cli", "quantize", str(source), str(out),
                             *CLI_OPTIONS, "--overwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 300
    while not partial.is_file():  # the first block is checkpointed: the run is under way
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the run never checkpointed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert tree_digest(out) == before
    read_artifact(out)
