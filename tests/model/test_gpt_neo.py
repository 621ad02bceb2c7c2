"""GPT-Neo through the GPT-2 code path: parity with transformers' GPTNeo classes (logits with and without
padding, local attention past the window, the 125M config, generation, classification, saving), and the
fine-tuning methods on GPT-Neo's own module names."""

import json

import pytest
import torch

import gpt2lite
from gpt2lite import GPT2, GPT2Config, GPT2ForSequenceClassification, Tokenizer, count_parameters, generate
from gpt2lite.model.gpt_neo import GPTNeoSelfAttention, compress_attention_layers, config_to_hf, expand_attention_types
from gpt2lite.errors import CheckpointError
from helpers import save_random

transformers = pytest.importorskip("transformers")

WINDOW = 8  # the tiny config's local window; test sequences are several windows long
TINY_NEO = dict(hidden_size=64, num_layers=4, num_heads=4, attention_types=[[["global", "local"], 2]],
                window_size=WINDOW, max_position_embeddings=128)
NEO_125M = dict(hidden_size=768, num_layers=12, num_heads=12, attention_types=[[["global", "local"], 6]],
                window_size=256, max_position_embeddings=2048)  # EleutherAI/gpt-neo-125M's config.json


def hf_neo_config(**overrides):
    return transformers.GPTNeoConfig(**{**TINY_NEO, **overrides})


@pytest.fixture(scope="module")
def tiny_neo(tmp_path_factory):
    """(directory, model): a random-init transformers GPTNeoForCausalLM, tiny, window 8."""
    directory = tmp_path_factory.mktemp("tiny_neo")
    return directory, save_random(transformers.GPTNeoForCausalLM, hf_neo_config(), directory, seed=0)


