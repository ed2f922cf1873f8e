"""The rank plumbing on a real gloo group of two processes: owners, reductions, sharing, agreement."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from gptq_plugins.config import ConfigError
from gptq_plugins.distributed import (SINGLE, DistributedError, ProcessGroup, assign_owners, options_digest,
                                      solve_cost)

WORLD = 2


def test_owners_balance_solve_cost_costliest_first():
    costs = {"q": solve_cost(64, 64), "k": solve_cost(64, 32), "v": solve_cost(64, 32)}
    assert assign_owners(costs, 2) == {"q": 0, "k": 1, "v": 1}
    assert list(assign_owners(costs, 2)) == ["q", "k", "v"]
    assert assign_owners({"a": 5, "b": 5, "c": 5}, 3) == {"a": 0, "b": 1, "c": 2}
    assert set(assign_owners(costs, 1).values()) == {0}


def test_one_process_is_the_identity():
    part = torch.randn(3, 3)
    assert SINGLE.sum_on([0], [part], 7, (3, 3)) == ([part], 7)
    assert SINGLE.owners({"a": 1, "b": 2}) == {"a": 0, "b": 0}
    assert SINGLE.samples(5, 8) == slice(0, 5)
    with pytest.raises(KeyError):
        SINGLE.agree(KeyError("x"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_two_ranks(check):
    """Run `check(ranks)` on both ranks of a fresh gloo group (this file run as a script per rank)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(WORLD),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, check.__name__], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(WORLD)]
    outcomes = [(proc.wait(timeout=120), proc.communicate()[1]) for proc in procs]
    assert all(code == 0 for code, _ in outcomes), "\n".join(err[-3000:] for _, err in outcomes)


def _check_sums(ranks):
    # Each rank's float64 partial sums go to the owner, which adds them up in rank order.
    parts = {r: [torch.full((2, 2), float(r + 1), dtype=torch.float64), torch.full((2, 2), -0.5 * r,
                                                                                 dtype=torch.float64)]
             for r in range(WORLD)}
    tokens = {0: 10, 1: 20}
    mine, total = ranks.sum_on([1], parts[ranks.rank], tokens[ranks.rank], (2, 2))
    assert total == 30
    if ranks.rank == 1:
        assert torch.equal(mine[0], torch.full((2, 2), 3.0, dtype=torch.float64))
        assert torch.equal(mine[1], torch.full((2, 2), -0.5, dtype=torch.float64))
    else:
        assert mine is None
    # A rank that saw no tokens sends nothing; both owners get the same sums.
    mine, total = ranks.sum_on([0, 1], None if ranks.rank == 0 else [torch.ones(2, 2, dtype=torch.float64)],
                               0 if ranks.rank == 0 else 4, (2, 2))
    assert total == 4 and torch.equal(mine[0], torch.ones(2, 2, dtype=torch.float64))


def test_partial_sums_are_added_up_on_their_owners():
    _on_two_ranks(_check_sums)


def _check_share_and_samples(ranks):
    sent = {"codes": torch.arange(6, dtype=torch.int32).reshape(2, 3), "scales": torch.tensor([0.5, float("nan")])}
    tensors, meta = ranks.share(1, sent if ranks.rank == 1 else None,
                                {"row": {"name": "q", "loss": float("nan")}, "fallback": None}
                                if ranks.rank == 1 else None)
    assert torch.equal(tensors["codes"], sent["codes"]) and tensors["codes"].dtype == torch.int32
    assert tensors["scales"][0] == 0.5 and tensors["scales"][1].isnan()
    assert meta["row"]["name"] == "q" and meta["fallback"] is None
    # Whole batches: 3 batches of 8 (the last one of 4 samples) are shared 1 + 2.
    assert ranks.samples(20, 8) == (slice(0, 8) if ranks.rank == 0 else slice(8, 20))
    with pytest.raises(ConfigError, match="expected more than 8 samples"):
        ranks.samples(8, 8)
    assert ranks.union_max([ranks.rank, -1, 3 * ranks.rank]) == [1, -1, 3]


def test_results_and_records_are_shared_from_their_owner():
    _on_two_ranks(_check_share_and_samples)


def _check_agreement(ranks):
    ranks.agree(None)
    failure = ValueError("output: taken") if ranks.rank == 1 else None
    expected = ValueError if ranks.rank == 1 else DistributedError
    with pytest.raises(expected, match="rank 1 of 2 failed: ValueError: output: taken" if ranks.rank == 0
                       else "output: taken"):
        ranks.agree(failure)
    ranks.check_same("options", options_digest({"bits": 4}))
    with pytest.raises(DistributedError, match=r"ranks \[1\] were given other options than rank 0"):
        ranks.check_same("options", options_digest({"bits": 4 if ranks.rank == 0 else 3}))


def test_a_failure_on_one_rank_is_raised_on_every_rank():
    _on_two_ranks(_check_agreement)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        globals()[sys.argv[1]](ProcessGroup())
    finally:
        dist.destroy_process_group()
