"""Generation controls token for token against transformers' generate (and peft's, with prompt/prefix
adapters): repetition_penalty, no_repeat_ngram_size, min_new_tokens, stop strings, beam search with
length_penalty and early_stopping; greedy and beam, on left-padded batches.

The models are random-init with a wide initialisation (initializer_range=0.2), so next-token distributions
are peaked and no choice is a float near-tie; a random model repeats itself, which exercises the controls.
Every comparison also checks that the control changed the output, so a control that did nothing would fail.
"""

import json

import pytest
import torch
from conftest import hf_gpt2_config
from test_generate import prompts

from gpt2lite import GPT2, GPT2Config, Tokenizer, generate
from gpt2lite.generation.decoding import GenerationConfig, KVCache

transformers = pytest.importorskip("transformers")

SMALL_VOCAB = 64
PAD = 63  # left padding of the small-vocabulary prompts (and eos where a test needs one that never occurs)


def save_random_pair(directory, **config):
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(hf_gpt2_config(initializer_range=0.2, **config)).save_pretrained(str(directory))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(directory)).eval()
    return GPT2.from_pretrained(str(directory)).eval(), theirs


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("small_vocab_peaked")


@pytest.fixture(scope="module")
def small(small_dir):
    """(gpt2lite, transformers) models over a 64-token vocabulary with the same random weights."""
    return save_random_pair(small_dir, vocab_size=SMALL_VOCAB)


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    """(gpt2lite, transformers) models over GPT-2's vocabulary, and transformers' GPT-2 tokenizer built from
    gpt2lite's bundled BPE ranks (the Hub is offline)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from gpt2lite.tokenizer import ASSET

    directory = tmp_path_factory.mktemp("words")
    vocab, merges = TikTokenConverter(ASSET).extract_vocab_merges_from_model(ASSET)
    vocab["<|endoftext|>"] = 50256
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges))
    tokenizer = transformers.GPT2TokenizerFast(str(directory / "vocab.json"), str(directory / "merges.txt"))
    return (*save_random_pair(directory / "model"), tokenizer)


def small_prompts(seed=0):
    ids, mask = prompts(SMALL_VOCAB, lengths=(7, 3, 5), seed=seed)
    return ids.masked_fill(mask == 0, PAD), mask


def text_prompts(texts):
    """Left-padded prompts of GPT-2 tokens, padded with <|endoftext|>."""
    rows = [Tokenizer().encode(text) for text in texts]
    T = max(len(row) for row in rows)
    ids = torch.full((len(rows), T), 50256)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, T - len(row):] = torch.tensor(row)
        mask[i, T - len(row):] = 1
    return ids, mask


def hf_generate(model, ids, mask, eos_id=None, pad_id=None, **controls):
    """transformers' generate with gpt2lite's argument names; the new tokens only."""
    pad_id = eos_id if pad_id is None else pad_id
    model.generation_config.eos_token_id = eos_id
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, eos_token_id=eos_id,
                         pad_token_id=pad_id, **controls)
    return out[:, ids.size(1):]


def assert_parity(ours, theirs, ids, mask, off, **controls):
    """gpt2lite equals transformers with `controls`, and differs from the same call with `off` instead."""
    got = generate(ours, ids, attention_mask=mask, **controls)
    assert got.tolist() == hf_generate(theirs, ids, mask, **controls).tolist()
    assert got.tolist() != generate(ours, ids, attention_mask=mask, **{**controls, **off}).tolist()
    return got


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("controls, off, padded", [
    (dict(repetition_penalty=1.5), dict(repetition_penalty=1.0), True),
    (dict(repetition_penalty=0.7), dict(repetition_penalty=1.0), True),  # < 1 rewards repetition
    # transformers counts left padding as unigrams, so it never generates the padding id in a padded row
    (dict(no_repeat_ngram_size=1), dict(no_repeat_ngram_size=0), False),
    (dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=0), True),
    (dict(no_repeat_ngram_size=3), dict(no_repeat_ngram_size=0), True),
    (dict(repetition_penalty=1.3, no_repeat_ngram_size=2), dict(repetition_penalty=1.0, no_repeat_ngram_size=0), True),
])
def test_repetition_controls_equal_transformers(small, controls, off, padded, num_beams):
    ours, theirs = small
    ids, mask = small_prompts() if padded else prompts(SMALL_VOCAB, lengths=(6, 6, 6))
    assert_parity(ours, theirs, ids, mask, off, max_new_tokens=20, eos_id=None, num_beams=num_beams, **controls)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_min_new_tokens_equals_transformers(small, num_beams):
    ours, theirs = small
    ids, mask = small_prompts()
    free = generate(ours, ids, attention_mask=mask, max_new_tokens=12, eos_id=None, num_beams=num_beams)
    eos = int(free[0, 1])  # a token row 0 produces early: without min_new_tokens it ends there
    got = assert_parity(ours, theirs, ids, mask, dict(min_new_tokens=0), max_new_tokens=12, eos_id=eos,
                        pad_id=PAD, min_new_tokens=6, num_beams=num_beams)
    assert (got[:, :6] != eos).all()


@pytest.mark.parametrize("controls", [dict(repetition_penalty=1.4), dict(no_repeat_ngram_size=1),
                                      dict(no_repeat_ngram_size=1, num_beams=3)])
def test_repetition_controls_ignore_left_padding(small, controls):
    """A padded row generates what it generates alone: its padding is neither penalised nor an n-gram
    (transformers ignores padding for the penalty; for n-grams it reads it, see the test above)."""
    ours, _ = small
    ids, mask = small_prompts()
    batch = generate(ours, ids, attention_mask=mask, max_new_tokens=24, eos_id=None, **controls)
    assert (batch[1:] == PAD).any()  # padded rows generate the padding id: penalising or banning it would show
    for row in range(ids.size(0)):
        alone = ids[row:row + 1, -int(mask[row].sum()):]
        assert generate(ours, alone, max_new_tokens=24, eos_id=None, **controls).tolist() == batch[row:row + 1].tolist()


def forward_calls(model, run):
    """How many times `run()` calls model's transformer body (the prefill, then one call per step)."""
    calls = []
    handle = model.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        return run(), len(calls)
    finally:
        handle.remove()


