"""Choices that follow the CPU kind: bfloat16 Hessians, the int4 kernel's activations, what is said.

Both kinds are exercised on any machine: the policy functions are checked with the feature test
replaced, and `gptq-plugins doctor` and a quantization run are checked in a subprocess with
`ATEN_CPU_CAPABILITY=avx2`, which makes PyTorch (and so this project) behave as on an AVX2-only CPU.
"""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from gptq_plugins.cpu_features import CpuFeatures, cpu_features
from gptq_plugins.hessian import resolve_hessian_dtype
from gptq_plugins.kernels import CpuInt4Backend, DenseBackend, announce
from gptq_plugins.kernels import base as kernel_base
from gptq_plugins.testing import build_tiny_model

SAPPHIRE_RAPIDS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
ZEN3 = ("avx2", "fma", "f16c")


@pytest.mark.parametrize("flags, capability, native, kind", [
    (SAPPHIRE_RAPIDS, "AVX512", True, "AVX-512 + bfloat16"),
    (SAPPHIRE_RAPIDS, "AVX2", False, "AVX2"),  # PyTorch told to use its AVX2 kernels
    (("avx2", "avx512f"), "AVX512", False, "AVX-512"),  # Skylake/Ice Lake: no bfloat16 dot products
    (ZEN3, "AVX2", False, "AVX2"),
])
def test_native_bfloat16_needs_the_flag_and_pytorchs_avx512_kernels(flags, capability, native, kind):
    features = CpuFeatures("test cpu", flags, capability)
    assert features.native_bfloat16 is native and features.kind == kind
    assert features.as_dict()["native_bfloat16"] is native


def test_this_machine_is_read(monkeypatch):
    features = cpu_features()
    assert features.model and features.torch_capability == torch.backends.cpu.get_cpu_capability()
    assert set(features.flags) <= set(("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                                       "amx_tile", "amx_bf16", "amx_int8"))


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_hessian_dtype_is_bfloat16_exactly_where_native(native, expected, monkeypatch):
    monkeypatch.setattr("gptq_plugins.hessian.native_bfloat16", lambda device: native)
    assert resolve_hessian_dtype("auto", "cpu") == expected
    assert resolve_hessian_dtype("float32", "cpu") == "float32"
    assert resolve_hessian_dtype("bfloat16", "cpu") == "bfloat16"  # an explicit choice is kept


def test_rounding_activations_is_warned_once_and_names_the_exact_backend(caplog, monkeypatch):
    monkeypatch.setattr(kernel_base, "_announced", set())
    with caplog.at_level(logging.INFO, logger="gptq_plugins"):
        for _ in range(3):
            announce(CpuInt4Backend(), "cpu", 4, torch.float32, forced=False)
            announce(DenseBackend(), "cpu", 3, torch.float32, forced=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 1 and len(infos) == 1
    assert "cpu_int4 kernel (chosen automatically) with bfloat16 activations, not float32" in warnings[0].getMessage()
    assert "backend='dense' (or GPTQ_PLUGINS_BACKEND=dense) computes in float32" in warnings[0].getMessage()
    assert "3-bit layers on cpu run on the dense kernel (chosen automatically) in float32" in infos[0].getMessage()


def _run(args, capability=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    proc = subprocess.run([sys.executable, "-m", "gptq_plugins.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_doctor_says_which_path_each_bit_width_takes_on_both_kinds():
    native = cpu_features().native_bfloat16
    here = _run(["doctor"])
    assert f"cpu: {cpu_features().model} ({cpu_features().kind}; PyTorch kernels" in here
    assert f"--hessian-dtype auto uses {'bfloat16' if native else 'float32'} here" in here
    assert ("4-bit cpu_int4 (bfloat16)" if native else "4-bit dense (float32)") in \
        next(line for line in here.splitlines() if line.startswith("  cpu float32:"))
    avx2 = _run(["doctor"], capability="avx2")
    assert "(AVX2; PyTorch kernels AVX2)" in avx2 and "bfloat16 in hardware: no" in avx2
    assert "--hessian-dtype auto uses float32 here" in avx2
    lines = {line.split(":")[0].strip(): line for line in avx2.splitlines() if line.startswith("  cpu ")}
    assert "2-bit dense (float32), 3-bit dense (float32), 4-bit dense (float32), 8-bit dense (float32)" in \
        lines["cpu float32"]
    assert "4-bit cpu_int4 (bfloat16)" in lines["cpu bfloat16"]  # the model's own dtype: nothing rounded


def test_a_run_records_the_hessian_dtype_and_the_machine_it_ran_on(tmp_path):
    model = build_tiny_model(tmp_path / "model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
    options = ["--group-size", "32", "--num-samples", "2", "--seq-len", "32", "--hessian-dtype", "auto"]
    for capability, out in ((None, tmp_path / "here"), ("avx2", tmp_path / "avx2")):
        stdout = _run(["quantize", str(model), str(out), *options], capability)
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        report = json.loads((out / "quantization_report.json").read_text())
        expected = "bfloat16" if capability is None and cpu_features().native_bfloat16 else "float32"
        assert config["meta"]["calibration"]["hessian_dtype"] == expected
        assert report["config"]["hessian_dtype"] == expected
        assert report["machine"]["cpu"]["kind"] == ("AVX2" if capability else cpu_features().kind)
        assert f"Hessian products in {expected}" in stdout
