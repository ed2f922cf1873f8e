"""Mixture-of-experts blocks seen as one Linear per expert projection, as GPTQ needs them.

Transformers 5 holds a MoE block's experts fused in two 3-D parameters (`gate_up_proj`
`[experts, 2 x intermediate, hidden]`, `down_proj [experts, hidden, intermediate]`) and runs them
in one loop. GPTQ quantizes each expert on the tokens routed to it, and checkpoints (and vLLM)
name every expert's projections separately, so the pipeline and the Transformers adapter swap
the fused module for `UnfusedExperts`: the same computation over per-expert `nn.Linear`s named
as in the checkpoint, whose forward pre-hooks then see exactly each expert's routed tokens.
Experts already held one module per expert (a `ModuleList`) are used as they are.
"""

from __future__ import annotations

import torch

FUSED_PARAMETERS = ("gate_up_proj", "down_proj")


class ExpertMLP(torch.nn.Module):
    """One expert: `down(act(gate(x)) * up(x))`, its Linears named by `projections` (gate, up, down)."""

    def __init__(self, projections: tuple[str, str, str], hidden: int, intermediate: int, *, device, dtype):
        super().__init__()
        self.projections = projections
        gate, up, down = projections
        for name, (n_in, n_out) in ((gate, (hidden, intermediate)), (up, (hidden, intermediate)),
                                    (down, (intermediate, hidden))):
            self.add_module(name, torch.nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, act_fn) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.projections)
        return down(act_fn(gate(x)) * up(x))


class UnfusedExperts(torch.nn.Module):
    """A drop-in for Transformers' fused experts module: the experts as `ExpertMLP`s named `0, 1, ...`.

    Called like the fused module, `(hidden_states [tokens, hidden], top_k_index [tokens, k],
    top_k_weights [tokens, k])`, it runs each expert on its routed tokens only, so an expert no
    token was routed to is never called.
    """

    def __init__(self, experts: list[ExpertMLP], act_fn):
        super().__init__()
        for index, expert in enumerate(experts):
            self.add_module(str(index), expert)
        self.num_experts = len(experts)
        self.act_fn = act_fn

    def expert(self, index: int) -> ExpertMLP:
        return self.get_submodule(str(index))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for index in range(self.num_experts):
            expert = self.expert(index)
            slot, token = torch.where((top_k_index == index).T)
            if token.numel() == 0:
                continue
            y = expert(hidden_states[token], self.act_fn) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def is_fused(module: torch.nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), torch.nn.Parameter) for name in FUSED_PARAMETERS)


def expert_count(module: torch.nn.Module) -> int:
    """Number of experts of a fused experts module, an `UnfusedExperts`, or a list of expert modules
    (the per-expert form older and remote-code models use)."""
    if isinstance(module, UnfusedExperts):
        return module.num_experts
    return module.gate_up_proj.shape[0] if is_fused(module) else len(module)


def unfuse(module: torch.nn.Module, projections: tuple[str, str, str], path: str, *,
           empty: bool = False) -> UnfusedExperts:
    """`UnfusedExperts` holding the fused module's weights; with `empty` (or from the meta
    device) an empty stand-in on the meta device, which costs no memory.

    `gate_up_proj[e]` is the expert's gate rows followed by its up rows, as the fused forward
    splits it; anything else on the module (biases, other layouts) is refused, not dropped.
    """
    others = [name for name, _ in module.named_parameters() if name not in FUSED_PARAMETERS]
    if not is_fused(module) or others:
        raise ValueError(f"{path}: expected fused experts holding only {' and '.join(FUSED_PARAMETERS)} "
                         f"[experts, 2 x intermediate, hidden] / [experts, hidden, intermediate]; "
                         f"{type(module).__name__} has {[name for name, _ in module.named_parameters()]}")
    gate_up, down = module.gate_up_proj, module.down_proj
    n_experts, hidden, intermediate = down.shape
    if tuple(gate_up.shape) != (n_experts, 2 * intermediate, hidden):
        raise ValueError(f"{path}.gate_up_proj: expected [{n_experts}, {2 * intermediate}, {hidden}] to match "
                         f"down_proj {list(down.shape)}, got {list(gate_up.shape)}")
    empty = empty or gate_up.device.type == "meta"
    experts = []
    for e in range(n_experts):
        expert = ExpertMLP(projections, hidden, intermediate, device="meta" if empty else gate_up.device,
                           dtype=gate_up.dtype)
        if not empty:
            gate_layer, up_layer, down_layer = (getattr(expert, name) for name in projections)
            gate_layer.weight.data = gate_up.data[e, :intermediate].clone()
            up_layer.weight.data = gate_up.data[e, intermediate:].clone()
            down_layer.weight.data = down.data[e].clone()
        experts.append(expert)
    return UnfusedExperts(experts, module.act_fn)