def batch(B=3, T=40, seed=0, padding="left"):
    """Random ids (B, T) and mask: row 0 full, rows 1.. padded with 50256 (more than a window of padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50000, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padding is not None:
        for row in range(1, B):
            n_pad = min(5 * row + 3, T - 4)
            pad = slice(0, n_pad) if padding == "left" else slice(T - n_pad, T)
            mask[row, pad] = 0
            ids[row, pad] = 50256
    return ids, mask


def positions_of(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)  # counted from each row's first real token


def max_diff_at_real_tokens(ours, theirs, mask):
    # A padding query's output is never used and each library lets it attend by its own convention.
    return (ours - theirs)[mask.bool()].abs().max().item()


# --------------------------------------------------------------------------------------------- logits


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_tiny_logits_match_transformers_past_the_window(tiny_neo, padding):
    directory, theirs_model = tiny_neo
    ours_model = GPT2.from_pretrained(str(directory)).eval()
    assert ours_model.config.model_type == "gpt_neo" and ours_model.config.attention_windows == (None, 8, None, 8)
    ids, mask = batch(padding=padding)
    with torch.no_grad():
        theirs = theirs_model(ids, attention_mask=mask, position_ids=positions_of(mask)).logits
        ours = ours_model(ids, attention_mask=mask, position_ids=positions_of(mask))
        # the same weights with every layer global: local attention must make a difference here
        all_global = GPT2(ours_model.config.replace(attention_windows=None)).eval()
        all_global.load_state_dict(ours_model.state_dict())
        without_window = all_global(ids, attention_mask=mask, position_ids=positions_of(mask))
    assert max_diff_at_real_tokens(ours, theirs, mask) < 1e-5
    assert max_diff_at_real_tokens(without_window, theirs, mask) > 1e-2


def test_125m_config_parameter_count_on_meta():
    with torch.device("meta"):
        ours = GPT2(GPT2Config.from_name("EleutherAI/gpt-neo-125M"))
        theirs = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**NEO_125M))
    assert count_parameters(ours) == (125_198_592, 125_198_592)
    assert sum(p.numel() for p in theirs.parameters()) == 125_198_592
    assert ours.config == GPT2Config.from_name("gpt-neo-125M")
    assert {name for name, _ in ours.named_parameters()} == {
        name for name, _ in theirs.named_parameters() if name != "lm_head.weight"
    }  # HF's module names (lm_head is tied to transformer.wte)


def test_125m_logits_match_transformers(tmp_path):
    """The full 125M config, a padded batch longer than the 256-token window. The final hidden states are
    compared at every real position and the logits (50257 wide, the costly part) at the last 64."""
    theirs_model = save_random(transformers.GPTNeoForCausalLM, transformers.GPTNeoConfig(**NEO_125M), tmp_path, 3)
    ours_model = GPT2.from_pretrained(str(tmp_path)).eval()
    assert ours_model.config == GPT2Config.from_name("gpt-neo-125M")
    ids, mask = batch(B=2, T=300, seed=3)
    kwargs = dict(attention_mask=mask, position_ids=positions_of(mask))
    with torch.no_grad():
        theirs = theirs_model.transformer(ids, **kwargs).last_hidden_state  # (B, T, C) after ln_f
        ours = ours_model.transformer(ids, **kwargs)
        assert max_diff_at_real_tokens(ours, theirs, mask) < 1e-4
        theirs_logits, ours_logits = theirs_model.lm_head(theirs[:, -64:]), ours_model.lm_head(ours[:, -64:])
    assert (ours_logits - theirs_logits).abs().max().item() < 1e-4


def test_save_pretrained_loads_in_transformers(tiny_neo, tmp_path):
    directory, _ = tiny_neo
    ours_model = GPT2.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        for p in ours_model.parameters():  # new values, so the test does not pass by reloading the original
            p.add_(0.01 * torch.randn_like(p))
    ours_model.save_pretrained(str(tmp_path))
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["architectures"] == ["GPTNeoForCausalLM"]
    assert hf_config["attention_types"] == [[["global", "local"], 2]] and hf_config["window_size"] == WINDOW
    theirs_model = transformers.GPTNeoForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids, mask = batch(seed=1)
    with torch.no_grad():
        theirs = theirs_model(ids, attention_mask=mask, position_ids=positions_of(mask)).logits
        ours = ours_model(ids, attention_mask=mask, position_ids=positions_of(mask))
    assert max_diff_at_real_tokens(ours, theirs, mask) < 1e-5


def test_old_checkpoints_mask_buffers_are_ignored(tiny_neo, tmp_path):
    """Checkpoints saved by older transformers (the hub's gpt-neo-125M) hold attn.attention.bias buffers."""
    from safetensors.torch import load_file, save_file

    directory, _ = tiny_neo
    state = load_file(str(directory / "model.safetensors"))
    state["transformer.h.0.attn.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    state["transformer.h.0.attn.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    model = GPT2.from_pretrained(str(tmp_path))
    assert torch.equal(model.transformer.h[0].attn.attention.q_proj.weight,
                       state["transformer.h.0.attn.attention.q_proj.weight"])


# --------------------------------------------------------------------------------------------- config


# EleutherAI/gpt-neo-125M's config.json on the hub (written by transformers 4.9), less its summary_* fields
HUB_CONFIG_125M = {
    "activation_function": "gelu_new", "architectures": ["GPTNeoForCausalLM"], "attention_dropout": 0,
    "attention_layers": ["global", "local"] * 6, "attention_types": [[["global", "local"], 6]],
    "bos_token_id": 50256, "embed_dropout": 0, "eos_token_id": 50256, "gradient_checkpointing": False,
    "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": None, "layer_norm_epsilon": 1e-05,
    "max_position_embeddings": 2048, "model_type": "gpt_neo", "num_heads": 12, "num_layers": 12,
    "resid_dropout": 0, "transformers_version": "4.9.0.dev0", "use_cache": True, "vocab_size": 50257,
    "window_size": 256,
}


def test_hub_config_is_the_preset():
    assert gpt2lite.model.gpt_neo.config_from_hf(HUB_CONFIG_125M) == GPT2Config.from_name("EleutherAI/gpt-neo-125M")


def test_config_round_trip_and_errors():
    config = GPT2Config.from_name("gpt-neo-125M")
    hf = config_to_hf(config)
    assert hf["attention_types"] == [[["global", "local"], 6]] and hf["window_size"] == 256
    assert transformers.GPTNeoConfig(**hf).attention_layers == ["global", "local"] * 6
    assert gpt2lite.model.gpt_neo.config_from_hf(hf) == config
    mixed = [[["global"], 2], [["local", "global"], 1]]
    assert expand_attention_types(mixed) == ["global", "global", "local", "global"]
    assert compress_attention_layers(["global", "global", "local"]) == [[["global", "global", "local"], 1]]
    with pytest.raises(CheckpointError, match="one local window size"):
        config_to_hf(config.replace(attention_windows=(None, 8) * 5 + (None, 16)))
    with pytest.raises(CheckpointError, match="scale_attn=False"):
        config_to_hf(config.replace(scale_attn=True))
    with pytest.raises(CheckpointError, match="unknown"):
        gpt2lite.model.gpt_neo.config_from_hf({**hf, "attention_types": [[["global", "sparse"], 6]]})


def test_tokenizer_is_gpt2s():
    """GPT-Neo was trained with GPT-2's tokenizer: same vocabulary size and end-of-text id."""
    config = GPT2Config.from_name("gpt-neo-125M")
    tokenizer = Tokenizer()
    assert tokenizer.vocab_size == config.vocab_size and tokenizer.eos_id == config.eos_token_id
    assert tokenizer.decode(tokenizer.encode("GPT-Neo reads GPT-2's tokens.")) == "GPT-Neo reads GPT-2's tokens."


# --------------------------------------------------------------------------------------------- generation


def test_greedy_generation_matches_transformers_past_the_window(tmp_path):
    """Left-padded prompts longer than the window and 30 new tokens: the KV cache respects the window."""
    config = hf_neo_config(initializer_range=0.1)  # sharper distributions: no near-ties for argmax
    theirs_model = save_random(transformers.GPTNeoForCausalLM, config, tmp_path, seed=4)
    ours_model = GPT2.from_pretrained(str(tmp_path)).eval()
    ids, mask = batch(B=3, T=14, seed=4)
    theirs = theirs_model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                                   pad_token_id=50256, eos_token_id=None)[:, ids.shape[1]:]
    ours = generate(ours_model, ids, max_new_tokens=30, attention_mask=mask, eos_id=None)
    assert ours.shape == (3, 30)
    assert torch.equal(ours, theirs)
    all_global = GPT2(ours_model.config.replace(attention_windows=None)).eval()
    all_global.load_state_dict(ours_model.state_dict())
    ignoring_window = generate(all_global, ids, max_new_tokens=30, attention_mask=mask, eos_id=None)
    assert not torch.equal(ignoring_window, theirs)  # the window decides tokens here


# --------------------------------------------------------------------------------------------- classification


def test_sequence_classification_loads_both_ways(tmp_path):
    config = hf_neo_config(num_labels=5, pad_token_id=50256)
    theirs_model = save_random(transformers.GPTNeoForSequenceClassification, config, tmp_path / "hf", seed=5)
    ours_model = GPT2ForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    assert ours_model.num_labels == 5 and ours_model.config.model_type == "gpt_neo"
    for padding in ("left", "right"):
        ids, mask = batch(seed=5, padding=padding)
        with torch.no_grad():
            theirs = theirs_model(ids, attention_mask=mask, position_ids=positions_of(mask)).logits
            ours = ours_model(ids, attention_mask=mask, position_ids=positions_of(mask))
        assert (ours - theirs).abs().max().item() < 1e-5
    ours_model.save_pretrained(str(tmp_path / "ours"))
    reloaded = transformers.GPTNeoForSequenceClassification.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert (reloaded(ids, attention_mask=mask, position_ids=positions_of(mask)).logits - ours).abs().max() < 1e-5


def test_classifier_from_a_language_model_checkpoint(tiny_neo):
    """What the classification example does: a new score head on GPT-Neo's pretrained body."""
    directory, lm = tiny_neo
    classifier = GPT2ForSequenceClassification.from_pretrained(str(directory), num_labels=20)
    assert classifier.score.weight.shape == (20, 64) and classifier.config.model_type == "gpt_neo"
    ids, mask = batch(seed=9)
    with torch.no_grad():
        body = classifier.transformer(ids, attention_mask=mask, position_ids=positions_of(mask))
        theirs = lm.transformer(ids, attention_mask=mask, position_ids=positions_of(mask)).last_hidden_state
    assert max_diff_at_real_tokens(body, theirs, mask) < 1e-5


# --------------------------------------------------------------------------------------------- precision


def test_half_precision_attention_does_not_overflow():
    """Unscaled scores past float16's range (65504): transformers casts them to float32; gpt2lite relies on
    scaled_dot_product_attention accumulating half-precision inputs in float32. This guards that reliance."""
    torch.manual_seed(6)
    model = GPT2(GPT2Config.from_name("gpt-neo-tiny")).eval()
    attention = model.transformer.h[0].attn.attention
    assert isinstance(attention, GPTNeoSelfAttention)
    with torch.no_grad():
        attention.q_proj.weight.mul_(400.0)
        attention.k_proj.weight.mul_(400.0)
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        reference = attention(x)
        scores = attention.q_proj(x) @ attention.k_proj(x).transpose(-1, -2)
        half = attention.half()(x.half())
    assert scores.abs().max() > 65504  # float16 would overflow
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert (half.float() - reference).abs().max() < 0.05 * reference.abs().max()


# --------------------------------------------------------------------------------------------- fine-tuning

peft = pytest.importorskip("peft")
from gpt2lite.peft import (add_bitfit, add_lora, apply, freeze_layers, frozen_baseline, full_finetuning,  # noqa: E402
                           load_adapter, save_adapter)
from gpt2lite.quantization import quantize_nf4  # noqa: E402
from gpt2lite.peft.ia3 import add_ia3  # noqa: E402
from gpt2lite.peft.prefix import add_prefix  # noqa: E402
from gpt2lite.peft.prompt import add_soft_prompt  # noqa: E402


def test_lora_q_v_parameter_count_125m_equals_peft():
    with torch.device("meta"):
        ours = add_lora(GPT2(GPT2Config.from_name("gpt-neo-125M")), rank=8, alpha=16, targets=["q_proj", "v_proj"])
        theirs = peft.get_peft_model(transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**NEO_125M)),
                                     peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert count_parameters(ours)[0] == 294_912  # 12 layers x 2 projections x (8 x 768 + 768 x 8)


