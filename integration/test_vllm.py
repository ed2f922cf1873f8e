"""vLLM adapter end to end on CPU: a tiny Llama quantized by gptq-plugins and served by vLLM.

Greedy tokens from `LLM(..., quantization="gptq_plugins")` must equal those of Transformers running
the same artifact through the core `QuantLinear`, for 2/3/4/8 bits, act-order on and off,
symmetric and asymmetric; a stock `quant_method: gptq` export is ours only when asked for;
`vllm serve` answers `/v1/completions`; tensor parallel 2 gives the tokens of TP=1; a tensor
that does not match its config fails before any engine starts, naming the tensor.

vLLM engines run in subprocesses (this file run as a script), several per process, so the module
pays vLLM's import once per mode: in-process engines for TP=1, worker processes for TP=2.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 128, 256, 4, 2  # 3-bit zeros pack: every width x 3 % 32 == 0
GROUP_SIZE = 32
CALIBRATION = {"num_samples": 8, "seq_len": 64}
# name: (bits, symmetric, act-order[, group size]); group 48 leaves ragged last groups (128 = 48 + 48 + 32,
# 256 = 5 x 48 + 16), and a tensor-parallel rank's 64 or 128 inputs start inside a group.
ARTIFACTS = {
    "b2-asym-act": (2, False, True),
    "b3-asym": (3, False, False),
    "b3-sym-act": (3, True, True),
    "b4-sym": (4, True, False),
    "b4-asym-act": (4, False, True),
    "b8-sym-act": (8, True, True),
    "b8-asym": (8, False, False),
    "b4-asym-g48": (4, False, False, 48),
    "b3-sym-act-g48": (3, True, True, 48),
}
STOCK_EXPORT = "b4-sym-as-gptq"  # b4-sym converted to quant_method gptq
TP_CASE = "b4-asym-act"  # act-order on row-parallel layers is the hard case of TP sharding
TP_RAGGED_CASE = "b4-asym-g48"  # row-parallel slices that start inside a group
PROMPTS = ["def main():\n    return", "The quick brown fox", "import os\nimport"]
NEW_TOKENS = 8
MAX_MODEL_LEN = 256
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false"}
SERVE_START_TIMEOUT_S = 300


# ----------------------------------------------------------------------------- engine side (script)
def run_engines(jobs: list[dict]) -> dict:
    """Run each job (an `LLM` of its own, a method resolution or a registration check) in turn;
    errors are recorded, not raised."""
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    results = {}
    for job in jobs:
        label = job["label"]
        if job.get("registration"):  # vLLM may call register() again in any process
            import gptq_plugins_vllm
            from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED
            from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

            gptq_plugins_vllm.register()
            gptq_plugins_vllm.register()
            results[label] = {"methods": QUANTIZATION_METHODS.count("gptq_plugins"),
                              "loader_v2": WEIGHT_LOADER_V2_SUPPORTED.count("GPTQPluginsLinearMethod")}
            continue
        if job.get("resolve_only"):  # which quantization method vLLM picks, without an engine
            args = EngineArgs(model=job["model"], quantization=job["quantization"], dtype=job["dtype"])
            results[label] = {"quantization": args.create_model_config().quantization}
            continue
        llm = None
        if job.get("backend"):  # what a user sets for `vllm serve`; read when the layers are prepared
            os.environ["GPTQ_PLUGINS_BACKEND"] = job["backend"]
        try:
            tp = job.get("tensor_parallel_size", 1)
            llm = LLM(model=job["model"], quantization=job["quantization"], dtype=job["dtype"],
                      max_model_len=MAX_MODEL_LEN, seed=0, enforce_eager=job.get("enforce_eager", True),
                      tensor_parallel_size=tp, distributed_executor_backend="uni" if tp == 1 else "mp")
            params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
            outputs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], params,
                                   use_tqdm=False)
            results[label] = {"tokens": [list(out.outputs[0].token_ids) for out in outputs],
                              "quantization": llm.model_config.quantization}
            if tp == 1:
                results[label]["kernels"] = llm.apply_model(kernel_names)[0]
                results[label]["qweight_copies"] = llm.apply_model(qweight_copies)[0]
        except Exception as err:  # noqa: BLE001  (the test asserts on the message)
            results[label] = {"error": f"{type(err).__name__}: {err}"}
        finally:
            os.environ.pop("GPTQ_PLUGINS_BACKEND", None)
            del llm
            gc.collect()
    return results


def kernel_names(model) -> list[str]:
    """Which kernel runs each quantized layer (core backend name, or vLLM's kernel class)."""
    names = set()
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if getattr(method, "core_linear", None) is not None:
            names.add(method.core_linear.backend.name)
        elif getattr(method, "vllm_kernel", None) is not None:
            names.add(type(method.vllm_kernel).__name__)
    return sorted(names)


def qweight_copies(model) -> dict[str, int]:
    """Of the Linears the core runs, how many still hold the checkpoint's codes beside the kernel
    state: in vLLM's `qweight` parameter, and in the core layer's buffer."""
    counts = {"layers": 0, "vllm": 0, "core": 0}
    for module in model.modules():
        core = getattr(getattr(module, "quant_method", None), "core_linear", None)
        if core is not None:
            counts["layers"] += 1
            counts["vllm"] += module.qweight.numel() > 0
            counts["core"] += core.qweight is not None
    return counts


# ----------------------------------------------------------------------------- test side
def engine_subprocess(jobs: list[dict], tmp_path: Path, extra_env: dict | None = None,
                      timeout: int = 900) -> dict:
    jobs_file, out_file = tmp_path / "jobs.json", tmp_path / "results.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {**os.environ, **ENGINE_ENV, **(extra_env or {})}
    done = subprocess.run([sys.executable, __file__, str(jobs_file), str(out_file)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 and out_file.is_file(), done.stderr[-4000:]
    return json.loads(out_file.read_text())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from gptq_plugins.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", hidden_size=HIDDEN,
                            intermediate_size=INTERMEDIATE, num_hidden_layers=2,
                            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)


@pytest.fixture(scope="module")
def prompt_ids(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in PROMPTS]


@pytest.fixture(scope="module")
def artifacts(model_dir, tmp_path_factory):
    """Every artifact of the matrix from one loaded model and calibration set, plus the
    `gptq-plugins convert --to gptq` export of b4-sym (a stock `quant_method: gptq` checkpoint)."""
    import copy

    from gptq_plugins.cli import main as gptq_plugins_cli
    from gptq_plugins.config import QuantizeConfig
    from gptq_plugins.model_loading import calibration_for, load_model
    from gptq_plugins.pipeline import quantize_model

    out = tmp_path_factory.mktemp("artifacts")
    model, tokenizer = load_model(model_dir)
    calibration = calibration_for(model, QuantizeConfig(**CALIBRATION), tokenizer)
    paths = {}
    for name, (bits, sym, desc_act, *group) in ARTIFACTS.items():
        paths[name] = out / name
        config = QuantizeConfig(bits=bits, group_size=group[0] if group else GROUP_SIZE, sym=sym,
                                desc_act=desc_act, **CALIBRATION)
        quantize_model(copy.deepcopy(model), paths[name], config, calibration, progress=False)
        for file in ("tokenizer.json", "tokenizer_config.json"):  # vLLM loads the tokenizer too
            shutil.copy2(model_dir / file, paths[name] / file)
    paths[STOCK_EXPORT] = out / STOCK_EXPORT
    assert gptq_plugins_cli(["convert", str(paths["b4-sym"]), str(paths[STOCK_EXPORT]), "--to", "gptq"]) == 0
    return paths


@pytest.fixture(scope="module")
def mismatched_artifact(artifacts, tmp_path_factory):
    """b4-sym with one `scales` tensor a group too long: its config promises another shape."""
    from gptq_plugins.testing import rewrite_tensor

    path = tmp_path_factory.mktemp("bad") / "b4-sym-bad-scales"
    shutil.copytree(artifacts["b4-sym"], path)
    name = "model.layers.1.mlp.down_proj.scales"
    rewrite_tensor(path, name, lambda scales: scales.repeat(2, 1)[: scales.shape[0] + 1])
    return path, name


@pytest.fixture(scope="module")
def fused_parts_disagree(artifacts, tmp_path_factory):
    """b4-asym-act whose k_proj carries another (valid) act-order g_idx than q_proj and v_proj."""
    from gptq_plugins.testing import rewrite_tensor

    path = tmp_path_factory.mktemp("bad") / "b4-asym-act-k-g_idx"
    shutil.copytree(artifacts["b4-asym-act"], path)
    rewrite_tensor(path, "model.layers.0.self_attn.k_proj.g_idx", lambda g_idx: g_idx.flip(0))
    return path


@pytest.fixture(scope="module")
def served(artifacts, prompt_ids, mismatched_artifact, fused_parts_disagree, tmp_path_factory):
    """One engine process for every TP=1 job: the matrix (eager), one compiled run, checks."""
    jobs = [{"label": name, "model": str(artifacts[name]), "quantization": "gptq_plugins",
             "dtype": "float32", "prompts": prompt_ids} for name in [*ARTIFACTS, STOCK_EXPORT]]
    jobs.append({"label": "compiled", "model": str(artifacts[TP_CASE]), "quantization": "gptq_plugins",
                 "dtype": "float32", "prompts": prompt_ids, "enforce_eager": False})
    jobs.append({"label": "forced-dense", "model": str(artifacts["b4-sym"]), "quantization": "gptq_plugins",
                 "dtype": "float32", "prompts": prompt_ids, "backend": "dense"})
    jobs.append({"label": "mismatched", "model": str(mismatched_artifact[0]), "quantization": None,
                 "dtype": "float32", "prompts": prompt_ids})
    jobs.append({"label": "fused-parts-disagree", "model": str(fused_parts_disagree), "quantization": None,
                 "dtype": "float32", "prompts": prompt_ids})
    jobs.append({"label": "registration", "registration": True})
    for flag in (None, "gptq_plugins"):
        jobs.append({"label": f"resolve-stock-{flag}", "model": str(artifacts[STOCK_EXPORT]),
                     "quantization": flag, "dtype": "float16", "resolve_only": True})
    jobs.append({"label": "resolve-ours-None", "model": str(artifacts["b4-sym"]), "quantization": None,
                 "dtype": "float32", "resolve_only": True})
    return engine_subprocess(jobs, tmp_path_factory.mktemp("engines"),
                             extra_env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})


@pytest.fixture(scope="module")
def transformers_tokens(artifacts, prompt_ids):
    from gptq_plugins.testing import greedy_tokens_transformers

    return {name: greedy_tokens_transformers(artifacts[name], prompt_ids, NEW_TOKENS) for name in ARTIFACTS}


def quantlinear_kernels(artifact_dir: Path) -> list[str]:
    """The backends `QuantLinear` itself picks for the artifact's layers in float32 on CPU."""
    import torch

    from gptq_plugins.artifact import read_artifact
    from gptq_plugins.quant_linear import QuantLinear

    artifact = read_artifact(artifact_dir)
    names = set()
    for module in artifact.modules.values():
        layer = QuantLinear(module.in_features, module.out_features, artifact.config.bits,
                            artifact.config.group_size, dtype=torch.float32)
        for tensor in ("qweight", "qzeros", "scales", "g_idx"):
            setattr(layer, tensor, artifact.tensor(f"{module.name}.{tensor}"))
        layer.post_init()
        names.add(layer.backend.name)
    return sorted(names)


def test_backend_chosen_by_the_user_runs_every_layer(served, artifacts, prompt_ids):
    """GPTQ_PLUGINS_BACKEND=dense: every layer exact in float32, the tokens of Transformers doing the same."""
    from gptq_plugins.testing import greedy_tokens_transformers

    result = served["forced-dense"]
    assert "error" not in result, result
    assert result["kernels"] == ["dense"]
    assert result["tokens"] == greedy_tokens_transformers(artifacts["b4-sym"], prompt_ids, NEW_TOKENS, backend="dense")


@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_greedy_tokens_match_transformers_quantlinear(name, artifacts, served, transformers_tokens):
    result = served[name]
    assert "error" not in result, result
    assert result["quantization"] == "gptq_plugins"
    assert result["kernels"] == quantlinear_kernels(artifacts[name])  # the core's choice, not vLLM's
    copies = result["qweight_copies"]
    if set(result["kernels"]) <= {"cpu_int4", "cpu_int8"}:  # their state holds the codes: kept once
        assert copies["layers"] > 0 and copies["vllm"] == copies["core"] == 0, copies
    else:  # the dense weight is derived; vLLM and the core share the one qweight they keep
        assert copies["vllm"] == copies["core"], copies
    assert result["tokens"] == transformers_tokens[name]


def test_compiled_graph_gives_the_eager_tokens(served):
    """vLLM's default mode traces `apply` with Dynamo; the kernel op must survive it unchanged."""
    assert "error" not in served["compiled"], served["compiled"]
    assert served["compiled"]["tokens"] == served[TP_CASE]["tokens"]


def test_stock_gptq_export_is_ours_only_when_asked(served):
    assert served["resolve-stock-gptq_plugins"]["quantization"] == "gptq_plugins"
    assert served["resolve-stock-None"]["quantization"] != "gptq_plugins"
    assert served["resolve-ours-None"]["quantization"] == "gptq_plugins"  # no flag needed
    assert served[STOCK_EXPORT]["tokens"] == served["b4-sym"]["tokens"]  # same tensors, same method


def test_mismatched_tensor_fails_at_load_naming_it(served, mismatched_artifact):
    _, tensor = mismatched_artifact
    error = served["mismatched"].get("error", "")
    assert tensor in error and "expected" in error, served["mismatched"]


def test_fused_parts_with_different_g_idx_are_refused(served):
    """vLLM fuses q/k/v into one layer with one g_idx: parts that disagree must not load."""
    error = served["fused-parts-disagree"].get("error", "")
    assert "model.layers.0.self_attn.qkv_proj.g_idx" in error and "'k'" in error, served["fused-parts-disagree"]


def test_register_is_idempotent(served):
    assert served["registration"] == {"methods": 1, "loader_v2": 1}


def test_importing_the_core_does_not_import_vllm():
    """`import gptq_plugins` loads this adapter's entry point on every CLI call: it must stay light."""
    probe = ("import sys, gptq_plugins; from gptq_plugins.plugins import describe_plugins; "
             "print('vllm' in sys.modules, any(row[1].startswith('gptq-plugins-vllm') for row in describe_plugins()))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **ENGINE_ENV})
    assert done.stdout.split() == ["False", "True"], done.stderr[-2000:]


def test_tensor_parallel_2_gives_the_tokens_of_1(artifacts, prompt_ids, served, tmp_path):
    jobs = [{"label": name, "model": str(artifacts[name]), "quantization": "gptq_plugins",
             "dtype": "float32", "prompts": prompt_ids, "tensor_parallel_size": 2}
            for name in (TP_CASE, TP_RAGGED_CASE)]
    results = engine_subprocess(jobs, tmp_path, extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    for name in (TP_CASE, TP_RAGGED_CASE):
        assert "error" not in results[name], results[name]
        assert results[name]["tokens"] == served[name]["tokens"], name


def test_tensor_parallel_2_serves_mixture_of_experts(tmp_path):
    """Each rank keeps its slice of every expert (w1/w3 output columns, w2 input rows): without
    act-order w2 keeps only its own rows' groups, with act-order every group."""
    import torch

    from gptq_plugins.config import QuantizeConfig
    from gptq_plugins.pipeline import quantize_model
    from gptq_plugins.testing import build_tiny_model, greedy_tokens_transformers

    model_dir = build_tiny_model(tmp_path / "mixtral", model_type="mixtral", hidden_size=64,
                                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=512, num_local_experts=4, num_experts_per_tok=2)
    calibration = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    prompts = [[5, 17, 42, 99, 7, 250, 311, 64], [300, 2, 81, 190, 45, 12]]
    jobs, expected = [], {}
    for desc_act in (False, True):
        label = f"moe-tp2{'-act' if desc_act else ''}"
        config = QuantizeConfig(bits=4, group_size=32, desc_act=desc_act, num_samples=8, seq_len=32)
        artifact = quantize_model(model_dir, tmp_path / label, config, calibration, progress=False)
        expected[label] = greedy_tokens_transformers(artifact, prompts, NEW_TOKENS)
        jobs.append({"label": label, "model": str(artifact), "quantization": "gptq_plugins", "dtype": "float32",
                     "prompts": prompts, "tensor_parallel_size": 2})
    results = engine_subprocess(jobs, tmp_path, extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    for label, tokens in expected.items():
        assert "error" not in results[label], results[label]
        assert results[label]["tokens"] == tokens, label


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_vllm_serve_answers_completions(artifacts, prompt_ids, served, tmp_path):
    """The OpenAI server `vllm serve` runs, on a loopback port, answers with the LLM's tokens.

    vllm-cpu 0.32's `vllm` console script dies at start (it asks package metadata for the
    distribution `vllm`, which vllm-cpu is not), so the server is started through its module.
    """
    port = free_port()
    model = str(artifacts[TP_CASE])
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--quantization", "gptq_plugins", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
             "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **ENGINE_ENV}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while True:
            assert server.poll() is None, log_path.read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not become healthy in time"
                time.sleep(2)
        answer = post_json(f"http://127.0.0.1:{port}/v1/completions",
                           {"model": model, "prompt": prompt_ids[0], "max_tokens": NEW_TOKENS,
                            "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert answer["choices"][0]["token_ids"] == served[TP_CASE]["tokens"][0]
    finally:
        stop_process_group(server)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the server and the engine processes it started; SIGKILL them if they linger."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


if __name__ == "__main__":
    jobs_path, out_path = sys.argv[1:3]
    Path(out_path).write_text(json.dumps(run_engines(json.loads(Path(jobs_path).read_text()))))
