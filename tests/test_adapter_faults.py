"""A catalogue of adapter faults: each gets the right exception, a message naming the culprit (the file, the
field or the tensor), and leaves the model exactly as it was (same modules, modes, requires_grad, values).

Every case starts from a good adapter that save_adapter wrote for the tiny model and breaks one thing in it.
"""

import copy
import json
import os

import pytest
import torch

from gpt2lite import GPT2, GPT2Config, GPT2ForSequenceClassification
from gpt2lite.errors import CheckpointError
from gpt2lite.peft import add_ia3, add_lora, add_prefix, add_soft_prompt, load_adapter, save_adapter

TOKENS = torch.tensor([[464, 2068, 7586, 21831, 18045, 625], [40, 588, 257, 922, 1492, 546]])


@pytest.fixture(scope="module")
def bases(tiny_hf_dir, tiny_hf_classifier_dir):
    return {"lm": GPT2.from_pretrained(str(tiny_hf_dir)).eval(),
            "classifier": GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir)).eval()}


ADAPTERS = {  # how each good adapter is made (on a copy of the base), before a fault is put in it
    "lora": lambda m: add_lora(m, rank=4, alpha=8, targets=["c_attn", "mlp.c_proj"], dropout=0.1,
                               modules_to_save=["score"] if isinstance(m, GPT2ForSequenceClassification) else None),
    "ia3": add_ia3,
    "prompt": lambda m: add_soft_prompt(m, 4),
    "prefix": lambda m: add_prefix(m, 4),
}


@pytest.fixture(scope="module")
def good_adapters(bases, tmp_path_factory):
    """{(method, head): directory} of adapters saved by save_adapter, trained-looking (moved off their init)."""
    directories = {}
    generator = torch.Generator().manual_seed(0)
    for method, make in ADAPTERS.items():
        for head in ("lm", "classifier"):
            model = make(copy.deepcopy(bases[head]))
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.1 * torch.randn(p.shape, generator=generator))
            directory = tmp_path_factory.mktemp(f"{method}_{head}")
            save_adapter(model, str(directory))
            directories[method, head] = directory
    return directories


