"""Bad inputs across the CLI, the Python API and the artifact reader.

Each one must end with exit code 2 (or its exception), a message naming the culprit (file, tensor or
option) and nothing at the output path, hidden temporary siblings included. One tiny model and one
tiny artifact are built per module; every case corrupts a fresh copy.
"""

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gptq_plugins.artifact import INDEX_FILE, ArtifactError, read_artifact
from gptq_plugins.cli import main
from gptq_plugins.config import QuantizeConfig
from gptq_plugins.convert import convert_checkpoint
from gptq_plugins.pipeline import quantize_model
from gptq_plugins.solver import quantize_weight, rtn
from gptq_plugins.testing import build_tiny_model
from gptq_plugins.validate import ValidationError, check_quantize_inputs

torch.set_num_threads(1)

HIDDEN, INTER = 64, 128
OPTIONS = {"group_size": 32, "num_samples": 2, "seq_len": 32}
CLI_OPTIONS = ["--group-size", "32", "--num-samples", "2", "--seq-len", "32"]
Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def pristine_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("pristine") / "model", hidden_size=HIDDEN,
                            intermediate_size=INTER, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1)


@pytest.fixture(scope="module")
def pristine_artifact(pristine_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("pristine_artifact") / "artifact"
    return quantize_model(pristine_model, out, QuantizeConfig(**OPTIONS), progress=False)


@pytest.fixture
def model(pristine_model, tmp_path):
    return Path(shutil.copytree(pristine_model, tmp_path / "model"))


def leftovers(out: Path) -> list[str]:
    """What a run left at `out` or beside it under a temporary name (`.<name>.*`)."""
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


# ---------------------------------------------------------------------------- corruptions
def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def edit_tensors(file: Path, edit: Callable[[dict], None]) -> None:
    with safe_open(str(file), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def set_tensor(name: str, make: Callable[[torch.Tensor], torch.Tensor]):
    def edit(tensors):
        tensors[name] = make(tensors[name]).contiguous()
    return edit


def with_value(index: tuple, value: float):
    def make(tensor):
        tensor = tensor.clone()
        tensor[index] = value
        return tensor
    return make


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-100])


def garble_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[8:40] = b"\x00not json at all\xff" * 2
    file.write_bytes(bytes(data))


