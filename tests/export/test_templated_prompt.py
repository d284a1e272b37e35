"""An exported prompt tuned on a template classifies texts put in that template, as its trials read them."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from ptune_search.data import encode_texts
from ptune_search.models.registry import AutoDistributedModelForSequenceClassification
from ptune_search.prompts.predict import PromptClassifier
from tests.export.handmade_prompt import handmade_prompt

TEMPLATE = "About {text} - topic"
TEXTS = ["a short text", "a long one " * 20]


def test_predict_puts_each_text_in_the_prompts_template(tiny_model_path, tmp_path):
    folder = handmade_prompt(tiny_model_path, tmp_path / "prompt", "ptune", 3, template=TEMPLATE)
    with PromptClassifier(folder, local_blocks=True) as classifier:
        predicted = torch.tensor([list(p.probabilities.values()) for p in classifier.classify(TEXTS)])
        order = [list(p.probabilities) for p in classifier.classify(TEXTS)]
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        tiny_model_path, local_blocks=True, prompt=folder
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    labels = classifier.manifest.label_names

    def probabilities(template: str) -> torch.Tensor:
        ids, mask = encode_texts(TEXTS, tokenizer, 32, template)
        with torch.no_grad():
            rows = torch.softmax(model(ids, mask).logits, dim=-1)
        return torch.stack([row[[labels.index(name) for name in names]] for row, names in zip(rows, order)])

    assert torch.allclose(predicted, probabilities(TEMPLATE), atol=1e-6)
    assert not torch.allclose(predicted, probabilities("{text}"), atol=1e-3), "the template changed nothing"
