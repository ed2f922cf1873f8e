"""Quantizing on several processes: `torchrun ... -m gptq_plugins quantize` on gloo (CPU).

Two ranks on one node and two nodes on 127.0.0.1 give the same bytes, run after run, and the
bytes of one process run at the same number of threads; the artifact is served like any other; a killed rank stops the run with nothing at the output and `--resume`
finishes it; ranks given other options are refused before any work.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptq_plugins.testing import build_tiny_model, read_tensors

BLOCKS = 4
OPTIONS = ["--bits", "4", "--group-size", "32", "--num-samples", "16", "--seq-len", "32"]
# vLLM's CPU attention needs head_dim 32 (hidden 128, 4 heads). Each rank on one thread: the CPU has two cores, and one process is compared at the same count.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUANTIZE = ["-m", "gptq_plugins", "quantize"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
DETERMINISTIC = ("config.json", "model.safetensors.index.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def standalone(model_dir, out, *extra, nproc=2):
    return [*TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), *QUANTIZE, str(model_dir), str(out),
            *OPTIONS, *extra]


def run(command, check=True, timeout=300):
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def artifact_bytes(directory: Path) -> dict[str, bytes]:
    names = [p.name for p in directory.iterdir() if p.suffix == ".safetensors" or p.name in DETERMINISTIC]
    return {name: (directory / name).read_bytes() for name in sorted(names)}


def two_nodes(model_dir, out, node_options=(OPTIONS, OPTIONS)):
    """Two torchrun launchers of one rank each, as on two machines, meeting on 127.0.0.1."""
    port = free_port()
    procs = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                               "--master-addr", "127.0.0.1", "--master-port", str(port), *QUANTIZE,
                               str(model_dir), str(out), *options],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for node, options in enumerate(node_options)]
    return [(proc.wait(timeout=300), *proc.communicate()) for proc in procs]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", hidden_size=128, intermediate_size=256,
                            num_hidden_layers=BLOCKS, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "artifact"
    run([sys.executable, *QUANTIZE, str(model_dir), str(out), *OPTIONS])
    return out


@pytest.fixture(scope="module")
def two_ranks(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "artifact"
    done = run(standalone(model_dir, out))
    assert done.stdout.count("quantized 28 layers") == 1, done.stdout  # one rank reports
    return out


def test_two_ranks_give_identical_bytes_run_after_run(model_dir, two_ranks, tmp_path):
    run(standalone(model_dir, tmp_path / "again"))
    assert artifact_bytes(tmp_path / "again") == artifact_bytes(two_ranks)


def test_two_nodes_give_the_bytes_of_two_ranks_on_one_node(model_dir, two_ranks, tmp_path):
    results = two_nodes(model_dir, tmp_path / "nodes")
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    assert artifact_bytes(tmp_path / "nodes") == artifact_bytes(two_ranks)


def test_two_ranks_give_the_bytes_of_one_process(one_process, two_ranks):
    """Each rank runs whole calibration batches, so every forward is one process's, and the float64
    Hessian sums add up to the same bits (at the same number of threads per process)."""
    assert artifact_bytes(two_ranks) == artifact_bytes(one_process)


def test_uneven_shares_with_gptaq_give_the_bytes_of_one_process(model_dir, tmp_path):
    """20 samples are 3 batches (8 + 8 + 4), shared 1 + 2; GPTAQ's asymmetry is summed like the Hessian."""
    options = ["--num-samples", "20", "--gptaq"]
    run([sys.executable, *QUANTIZE, str(model_dir), str(tmp_path / "one"), *OPTIONS, *options])
    run(standalone(model_dir, tmp_path / "two", *options))
    assert artifact_bytes(tmp_path / "two") == artifact_bytes(tmp_path / "one")


def test_two_rank_artifact_is_served_by_transformers_and_vllm(model_dir, two_ranks, tmp_path):
    from transformers import AutoTokenizer

    from gptq_plugins.testing import dequantized_reference, greedy_tokens, greedy_tokens_transformers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("def main():", "The quick")]
    expected = greedy_tokens(dequantized_reference(model_dir, two_ranks), prompts, 6)
    assert greedy_tokens_transformers(two_ranks, prompts, 6, backend="dense") == expected
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"label": "two-ranks", "model": str(two_ranks), "quantization": "gptq_plugins",
                                 "dtype": "float32", "prompts": prompts}]))
    engine = Path(__file__).with_name("test_vllm.py")  # its script mode runs vLLM engines in a fresh process
    env = {**ENV, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "GPTQ_PLUGINS_BACKEND": "dense"}
    done = subprocess.run([sys.executable, str(engine), str(jobs), str(tmp_path / "out.json")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    served = json.loads((tmp_path / "out.json").read_text())["two-ranks"]
    assert [tokens[:6] for tokens in served["tokens"]] == expected, served


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The process id of `rank` among the launcher's workers (read from /proc), None before it starts."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_killed_rank_stops_every_rank_and_resume_finishes(model_dir, two_ranks, tmp_path):
    out = tmp_path / "killed"
    progress = tmp_path / ".killed.partial" / "progress.json"
    launcher = subprocess.Popen(standalone(model_dir, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=ENV)
    deadline = time.monotonic() + 240
    while not (progress.is_file() and json.loads(progress.read_text())["state"]["next_block"] >= 2):
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "block 2 was not reached in time"
        time.sleep(0.01)
    os.kill(_rank_pid(launcher, 1), signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert "rank      : 1" in stderr and "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]  # torchrun's summary
    assert not out.exists(), "a stopped run must leave nothing at the output path"
    assert json.loads(progress.read_text())["state"]["next_block"] >= 2
    refused = run([sys.executable, *QUANTIZE, str(model_dir), str(out), *OPTIONS, "--resume"], check=False)
    assert refused.returncode == 2 and "had 2 ranks" in refused.stderr, refused.stderr[-2000:]
    run(standalone(model_dir, out, "--resume"))
    assert artifact_bytes(out) == artifact_bytes(two_ranks)
    assert [p.name for p in tmp_path.iterdir()] == ["killed"]


def test_ranks_given_other_options_are_refused_up_front(model_dir, tmp_path):
    out = tmp_path / "mismatch"
    results = two_nodes(model_dir, out, (OPTIONS, [*OPTIONS, "--bits", "3"]))
    assert all(code != 0 for code, _, _ in results)
    node_one_stderr = results[1][2]
    assert "ranks [1] were given other options than rank 0" in node_one_stderr, node_one_stderr[-3000:]
    assert list(tmp_path.iterdir()) == []