def randomize_adapters(model, seed):
    """Nonzero LoRA weights (B starts at zero), so that the comparison means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_lora_adapter_loads_in_peft_and_back(tiny_neo, tmp_path):
    directory, _ = tiny_neo
    targets = ["q_proj", "v_proj", "out_proj", "c_fc"]
    ours = add_lora(GPT2.from_pretrained(str(directory)), rank=8, alpha=16, targets=targets).eval()
    randomize_adapters(ours, seed=7)
    save_adapter(ours, str(tmp_path / "ours"))
    base = transformers.GPTNeoForCausalLM.from_pretrained(str(directory))
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
    assert theirs.get_nb_trainable_parameters()[0] == 0 and len(theirs.peft_config["default"].target_modules) == 4
    ids, mask = batch(seed=7)
    kwargs = dict(attention_mask=mask, position_ids=positions_of(mask))
    with torch.no_grad():
        assert max_diff_at_real_tokens(ours(ids, **kwargs), theirs(input_ids=ids, **kwargs).logits, mask) < 1e-5
        # and back: peft's adapter (new weights) saved by peft, loaded by gpt2lite
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.mul_(-2.0)
        theirs.save_pretrained(str(tmp_path / "peft"))
        reloaded = load_adapter(GPT2.from_pretrained(str(directory)), str(tmp_path / "peft")).eval()
        theirs_logits = theirs(input_ids=ids, **kwargs).logits
        assert max_diff_at_real_tokens(reloaded(ids, **kwargs), theirs_logits, mask) < 1e-5
        assert max_diff_at_real_tokens(ours(ids, **kwargs), theirs_logits, mask) > 1e-3  # the adapter changed


NEO_IA3 = dict(targets=["q_proj", "v_proj", "c_proj"], feedforward=["c_proj"])  # peft's gpt_neo defaults


@pytest.mark.parametrize("method", ["prompt", "prefix", "ia3"])
def test_other_adapters_load_in_peft_with_the_same_logits(tiny_neo, tmp_path, method):
    """Soft prompt, prefix (key/value prefixes in the cache: local layers drop them past the window, in both)
    and IA3 on GPT-Neo, saved by gpt2lite in peft's format."""
    directory, _ = tiny_neo
    ours = GPT2.from_pretrained(str(directory))
    if method == "ia3":
        add_ia3(ours, **NEO_IA3)
    else:
        (add_soft_prompt if method == "prompt" else add_prefix)(ours, n_tokens=4)
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():  # away from the initialisation (IA3 starts at ones: the identity)
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    save_adapter(ours.eval(), str(tmp_path))
    base = transformers.GPTNeoForCausalLM.from_pretrained(str(directory))
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    ids, _ = batch(B=2, T=20, seed=10, padding=None)  # 4 virtual + 20 real tokens: past the window of 8
    with torch.no_grad():
        theirs_logits = theirs(input_ids=ids).logits[:, -ids.shape[1]:]  # peft returns the prompt's positions too
        assert (ours(ids) - theirs_logits).abs().max().item() < 1e-5
        with theirs.disable_adapter():
            without_adapter = theirs(input_ids=ids).logits[:, -ids.shape[1]:]
        assert (without_adapter - theirs_logits).abs().max().item() > 1e-3  # the adapter does something


