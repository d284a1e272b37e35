"""What a fuzzed server should have said: local blocks compute the answers, :func:`check_outcome` compares."""

from __future__ import annotations

from pathlib import Path

import torch
from fuzz_requests import NUM_BLOCKS, Expect, FuzzCase, SpanInputs
from fuzz_sending import Outcome
from transformers import AutoConfig

from ptune_search.models.llama.model import LlamaBlockSpan
from ptune_search.swarm.protocol import ErrorKind

REFUSAL_KINDS = (ErrorKind.BAD_REQUEST, ErrorKind.UNKNOWN_BLOCK)
TOLERANCE = 1e-4


class LocalBlocks:
    """All blocks of the fuzzed model in this process, to compute what the server must answer."""

    def __init__(self, model: Path):
        self.span = LlamaBlockSpan.from_checkpoint(model, AutoConfig.from_pretrained(model), 0, NUM_BLOCKS)

    def answer(self, inputs: SpanInputs) -> list[torch.Tensor]:
        if inputs.method == "forward":
            with torch.no_grad():
                return [self.span.run(inputs.start, inputs.end, inputs.hidden, inputs.mask, inputs.prompts)]
        hidden = inputs.hidden.clone().requires_grad_(True)
        wrt = [hidden]
        prompts = None
        if inputs.prompts is not None:
            prompts = inputs.prompts.clone().requires_grad_(True)
            wrt.append(prompts)
        with torch.enable_grad():
            output = self.span.run(inputs.start, inputs.end, hidden, inputs.mask, prompts)
            return list(torch.autograd.grad(output, wrt, grad_outputs=inputs.grad_outputs))


def check_outcome(case: FuzzCase, outcome: Outcome, local: LocalBlocks) -> None:
    """Assert that ``outcome`` is what the server owes ``case``."""
    what = f"{case.label} ({case.method}, {'stream' if case.streamed else 'unary'}): {outcome.describe()}"
    if case.expect is Expect.ANY:
        return
    if case.expect is Expect.REJECTION:
        assert outcome.handler_error or _is_refusal(outcome), f"garbage was not rejected: {what}"
        return
    if case.expect is Expect.REFUSAL:
        assert _is_refusal(outcome), f"an invalid request was not refused: {what}"
        return
    assert not (outcome.refusal or outcome.handler_error or outcome.silent), f"a valid request failed: {what}"
    expected = local.answer(case.inputs)
    assert [t.shape for t in outcome.tensors] == [t.shape for t in expected], f"wrong shapes: {what}"
    for got, want in zip(outcome.tensors, expected):
        if bool(torch.isfinite(want).all()):  # overflowing garbage floats may round either way: shapes suffice
            assert torch.allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE), f"wrong answer: {what}"


def _is_refusal(outcome: Outcome) -> bool:
    return outcome.refusal is not None and outcome.refusal.kind in REFUSAL_KINDS and bool(outcome.refusal.message)