@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 1.0, 2.0])
@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_search_equals_transformers_with_finished_hypotheses(small, length_penalty, early_stopping):
    """eos is the model's favourite token, so beams end at many lengths: scoring finished hypotheses, padding
    the shorter ones, and when each prompt stops adding hypotheses and generation stops (the same number of
    steps as transformers) all show."""
    ours, theirs = small
    ids, mask = small_prompts()
    eos = int(generate(ours, ids, attention_mask=mask, max_new_tokens=1, eos_id=None)[0, 0])
    beam = dict(max_new_tokens=30, num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping,
                eos_id=eos, pad_id=PAD)
    got, steps = forward_calls(ours, lambda: generate(ours, ids, attention_mask=mask, **beam))
    expected, their_steps = forward_calls(theirs, lambda: hf_generate(theirs, ids, mask, **beam))
    assert got.tolist() == expected.tolist()
    assert steps == their_steps
    assert (got == PAD).any()


def test_length_penalty_and_early_stopping_change_the_result(small):
    ours, _ = small
    ids, mask = small_prompts()
    free = generate(ours, ids, attention_mask=mask, eos_id=None, max_new_tokens=12, num_beams=4)
    beam = dict(attention_mask=mask, max_new_tokens=12, num_beams=4, eos_id=int(free[0, 2]), pad_id=PAD)
    short, long = (generate(ours, ids, length_penalty=p, **beam) for p in (-1.0, 2.0))
    assert ((short == PAD).sum(1) >= (long == PAD).sum(1)).all() and not torch.equal(short, long)
    assert not torch.equal(generate(ours, ids, early_stopping=True, **beam), generate(ours, ids, **beam))


def test_beam_search_with_one_beam_is_greedy_and_beams_can_beat_greedy(small):
    ours, _ = small
    ids, mask = small_prompts()
    greedy = generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_id=None)
    assert torch.equal(generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_id=None, num_beams=1), greedy)
    assert not torch.equal(generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_id=None, num_beams=3),
                           greedy)


STOP_TEXTS = ["The cat sat on the mat", "Hello", "In 1999, the"]


def stop_strings_from(free):
    """Stop strings taken from a free run's tokens, and the step where each row completes one."""
    pieces = [[Tokenizer().decode([t]) for t in row] for row in free.tolist()]
    stops = ("cat",  # wholly inside row 0's prompt: never stops anything
             pieces[0][1][-4:] + pieces[0][2][:4],  # across row 0's 2nd and 3rd new tokens
             "llo" + pieces[1][0][:3],  # from the end of row 1's prompt ("Hello") into its first new token
             pieces[2][2][:5])  # inside row 2's 3rd new token: the token overhangs the stop string
    return stops, [2, 0, 2]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_stop_strings_equal_transformers(words, num_beams):
    ours, theirs, hf_tokenizer = words
    ids, mask = text_prompts(STOP_TEXTS)
    greedy = generate(ours, ids, attention_mask=mask, max_new_tokens=12, eos_id=None)
    stops, stop_steps = stop_strings_from(greedy)
    # eos_id: without one, transformers does not pad a stopped sequence (greedy) or pads it with -1 (beams)
    controls = dict(max_new_tokens=12, eos_id=50256, num_beams=num_beams, stop_strings=stops)
    got = generate(ours, ids, attention_mask=mask, tokenizer=Tokenizer(), **controls)
    assert got.tolist() == hf_generate(theirs, ids, mask, tokenizer=hf_tokenizer, **controls).tolist()
    by_function = generate(ours, ids, attention_mask=mask, tokenizer=hf_tokenizer.decode, **controls)
    assert torch.equal(by_function, got)  # any decode function serves, transformers' tokenizer too
    if num_beams == 1:  # each row ends with the token that completed its stop string
        assert got.shape == (3, max(stop_steps) + 1)
        for row, step in enumerate(stop_steps):
            assert got[row, :step + 1].tolist() == greedy[row, :step + 1].tolist()
            assert (got[row, step + 1:] == 50256).all()
    else:
        assert got.tolist() != generate(ours, ids, attention_mask=mask, **{**controls, "stop_strings": ()}).tolist()


