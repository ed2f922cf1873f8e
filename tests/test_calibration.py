"""Calibration windows look like the model's real inputs: BOS first where the tokenizer adds one,
and no padding position ever reaches a Hessian."""

import json

import pytest
import torch
from tokenizers import processors

from gptq_plugins.calibration import _shuffled, added_bos, builtin_documents, tokenize_documents, windows
from gptq_plugins.config import QuantizeConfig
from gptq_plugins.evaluate import perplexity
from gptq_plugins.plugins import load_calibration
from gptq_plugins.testing import build_tokenizer


@pytest.fixture(scope="module")
def plain_tokenizer():
    return build_tokenizer(256)


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The same vocabulary with Llama's post-processor: `<s>` before every text."""
    tokenizer = build_tokenizer(256)
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    return tokenizer


def test_added_bos_is_found_only_where_the_tokenizer_adds_it(plain_tokenizer, bos_tokenizer):
    assert added_bos(plain_tokenizer) is None
    assert added_bos(bos_tokenizer) == bos_tokenizer.bos_token_id
    assert bos_tokenizer("a")["input_ids"][0] == bos_tokenizer.bos_token_id


def test_builtin_windows_start_with_bos_and_continue_the_text(plain_tokenizer, bos_tokenizer):
    config = QuantizeConfig(num_samples=6, seq_len=40)
    plain = load_calibration(config, plain_tokenizer).token_ids
    with_bos = load_calibration(config, bos_tokenizer).token_ids
    bos = bos_tokenizer.bos_token_id
    assert plain.shape == with_bos.shape == (6, 40)
    assert (with_bos[:, 0] == bos).all() and not (plain[:, 0] == bos).any()
    # After BOS, each window is a run of the document stream (tokenized without special tokens).
    stream = tokenize_documents(_shuffled(builtin_documents("calibration"), config.seed), plain_tokenizer,
                                max_tokens=2 * 6 * 40).tolist()
    runs = {tuple(stream[i:i + 39]) for i in range(len(stream) - 38)}
    assert all(tuple(row) in runs for row in with_bos[:, 1:].tolist())


def test_windows_with_bos_are_bos_then_stream_runs():
    stream = torch.arange(100, 200)
    picked = windows(stream, 4, 10, seed=0, source="s", bos=1)
    assert picked.shape == (4, 10) and (picked[:, 0] == 1).all()
    for row in picked[:, 1:]:  # nine consecutive stream tokens, aligned to nine-token windows
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 9)) and (int(row[0]) - 100) % 9 == 0


def test_padding_marked_by_the_attention_mask_never_enters_calibration(tmp_path, plain_tokenizer):
    pad = plain_tokenizer.pad_token_id
    rows = [{"input_ids": [pad] * 3 + list(range(10, 20)), "attention_mask": [0] * 3 + [1] * 10},
            {"input_ids": list(range(30, 38)) + [pad] * 5, "attention_mask": [1] * 8 + [0] * 5},
            {"input_ids": list(range(40, 52)) + [pad], "attention_mask": [1] * 12 + [0]}]
    data = tmp_path / "padded.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ids = load_calibration(QuantizeConfig(dataset=str(data), num_samples=2, seq_len=10), plain_tokenizer).token_ids
    # The 8 real tokens of row 2 are too few for a window: it is dropped, not padded.
    assert ids.tolist() == [list(range(10, 20)), list(range(40, 50))]
    assert pad not in ids.reshape(-1).tolist()


def test_perplexity_windows_start_with_bos_when_given():
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def forward(self, input_ids, use_cache):
            self.seen.append(input_ids.clone())
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 300)})()

    model = Recorder()
    result = perplexity(model, torch.arange(100, 130), seq_len=8, bos=1)
    windows_seen = torch.cat(model.seen)
    assert result["windows"] == 4 and result["predicted_tokens"] == 4 * 7
    assert (windows_seen[:, 0] == 1).all() and torch.equal(windows_seen[:, 1:].reshape(-1), torch.arange(100, 128))
    assert result["perplexity"] == pytest.approx(300)  # uniform logits over 300 ids
