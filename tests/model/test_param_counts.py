"""Trainable-parameter counts on the full gpt2 124M configuration: the issue's figures, and each equal to what
peft reports for the same configuration (peft's get_peft_model on a transformers model), in the same run.

Every model is built on the meta device (no memory, no initialisation), ours and transformers' alike.
"""

import pytest
import torch

from gpt2lite import GPT2, GPT2Config, GPT2ForSequenceClassification, count_parameters
from gpt2lite.peft import add_lora, apply, freeze_layers

NUM_LABELS = 20


def ours(classifier=False):
    config = GPT2Config.from_name("gpt2")
    with torch.device("meta"):
        return GPT2ForSequenceClassification(config, num_labels=NUM_LABELS) if classifier else GPT2(config)


def hf(classifier=False):
    import transformers

    with torch.device("meta"):
        if classifier:
            return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(num_labels=NUM_LABELS))
        return transformers.GPT2LMHeadModel(transformers.GPT2Config())


def peft_counts(classifier=False, **lora_kwargs):
    """(trainable, total) as peft reports them for a LoraConfig."""
    import peft

    model = peft.get_peft_model(hf(classifier), peft.LoraConfig(**lora_kwargs))
    return model.get_nb_trainable_parameters()


LORA_CASES = [  # (rank, targets, trainable figure from the issue)
    (8, ["c_attn"], 294_912),
    (8, ["attn.c_attn", "attn.c_proj"], 442_368),
    (16, ["attn.c_attn", "attn.c_proj"], 884_736),
    (32, ["attn.c_attn", "attn.c_proj"], 1_769_472),
    (8, ["c_attn", "c_proj"], 811_008),  # a bare "c_proj" also matches mlp.c_proj, as in peft
    (4, ["c_attn", "c_proj"], 405_504),
    (8, ["c_attn", "c_proj", "c_fc"], 1_179_648),
]


@pytest.mark.parametrize("rank,targets,figure", LORA_CASES)
def test_lora_counts_equal_figures_and_peft(rank, targets, figure):
    model = add_lora(ours(), rank=rank, alpha=2 * rank, targets=targets)
    counted = count_parameters(model)
    assert counted[0] == figure
    assert counted == peft_counts(r=rank, lora_alpha=2 * rank, target_modules=targets)


@pytest.mark.parametrize("options", [
    dict(bias="all"), dict(bias="lora_only"), dict(dora=True), dict(layers_to_transform=[10, 11]),
])
def test_lora_option_counts_equal_peft(options):
    peft_options = {"use_dora" if k == "dora" else k: v for k, v in options.items()}
    model = add_lora(ours(), rank=8, alpha=16, targets=["c_attn"], **options)
    assert count_parameters(model) == peft_counts(r=8, lora_alpha=16, target_modules=["c_attn"], **peft_options)


def test_classifier_lora_r128_lora_only_bias_with_score_in_modules_to_save():
    model = add_lora(ours(classifier=True), rank=128, alpha=16, targets=["c_attn"], bias="lora_only",
                     modules_to_save=["score"])
    counted = count_parameters(model)
    # 4,718,592 LoRA + 27,648 c_attn biases + 15,360 score; the total holds the frozen original score too.
    assert counted == (4_761_600, 129_189_120)
    assert counted == peft_counts(classifier=True, r=128, lora_alpha=16, target_modules=["c_attn"],
                                  bias="lora_only", modules_to_save=["score"])


def test_score_head_alone_is_15360_as_in_peft():
    probe = apply(ours(classifier=True), "frozen")  # the no-fine-tuning baseline of a classifier: a linear probe
    assert count_parameters(probe)[0] == 15_360
    # peft keeps the score head trainable for SEQ_CLS; its share of the count is the same 15,360.
    with_head = peft_counts(classifier=True, task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["c_attn"])
    without_head = peft_counts(r=8, lora_alpha=16, target_modules=["c_attn"])
    assert with_head[0] - without_head[0] == 15_360
    # apply() follows peft's SEQ_CLS convention: LoRA on a classifier trains the score head too.
    ours_lora = apply(ours(classifier=True), {"name": "lora", "rank": 8, "alpha": 16, "targets": ["c_attn"]})
    assert count_parameters(ours_lora) == with_head


def test_full_finetuning_trains_all_124439808():
    model = apply(ours(), "full")
    reference = sum(p.numel() for p in hf().parameters())  # transformers counts the tied head once, too
    assert count_parameters(model) == (124_439_808, 124_439_808) == (reference, reference)


def test_last_n_counts_the_blocks_ln_f_and_the_chosen_head():
    reference = hf()
    blocks = sum(p.numel() for p in reference.transformer.h[-2:].parameters())
    ln_f = sum(p.numel() for p in reference.transformer.ln_f.parameters())
    wte = reference.transformer.wte.weight.numel()
    assert count_parameters(freeze_layers(ours(), last_n=2))[0] == blocks + ln_f == 14_177_280
    assert count_parameters(freeze_layers(ours(), last_n=2, head="tied")) == (blocks + ln_f + wte, 124_439_808)
    # untying adds a new head matrix: it trains, and the total grows by its size
    assert count_parameters(freeze_layers(ours(), last_n=2, head="untied")) == (blocks + ln_f + wte,
                                                                                124_439_808 + wte)


PEFT_METHODS = {  # our apply() config -> the peft config of the same adapter (its task_type set per head)
    "lora": ({"name": "lora", "rank": 8, "alpha": 16, "targets": ["c_attn"]},
             lambda peft, task: peft.LoraConfig(task_type=task, r=8, lora_alpha=16, target_modules=["c_attn"])),
    "prompt": ({"name": "prompt", "n_tokens": 20},
               lambda peft, task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=20)),
    "prefix": ({"name": "prefix", "n_tokens": 20},
               lambda peft, task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=20)),
    "prefix_projection": ({"name": "prefix", "n_tokens": 20, "projection": True},
                          lambda peft, task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=20,
                                                                     prefix_projection=True, encoder_hidden_size=768)),
    "ia3": ({"name": "ia3"}, lambda peft, task: peft.IA3Config(task_type=task)),
}


@pytest.mark.parametrize("classifier", [False, True], ids=["lm", "classifier"])
@pytest.mark.parametrize("method", sorted(PEFT_METHODS))
def test_every_peft_method_counts_as_peft_on_both_heads(method, classifier):
    """(trainable, total) equal peft's get_nb_trainable_parameters(); on a classifier peft keeps the frozen
    original of `score` beside its trainable copy (SEQ_CLS modules_to_save), and so does gpt2lite."""
    import peft

    ours_config, peft_config = PEFT_METHODS[method]
    model = apply(ours(classifier), ours_config)
    theirs = peft.get_peft_model(hf(classifier), peft_config(peft, "SEQ_CLS" if classifier else "CAUSAL_LM"))
    assert count_parameters(model) == theirs.get_nb_trainable_parameters()