def lora_names(name):
    return "lora_" in name


def qlora_on_neo(model):
    quantize_nf4(model, targets=["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"])
    return add_lora(model, rank=4, alpha=8, targets=["q_proj", "v_proj"])


# method -> (prepare the model, which parameter names must be trainable). GPT-Neo's own module names.
NEO_METHODS = {
    "full": (full_finetuning, lambda name: True),
    "frozen": (frozen_baseline, lambda name: False),
    "lora": (lambda m: apply(m, {"name": "lora", "rank": 4, "targets": ["q_proj", "v_proj", "out_proj", "c_fc"]}),
             lora_names),
    "qlora": (qlora_on_neo, lora_names),
    "prompt": (lambda m: apply(m, {"name": "prompt", "n_tokens": 4}), lambda name: "virtual_tokens" in name),
    "prefix": (lambda m: apply(m, {"name": "prefix", "n_tokens": 4, "projection": True}),
               lambda name: "virtual_tokens" in name),
    "last_n": (lambda m: freeze_layers(m, last_n=2), lambda name: name.startswith(("transformer.h.2.",
                                                                                   "transformer.h.3.",
                                                                                   "transformer.ln_f."))),
    "bitfit": (add_bitfit, lambda name: name.endswith(".bias")),
    "ia3": (lambda m: add_ia3(m, **NEO_IA3), lambda name: "ia3_l" in name),
}


