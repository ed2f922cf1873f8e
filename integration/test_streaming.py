"""Streaming, determinism and resume: the same inputs give the same bytes, however the run went."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from gptq_plugins.testing import build_tiny_model

BLOCKS = 6
CLI = [sys.executable, "-m", "gptq_plugins.cli", "quantize"]
OPTIONS = ["--bits", "4", "--group-size", "32", "--num-samples", "6", "--seq-len", "32"]
# Files whose bytes must not depend on how the run went (the report holds timings).
DETERMINISTIC = ("config.json", "model.safetensors.index.json")


def quantize(model_dir, out, *extra, check=True):
    proc = subprocess.run([*CLI, str(model_dir), str(out), *OPTIONS, *extra], capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def artifact_bytes(directory) -> dict[str, bytes]:
    names = [p.name for p in directory.iterdir() if p.suffix == ".safetensors" or p.name in DETERMINISTIC]
    return {name: (directory / name).read_bytes() for name in sorted(names)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", hidden_size=64, intermediate_size=128,
                            num_hidden_layers=BLOCKS, num_attention_heads=4)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "artifact"
    quantize(model_dir, out)
    return artifact_bytes(out)


def test_reference_has_one_shard_per_block(reference):
    shards = [name for name in reference if name.endswith(".safetensors")]
    assert len(shards) == BLOCKS + 1  # one per block, then the float tensors


def test_two_runs_give_identical_bytes(model_dir, reference, tmp_path):
    quantize(model_dir, tmp_path / "again")
    assert artifact_bytes(tmp_path / "again") == reference


@pytest.mark.parametrize("mode", ["--in-memory", "--offload-activations"])
def test_in_memory_and_offloaded_runs_equal_the_streamed_one(model_dir, reference, tmp_path, mode):
    quantize(model_dir, tmp_path / "other", mode)
    assert artifact_bytes(tmp_path / "other") == reference


def _start_and_wait_for_block(model_dir, out, block, *extra):
    """Start a run and return it once its checkpoint says `block` blocks are finished."""
    progress = out.parent / f".{out.name}.partial" / "progress.json"
    proc = subprocess.Popen([*CLI, str(model_dir), str(out), *OPTIONS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if progress.is_file():
            try:
                if json.loads(progress.read_text())["state"]["next_block"] >= block:
                    return proc
            except (json.JSONDecodeError, KeyError):
                pass  # replaced atomically, but read it again rather than trust a race
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before block {block}: {proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"block {block} was not reached in time")


def test_resume_after_sigkill_gives_identical_bytes(model_dir, reference, tmp_path):
    block = random.Random(os.getpid()).randint(1, BLOCKS - 2)
    out = tmp_path / "killed"
    proc = _start_and_wait_for_block(model_dir, out, block, "--offload-activations")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists(), "a killed run must leave nothing at the output path"
    assert (tmp_path / ".killed.partial" / "progress.json").is_file()
    done = quantize(model_dir, out, "--offload-activations", "--resume")
    assert "quantized 42 layers" in done.stdout
    assert artifact_bytes(out) == reference, f"resumed after block {block}"
    assert [p.name for p in tmp_path.iterdir()] == ["killed"]


def test_sigterm_stops_cleanly_and_keeps_progress(model_dir, reference, tmp_path):
    out = tmp_path / "stopped"
    proc = _start_and_wait_for_block(model_dir, out, 1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not out.exists()
    refused = quantize(model_dir, out, check=False)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    quantize(model_dir, out, "--resume")
    assert artifact_bytes(out) == reference


def test_gptaq_resumes_with_its_float_hidden_states(model_dir, tmp_path):
    """GPTAQ carries a second stream (the float model's hidden states); a stopped run resumes it."""
    whole = tmp_path / "whole"
    quantize(model_dir, whole, "--gptaq")
    out = tmp_path / "stopped"
    proc = _start_and_wait_for_block(model_dir, out, 1, "--gptaq")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert (tmp_path / ".stopped.partial" / "scratch" / "float").is_dir()
    quantize(model_dir, out, "--gptaq", "--resume")
    assert artifact_bytes(out) == artifact_bytes(whole)


def test_resume_with_other_options_is_refused(model_dir, tmp_path):
    out = tmp_path / "mixed"
    proc = _start_and_wait_for_block(model_dir, out, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    refused = subprocess.run([*CLI, str(model_dir), str(out), *OPTIONS, "--bits", "8", "--resume"],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "other options" in refused.stderr
    assert not out.exists()
