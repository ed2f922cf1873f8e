"""`GPTQPluginsLinearMethod`: owns a quantized Linear's tensors inside vLLM and runs its kernel.

The tensors are registered with vLLM's parameter classes, which know how to cut a checkpoint
tensor for each tensor-parallel rank; after loading, one kernel is prepared per layer: vLLM's own
Marlin/Machete where they support the layer (GPU, symmetric 4/8-bit, no act-order), else the
core's kernel backend, chosen exactly as `QuantLinear` chooses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)

from gptq_plugins.packed_words import WORD_BITS, whole_words_problem
from gptq_plugins.packing import check_group_indices, pack_rows
from gptq_plugins.quant_linear import QuantLinear


class SharedGroupIndexParameter(RowvLLMParameter):
    """`g_idx` of a layer vLLM fuses (q/k/v, gate/up): every part must carry the same one.

    The fused layer holds one `g_idx` for its input; parts quantized from the same inputs share
    it, and a checkpoint whose parts disagree is refused rather than served wrong.
    """

    def __init__(self, layer_name: str, **kwargs):
        super().__init__(**kwargs)
        self.layer_name = layer_name
        self.loaded_from: str | int | None = None
        layer_loader = self._weight_loader

        def load(param, loaded_weight, loaded_shard_id=None, *args, **kwargs):
            # A part already fused on disk (Phi-3's qkv_proj) comes with no shard id, and vLLM
            # would split it along an output dimension a g_idx does not have: take it whole.
            if loaded_shard_id is None:
                param._load_shared(loaded_weight, "fused")
            else:
                layer_loader(param, loaded_weight, loaded_shard_id, *args, **kwargs)

        self._weight_loader = load

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs):
        self._load_shared(loaded_weight, kwargs.get("shard_id"))

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs):
        self._load_shared(loaded_weight, kwargs.get("shard_id"))

    def _load_shared(self, loaded_weight: torch.Tensor, shard_id):
        if self.loaded_from is not None and not torch.equal(self.data, loaded_weight.to(self.data.device)):
            raise ValueError(f"{self.layer_name}.g_idx: the checkpoint's g_idx of part {shard_id!r} "
                             f"differs from that of part {self.loaded_from!r}; vLLM runs the parts as "
                             "one layer, which needs one act-order permutation")
        self.load_column_parallel_weight(loaded_weight)
        self.loaded_from = shard_id


@torch.library.custom_op("gptq_plugins_vllm::linear", mutates_args=())
def run_core_linear(x: torch.Tensor, layer_name: str, out_features: int) -> torch.Tensor:
    """`x [M, in] @ W.T` of layer `layer_name` through its prepared core `QuantLinear`.

    An opaque op for torch.compile: the kernel state (converted or dequantized weights) is read
    at run time from the engine's own layer, never traced into a graph (vLLM caches compiled
    graphs across runs keyed by the model config, not by the weights).
    """
    layer = get_forward_context().no_compile_layers[layer_name]
    return layer.quant_method.core_linear(x)


@run_core_linear.register_fake
def _(x: torch.Tensor, layer_name: str, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


@register_weight_loader_v2_supported_method
class GPTQPluginsLinearMethod(LinearMethodBase):
    """A GPTQ v1 Linear (`qweight`, `qzeros`, `scales`, `g_idx`) of any bits, order and symmetry."""

    def __init__(self, quant_config):
        self.options = quant_config.options
        self.vllm_kernel = None  # vLLM's own kernel (GPU), when it serves the layer
        self.core_linear = None  # else the core's QuantLinear over this layer's tensors

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        bits = self.options.bits
        name = layer.prefix
        self.options.check_layer(input_size, output_size, name=name)
        group_size = self.options.group_size_for(input_size)
        row_parallel = input_size_per_partition != input_size
        tp_note = "per tensor-parallel rank; use a smaller --tensor-parallel-size"
        for size in (*output_partition_sizes, input_size_per_partition):
            problem = whole_words_problem(size, bits, f"{name}: a {size}-wide slice", f" {tp_note}")
            if problem:
                raise ValueError(problem)
        # A row-parallel rank keeps the groups of its own columns when its slice holds whole
        # groups. Otherwise (act-order, where any column may use any group, or a slice that starts
        # inside a group) it keeps every group's scales and zeros and only its slice of g_idx.
        groups_follow_rows = (row_parallel and group_size != input_size and not self.options.desc_act
                              and input_size_per_partition % group_size == 0)
        n_groups = (input_size_per_partition // group_size if groups_follow_rows
                    else self.options.groups_for(input_size))
        out_features = sum(output_partition_sizes)
        packed_factor = Fraction(WORD_BITS, bits)
        loader = extra_weight_attrs["weight_loader"]

        qweight = PackedvLLMParameter(
            data=torch.empty(input_size_per_partition * bits // WORD_BITS, out_features, dtype=torch.int32),
            input_dim=0, output_dim=1, packed_dim=0, packed_factor=packed_factor, weight_loader=loader)
        g_idx_data = torch.empty(input_size_per_partition, dtype=torch.int32)
        if len(output_partition_sizes) > 1:  # parts vLLM fuses must agree on one g_idx
            g_idx = SharedGroupIndexParameter(layer_name=name, data=g_idx_data, input_dim=0, weight_loader=loader)
        else:
            g_idx = RowvLLMParameter(data=g_idx_data, input_dim=0, weight_loader=loader)
        zeros_data = torch.empty(n_groups, out_features * bits // WORD_BITS, dtype=torch.int32)
        scales_data = torch.empty(n_groups, out_features, dtype=params_dtype)
        if groups_follow_rows:
            scales = GroupQuantScaleParameter(data=scales_data, input_dim=0, output_dim=1, weight_loader=loader)
            qzeros = PackedvLLMParameter(data=zeros_data, input_dim=0, output_dim=1, packed_dim=1,
                                         packed_factor=packed_factor, weight_loader=loader)
        else:
            scales = ChannelQuantScaleParameter(data=scales_data, output_dim=1, weight_loader=loader)
            qzeros = PackedColumnParameter(data=zeros_data, output_dim=1, packed_dim=1,
                                           packed_factor=packed_factor, weight_loader=loader)
        for param_name, param in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales),
                                  ("g_idx", g_idx)):
            layer.register_parameter(param_name, param)
        self.shape = LayerShape(input_size, output_size, input_size_per_partition, out_features,
                                group_size, groups_follow_rows, params_dtype)
        layers = get_current_vllm_config().compilation_config.static_forward_context
        if name in layers:
            raise ValueError(f"duplicate layer name {name!r}")
        layers[name] = layer  # found again by `run_core_linear` during each forward

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        shape = self.shape
        g_idx = layer.g_idx.data
        if shape.groups_follow_rows:
            # This rank loaded the groups of its own columns only; g_idx still counts them from
            # the first rank's first column.
            g_idx -= layer.tp_rank * (shape.in_per_rank // shape.group_size)
        check_group_indices(g_idx, layer.scales.shape[0], name=f"{layer.prefix}.g_idx")
        self.vllm_kernel = self._vllm_kernel(layer)
        if self.vllm_kernel is not None:
            self.vllm_kernel.process_weights_after_loading(layer)
            return
        core = QuantLinear(shape.in_per_rank, shape.out_per_rank, self.options.bits, self.options.group_size,
                           dtype=shape.dtype)
        for tensor_name in ("qweight", "qzeros", "scales", "g_idx"):
            setattr(core, tensor_name, getattr(layer, tensor_name).data)
        core.post_init()
        if core.qweight is None:  # the core kernel's state holds the codes: vLLM's copy of them goes
            layer.qweight = torch.nn.Parameter(torch.empty(0, dtype=torch.int32), requires_grad=False)
        self.core_linear = core

    def _vllm_kernel(self, layer: torch.nn.Module):
        """vLLM's Marlin/Machete for this layer on GPU, when one supports it; else None.

        They take symmetric 4/8-bit weights whose groups follow the input columns (no
        act-order permutation) and whose zero points all sit at the grid's middle.
        """
        if layer.qweight.device.type != "cuda" or not self.options.sym or self.options.bits not in (4, 8):
            return None
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
        from vllm.model_executor.kernels.linear.mixed_precision.machete import MacheteLinearKernel
        from vllm.model_executor.kernels.linear.mixed_precision.marlin import MarlinLinearKernel
        from vllm.scalar_type import scalar_types

        shape, bits = self.shape, self.options.bits
        columns = torch.arange(shape.in_per_rank, device=layer.g_idx.device)
        if layer.scales.shape[0] != max(shape.in_per_rank // shape.group_size, 1) or not torch.equal(
                layer.g_idx.data, (columns // shape.group_size).to(torch.int32)):
            return None
        middle = torch.full((shape.out_per_rank, 1), (1 << (bits - 1)) - 1, dtype=torch.int32)
        if not torch.equal(layer.qzeros.data, pack_rows(middle, bits).T.to(layer.qzeros.device).expand_as(layer.qzeros)):
            return None
        config = MPLinearLayerConfig(
            full_weight_shape=(shape.input_size, shape.output_size),
            partition_weight_shape=(shape.in_per_rank, shape.out_per_rank),
            weight_type=scalar_types.uint4b8 if bits == 4 else scalar_types.uint8b128,
            act_type=shape.dtype, group_size=self.options.group_size, zero_points=False)
        try:
            kernel_type = choose_mp_linear_kernel(config)
        except ValueError:  # no vLLM kernel takes this layer
            return None
        if kernel_type not in (MacheteLinearKernel, MarlinLinearKernel):
            return None  # vLLM's slower fallbacks lose to the core's Triton kernel
        return kernel_type(config, w_q_param_name="qweight", w_s_param_name="scales", w_zp_param_name="qzeros")

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.vllm_kernel is not None:
            return self.vllm_kernel.apply_weights(layer, x, bias)
        out_features = self.shape.out_per_rank
        y = run_core_linear(x.reshape(-1, x.shape[-1]), layer.prefix, out_features)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], out_features)


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one layer on this tensor-parallel rank, fixed when its weights are created."""

    input_size: int
    output_size: int
    in_per_rank: int
    out_per_rank: int
    group_size: int  # input columns per group (in_features for group_size=-1)
    groups_follow_rows: bool  # scales/zeros hold only this rank's groups
    dtype: torch.dtype
