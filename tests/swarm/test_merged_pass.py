"""Requests of several clients merged into one pass through a span equal each request's pass alone."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
from swarm_testing import started_task, swarm_config, until

from ptune_search.models.llama.model import LlamaBlockSpan
from ptune_search.swarm.server.checks import SpanRequest
from ptune_search.swarm.server.fair_queue import FairQueue, Mergeable, MergeLimits
from ptune_search.swarm.server.merged_pass import MergedForward

START, END = 1, 4  # a span in the middle of the 6-block model
# (batch, length, pre_seq_len, prompts shared by the batch, padded from): different clients, modes and lengths
SHAPES = [(2, 9, 0, False, 6), (1, 5, 2, True, None), (3, 12, 3, False, 4), (2, 7, 1, True, 3)]


def request(seed: int, batch: int, length: int, pre_seq_len: int, shared: bool, pad_from: Optional[int]):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, 64, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
    prompts = None
    if pre_seq_len:
        prompts = torch.randn(1 if shared else batch, pre_seq_len * (END - START), 64, generator=generator)
    grad_outputs = torch.randn(batch, length, 64, generator=generator)
    return SpanRequest(START, END, hidden, mask, prompts, grad_outputs, f"r{seed}", True, torch.float32)


@pytest.fixture(scope="module")
def span(swarm_model: Path) -> LlamaBlockSpan:
    return LlamaBlockSpan.from_checkpoint(swarm_model, swarm_config(swarm_model, None), START, END)


def span_fn(span: LlamaBlockSpan):
    return lambda hidden, mask, prompts: span(hidden, mask, prompts)


def alone(span: LlamaBlockSpan, r: SpanRequest) -> list[torch.Tensor]:
    """Output, input grad and prompt grad of ``r`` run by itself, as a server did before merging."""
    hidden = r.hidden.clone().requires_grad_(True)
    prompts = None if r.prompts is None else r.prompts.clone().requires_grad_(True)
    output = span(hidden, r.attention_mask, prompts)
    output.backward(r.grad_outputs)
    return [output.detach(), hidden.grad] + ([] if prompts is None else [prompts.grad])


def test_merged_forward_and_backward_equal_each_request_alone(span):
    requests = [request(seed, *shape) for seed, shape in enumerate(SHAPES)]
    merged = MergedForward.run(span_fn(span), requests, END - START, grad=True)
    # the backwards come in two rounds, as clients' backwards do: the graph stays for the second
    grads = dict(zip([1, 3], merged.backward([1, 3], [requests[1].grad_outputs, requests[3].grad_outputs])))
    grads.update(zip([0, 2], merged.backward([0, 2], [requests[0].grad_outputs, requests[2].grad_outputs])))
    for member, r in enumerate(requests):
        grad_hidden, grad_prompts = grads[member]
        ours = [merged.output(member), grad_hidden] + ([] if grad_prompts is None else [grad_prompts])
        reference = alone(span, r)
        assert [t.shape for t in ours] == [t.shape for t in reference], member
        for got, expected in zip(ours, reference):
            assert (got - expected).abs().max().item() <= 1e-5, member
    assert not merged.outstanding


def test_merged_graph_counts_activation_bytes_without_weights(span):
    requests = [request(seed, *shape) for seed, shape in enumerate(SHAPES)]
    weights = frozenset(t.untyped_storage().data_ptr() for t in span.parameters())
    merged = MergedForward.run(span_fn(span), requests, END - START, grad=True, weights=weights)
    weight_bytes = sum(t.numel() * t.element_size() for t in span.parameters())
    tokens = sum(r.hidden.shape[0] for r in requests) * max(r.hidden.shape[1] for r in requests)
    assert tokens * 64 * 4 < merged.nbytes < weight_bytes + tokens * 64 * 4 * 100
    assert sum(merged.member_bytes(m) for m in range(len(requests))) <= merged.nbytes
    unmeasured = MergedForward.run(span_fn(span), requests, END - START, grad=True)
    assert unmeasured.nbytes - merged.nbytes >= weight_bytes // 2  # the frozen weights are what was left out


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("backwards", [[], [[1]]], ids=["never backwarded", "partly backwarded"])
def test_a_dropped_graph_frees_what_it_saved(span, backwards):
    """A graph the activation cache evicts before every backward ran is freed once dropped: no activation it
    saved outlives it (saved as themselves, outputs of its ops held their own grad_fn: a leak under load)."""
    requests = [request(seed, *shape) for seed, shape in enumerate(SHAPES)]
    before = live_tensors()
    merged = MergedForward.run(span_fn(span), requests, END - START, grad=True)
    for members in backwards:
        merged.backward(members, [requests[m].grad_outputs for m in members])
    assert live_tensors() > before  # the kept graph's activations are alive while it is
    del merged
    assert live_tensors() == before


def mergeable(key, rows: int, length: int, payload: str, batches: list) -> Mergeable:
    def run_batch(payloads):
        batches.append(list(payloads))
        return [f"done {p}" for p in payloads]

    return Mergeable(key, rows, length, nbytes=rows * length, payload=payload, run_batch=run_batch)


def test_fair_queue_merges_waiting_work_of_other_clients_within_its_limits_and_in_turn():
    queue = FairQueue(merge_limits=MergeLimits(max_tokens=40, max_bytes=10**6))
    queue.start()
    release = threading.Event()
    started, blocking = started_task(release)
    batches: list[list[str]] = []

    async def scenario():
        blocker = asyncio.ensure_future(queue.run("x", blocking))
        await until(started.is_set)
        submitted = [
            ("a", mergeable("fwd", 2, 5, "a0", batches)),
            ("a", mergeable("fwd", 2, 5, "a1", batches)),  # the same client's next request waits its turn
            ("b", mergeable("bwd", 2, 5, "b0", batches)),  # another key
            ("c", mergeable("fwd", 2, 10, "c0", batches)),  # 4 rows x 10 = 40 tokens: fits with a0
            ("d", mergeable("fwd", 1, 5, "d0", batches)),  # would make 5 rows x 10 > 40
        ]
        futures = [asyncio.ensure_future(queue.run_mergeable(client, work)) for client, work in submitted]
        await until(lambda: queue.pending == len(submitted))
        release.set()
        await blocker
        return await asyncio.gather(*futures)

    try:
        results = asyncio.run(scenario())
    finally:
        queue.close()
    assert results == ["done a0", "done a1", "done b0", "done c0", "done d0"]
    assert batches == [["a0", "c0"], ["b0"], ["d0", "a1"]]
    assert queue.stats["merged_batches"] == 2 and queue.stats["merged_requests"] == 4
    assert queue.stats["largest_merge"] == 2


def test_fair_queue_holds_no_merge_for_a_client_whose_work_never_merges():
    queue = FairQueue(merge_limits=MergeLimits(max_wait=2.0))
    queue.start()
    batches: list[list[str]] = []

    async def scenario() -> float:
        await queue.run("generating", lambda: None)  # an inference session's step: never merged
        started = time.monotonic()
        await queue.run_mergeable("training", mergeable("fwd", 1, 4, "t0", batches))
        return time.monotonic() - started

    try:
        waited = asyncio.run(scenario())
    finally:
        queue.close()
    assert waited < 1.0 and batches == [["t0"]]


def test_fair_queue_never_merges_with_max_tokens_zero():
    queue = FairQueue(merge_limits=MergeLimits(max_tokens=0))
    queue.start()
    release = threading.Event()
    started, blocking = started_task(release)
    batches: list[list[str]] = []

    async def scenario():
        blocker = asyncio.ensure_future(queue.run("x", blocking))
        await until(started.is_set)
        futures = [asyncio.ensure_future(queue.run_mergeable(c, mergeable("k", 1, 1, c, batches))) for c in "abc"]
        await until(lambda: queue.pending == 3)
        release.set()
        await blocker
        await asyncio.gather(*futures)

    try:
        asyncio.run(scenario())
    finally:
        queue.close()
    assert batches == [["a"], ["b"], ["c"]] and queue.stats["merged_batches"] == 0


def test_fair_queue_waits_briefly_for_a_client_that_was_active_lately():
    queue = FairQueue(merge_limits=MergeLimits(max_wait=120.0))
    queue.ACTIVE_SECONDS = 120.0  # b counts as active however slowly a loaded machine gets to a0
    queue.start()
    batches: list[list[str]] = []

    async def scenario():
        await queue.run_mergeable("b", mergeable("k", 1, 1, "b0", batches))  # b is active from now on
        first = asyncio.ensure_future(queue.run_mergeable("a", mergeable("k", 1, 1, "a0", batches)))
        await asyncio.sleep(0)  # a0 is submitted
        await until(lambda: queue.pending == 0)  # the worker took a0 and waits for b, which was active lately
        second = asyncio.ensure_future(queue.run_mergeable("b", mergeable("k", 1, 1, "b1", batches)))
        await asyncio.gather(first, second)

    try:
        asyncio.run(scenario())
    finally:
        queue.close()
    assert batches == [["b0"], ["a0", "b1"]]
