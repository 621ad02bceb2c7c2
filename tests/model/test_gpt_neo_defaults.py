"""The fine-tuning methods pick each architecture's own module names when none are given (peft's
per-model_type defaults): apply(model, "lora" | "qlora" | "ia3") on GPT-Neo, and peft's fan_in_fan_out."""

import json

import pytest
import torch

from gpt2lite import GPT2, GPT2Config
from gpt2lite.model.architectures import stores_transposed

pytest.importorskip("peft")
from gpt2lite.peft import apply, save_adapter  # noqa: E402
from gpt2lite.peft.ia3 import ia3_layers  # noqa: E402
from gpt2lite.peft.lora.add import lora_layers  # noqa: E402

ADAPTED = {"lora": ("q_proj", "v_proj"), "qlora": ("q_proj", "v_proj"), "ia3": ("c_proj", "q_proj", "v_proj")}


@pytest.mark.parametrize("method", sorted(ADAPTED))
def test_apply_uses_gpt_neo_default_targets(method):
    model = apply(GPT2(GPT2Config.from_name("gpt-neo-tiny")), method)
    adapted = ia3_layers(model) if method == "ia3" else lora_layers(model)
    assert sorted({name.split(".")[-1] for name in adapted}) == list(ADAPTED[method])
    assert len(adapted) == model.config.n_layer * len(ADAPTED[method])
    if method == "qlora":  # every linear layer of the blocks is quantized
        assert type(model.transformer.h[3].attn.attention.out_proj).__name__ == "NF4Linear"
        assert type(model.transformer.h[3].mlp.c_proj).__name__ == "NF4Linear"


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_adapter_config_fan_in_fan_out_follows_the_architecture(tmp_path, method):
    """peft's fan_in_fan_out is true for GPT-2's Conv1D weights only; GPT-Neo's are nn.Linear."""
    for preset, transposed in (("tiny", True), ("gpt-neo-tiny", False)):
        model = GPT2(GPT2Config.from_name(preset))
        assert stores_transposed(model) is transposed
        save_adapter(apply(model, method), str(tmp_path / preset))
        assert json.loads((tmp_path / preset / "adapter_config.json").read_text())["fan_in_fan_out"] is transposed
