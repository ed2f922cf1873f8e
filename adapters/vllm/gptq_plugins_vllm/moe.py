"""`GPTQPluginsMoEMethod`: a mixture-of-experts layer whose experts are GPTQ Linears, inside vLLM.

The artifact stores each expert's projections as separate GPTQ v1 Linears under the checkpoint's
names (`experts.<e>.w1|w3|w2` or `gate_proj|up_proj|down_proj`); vLLM's expert loader hands each
tensor to this method with its expert id and part (`w1`, `w3`, `w2`). With tensor parallelism
each rank keeps its slice of every expert's intermediate dimension: the output columns of w1/w3,
the input rows of w2 (vLLM sums the ranks' partial outputs). After loading, every expert
projection becomes one core `QuantLinear` over its slice of the stacked tensors, and each forward
runs every routed expert on its own tokens only, with the weights kept packed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.activation import MoEActivation

from gptq_plugins.packed_words import WORD_BITS, whole_words_problem
from gptq_plugins.packing import check_group_indices
from gptq_plugins.quant_linear import QuantLinear

# Gated activations: the expert computes down(act(w1 x) * w3 x).
ACTIVATIONS = {
    MoEActivation.SILU: F.silu,
    MoEActivation.GELU: F.gelu,
    MoEActivation.GELU_TANH: lambda x: F.gelu(x, approximate="tanh"),
}
PARTS = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", 0)}  # part -> (stack, index in the stack)
TENSORS = ("qweight", "qzeros", "scales", "g_idx")


class GPTQPluginsMoEMethod(FusedMoEMethodBase):
    """Routed experts stored as GPTQ v1 Linears of any bits, order and symmetry."""

    def __init__(self, quant_config, moe):
        super().__init__(moe)
        self.options = quant_config.options
        self.experts: list[tuple[QuantLinear, QuantLinear, QuantLinear]] = []  # (w1, w3, w2) per expert

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        name = layer.layer_name
        parallel = self.moe.moe_parallel_config
        if parallel.use_ep:
            raise NotImplementedError(f"{name}: gptq_plugins does not serve mixture-of-experts layers with "
                                      "expert parallelism; use tensor parallelism")
        if layer.activation not in ACTIVATIONS or layer.apply_router_weight_on_input:
            raise NotImplementedError(
                f"{name}: gptq_plugins serves experts with a gated {[a.value for a in ACTIVATIONS]} activation "
                f"and router weights applied to the outputs; this layer has {layer.activation.value!r}"
                f"{' with weights on the inputs' if layer.apply_router_weight_on_input else ''}")
        self.act_fn = ACTIVATIONS[layer.activation]
        self.dtype = params_dtype
        bits, rank_size = self.options.bits, intermediate_size_per_partition
        self.rank, self.ranks = parallel.tp_rank, parallel.tp_size
        full_size = intermediate_size_per_partition * parallel.tp_size
        self.options.check_layer(hidden_size, full_size, name=f"{name}.w13")
        self.options.check_layer(full_size, hidden_size, name=f"{name}.w2")
        tp_note = "per tensor-parallel rank; use a smaller --tensor-parallel-size"
        problem = whole_words_problem(rank_size, bits, f"{name}: a {rank_size}-wide intermediate slice",
                                      f" {tp_note}")
        if problem:
            raise ValueError(problem)
        group_size = self.options.group_size_for(full_size)
        # As in row-parallel Linears: without act-order a rank keeps the groups of its own w2 rows
        # when they hold whole groups; otherwise every group, and its slice of g_idx.
        self.w2_groups_follow_rows = (parallel.tp_size > 1 and group_size != full_size and not self.options.desc_act
                                      and rank_size % group_size == 0)
        self.w2_groups = rank_size // group_size if self.w2_groups_follow_rows else self.options.groups_for(full_size)
        # (in, out) of one expert's projection in each stack on this rank; a stack holds [experts, parts, ...].
        self.shapes = {"w13": (hidden_size, rank_size), "w2": (rank_size, hidden_size)}
        for stack, (n_in, n_out) in self.shapes.items():
            parts = 2 if stack == "w13" else 1
            n_groups = self.options.groups_for(n_in) if stack == "w13" else self.w2_groups
            shapes = {"qweight": ((n_in * self.options.bits // WORD_BITS, n_out), torch.int32),
                      "qzeros": ((n_groups, n_out * self.options.bits // WORD_BITS), torch.int32),
                      "scales": ((n_groups, n_out), params_dtype),
                      "g_idx": ((n_in,), torch.int32)}
            for tensor, (shape, dtype) in shapes.items():
                param = torch.nn.Parameter(torch.empty(num_experts, parts, *shape, dtype=dtype), requires_grad=False)
                param.weight_loader = self._load_expert_tensor
                param.tensor_name = tensor
                layer.register_parameter(f"{stack}_{tensor}", param)

    def _rank_slice(self, tensor: str, stack: str, loaded: torch.Tensor) -> torch.Tensor:
        """This rank's part of one expert's full checkpoint tensor."""
        size = self.shapes[stack][1 if stack == "w13" else 0]  # the intermediate slice on this rank
        words = size * self.options.bits // WORD_BITS
        if stack == "w13":  # output columns; g_idx follows the (whole) hidden input
            cuts = {"qweight": (1, size), "scales": (1, size), "qzeros": (1, words), "g_idx": None}
        else:  # input rows; scales and zeros by group, when groups follow the rows
            rows = (0, self.w2_groups) if self.w2_groups_follow_rows else None
            cuts = {"qweight": (0, words), "g_idx": (0, size), "scales": rows, "qzeros": rows}
        if cuts[tensor] is None:
            return loaded
        dim, length = cuts[tensor]
        if loaded.shape[dim] != length * self.ranks:  # not a full tensor: the caller names the mismatch
            return loaded
        return loaded.narrow(dim, self.rank * length, length)

    def _load_expert_tensor(self, param, loaded_weight: torch.Tensor, weight_name: str, shard_id: str,
                            expert_id: int, return_success: bool = False):
        """Copy this rank's part of one expert's tensor of part `shard_id` (w1, w3 or w2) into its slot."""
        stack, part = PARTS[shard_id]
        slot = param.data[expert_id, part]
        loaded_weight = self._rank_slice(param.tensor_name, stack, loaded_weight)
        if tuple(loaded_weight.shape) != tuple(slot.shape):
            raise ValueError(f"{weight_name} (expert {expert_id}, {shard_id}): expected a tensor "
                             f"{list(slot.shape)}, got {list(loaded_weight.shape)}")
        slot.copy_(loaded_weight)
        return True if return_success else None

    def process_weights_after_loading(self, layer) -> None:
        self.experts = []
        for expert in range(layer.w13_qweight.shape[0]):
            linears = []
            for part in ("w1", "w3", "w2"):
                stack, index = PARTS[part]
                core = QuantLinear(*self.shapes[stack], self.options.bits, self.options.group_size, dtype=self.dtype)
                for tensor in TENSORS:
                    setattr(core, tensor, getattr(layer, f"{stack}_{tensor}").data[expert, index])
                if stack == "w2" and self.w2_groups_follow_rows:  # g_idx counts groups from rank 0's first row
                    core.g_idx -= self.rank * self.w2_groups
                check_group_indices(core.g_idx, core.scales.shape[0],
                                    name=f"{layer.layer_name}: expert {expert} {part} g_idx")
                core.post_init()
                linears.append(core)
            self.experts.append(tuple(linears))
        if all(core.qweight is None for linears in self.experts for core in linears):
            # the core kernels' states hold the codes: vLLM's stacked copies of them go
            for stack in ("w13", "w2"):
                setattr(layer, f"{stack}_qweight",
                        torch.nn.Parameter(torch.empty(0, dtype=torch.int32), requires_grad=False))

    def get_fused_moe_quant_config(self, layer):
        return None  # the experts run through the core's kernels, not a vLLM fused-MoE kernel

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        """Each routed expert on its own tokens, weighted; shared experts are the runner's to add."""
        out = torch.zeros_like(x)
        for expert in torch.unique(topk_ids).tolist():
            token, slot = torch.where(topk_ids == expert)
            w1, w3, w2 = self.experts[expert]
            hidden = x[token]
            y = w2(self.act_fn(w1(hidden)) * w3(hidden)) * topk_weights[token, slot, None].to(x.dtype)
            out.index_add_(0, token, y.to(out.dtype))
        return out
