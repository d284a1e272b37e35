"""Many clients share one swarm: their requests interleave on the servers, their results do not mix."""

from __future__ import annotations

import threading

import torch
from swarm_testing import classification_batch

STEPS = 6
CLIENTS = [("ptune", 2), ("deep_ptune", 3), ("ptune", 5), ("deep_ptune", 1)]  # different sequence lengths


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in state.items():
            model.get_parameter(name).copy_(value)


def train(model, batches) -> list[float]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for step in range(STEPS):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_four_clients_training_at_once_each_equal_their_run_alone(swarm2, remote_classifier):
    torch.manual_seed(0)
    models = [remote_classifier(swarm2, tuning_mode=mode, pre_seq_len=length) for mode, length in CLIENTS]
    initial = [snapshot(model) for model in models]
    batches = [
        [classification_batch(10 * client + step, length=8 + 3 * client) for step in range(3)]
        for client in range(len(models))
    ]

    alone = [train(model, data) for model, data in zip(models, batches)]

    for model, state in zip(models, initial):
        restore(model, state)
    together: list = [None] * len(models)
    errors: list[BaseException] = []
    start = threading.Barrier(len(models))

    def run(client: int) -> None:
        try:
            start.wait()
            together[client] = train(models[client], batches[client])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(client,)) for client in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    for client, (ours, reference) in enumerate(zip(together, alone)):
        assert ours is not None, f"client {client} did not finish"
        assert max(abs(a - b) for a, b in zip(ours, reference)) <= 1e-5, client
