"""`gptq-plugins eval` and the quality comparison it serves: small, fast checks on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from gptq_plugins.cli import main
from gptq_plugins.config import ConfigError, QuantizeConfig
from gptq_plugins.evaluate import heldout_tokens, perplexity, quantize_rtn_in_place
from gptq_plugins.model_loading import load_model
from gptq_plugins.pipeline import quantize_model, quantize_modules
from gptq_plugins.testing import build_tiny_model

VOCAB = 256
CONTEXT = 64


def _uniform_output_model(path, **kwargs):
    """A tiny model whose logits are all zero: every next token has probability 1/vocab."""
    build_tiny_model(path, num_hidden_layers=1, max_position_embeddings=CONTEXT, **kwargs)
    model, _ = load_model(path)
    model.lm_head.weight.data.zero_()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def uniform_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("uniform") / "model"
    _uniform_output_model(path, vocab_size=300)
    return path


def test_perplexity_of_uniform_output_model_is_vocab_size(tmp_path):
    model = _uniform_output_model(tmp_path / "model", vocab_size=VOCAB, with_tokenizer=False)
    tokens = torch.randint(0, VOCAB, (5 * CONTEXT + 7,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, tokens, CONTEXT)
    assert result["perplexity"] == pytest.approx(VOCAB, rel=1e-5)
    assert result["windows"] == 5
    assert result["predicted_tokens"] == 5 * (CONTEXT - 1)


def test_eval_command_writes_known_perplexity(uniform_model_dir, tmp_path, capsys):
    text = tmp_path / "heldout.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    out = tmp_path / "eval.json"
    code = main(["eval", str(uniform_model_dir), "--dataset", str(text), "--seq-len", "32",
                 "--max-tokens", "200", "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "float"
    vocab_size = json.loads((uniform_model_dir / "config.json").read_text())["vocab_size"]
    assert result["perplexity"] == pytest.approx(vocab_size, rel=1e-5)
    assert result["windows"] == 200 // 32
    assert f"perplexity {result['perplexity']:.4f}" in capsys.readouterr().out


def test_eval_of_an_artifact_matches_the_quantized_model_in_memory(tmp_path):
    """`eval` on an artifact loads it through the Transformers adapter and scores what was quantized."""
    # Wide initial weights give confident logits, so perplexity moves visibly with quantization.
    build_tiny_model(tmp_path / "model", vocab_size=300, num_hidden_layers=1,
                     max_position_embeddings=CONTEXT, initializer_range=0.5)
    text = tmp_path / "heldout.txt"
    text.write_text("import os\nprint(os.getcwd())\n" * 40)
    config = QuantizeConfig(bits=3, group_size=64, num_samples=4, seq_len=32)
    calibration = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(tmp_path / "model", tmp_path / "artifact", config, calibration, progress=False)

    model, tokenizer = load_model(tmp_path / "model")
    tokens = heldout_tokens(str(text), tokenizer)
    float_ppl = perplexity(model, tokens, 32)["perplexity"]
    quantize_modules(model, config, calibration, progress=False)
    quantized_ppl = perplexity(model, tokens, 32)["perplexity"]

    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "artifact"), "--dataset", str(text), "--seq-len", "32",
                 "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "artifact"
    assert result["quantization_config"]["bits"] == 3
    assert abs(result["perplexity"] - quantized_ppl) < 0.05 * abs(quantized_ppl - float_ppl)


def test_eval_rejects_windows_longer_than_context(uniform_model_dir, capsys):
    code = main(["eval", str(uniform_model_dir), "--seq-len", str(CONTEXT + 1)])
    assert code == 2
    assert "seq_len" in capsys.readouterr().err


def test_eval_rejects_a_dataset_that_is_not_text(uniform_model_dir, tmp_path, capsys):
    table = tmp_path / "heldout.csv"
    table.write_text("a,b\n1,2\n")
    assert main(["eval", str(uniform_model_dir), "--dataset", str(table)]) == 2
    assert f"dataset: {table}: expected 'builtin' or a UTF-8 text file (.txt or no extension)" in capsys.readouterr().err


def test_versioned_license_names_read_as_text(tmp_path, uniform_model_dir):
    """Debian's common-licenses/Apache-2.0 has no extension: '.0' is a version, not a format."""
    from gptq_plugins.evaluate import heldout_tokens
    from gptq_plugins.model_loading import load_tokenizer

    text = tmp_path / "Apache-2.0"
    text.write_text("Licensed under the Apache License, Version 2.0. " * 20)
    tokens = heldout_tokens(str(text), load_tokenizer(uniform_model_dir), max_tokens=50)
    assert tokens.numel() == 50


def test_perplexity_rejects_text_shorter_than_one_window(tmp_path):
    model = _uniform_output_model(tmp_path / "model", vocab_size=VOCAB, with_tokenizer=False)
    with pytest.raises(ConfigError, match="seq_len"):
        perplexity(model, torch.arange(10), CONTEXT)


def _markov_tokens(count: int, generator: torch.Generator) -> torch.Tensor:
    """Text from a fixed sparse bigram chain: learnable in a few dozen steps, never memorised."""
    chain = torch.Generator().manual_seed(1234)
    successors = torch.randint(0, VOCAB, (VOCAB, 4), generator=chain)
    tokens = [0]
    choices = torch.randint(0, 4, (count - 1,), generator=generator).tolist()
    for choice in choices:
        tokens.append(int(successors[tokens[-1], choice]))
    return torch.tensor(tokens)


def test_gptq_beats_round_to_nearest_on_a_trained_model(tmp_path):
    torch.manual_seed(0)
    build_tiny_model(tmp_path / "model", vocab_size=VOCAB, with_tokenizer=False, hidden_size=128,
                     intermediate_size=256, num_hidden_layers=2, max_position_embeddings=CONTEXT)
    model, _ = load_model(tmp_path / "model")
    train = _markov_tokens(40 * 8 * CONTEXT, torch.Generator().manual_seed(1)).view(-1, 8, CONTEXT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for batch in train:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    heldout = _markov_tokens(16 * CONTEXT, torch.Generator().manual_seed(2))
    calibration = _markov_tokens(32 * CONTEXT, torch.Generator().manual_seed(3)).view(32, CONTEXT)
    float_ppl = perplexity(model, heldout, CONTEXT)["perplexity"]
    assert float_ppl < 8, "the tiny model did not learn the 4-successor chain"

    config = QuantizeConfig(bits=2, group_size=-1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_rtn_in_place(model, config)
    rtn_ppl = perplexity(model, heldout, CONTEXT)["perplexity"]
    model.load_state_dict(state)
    quantize_modules(model, config, calibration, progress=False)
    gptq_ppl = perplexity(model, heldout, CONTEXT)["perplexity"]

    assert float_ppl < gptq_ppl < rtn_ppl
