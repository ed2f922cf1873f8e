"""The block loop's rank plumbing over torch.distributed (gloo on CPU, NCCL on CUDA).

Every rank streams the same block and runs its own contiguous share of the calibration batches
through it; each Linear has one owner rank that receives the other ranks' partial Hessian sums
(float64, added in rank order), solves, and sends the result to all. `SINGLE` is one process with no group: every method is the
identity, so the run loop never asks how many ranks there are.

Nothing here pickles: what ranks exchange are tensors, and small records travel as JSON bytes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from gptq_plugins.config import ConfigError

# How long a rank waits in a collective for the others: a stalled peer fails the run, not hangs it.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


class DistributedError(RuntimeError):
    """Another rank failed, or the ranks disagree; the message names the rank."""


def solve_cost(in_features: int, out_features: int) -> int:
    """GPTQ's work for one Linear: the column sweep (`in^2 * out`) plus the inverse Cholesky (`in^3`)."""
    return in_features * in_features * out_features + in_features ** 3


def assign_owners(costs: dict[str, int], world_size: int) -> dict[str, int]:
    """Owner rank of each name: costliest first to the least loaded rank (ties: name order, lower rank)."""
    loads = [0] * world_size
    owners = {}
    for name in sorted(costs, key=lambda name: -costs[name]):  # stable: equal costs keep their order
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += costs[name]
    return {name: owners[name] for name in costs}


def options_digest(options: dict) -> bytes:
    """sha256 of a JSON-clean dict of options, the same on every rank given the same options."""
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).digest()


class SingleProcess:
    """One process: it holds every sample, owns every Linear and writes the artifact."""

    rank, world_size, is_writer = 0, 1, True

    def samples(self, n: int, batch_size: int) -> slice:
        return slice(0, n)

    def owners(self, costs: dict[str, int]) -> dict[str, int]:
        return dict.fromkeys(costs, 0)

    def sum_on(self, owners, parts, tokens: int, shape) -> tuple[list[torch.Tensor] | None, int]:
        return parts, tokens

    def union_max(self, values: list[int]) -> list[int]:
        return values

    def share(self, src: int, tensors: dict[str, torch.Tensor] | None, meta: dict | None):
        return tensors, meta

    def scratch_in(self, scratch: Path) -> Path:
        return scratch

    def after_all(self, step=None) -> None:
        if step is not None:
            step()

    def agree(self, error: BaseException | None) -> None:
        if error is not None:
            raise error

    def check_same(self, what: str, digest: bytes) -> None:
        pass


SINGLE = SingleProcess()