def peft_pair(small_dir, kind):
    """gpt2lite and peft models with the same 4-token soft prompt or prefix."""
    import peft

    from gpt2lite.peft.prefix import add_prefix, prefix_of
    from gpt2lite.peft.prompt import add_soft_prompt, soft_prompt

    ours = GPT2.from_pretrained(str(small_dir))
    base = transformers.GPT2LMHeadModel.from_pretrained(str(small_dir))
    torch.manual_seed(1)
    if kind == "prefix":
        add_prefix(ours, 4)
        table = prefix_of(ours).embedding
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    else:
        add_soft_prompt(ours, 4)
        table = soft_prompt(ours).embedding
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    theirs = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        theirs.prompt_encoder.default.embedding.weight.copy_(table)
    return ours.eval(), theirs


ADAPTER_CONTROLS = [dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2), dict(num_beams=3),
                    dict(num_beams=3, repetition_penalty=1.3, no_repeat_ngram_size=2)]


@pytest.mark.parametrize("controls", ADAPTER_CONTROLS)
def test_controls_with_a_prefix_equal_peft_on_a_padded_batch(small, small_dir, controls):
    ours, theirs = peft_pair(small_dir, "prefix")
    ids, mask = small_prompts()
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_id=None, **controls)
    assert got.tolist() == hf_generate(theirs, ids, mask, max_new_tokens=10, **controls).tolist()
    assert not torch.equal(got, generate(small[0], ids, attention_mask=mask, max_new_tokens=10, eos_id=None,
                                         **controls))  # the prefix matters


@pytest.mark.parametrize("controls", ADAPTER_CONTROLS)
def test_controls_with_a_soft_prompt_equal_peft_row_by_row(small_dir, controls):
    """peft ignores position ids with prompt tuning, so it shifts a padded row; compare each row alone
    with gpt2lite's padded batch."""
    ours, theirs = peft_pair(small_dir, "prompt")
    ids, mask = small_prompts()
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_id=None, **controls)
    for row in range(ids.size(0)):
        alone = ids[row:row + 1, -int(mask[row].sum()):]
        expected = hf_generate(theirs, alone, torch.ones_like(alone), max_new_tokens=10, **controls)
        assert got[row].tolist() == expected[0].tolist()


def test_config_and_keyword_arguments(small):
    """A GenerationConfig, its fields as keywords (dataclasses.asdict, as the CLI passes them), or both:
    keywords override the config's fields."""
    from dataclasses import asdict

    ours, _ = small
    ids, mask = small_prompts()
    config = GenerationConfig(max_new_tokens=9, eos_id=None, num_beams=3, repetition_penalty=1.3)
    expected = generate(ours, ids, attention_mask=mask, **asdict(config))
    assert torch.equal(generate(ours, ids, attention_mask=mask, config=config), expected)
    assert torch.equal(generate(ours, ids, 9, mask, config=GenerationConfig(eos_id=None, num_beams=3),
                                repetition_penalty=1.3), expected)
    assert generate(ours, ids, attention_mask=mask, config=config, max_new_tokens=4).shape == (3, 4)
    assert GenerationConfig(stop_strings=["\n\n"]).stop_strings == ("\n\n",)  # lists (YAML) become tuples
    with pytest.raises(TypeError, match="unknown arguments \\['num_beam'\\]"):
        generate(ours, ids, attention_mask=mask, num_beam=3)


def test_generate_refuses_empty_prompts_and_controls_it_cannot_apply():
    model = GPT2(GPT2Config.from_name("tiny", n_positions=16)).eval()
    with pytest.raises(ValueError, match="empty prompt: input_ids has 0 tokens"):
        generate(model, torch.zeros(2, 0, dtype=torch.long), 3)
    ids = torch.ones(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="empty prompt: attention_mask row 1 is all zeros"):
        generate(model, ids, 3, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, ids, 3, stop_strings=["x"])
    with pytest.raises(ValueError, match="need a pad_id"):
        generate(model, ids, 3, stop_strings=["x"], eos_id=None, tokenizer=Tokenizer())
    with pytest.raises(TypeError, match="not one string"):
        generate(model, ids, 3, stop_strings="x")
    with pytest.raises(ValueError, match="temperature=0 with num_beams"):
        generate(model, ids, 3, num_beams=2, temperature=0.7)


def test_kv_cache_reorder_copies_the_chosen_rows_of_the_stored_positions():
    cache = KVCache(n_layer=1, batch_size=2, n_head=1, max_len=4, head_dim=1)
    cache.update(0, torch.tensor([[[[1.0], [2.0]]], [[[3.0], [4.0]]]]), torch.zeros(2, 1, 2, 1))
    cache.advance(2)
    cache.repeat_interleave(2)  # rows a, a, b, b
    cache.reorder(torch.tensor([3, 0, 0, 1]))
    assert cache.k[0, :, 0, :2, 0].tolist() == [[3.0, 4.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]