@pytest.mark.parametrize("method", sorted(NEO_METHODS))
def test_every_method_trains_gpt_neo(method):
    torch.manual_seed(8)
    model = GPT2(GPT2Config.from_name("gpt-neo-tiny"))
    prepare, expected = NEO_METHODS[method]
    prepare(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if expected(name)}
    if method == "bitfit":  # GPT-Neo's q, k, v projections have no bias
        assert "transformer.h.0.attn.attention.out_proj.bias" in trainable
        assert not any("q_proj" in name for name in trainable)
    if method == "frozen":
        return
    ids, _ = batch(B=2, T=20, seed=8, padding=None)  # longer than the window of 8
    model.train()
    loss = model(ids, labels=ids)
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    assert all(bool(p.grad.abs().sum() > 0) for name, p in model.named_parameters() if name in trainable
               and "lora_A" not in name)  # lora_A's gradient is zero while lora_B is zero
    if method in ("prompt", "prefix"):  # virtual tokens take cache positions: generate past the window
        model.eval()
        assert generate(model, ids[:, :6], max_new_tokens=8, eos_id=None).shape == (2, 8)
    if method == "qlora":
        assert type(model.transformer.h[0].mlp.c_fc).__name__ == "NF4Linear"


@pytest.mark.parametrize("model_type,preset", [("gpt2", "tiny"), ("gpt_neo", "gpt-neo-tiny")])
def test_default_targets_are_peft_defaults_on_each_architectures_modules(model_type, preset):
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
                                      TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)

    from gpt2lite.model.architectures import default_targets
    from gpt2lite.model.surgery import find_targets

    with torch.device("meta"):
        model = GPT2(GPT2Config.from_name(preset))
    assert model.config.model_type == model_type
    assert list(default_targets(model, "lora")) == TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]
    assert list(default_targets(model, "ia3")) == TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]
    assert (list(default_targets(model, "ia3_feedforward"))
            == TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type])
    quantized = find_targets(model, default_targets(model, "quantize"))
    block_linears = [name for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and name.startswith("transformer.h.")]
    assert quantized == block_linears  # QLoRA quantizes every linear layer of the blocks
    with pytest.raises(ValueError, match="no default targets"):
        default_targets(model, "prefix")