class ProcessGroup:
    """This process's place in an initialised torch.distributed group of `world_size` ranks; rank 0 writes."""

    def __init__(self):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_writer = self.rank == 0
        # NCCL moves only CUDA tensors; gloo CPU ones.
        self.device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                       else torch.device("cpu"))

    def samples(self, n: int, batch_size: int) -> slice:
        """This rank's contiguous share of `n` calibration samples: whole batches of `batch_size`
        (shares differ by at most one batch), so every batch is the one a single process runs."""
        batches = -(-n // batch_size)
        if batches < self.world_size:
            raise ConfigError("num_samples", f"{n} calibration samples make {batches} batches of {batch_size}, "
                              f"fewer than the {self.world_size} ranks; expected more than "
                              f"{batch_size * (self.world_size - 1)} samples")
        first, last = (batches * r // self.world_size for r in (self.rank, self.rank + 1))
        return slice(first * batch_size, min(last * batch_size, n))

    def owners(self, costs: dict[str, int]) -> dict[str, int]:
        return assign_owners(costs, self.world_size)

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device)
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor)
        return torch.stack(out).cpu()

    def union_max(self, values: list[int]) -> list[int]:
        """Element-wise maximum of `values` over the ranks (which Linear fed an input, wherever it ran)."""
        return self._all_gather(torch.tensor(values, dtype=torch.int64)).amax(dim=0).tolist()

    def sum_on(self, owners, parts: list[torch.Tensor] | None, tokens: int,
               shape) -> tuple[list[torch.Tensor] | None, int]:
        """`parts` (this rank's float64 partial sums, each of `shape`, over its `tokens` tokens; None
        where it saw none) added up over the ranks, on each rank of `owners`; None elsewhere.

        Each owner adds the ranks' partial sums in rank order, so the result depends on the world
        size only, never on timing. Returns them with the token count over all ranks.
        """
        gathered = self._all_gather(torch.tensor([tokens, len(parts or ())], dtype=torch.int64))
        counts, kinds = gathered[:, 0].tolist(), int(gathered[:, 1].max())
        mine = None
        for owner in sorted(set(owners)):
            if self.rank != owner:
                for part in (parts if tokens else ()):
                    dist.send(part.contiguous().to(self.device), owner)
                continue
            mine = [torch.zeros(shape, dtype=torch.float64, device=self.device) for _ in range(kinds)]
            for r in (r for r, count in enumerate(counts) if count):
                for total, own in zip(mine, parts if r == self.rank else [None] * kinds):
                    if own is None:
                        own = torch.empty(shape, dtype=torch.float64, device=self.device)
                        dist.recv(own, r)
                    total.add_(own.to(self.device))
        return mine, sum(counts)

    def share(self, src: int, tensors: dict[str, torch.Tensor] | None, meta: dict | None):
        """Rank `src`'s `tensors` and JSON-clean `meta`, on every rank."""
        if self.rank == src:
            header = {"meta": meta, "tensors": [[name, str(t.dtype).removeprefix("torch."), list(t.shape)]
                                                for name, t in tensors.items()]}
            encoded = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
            length = torch.tensor([encoded.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        length = length.to(self.device)
        dist.broadcast(length, src)
        if self.rank != src:
            encoded = torch.empty(int(length), dtype=torch.uint8)
        encoded = encoded.to(self.device)
        dist.broadcast(encoded, src)
        header = json.loads(encoded.cpu().numpy().tobytes().decode())
        out = {}
        for name, dtype, shape in header["tensors"]:
            buffer = (tensors[name].contiguous().to(self.device) if self.rank == src
                      else torch.empty(shape, dtype=getattr(torch, dtype), device=self.device))
            dist.broadcast(buffer, src)
            out[name] = tensors[name] if self.rank == src else buffer
        return out, header["meta"]

    def scratch_in(self, scratch: Path) -> Path:
        """This rank's own scratch directory (its share of the hidden states) inside the run's."""
        return scratch / f"rank-{self.rank:05d}"

    def after_all(self, step=None) -> None:
        """Run `step` on the writer once every rank has arrived here, and return once it is done."""
        dist.barrier()
        if self.is_writer and step is not None:
            step()
        dist.barrier()

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed: its own error where it happened, elsewhere a
        `DistributedError` with the first failing rank's message."""
        failed = self._all_gather(torch.tensor([error is not None], dtype=torch.int64))[:, 0].tolist()
        if not any(failed):
            return
        first = failed.index(1)
        _, meta = self.share(first, {}, {"message": f"{type(error).__name__}: {error}"} if self.rank == first else None)
        if error is not None:
            raise error
        raise DistributedError(f"rank {first} of {self.world_size} failed: {meta['message']}")

    def check_same(self, what: str, digest: bytes) -> None:
        """Refuse to start unless every rank was given the same `what` (compared by digest)."""
        digests = self._all_gather(torch.frombuffer(bytearray(digest), dtype=torch.uint8))
        differ = [r for r in range(self.world_size) if not torch.equal(digests[r], digests[0])]
        if differ:
            raise DistributedError(f"ranks {differ} were given other {what} than rank 0; every rank "
                                   "must run the same command")


def process_ranks() -> SingleProcess | ProcessGroup:
    """The ranks of the initialised default process group, or `SINGLE` when there is none (or one rank)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroup()
    return SINGLE


def backend_for(device: str | torch.device | None) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


@contextlib.contextmanager
def launcher_group(device: str | None):
    """The process group of a launcher such as torchrun (its `WORLD_SIZE`, `RANK`, `MASTER_ADDR`
    and `MASTER_PORT`), initialised for the run's device and destroyed after it; nothing when the
    process was not launched as one of several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    backend = backend_for(device)
    if backend == "nccl":  # one GPU per rank: `cuda` means this rank's
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()
