"""`gptq-plugins quantize` end to end on a tiny local Llama: the artifact's files, shapes and report."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from gptq_plugins.artifact import ArtifactError, read_artifact
from gptq_plugins.testing import build_tiny_model, read_tensors, rewrite_tensor

HIDDEN, INTER, LAYERS = 128, 256, 2
CLI = [sys.executable, "-m", "gptq_plugins.cli"]
FAST = ["--num-samples", "8", "--seq-len", "64"]


def run_cli(*args, check=True):
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", hidden_size=HIDDEN,
                            intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
                            num_key_value_heads=2)


@pytest.fixture(scope="module")
def artifact(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "artifact"
    proc = run_cli("quantize", model_dir, out, "--bits", "4", "--group-size", "64", *FAST)
    assert "quantized 14 layers to 4 bits" in proc.stdout
    assert f"artifact: {out}" in proc.stdout
    return out


def test_artifact_files_and_config(artifact, model_dir):
    names = {p.name for p in artifact.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "quantization_report.json",
            "tokenizer.json", "generation_config.json"} <= names
    qc = json.loads((artifact / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq_plugins" and qc["checkpoint_format"] == "gptq"
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (4, 64, True, False)
    assert qc["meta"]["quantizer"][0].startswith("gptq-plugins:")
    index = json.loads((artifact / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(read_tensors(artifact))
    leftovers = [p.name for p in artifact.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("module, in_features, out_features", [
    ("self_attn.q_proj", HIDDEN, HIDDEN),
    ("self_attn.k_proj", HIDDEN, HIDDEN // 2),
    ("self_attn.o_proj", HIDDEN, HIDDEN),
    ("mlp.up_proj", HIDDEN, INTER),
    ("mlp.down_proj", INTER, HIDDEN),
])
def test_quantized_tensors_have_the_gptq_v1_shapes(artifact, module, in_features, out_features):
    all_tensors = read_tensors(artifact)
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}.{module}"
        groups = in_features // 64
        assert all_tensors[f"{prefix}.qweight"].dtype == torch.int32
        assert list(all_tensors[f"{prefix}.qweight"].shape) == [in_features * 4 // 32, out_features]
        assert list(all_tensors[f"{prefix}.qzeros"].shape) == [groups, out_features * 4 // 32]
        assert all_tensors[f"{prefix}.scales"].dtype == torch.float16
        assert list(all_tensors[f"{prefix}.scales"].shape) == [groups, out_features]
        assert all_tensors[f"{prefix}.g_idx"].tolist() == [i // 64 for i in range(in_features)]
        assert f"{prefix}.weight" not in all_tensors


def test_float_modules_stay_float(artifact):
    all_tensors = read_tensors(artifact)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert all_tensors[name].dtype == torch.float32


def test_report_shows_gptq_beats_rtn(artifact):
    report = json.loads((artifact / "quantization_report.json").read_text())
    rows = report["layers"]
    assert len(rows) == 7 * LAYERS
    assert all(r["tokens"] == 8 * 64 for r in rows)
    assert all(r["fallback"] is None and r["damp_percent"] == 0.01 for r in rows)
    assert report["summary"]["mean_relative_error"] < report["summary"]["mean_rtn_relative_error"]
    # The first layer's inputs are the same for both methods, so the comparison is exact there.
    assert rows[0]["relative_error"] < rows[0]["rtn_relative_error"]


def test_reader_validates_and_inspect_describes(artifact):
    art = read_artifact(artifact)
    assert len(art.modules) == 7 * LAYERS
    assert art.modules["model.layers.1.mlp.down_proj"].in_features == INTER
    proc = run_cli("inspect", artifact)
    assert "14 quantized modules" in proc.stdout


def test_inspect_plots_the_report_into_a_new_file_only(artifact, tmp_path):
    png = tmp_path / "report.png"
    proc = run_cli("inspect", artifact, "--plot", png)
    assert f"plot: {png}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    again = run_cli("inspect", artifact, "--plot", png, check=False)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_reader_rejects_a_truncated_shard(artifact, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=shard.name):
        read_artifact(broken)
    proc = run_cli("inspect", broken, check=False)
    assert proc.returncode == 2 and shard.name in proc.stderr


def test_reader_names_a_tensor_with_the_wrong_shape(artifact, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    rewrite_tensor(broken, "model.layers.0.mlp.up_proj.scales", lambda scales: scales[:, :-1])
    with pytest.raises(ArtifactError, match=r"model.layers.0.mlp.up_proj.scales.*expected F16 \[2, 256\]"):
        read_artifact(broken)


def test_existing_output_is_refused_without_overwrite(artifact, model_dir):
    before = sorted(p.name for p in artifact.iterdir())
    proc = run_cli("quantize", model_dir, artifact, *FAST, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert sorted(p.name for p in artifact.iterdir()) == before


def test_bad_option_exits_2_and_writes_nothing(model_dir, tmp_path):
    out = tmp_path / "never"
    proc = run_cli("quantize", model_dir, out, "--group-size", "0", *FAST, check=False)
    assert proc.returncode == 2
    assert "group_size: expected -1 or a positive integer, got 0" in proc.stderr
    assert list(tmp_path.iterdir()) == []
