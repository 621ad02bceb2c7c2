"""peft's Auto classes load every adapter gpt2lite saves: adapter_config.json names the task (CAUSAL_LM for a
language model, SEQ_CLS for a classifier), so peft.AutoPeftModelForCausalLM / AutoPeftModelForSequenceClassification
.from_pretrained(directory) build the right model from base_model_name_or_path alone, with gpt2lite's logits."""

import copy
import json

import pytest
import torch

from gpt2lite import GPT2, GPT2ForSequenceClassification
from gpt2lite.quantization import NF4Linear, quantize_nf4
from gpt2lite.peft import apply, save_adapter
from gpt2lite.model.surgery import replace_modules
from gpt2lite.peft.lora.layer import plain_linear
from helpers import TOKENS

peft = pytest.importorskip("peft")

METHODS = {
    "lora": {"name": "lora", "rank": 4, "alpha": 8, "targets": ["c_attn", "c_proj"]},
    "dora": {"name": "lora", "rank": 4, "alpha": 8, "dora": True},
    "qlora": {"name": "qlora", "rank": 4, "alpha": 8, "targets": ["c_attn", "mlp.c_fc"]},
    "prompt": {"name": "prompt", "n_tokens": 3},
    "prefix": {"name": "prefix", "n_tokens": 3},
    "ia3": {"name": "ia3"},
}
HEADS = {  # head -> (gpt2lite class, peft's Auto class name, task_type)
    "lm": (GPT2, "AutoPeftModelForCausalLM", "CAUSAL_LM"),
    "classifier": (GPT2ForSequenceClassification, "AutoPeftModelForSequenceClassification", "SEQ_CLS"),
}


@pytest.fixture(scope="module")
def base_dirs(tiny_hf_dir, tiny_hf_classifier_dir):
    return {"lm": tiny_hf_dir, "classifier": tiny_hf_classifier_dir}


def dequantized_checkpoint(quantized: torch.nn.Module, directory) -> str:
    """Save the 4-bit model's dequantized weights as a float Hugging Face checkpoint: the base peft loads
    under a QLoRA adapter, so that its logits can equal the 4-bit model's."""
    float_model = copy.deepcopy(quantized)
    names = [name for name, module in float_model.named_modules() if isinstance(module, NF4Linear)]
    replace_modules(float_model, names, lambda name, layer: plain_linear(layer.dequantize(torch.float32),
                                                                        layer.bias, torch.float32))
    float_model.save_pretrained(str(directory))
    return str(directory)


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_auto_classes_load_every_adapter_with_gpt2lites_logits(method, head, base_dirs, tmp_path):
    cls, auto_class, task_type = HEADS[head]
    model = cls.from_pretrained(str(base_dirs[head])).eval()
    base_dir = str(base_dirs[head])
    if method == "qlora":  # peft's base is the float model; gpt2lite's the same weights in 4 bits
        quantize_nf4(model)
        base_dir = dequantized_checkpoint(model, tmp_path / "dequantized")
    torch.manual_seed(0)
    apply(model, METHODS[method])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every trainable tensor away from its start (LoRA's B is zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        expected = model(TOKENS)
    save_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path=base_dir)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == task_type

    theirs = getattr(peft, auto_class).from_pretrained(str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = theirs(input_ids=TOKENS).logits
        base = cls.from_pretrained(base_dir).eval()(TOKENS)
    if method == "prompt" and head == "lm":
        got = got[:, METHODS[method]["n_tokens"]:]  # peft returns the virtual tokens' logits too
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-5
    assert (expected - base).abs().max() > 1e-3  # the adapter matters, so agreeing is meaningful
