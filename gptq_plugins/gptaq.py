"""GPTAQ's float reference: the float model's own hidden states, run beside the quantized ones.

GPTAQ fits each Linear to the float model's output given the float model's inputs, so it needs a
second stream of hidden states (the float model's, at each block boundary) and, per Linear, how
the float inputs differ from the quantized model's (`AsymmetryAccumulator`). Plain GPTQ gets
`NO_REFERENCE`, whose methods do nothing: the block loop and the Hessian collection never ask
which of the two they have.
"""

from __future__ import annotations

import copy

import torch

from gptq_plugins.capture import BatchContext, linear_inputs, propagate
from gptq_plugins.config import QuantizeConfig
from gptq_plugins.hessian import AsymmetryAccumulator
from gptq_plugins.streaming import ActivationStore


class Unpaired:
    """A block quantized as plain GPTQ: its Linears' inputs are paired with nothing."""

    def record_inputs(self, names: list[str], context: BatchContext) -> None:
        pass

    def pair(self, name: str, x: torch.Tensor) -> None:
        pass

    def asymmetry(self, name: str) -> None:
        return None


UNPAIRED = Unpaired()


class FloatBlock:
    """A float copy of one block, taken before it is quantized, run on the float stream."""

    def __init__(self, block: torch.nn.Module, hidden: torch.Tensor, device):
        self.block, self.hidden, self.device = block, hidden, device
        self.dtype = next(block.parameters()).dtype
        self._inputs: dict[str, torch.Tensor] = {}
        self._accumulators: dict[str, AsymmetryAccumulator] = {}

    def record_inputs(self, names: list[str], context: BatchContext) -> None:
        """The float block's inputs to Linears `names` on this batch, for `pair`."""
        self._inputs = linear_inputs(self.block, names, self.hidden, context, self.dtype, self.device)

    def pair(self, name: str, x: torch.Tensor) -> None:
        """Accumulate how Linear `name`'s float input on this batch differs from the quantized model's `x`."""
        if name not in self._accumulators:
            self._accumulators[name] = AsymmetryAccumulator(x.shape[-1], device=self.device)
        self._accumulators[name].add(self._inputs[name], x)

    def asymmetry(self, name: str) -> AsymmetryAccumulator:
        """The asymmetry accumulated for the input Linear `name` was paired on; its group's
        collection is over, so the float inputs and the accumulator are let go."""
        self._inputs = {}
        return self._accumulators.pop(name)


class NoReference:
    """Plain GPTQ: no float stream."""

    def follow(self, block: torch.nn.Module) -> Unpaired:
        return UNPAIRED

    def advance(self, index: int, followed: Unpaired, contexts: list[BatchContext]) -> None:
        pass


NO_REFERENCE = NoReference()


class FloatReference:
    """The float model's hidden states at the current block boundary, in a store of their own."""

    def __init__(self, store: ActivationStore, hidden: torch.Tensor, device):
        self.store, self.hidden, self.device = store, hidden, device

    def follow(self, block: torch.nn.Module) -> FloatBlock:
        """The float reference of `block`, which is about to be quantized in place."""
        return FloatBlock(copy.deepcopy(block), self.hidden, self.device)

    def advance(self, index: int, followed: FloatBlock, contexts: list[BatchContext]) -> None:
        """The float stream moved past block `index`, durable before the block's checkpoint."""
        self.hidden = propagate(followed.block, self.hidden, contexts, self.store.new(index + 1, self.hidden.shape),
                                followed.dtype, self.device)
        if self.store.scratch is not None:
            self.store.persist(index + 1, self.hidden)
        self.store.drop(index)


def reference_for(config: QuantizeConfig, store: ActivationStore, start: int, hidden: torch.Tensor,
                  device) -> FloatReference | NoReference:
    """GPTAQ's float reference from block `start` on, or `NO_REFERENCE` without `config.gptaq`.

    Block 0 receives the same inputs on both paths; a resumed run reads the float stream's.
    """
    if not config.gptaq:
        return NO_REFERENCE
    float_store = store.sibling("float")
    return FloatReference(float_store, float_store.load(start) if start else hidden, device)
