"""Mixture-of-experts: the per-expert Linears compute what Transformers' fused experts do, and each
expert is calibrated on exactly the tokens routed to it (too few: round-to-nearest, listed)."""

from __future__ import annotations

import pytest
import torch

from gptq_plugins.config import ConfigError, QuantizeConfig
from gptq_plugins.experts import UnfusedExperts, unfuse
from gptq_plugins.testing import tiny_config

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, VOCAB = 64, 96, 4, 2, 128
CALIBRATION = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


def mixtral():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("mixtral", hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                         num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    return AutoModelForCausalLM.from_config(config).eval()


def test_unfused_experts_compute_the_fused_forward():
    fused = mixtral().model.layers[0].mlp.experts
    unfused = unfuse(fused, ("w1", "w3", "w2"), "experts")
    x = torch.randn(20, HIDDEN)
    top_k_index = torch.rand(20, EXPERTS).topk(TOP_K).indices
    top_k_weights = torch.rand(20, TOP_K)
    with torch.no_grad():
        torch.testing.assert_close(unfused(x, top_k_index, top_k_weights), fused(x, top_k_index, top_k_weights))
    assert torch.equal(unfused.expert(2).w3.weight, fused.gate_up_proj[2, INTERMEDIATE:])


def test_unfusing_refuses_experts_it_would_misread():
    fused = mixtral().model.layers[0].mlp.experts
    fused.gate_up_proj_bias = torch.nn.Parameter(torch.zeros(EXPERTS, 2 * INTERMEDIATE))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts: expected fused experts .*gate_up_proj_bias"):
        unfuse(fused, ("w1", "w3", "w2"), "model.layers.0.mlp.experts")


def test_options_are_checked_on_the_experts_before_any_weight_loads():
    from gptq_plugins.preparation import check_layers, layout_for

    model = mixtral()
    layout = layout_for(model)
    check_layers(layout.block_list(model), layout, QuantizeConfig(group_size=64))  # w2's 96 inputs: a ragged last group
    assert not isinstance(model.model.layers[0].mlp.experts, UnfusedExperts)  # checking changed nothing
    with pytest.raises(ConfigError, match="gptaq: not available for mixtral models: .*route tokens"):
        check_layers(layout.block_list(model), layout, QuantizeConfig(group_size=32, gptaq=True))


def never_route_to(model, expert: int) -> None:
    """Make the router of every block skip `expert` (Mixtral's routing, with its logit at -inf)."""
    for block in model.model.layers:
        router = block.mlp.gate

        def forward(hidden, router=router):
            logits = torch.nn.functional.linear(hidden.reshape(-1, HIDDEN), router.weight)
            logits[:, expert] = -torch.inf
            top, index = torch.softmax(logits.float(), dim=-1).topk(TOP_K, dim=-1)
            return logits, top / top.sum(dim=-1, keepdim=True), index

        router.forward = forward


def test_each_expert_is_calibrated_on_its_routed_tokens_and_an_unrouted_one_falls_back():
    from gptq_plugins.pipeline import quantize_modules
    from gptq_plugins.solver import rtn

    model = mixtral()
    never_route_to(model, 3)
    original = {e: model.model.layers[0].mlp.experts.down_proj[e].detach().clone() for e in range(EXPERTS)}
    config = QuantizeConfig(bits=4, group_size=32)
    results, report = quantize_modules(model, config, CALIBRATION, progress=False)

    rows = {row["name"].removeprefix("model.layers.0.mlp.experts."): row for row in report["layers"]
            if ".experts." in row["name"]}
    assert sum(rows[f"{e}.w1"]["tokens"] for e in range(EXPERTS)) == CALIBRATION.numel() * TOP_K
    for e in range(3):
        assert rows[f"{e}.w1"]["tokens"] == rows[f"{e}.w3"]["tokens"] == rows[f"{e}.w2"]["tokens"] > 0
        assert rows[f"{e}.w2"]["fallback"] is None
    for part in ("w1", "w3", "w2"):
        assert rows[f"3.{part}"]["tokens"] == 0
        assert "expert routed 0 calibration tokens" in rows[f"3.{part}"]["fallback"]
    assert sorted(report["summary"]["fallbacks"]) == [f"model.layers.0.mlp.experts.3.{p}" for p in ("w1", "w2", "w3")]
    fallback = results["model.layers.0.mlp.experts.3.w2"]
    assert torch.equal(fallback.codes, rtn(original[3], config).codes)
    assert not torch.equal(results["model.layers.0.mlp.experts.0.w2"].codes, rtn(original[0], config).codes)


class ListedExperts(torch.nn.ModuleList):
    """The per-expert form (older and remote-code models): one MLP module per expert, called only
    on its routed tokens."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token, slot = torch.where(top_k_index == index)
            if token.numel():
                y = expert.w2(torch.nn.functional.silu(expert.w1(hidden_states[token])) * expert.w3(hidden_states[token]))
                out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out


def test_experts_already_held_per_expert_are_quantized_as_they_are():
    from gptq_plugins.pipeline import quantize_modules

    model = mixtral()
    fused = model.model.layers[0].mlp.experts
    listed = ListedExperts(unfuse(fused, ("w1", "w3", "w2"), "experts").expert(e) for e in range(EXPERTS))
    model.model.layers[0].mlp.experts = listed
    results, report = quantize_modules(model, QuantizeConfig(bits=4, group_size=32), CALIBRATION, progress=False)
    assert model.model.layers[0].mlp.experts is listed
    assert {f"model.layers.0.mlp.experts.{e}.{p}" for e in range(EXPERTS) for p in ("w1", "w3", "w2")} <= set(results)
    routed = sum(row["tokens"] for row in report["layers"] if row["name"].endswith(".w1"))
    assert routed == CALIBRATION.numel() * TOP_K