def snapshot(model):
    """Everything a failed load must leave alone."""
    return {
        "modules": [(name, type(m).__name__, m.training) for name, m in model.named_modules()],
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "values": {name: t.clone() for name, t in model.state_dict().items()},
        "attributes": sorted(vars(model)),
        "virtual_tokens": model.transformer.virtual_tokens,
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["attributes"] == before["attributes"]  # no lora_settings, num_virtual_tokens left behind
    assert after["virtual_tokens"] is before["virtual_tokens"]
    assert after["values"].keys() == before["values"].keys()
    assert all(torch.equal(after["values"][k], before["values"][k]) for k in before["values"])


def broken_copy(source, tmp_path):
    """A copy of an adapter directory to break."""
    target = tmp_path / "adapter"
    target.mkdir()
    for name in os.listdir(source):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def edit_config(directory, change):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def edit_tensors(directory, change):
    from safetensors.torch import load_file, save_file

    path = str(directory / "adapter_model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def truncate(directory):
    path = directory / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rename_first_key(tensors):
    key = sorted(tensors)[0]
    tensors[key.replace("transformer.h.0.", "transformer.h.7.")] = tensors.pop(key)


def grow_first_tensor(tensors):
    key = sorted(k for k in tensors if "score" not in k)[0]
    tensors[key] = torch.cat([tensors[key], tensors[key]], dim=0)


# (id, adapter (method, head), the model it is loaded into, the fault, exception, message part naming the culprit)
# "into" is "lm" or "classifier" (the plain base) or a method name (the base with that adapter already in it).
CASES = [
    # --- the files
    ("missing_directory", ("lora", "lm"), "lm", lambda d: os.rename(d, str(d) + "_gone"), CheckpointError,
     "no adapter directory"),
    ("missing_config", ("lora", "lm"), "lm", lambda d: os.remove(d / "adapter_config.json"), CheckpointError,
     "has no adapter_config.json"),
    ("config_invalid_json", ("lora", "lm"), "lm", lambda d: (d / "adapter_config.json").write_text("{'r': 8,"),
     CheckpointError, "adapter_config.json is not valid JSON"),
    ("config_not_utf8", ("ia3", "lm"), "lm", lambda d: (d / "adapter_config.json").write_bytes(b"\xff\xfe{}"),
     CheckpointError, "adapter_config.json is not valid JSON"),
    ("config_is_a_list", ("lora", "lm"), "lm", lambda d: (d / "adapter_config.json").write_text('["LORA", 8]'),
     CheckpointError, "adapter_config.json holds a JSON list, not an object"),
    ("config_without_peft_type", ("prompt", "lm"), "lm", lambda d: edit_config(d, lambda c: c.pop("peft_type")),
     CheckpointError, "adapter_config.json has no peft_type"),
    ("unsupported_peft_type", ("lora", "lm"), "lm", lambda d: edit_config(d, lambda c: c.update(peft_type="LOHA")),
     CheckpointError, "adapter type 'LOHA' is not supported"),
    ("missing_weights", ("lora", "lm"), "lm", lambda d: os.remove(d / "adapter_model.safetensors"),
     CheckpointError, "has no adapter_model.safetensors"),
    ("truncated_lora_weights", ("lora", "lm"), "lm", truncate, CheckpointError,
     "adapter_model.safetensors: .*probably truncated or corrupted"),
    ("truncated_ia3_weights", ("ia3", "classifier"), "classifier", truncate, CheckpointError,
     "adapter_model.safetensors: .*probably truncated"),
    ("truncated_prompt_weights", ("prompt", "lm"), "lm", truncate, CheckpointError,
     "adapter_model.safetensors: .*probably truncated"),
    ("truncated_prefix_weights", ("prefix", "lm"), "lm", truncate, CheckpointError,
     "adapter_model.safetensors: .*probably truncated"),
    # --- LoRA: the config
    ("lora_without_target_modules", ("lora", "lm"), "lm", lambda d: edit_config(d, lambda c: c.pop("target_modules")),
     CheckpointError, "adapter_config.json has no target_modules"),
    ("lora_empty_target_modules", ("lora", "lm"), "lm", lambda d: edit_config(d, lambda c: c.update(target_modules=[])),
     CheckpointError, "adapter_config.json has no target_modules"),
    ("lora_target_matches_nothing", ("lora", "lm"), "lm",
     lambda d: edit_config(d, lambda c: c.update(target_modules=["c_attn", "q_proj"])), CheckpointError,
     "adapter_config.json: target 'q_proj' matches no module"),
    ("lora_regex_matches_nothing", ("lora", "lm"), "lm",
     lambda d: edit_config(d, lambda c: c.update(target_modules=r".*\.query")), CheckpointError,
     r"target_modules '\.\*\\\\\.query' \(a regular expression"),
    ("lora_bad_rank", ("lora", "lm"), "lm", lambda d: edit_config(d, lambda c: c.update(r=0)), CheckpointError,
     "adapter_config.json: LoRA rank must be a positive integer, got 0"),
    ("lora_alpha_a_string", ("lora", "lm"), "lm", lambda d: edit_config(d, lambda c: c.update(lora_alpha="16")),
     CheckpointError, "adapter_config.json: LoRA alpha must be a positive number, got '16'"),
    ("lora_rank_pattern", ("lora", "lm"), "lm",
     lambda d: edit_config(d, lambda c: c.update(rank_pattern={"c_attn": 2})), CheckpointError, "adapter_config.json sets rank_pattern"),
    # --- LoRA: the tensors (found only once the layers are in: they must come out again)
    ("lora_tensor_of_another_size", ("lora", "lm"), "lm", lambda d: edit_tensors(d, grow_first_tensor),
     CheckpointError, r"adapter_model.safetensors: base_model.model.transformer.h.0.attn.c_attn.lora_A.weight has "
                      r"shape \(8, 64\), this model expects \(4, 64\)"),
    ("lora_tensor_missing", ("lora", "lm"), "lm", lambda d: edit_tensors(d, lambda t: t.pop(sorted(t)[-1])),
     CheckpointError, r"adapter_model.safetensors does not fit this model: missing \['base_model.model.transformer"
                      r".h.1.mlp.c_proj.lora_B.weight'\]"),
    ("lora_tensor_renamed", ("lora", "lm"), "lm", lambda d: edit_tensors(d, rename_first_key), CheckpointError,
     r"unexpected \['base_model.model.transformer.h.7.attn.c_attn.lora_A.weight'\]"),
    ("lora_classifier_adapter_into_lm", ("lora", "classifier"), "lm", lambda d: None, CheckpointError,
     r"unexpected \['base_model.model.score.weight'\]"),
    ("lora_into_lora_of_another_rank", ("lora", "lm"), "lora8", lambda d: None, CheckpointError,
     r"has rank 4, the model's LoRA layers have rank \[8\]"),
    ("lora_into_lora_with_other_targets", ("lora", "lm"), "lora4_c_fc", lambda d: None, CheckpointError,
     "does not fit this model: missing"),
    # --- IA3
    ("ia3_without_target_modules", ("ia3", "lm"), "lm", lambda d: edit_config(d, lambda c: c.pop("target_modules")),
     CheckpointError, "adapter_config.json has no target_modules"),
    ("ia3_target_not_linear", ("ia3", "lm"), "lm", lambda d: edit_config(d, lambda c: c.update(
        target_modules=["c_attn", "ln_2"], feedforward_modules=[])), CheckpointError,
     "adapter_config.json: IA3 needs an nn.Linear, got LayerNorm"),
    ("ia3_vector_of_another_size", ("ia3", "lm"), "lm", lambda d: edit_tensors(d, grow_first_tensor),
     CheckpointError, r"adapter_model.safetensors: base_model.model.transformer.h.0.attn.c_attn.ia3_l has shape "
                      r"\(384, 1\), this model expects \(192, 1\)"),
    ("ia3_feedforward_layout_swapped", ("ia3", "lm"), "lm",
     lambda d: edit_config(d, lambda c: c.update(feedforward_modules=[])), CheckpointError,
     r"mlp.c_proj.ia3_l has shape \(1, 256\), this model expects \(64, 1\)"),
    ("ia3_classifier_adapter_into_lm", ("ia3", "classifier"), "lm", lambda d: None, CheckpointError,
     r"unexpected \['base_model.model.score.weight'\]"),
    ("ia3_score_for_other_labels", ("ia3", "classifier"), "classifier",
     lambda d: edit_tensors(d, lambda t: t.update({"base_model.model.score.weight": torch.zeros(3, 64)})),
     CheckpointError, r"score.weight has shape \(3, 64\), this model expects \(20, 64\)"),
    # --- prompt tuning
    ("prompt_embeddings_missing", ("prompt", "lm"), "lm",
     lambda d: edit_tensors(d, lambda t: t.update(other=t.pop("prompt_embeddings"))), CheckpointError,
     r"adapter_model.safetensors: prompt_embeddings should be \(4, 64\), found nothing"),
    ("prompt_count_differs_from_config", ("prompt", "lm"), "lm",
     lambda d: edit_config(d, lambda c: c.update(num_virtual_tokens=6)), CheckpointError,
     r"prompt_embeddings should be \(6, 64\), found shape \(4, 64\)"),
    ("prompt_for_another_width", ("prompt", "lm"), "lm", lambda d: edit_config(d, lambda c: c.update(token_dim=32)),
     CheckpointError, "adapter_config.json: the adapter was made for token_dim=32, this model has token_dim=64"),
    ("prompt_with_a_stray_tensor", ("prompt", "lm"), "lm",
     lambda d: edit_tensors(d, lambda t: t.update(stray=torch.zeros(2))), CheckpointError, r"unexpected \['stray'\]"),
    ("prompt_classifier_adapter_into_lm", ("prompt", "classifier"), "lm", lambda d: None, CheckpointError,
     r"unexpected \['base_model.score.weight'\].*GPT2ForSequenceClassification"),
    ("prompt_lm_adapter_into_classifier", ("prompt", "lm"), "classifier", lambda d: None, CheckpointError,
     r"missing \['base_model.score.weight'\]"),
    ("prompt_into_a_longer_prompt", ("prompt", "lm"), "prompt6", lambda d: None, CheckpointError,
     r"prompt_embeddings has shape \(4, 64\), this model expects \(6, 64\)"),
    # --- prefix tuning
    ("prefix_for_more_layers", ("prefix", "lm"), "lm", lambda d: edit_config(d, lambda c: c.update(num_layers=3)),
     CheckpointError, "adapter_config.json: the adapter was made for num_layers=3, this model has num_layers=2"),
    ("prefix_table_of_another_width", ("prefix", "lm"), "lm",
     lambda d: edit_tensors(d, lambda t: t.update(prompt_embeddings=t["prompt_embeddings"][:, :64].clone())),
     CheckpointError, r"prompt_embeddings should be \(4, 256\), found shape \(4, 64\)"),
    ("prefix_with_a_stray_tensor", ("prefix", "classifier"), "classifier",
     lambda d: edit_tensors(d, lambda t: t.update(stray=torch.zeros(2))), CheckpointError, r"unexpected \['stray'\]"),
    ("prefix_table_into_a_projected_prefix", ("prefix", "lm"), "prefix_projection", lambda d: None, CheckpointError,
     "the model's prefix has an MLP projection"),
]

INTO = {  # models that already carry an adapter
    "lora8": lambda bases: add_lora(copy.deepcopy(bases["lm"]), rank=8, alpha=16, targets=["c_attn", "mlp.c_proj"]),
    "lora4_c_fc": lambda bases: add_lora(copy.deepcopy(bases["lm"]), rank=4, alpha=8, targets=["c_fc"]),
    "prompt6": lambda bases: add_soft_prompt(copy.deepcopy(bases["lm"]), 6),
    "prefix_projection": lambda bases: add_prefix(copy.deepcopy(bases["lm"]), 4, projection=True),
}


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_a_faulty_adapter_is_refused_and_the_model_is_unchanged(case, bases, good_adapters, tmp_path):
    _, adapter, into, fault, exception, message = case
    directory = broken_copy(good_adapters[adapter], tmp_path)
    fault(directory)
    model = INTO[into](bases) if into in INTO else copy.deepcopy(bases[into])
    before = snapshot(model)
    logits = model(TOKENS)
    with pytest.raises(exception, match=message):
        load_adapter(model, str(directory))
    assert_unchanged(model, before)
    assert torch.equal(model(TOKENS), logits)


def test_every_good_adapter_loads(bases, good_adapters):
    """The catalogue's starting points are sound: each good adapter loads into its base and changes it."""
    for (method, head), directory in good_adapters.items():
        model = load_adapter(copy.deepcopy(bases[head]), str(directory))
        assert not torch.equal(model(TOKENS), bases[head](TOKENS)), (method, head)


def test_a_refused_adapter_leaves_a_loaded_one_in_place(bases, good_adapters, tmp_path):
    """Loading into a model that already has LoRA: a bad file changes none of the loaded values."""
    model = load_adapter(copy.deepcopy(bases["lm"]), str(good_adapters["lora", "lm"]))
    directory = broken_copy(good_adapters["lora", "lm"], tmp_path)
    edit_tensors(directory, lambda t: t.pop(sorted(t)[-1]))
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="missing"):
        load_adapter(model, str(directory))
    assert_unchanged(model, before)


def test_add_ia3_on_a_layer_that_is_not_linear_changes_nothing(bases):
    """add_ia3 finds a non-linear target only while wrapping: the layers wrapped before it come out again."""
    model = copy.deepcopy(bases["lm"])
    before = snapshot(model)
    with pytest.raises(TypeError, match="IA3 needs an nn.Linear, got LayerNorm"):
        add_ia3(model, targets=["c_attn", "ln_2"], feedforward=[])
    assert_unchanged(model, before)


def test_adapter_made_for_another_model_size_names_the_file(good_adapters, tmp_path):
    smaller = GPT2(GPT2Config.from_name("tiny", n_embd=32)).eval()
    before = snapshot(smaller)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: .* another base size"):
        load_adapter(smaller, str(good_adapters["lora", "lm"]))
    assert_unchanged(smaller, before)
