"""PEFT interop: a ptune prompt loads in PEFT with our logits, a PEFT adapter loads here with PEFT's logits;
deep_ptune is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ptune_search.models import DistributedLlamaForSequenceClassification
from ptune_search.models.peft_adapter import write_peft_adapter
from ptune_search.models.prompt_folder import ExportedPrompt
from ptune_search.pretrained import prepare_model
from tests.export.handmade_prompt import LABELS, handmade_prompt

TEXTS = ["Shares in the bank fell sharply after its profit warning.", "The striker scored twice in the cup final."]


@pytest.fixture(params=["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def model_path(request: pytest.FixtureRequest, tiny_model_path: Path) -> Path:
    return tiny_model_path if request.param == "tiny" else prepare_model("smollm2-135m")


def _logits_one_text_at_a_time(model: torch.nn.Module, model_path: Path) -> torch.Tensor:
    """PEFT's classifier pools the batch's last position (HF cannot see padding in inputs_embeds), so texts
    go one by one, unpadded."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with torch.no_grad():
        return torch.cat([model(**tokenizer(text, return_tensors="pt")).logits for text in TEXTS])


def test_a_ptune_prompt_loads_in_peft_with_our_logits(model_path: Path, tmp_path: Path):
    prompt = handmade_prompt(model_path, tmp_path / "prompt", "ptune", pre_seq_len=5)
    adapter = tmp_path / "peft"
    write_peft_adapter(ExportedPrompt.read(prompt), adapter)

    ours = DistributedLlamaForSequenceClassification.from_pretrained(model_path, prompt=prompt, local_blocks=True)
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(LABELS))
    theirs = PeftModel.from_pretrained(base, adapter)
    expected = _logits_one_text_at_a_time(ours.eval(), model_path)
    got = _logits_one_text_at_a_time(theirs.eval(), model_path)
    assert expected.abs().max() > 1e-2, "the head gives all-zero logits; equality would prove nothing"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    without_prompt = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(LABELS))
    without_prompt.score.weight.data.copy_(theirs.base_model.score.modules_to_save["default"].weight)
    assert (_logits_one_text_at_a_time(without_prompt.eval(), model_path) - expected).abs().max() > 1e-3, (
        "the virtual tokens change nothing; the comparison does not see the prompt"
    )


def test_a_peft_adapter_trained_elsewhere_loads_as_a_ptune_prompt(model_path: Path, tmp_path: Path):
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=3)
    theirs = get_peft_model(base, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=6))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        embedding = theirs.prompt_encoder["default"].embedding.weight
        embedding.copy_(torch.randn(embedding.shape, generator=generator) * 0.5)
        head = theirs.base_model.score.modules_to_save["default"].weight
        head.copy_(torch.randn(head.shape, generator=generator) * 0.2)
    theirs.save_pretrained(tmp_path / "adapter")

    ours = DistributedLlamaForSequenceClassification.from_pretrained(
        model_path, prompt=tmp_path / "adapter", local_blocks=True
    )
    assert (ours.model.tuning_mode, ours.model.pre_seq_len, ours.num_labels) == ("ptune", 6, 3)
    torch.testing.assert_close(
        _logits_one_text_at_a_time(ours.eval(), model_path),
        _logits_one_text_at_a_time(theirs.eval(), model_path),
        atol=1e-4,
        rtol=0,
    )


def test_deep_ptune_is_refused_with_its_reason(tiny_model_path: Path, tmp_path: Path):
    prompt = handmade_prompt(tiny_model_path, tmp_path / "prompt", "deep_ptune", pre_seq_len=3)
    with pytest.raises(ValueError, match="deep_ptune has no PEFT equivalent: it adds a trained prompt to the input"):
        write_peft_adapter(ExportedPrompt.read(prompt), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