def write_dataset(path: Path, rows: list[dict] | str) -> Path:
    path.write_text(rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------- quantize inputs
@dataclass
class Run:
    """One quantization request: the model, the output, and the options differing from OPTIONS."""

    model: Path
    out: Path
    options: dict = field(default_factory=dict)
    overwrite: bool = False

    def cli_args(self) -> list[str]:
        flags = [item for name, value in self.options.items() for item in ("--" + name.replace("_", "-"), str(value))]
        return ["quantize", str(self.model), str(self.out), *CLI_OPTIONS, *flags,
                *(["--overwrite"] if self.overwrite else [])]


def missing_config(m, tmp):
    (m / "config.json").unlink()
    return Run(m, tmp / "out")


def unparsable_config(m, tmp):
    (m / "config.json").write_text('{"model_type": "llama",')
    return Run(m, tmp / "out")


def unsupported_architecture(m, tmp):
    edit_config(m, model_type="bloom")
    return Run(m, tmp / "out")


def already_quantized(m, tmp):
    edit_config(m, quantization_config={"quant_method": "gptq", "bits": 4})
    return Run(m, tmp / "out")


def truncated_weights(m, tmp):
    truncate(m / "model.safetensors")
    return Run(m, tmp / "out")


def garbled_weights_header(m, tmp):
    garble_header(m / "model.safetensors")
    return Run(m, tmp / "out")


def missing_tensor(m, tmp):
    edit_tensors(m / "model.safetensors", lambda t: t.pop(f"{Q_PROJ}.weight"))
    return Run(m, tmp / "out")


def missing_norm(m, tmp):
    edit_tensors(m / "model.safetensors", lambda t: t.pop("model.layers.0.post_attention_layernorm.weight"))
    return Run(m, tmp / "out")


def wrong_shape(m, tmp):
    edit_tensors(m / "model.safetensors", set_tensor("model.layers.0.self_attn.k_proj.weight",
                                                     lambda t: torch.zeros(HIDDEN, HIDDEN)))
    return Run(m, tmp / "out")


def config_disagrees_with_weights(m, tmp):
    edit_config(m, intermediate_size=2 * INTER)
    return Run(m, tmp / "out")


def wrong_dtype(m, tmp):
    edit_tensors(m / "model.safetensors", set_tensor(f"{Q_PROJ}.weight", lambda t: t.to(torch.int32)))
    return Run(m, tmp / "out")


def nan_weight(m, tmp):
    edit_tensors(m / "model.safetensors", set_tensor("model.layers.0.mlp.down_proj.weight",
                                                     with_value((5, 7), float("nan"))))
    return Run(m, tmp / "out")


def inf_norm(m, tmp):
    edit_tensors(m / "model.safetensors", set_tensor("model.layers.0.input_layernorm.weight",
                                                     with_value((3,), float("inf"))))
    return Run(m, tmp / "out")


def pickle_weights_only(m, tmp):
    (m / "model.safetensors").rename(m / "pytorch_model.bin")
    return Run(m, tmp / "out")


def missing_dataset(m, tmp):
    return Run(m, tmp / "out", {"dataset": str(tmp / "absent.jsonl")})


def empty_dataset(m, tmp):
    return Run(m, tmp / "out", {"dataset": str(write_dataset(tmp / "empty.txt", ""))})


def too_short_dataset(m, tmp):
    rows = [{"input_ids": list(range(3, 3 + 32))}, {"input_ids": list(range(3, 3 + 16))}]
    return Run(m, tmp / "out", {"dataset": str(write_dataset(tmp / "short.jsonl", rows))})


def all_pad_calibration(m, tmp):
    pad = json.loads((m / "config.json").read_text())["pad_token_id"]
    rows = [{"input_ids": [pad] * 32} for _ in range(4)]
    return Run(m, tmp / "out", {"dataset": str(write_dataset(tmp / "pad.jsonl", rows))})


def unknown_dataset_format(m, tmp):
    return Run(m, tmp / "out", {"dataset": str(write_dataset(tmp / "data.csv", "text\nhello\n"))})


def output_inside_input(m, tmp):
    return Run(m, m / "quantized")


def output_is_input(m, tmp):
    return Run(m, m, overwrite=True)


def output_contains_input(m, tmp):
    return Run(m, tmp, overwrite=True)


def output_parent_is_a_file(m, tmp):
    (tmp / "a_file").write_text("not a directory")
    return Run(m, tmp / "a_file" / "out")


def output_parent_missing(m, tmp):
    return Run(m, tmp / "no" / "such" / "out")


def output_not_writable(m, tmp):
    # Root ignores permission bits; /proc refuses new entries to everyone.
    return Run(m, Path("/proc") / f"gptq-plugins-test-{tmp.name}")


def missing_model_dir(m, tmp):
    return Run(tmp / "no_model", tmp / "out")


QUANTIZE_CASES = [  # (setup, what the message must name, also run through the CLI: "", "main" or "subprocess")
    (missing_config, r"model/config\.json: missing", "main"),
    (unparsable_config, r"model/config\.json: not valid JSON", ""),
    (unsupported_architecture, r"config\.json: model_type 'bloom' has no GPTQ layout \(supported: .*llama", "main"),
    (already_quantized, r"config\.json: already quantized .*'gptq'.*expected a float model", ""),
    (truncated_weights, r"model/model\.safetensors: unreadable safetensors file", "main"),
    (garbled_weights_header, r"model/model\.safetensors: unreadable safetensors file", ""),
    (missing_tensor, rf"tensor '{Q_PROJ}\.weight' is missing; expected a tensor \[64, 64\] "
                     r"\(from config\.json\)", "main"),
    (missing_norm, r"tensor 'model\.layers\.0\.post_attention_layernorm\.weight' is missing; expected a tensor "
                   r"\[64\]", ""),
    (wrong_shape, r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' is \[64, 64\], "
                  r"expected \[32, 64\]", ""),
    (config_disagrees_with_weights, r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' is \[128, 64\], "
                                    r"expected \[256, 64\]", ""),
    (wrong_dtype, rf"tensor '{Q_PROJ}\.weight' is I32, expected a float tensor", ""),
    (nan_weight, r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has 1 non-finite "
                 r"values \(NaN or inf\) of 8192", "subprocess"),
    (inf_norm, r"tensor 'model\.layers\.0\.input_layernorm\.weight' has 1 non-finite", ""),
    (pickle_weights_only, r"weights only in pytorch_model\.bin; expected safetensors .*never unpickled", "main"),
    (missing_dataset, r"dataset: .*absent\.jsonl: no such file", ""),
    (empty_dataset, r"dataset '.*empty\.txt': .*empty\.txt: empty file; expected text or input_ids for "
                    r"num_samples=2 x seq_len=32", ""),
    (too_short_dataset, r"short\.jsonl: 1 rows of input_ids have at least 32 tokens, need num_samples=2", "main"),
    (all_pad_calibration, r"dataset '.*pad\.jsonl': all 64 calibration tokens are id 2 \(the pad token", "main"),
    (unknown_dataset_format, r"dataset: .*data\.csv: expected 'builtin' or a file ending in \.txt", ""),
    (output_inside_input, r"output: .*model/quantized is inside the source directory", "subprocess"),
    (output_is_input, r"output: .*model is the source directory", ""),
    (output_contains_input, r"output: .* contains the source directory", ""),
    (output_parent_is_a_file, r"output: .*a_file is not a directory", ""),
    (output_parent_missing, r"output: parent directory .*no/such does not exist", ""),
    (output_not_writable, r"output: cannot create directories in /proc", "main"),
    (missing_model_dir, r"model directory .*no_model: does not exist", ""),
]


def case_id(case):
    return case[0].__name__


@pytest.mark.parametrize("setup, culprit, _cli", QUANTIZE_CASES, ids=map(case_id, QUANTIZE_CASES))
def test_python_api_rejects_bad_quantize_inputs(model, tmp_path, setup, culprit, _cli):
    run = setup(model, tmp_path)
    before = leftovers(run.out)
    with pytest.raises(ValidationError) as err:
        check_quantize_inputs(run.model, run.out, QuantizeConfig(**{**OPTIONS, **run.options}),
                              overwrite=run.overwrite)
    assert re.search(culprit, str(err.value)), f"{culprit!r} not in:\n{err.value}"
    assert leftovers(run.out) == before


CLI_CASES = [case for case in QUANTIZE_CASES if case[2]]


@pytest.mark.parametrize("setup, culprit, how", CLI_CASES, ids=map(case_id, CLI_CASES))
def test_cli_exits_2_on_bad_quantize_inputs(model, tmp_path, capsys, setup, culprit, how):
    run = setup(model, tmp_path)
    before = leftovers(run.out)
    if how == "subprocess":
        proc = subprocess.run([sys.executable, "-m", "gptq_plugins.cli", *run.cli_args()], capture_output=True,
                              text=True, timeout=300)
        code, stderr = proc.returncode, proc.stderr
        assert "Traceback" not in stderr
    else:
        code, stderr = main(run.cli_args()), capsys.readouterr().err
    assert code == 2, stderr
    error = stderr[stderr.index("gptq-plugins quantize: error: "):]  # after any progress bars
    assert re.search(culprit, error), f"{culprit!r} not in:\n{stderr}"
    assert leftovers(run.out) == before


def test_valid_inputs_pass_and_leave_nothing_behind(pristine_model, tmp_path):
    out = tmp_path / "out"
    checked = check_quantize_inputs(pristine_model, out, QuantizeConfig(**OPTIONS))
    assert checked.layout.name == "llama" and checked.out_dir == out.resolve()
    assert checked.calibration.token_ids.shape == (2, 32) and checked.calibration.token_ids.unique().numel() > 1
    assert list(tmp_path.iterdir()) == []  # the writability probe is gone too


def test_every_problem_is_reported_at_once(model, tmp_path):
    edit_tensors(model / "model.safetensors", set_tensor(f"{Q_PROJ}.weight", lambda t: t.to(torch.int32)))
    with pytest.raises(ValidationError) as err:
        check_quantize_inputs(model, model / "out", QuantizeConfig(**OPTIONS))
    assert [p.split(":")[0] for p in err.value.problems] == ["output", str(model / "model.safetensors")]
    assert str(err.value).startswith("2 problems with the inputs:\n  - output: ")


def test_existing_output_is_left_untouched(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code = main(Run(model, out).cli_args())
    assert code == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert leftovers(out) == ["out"]


@pytest.mark.parametrize("flags, culprit", [
    (["--bits", "5"], r"--bits: invalid choice: 5"),
    (["--damp", "-0.1"], r"damp_percent: expected a fraction in \(0, 1\), got -0\.1"),
    (["--group-size", "0"], r"group_size: expected -1 or a positive integer, got 0"),
    (["--static-groups"], r"static_groups: only meaningful with desc_act=True"),
    (["--num-samples", "0"], r"num_samples: expected a positive integer, got 0"),
])
def test_cli_rejects_bad_options(pristine_model, tmp_path, capsys, flags, culprit):
    out = tmp_path / "out"
    try:
        code = main(["quantize", str(pristine_model), str(out), *CLI_OPTIONS, *flags])
    except SystemExit as exit_:  # argparse's own errors (choices)
        code = exit_.code
    stderr = capsys.readouterr().err
    assert code == 2 and re.search(culprit, stderr), stderr
    assert leftovers(out) == []


def test_model_code_is_not_run_unless_trusted(model, tmp_path):
    """A model directory may ship Python (auto_map); it runs only with trust_remote_code."""
    marker = tmp_path / "code_ran"
    (model / "payload.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                      "from transformers import LlamaConfig as PayloadConfig\n"
                                      "from transformers import LlamaForCausalLM as PayloadModel\n")
    edit_config(model, auto_map={"AutoConfig": "payload.PayloadConfig",
                                 "AutoModelForCausalLM": "payload.PayloadModel"})
    check_quantize_inputs(model, tmp_path / "out", QuantizeConfig(**OPTIONS))
    assert not marker.exists()
    # With trust the same call does run it (so the check above can fail). In a child process:
    # remote code registers Transformers' own Llama classes for auto-class saving, process-wide.
    trusted = (f"from gptq_plugins.config import QuantizeConfig\n"
               f"from gptq_plugins.validate import check_quantize_inputs\n"
               f"check_quantize_inputs({str(model)!r}, {str(tmp_path / 'out')!r}, "
               f"QuantizeConfig(**{OPTIONS!r}), trust_remote_code=True)\n")
    subprocess.run([sys.executable, "-c", trusted], check=True, timeout=300)
    assert marker.exists()


# ---------------------------------------------------------------------------- artifact reader
def shard(directory: Path) -> Path:
    return next(directory.glob("*.safetensors"))


def edit_quantization_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"].update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def artifact_truncated(a):
    truncate(shard(a))
    return rf"{shard(a).name}: unreadable safetensors file"


def artifact_garbled_header(a):
    garble_header(shard(a))
    return rf"{shard(a).name}: unreadable safetensors file"


def artifact_missing_tensor(a):
    edit_tensors(shard(a), lambda t: t.pop(f"{Q_PROJ}.qzeros"))
    index = json.loads((a / INDEX_FILE).read_text())
    del index["weight_map"][f"{Q_PROJ}.qzeros"]
    (a / INDEX_FILE).write_text(json.dumps(index))
    return rf"tensor '{Q_PROJ}\.qzeros' is missing \(expected I32 \[2, 8\]\)"


def artifact_tensor_missing_from_shard(a):
    edit_tensors(shard(a), lambda t: t.pop(f"{Q_PROJ}.g_idx"))
    return rf"{shard(a).name}: tensor '{Q_PROJ}\.g_idx' listed in {INDEX_FILE} is missing"


def artifact_wrong_dtype(a):
    edit_tensors(shard(a), set_tensor(f"{Q_PROJ}.scales", lambda t: t.float()))
    return rf"tensor '{Q_PROJ}\.scales' is F32 \[2, 64\], expected F16 \[2, 64\]"


def artifact_wrong_shape(a):
    edit_tensors(shard(a), set_tensor(f"{Q_PROJ}.qzeros", lambda t: t[:1]))
    return rf"tensor '{Q_PROJ}\.qzeros' is I32 \[1, 8\], expected I32 \[2, 8\]"


def artifact_g_idx_out_of_range(a):
    edit_tensors(shard(a), set_tensor(f"{Q_PROJ}.g_idx", with_value((0,), 7)))
    return rf"tensor {Q_PROJ}\.g_idx: group indices must lie in \[0, 1\], found \[0, 7\]"


def artifact_bits_disagree_with_tensors(a):
    edit_quantization_config(a, bits=8)
    return r"qzeros' is I32 \[\d+, \d+\], expected I32"


def artifact_unknown_option(a):
    edit_quantization_config(a, zero_point_magic=True)
    return r"quantization_config: unknown keys \['zero_point_magic'\]"


def artifact_nan_scales(a):
    edit_tensors(shard(a), set_tensor(f"{Q_PROJ}.scales", with_value((1, 3), float("nan"))))
    return rf"tensor '{Q_PROJ}\.scales' has 1 non-finite values"


def artifact_inf_scales(a):
    edit_tensors(shard(a), set_tensor("model.layers.0.mlp.down_proj.scales", with_value((0, 0), float("inf"))))
    return r"tensor 'model\.layers\.0\.mlp\.down_proj\.scales' has 1 non-finite values"


def artifact_missing_shard(a):
    missing = shard(a)
    missing.unlink()
    return rf"{missing.name}: listed in {INDEX_FILE} but missing"


def artifact_weight_beside_qweight(a):
    def add_weight(tensors):
        tensors[f"{Q_PROJ}.weight"] = torch.zeros(HIDDEN, HIDDEN)
    edit_tensors(shard(a), add_weight)
    index = json.loads((a / INDEX_FILE).read_text())
    index["weight_map"][f"{Q_PROJ}.weight"] = shard(a).name
    (a / INDEX_FILE).write_text(json.dumps(index))
    return rf"tensor '{Q_PROJ}\.weight' beside {Q_PROJ}\.qweight"


ARTIFACT_CASES = [artifact_truncated, artifact_garbled_header, artifact_missing_tensor,
                  artifact_tensor_missing_from_shard, artifact_wrong_dtype, artifact_wrong_shape,
                  artifact_g_idx_out_of_range, artifact_bits_disagree_with_tensors, artifact_unknown_option,
                  artifact_nan_scales, artifact_inf_scales, artifact_missing_shard, artifact_weight_beside_qweight]


@pytest.mark.parametrize("corrupt", ARTIFACT_CASES, ids=[c.__name__ for c in ARTIFACT_CASES])
def test_reader_rejects_bad_artifacts(pristine_artifact, tmp_path, corrupt):
    broken = Path(shutil.copytree(pristine_artifact, tmp_path / "broken"))
    culprit = corrupt(broken)
    with pytest.raises(ArtifactError) as err:
        read_artifact(broken)
    assert re.search(culprit, str(err.value)), f"{culprit!r} not in:\n{err.value}"
    # A tool that reads it before writing leaves nothing at its output.
    out = tmp_path / "converted"
    with pytest.raises(ArtifactError):
        convert_checkpoint(broken, out)
    assert leftovers(out) == []


@pytest.mark.parametrize("corrupt", [artifact_truncated, artifact_nan_scales],
                         ids=["truncated", "nan_scales"])
def test_cli_inspect_exits_2_on_bad_artifacts(pristine_artifact, tmp_path, capsys, corrupt):
    broken = Path(shutil.copytree(pristine_artifact, tmp_path / "broken"))
    culprit = corrupt(broken)
    code = main(["inspect", str(broken)])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.startswith("gptq-plugins inspect: error: ") and re.search(culprit, stderr), stderr


def test_the_pristine_artifact_reads(pristine_artifact):
    """The corruptions above are what the reader rejects, not the artifact itself."""
    assert len(read_artifact(pristine_artifact).modules) == 7


def flip_a_bit_of(directory: Path, name: str) -> Path:
    """Flip one bit inside tensor `name`'s data: the header, shapes and dtypes stay valid."""
    file = directory / json.loads((directory / INDEX_FILE).read_text())["weight_map"][name]
    data = bytearray(file.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start = json.loads(data[8:8 + header_size])[name]["data_offsets"][0]
    data[8 + header_size + start] ^= 1
    file.write_bytes(bytes(data))
    return file


def test_inspect_verifies_the_recorded_sha256_of_each_shard(pristine_artifact, tmp_path, capsys):
    shards = len(set(json.loads((pristine_artifact / INDEX_FILE).read_text())["weight_map"].values()))
    assert main(["inspect", str(pristine_artifact)]) == 0
    assert f"sha256: {shards} shard(s) match the index" in capsys.readouterr().out
    broken = Path(shutil.copytree(pristine_artifact, tmp_path / "broken"))
    file = flip_a_bit_of(broken, f"{Q_PROJ}.qweight")
    read_artifact(broken)  # every tensor still has a valid name, shape, dtype and range
    assert main(["inspect", str(broken)]) == 2
    stderr = capsys.readouterr().err
    assert re.search(rf"{file.name}: sha256 is [0-9a-f]{{64}}, expected [0-9a-f]{{64}} as recorded", stderr), stderr


def test_unknown_keys_of_stock_gptq_configs_are_reported(pristine_artifact, tmp_path, caplog):
    """Stock GPTQ configs carry writer-specific keys, so unknown ones are not fatal, but never silent."""
    stock = convert_checkpoint(pristine_artifact, tmp_path / "stock", to="gptq").path
    edit_quantization_config(stock, zero_point_magic=True)
    with caplog.at_level("WARNING", logger="gptq_plugins"):
        assert read_artifact(stock).config.bits == 4
    assert re.search(r"config\.json: quantization_config: ignoring unknown keys \['zero_point_magic'\]", caplog.text)


# ---------------------------------------------------------------------------- solver
def poisoned(tensor: torch.Tensor, value: float) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[0] = value
    return tensor


@pytest.mark.parametrize("solve, culprit", [
    (lambda w, h, c: quantize_weight(poisoned(w, float("nan")), h, c), r"weight has 1 non-finite"),
    (lambda w, h, c: quantize_weight(w, poisoned(h, float("inf")), c), r"hessian has 1 non-finite"),
    (lambda w, h, c: rtn(torch.full_like(w, float("nan")), c), r"weight has 2048 non-finite"),
    (lambda w, h, c: quantize_weight(w, h[:-1], c), r"hessian must be \[64, 64\]"),
], ids=["nan_weight", "inf_hessian", "nan_weight_rtn", "hessian_shape"])
def test_solver_rejects_non_finite_or_mismatched_inputs(solve, culprit):
    weight, x = torch.randn(32, 64), torch.randn(256, 64)
    with pytest.raises(ValueError, match=culprit):
        solve(weight, 2 * x.T @ x / 256, QuantizeConfig(group_size=32))


@pytest.mark.parametrize("config", [QuantizeConfig(group_size=32), QuantizeConfig(group_size=32, desc_act=True),
                                    QuantizeConfig(group_size=-1, sym=False, mse_clip=True)],
                         ids=["groups", "act_order", "asym_mse"])
def test_all_zero_calibration_inputs_give_finite_zero_weights(config):
    """All-zero activations (a pad-token-only calibration) carry no signal: the solver treats every
    input as dead and returns a finite all-zero weight, never NaN. The run refuses such data up front
    (`all_pad_calibration` above), since a zeroed model is not a useful result."""
    result = quantize_weight(torch.randn(32, 64), torch.zeros(64, 64), config)
    assert result.fallback is None and result.loss == 0
    assert torch.isfinite(result.scales).all() and (result.scales > 0).all()
    assert torch.equal(result.dequantize(), torch.zeros(32, 64))


def test_indefinite_hessian_falls_back_to_rtn_loudly():
    weight = torch.randn(32, 64)
    result = quantize_weight(weight, -torch.eye(64), QuantizeConfig(group_size=32))
    assert result.fallback and "round-to-nearest" in result.fallback and result.damp_percent == 1.0
    assert torch.equal(result.codes, rtn(weight, QuantizeConfig(group_size=32)).codes)
