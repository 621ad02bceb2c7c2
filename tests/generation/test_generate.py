"""KV-cache generation: greedy equals transformers' generate, eos handling, sampling, one prefill."""

import pytest
import torch
from conftest import hf_gpt2_config

from gpt2lite import GPT2, GPT2Config, generate
from gpt2lite.generation.decoding import sample_next

transformers = pytest.importorskip("transformers")

SMALL_VOCAB = 64  # a random model over 64 tokens repeats tokens soon, so eos can be made to occur


def prompts(vocab, lengths=(7, 3, 5), seed=0):
    """Left-padded random prompts of different lengths: (ids, mask), padding with token 0."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, T - n:] = torch.randint(0, vocab, (n,), generator=g)
        mask[row, T - n:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def small_vocab_pair(tmp_path_factory):
    """(gpt2lite, transformers) random models with the same weights and a 64-token vocabulary."""
    directory = tmp_path_factory.mktemp("small_vocab")
    torch.manual_seed(0)
    # a wider init makes the next-token distribution peaked, so greedy choices are far from ties
    config = hf_gpt2_config(vocab_size=SMALL_VOCAB, initializer_range=0.2)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(directory))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(directory)).eval()
    return GPT2.from_pretrained(str(directory)).eval(), theirs


def hf_greedy(model, ids, mask, max_new_tokens, eos_id, pad_id):
    model.generation_config.eos_token_id = eos_id
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=pad_id, eos_token_id=eos_id)
    return out[:, ids.size(1):]


def test_greedy_equals_transformers_for_left_padded_prompts(tiny_hf_dir):
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(tiny_hf_dir)).eval()
    ours = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    ids, mask = prompts(50000, lengths=(9, 4, 6, 1))
    ids = ids.masked_fill(mask == 0, 50256)
    expected = hf_greedy(theirs, ids, mask, 12, eos_id=50256, pad_id=50256)
    got = generate(ours, ids, max_new_tokens=12, attention_mask=mask)
    assert got.shape == (4, 12)
    assert torch.equal(got, expected)


def test_greedy_with_eos_equals_transformers_and_pads_after_eos(small_vocab_pair):
    ours, theirs = small_vocab_pair
    ids, mask = prompts(SMALL_VOCAB)
    free_run = generate(ours, ids, max_new_tokens=12, attention_mask=mask, eos_id=None)
    assert free_run.shape == (3, 12)  # eos_id=None never stops early
    # make eos a token that row 0 first produces at step j >= 1
    row0 = free_run[0].tolist()
    j = next(j for j in range(1, 12) if row0[j] not in row0[:j])
    eos, pad = row0[j], (row0[j] + 1) % SMALL_VOCAB
    got = generate(ours, ids, max_new_tokens=12, attention_mask=mask, eos_id=eos, pad_id=pad)
    assert got[0, j] == eos and torch.equal(got[0, :j], free_run[0, :j])
    assert (got[0, j + 1:] == pad).all()  # stopped: only padding after eos
    assert torch.equal(got, hf_greedy(theirs, ids, mask, 12, eos_id=eos, pad_id=pad))


def test_generation_stops_when_every_sequence_has_ended(small_vocab_pair):
    ours, _ = small_vocab_pair
    ids, mask = prompts(SMALL_VOCAB)
    first = generate(ours, ids, max_new_tokens=1, attention_mask=mask, eos_id=None)[:, 0]
    ids, mask = ids[:1], mask[:1]
    got = generate(ours, ids, max_new_tokens=10, attention_mask=mask, eos_id=int(first[0]))
    assert got.tolist() == [[int(first[0])]]


def test_kv_cache_greedy_equals_recomputing_the_whole_sequence(small_vocab_pair):
    """Greedy generation with the cache equals a loop that re-runs the full sequence at every step."""
    ours, _ = small_vocab_pair
    ids, mask = prompts(SMALL_VOCAB, seed=1)
    got = generate(ours, ids, max_new_tokens=8, attention_mask=mask, eos_id=None)
    seq, seq_mask = ids, mask
    with torch.no_grad():
        for _ in range(8):
            positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
            token = ours(seq, attention_mask=seq_mask, position_ids=positions)[:, -1].argmax(-1, keepdim=True)
            seq, seq_mask = torch.cat([seq, token], 1), torch.cat([seq_mask, torch.ones_like(token)], 1)
    assert torch.equal(got, seq[:, ids.size(1):])


def test_prompt_is_computed_once_then_one_token_per_step(small_vocab_pair):
    ours, _ = small_vocab_pair
    ids, mask = prompts(SMALL_VOCAB)
    fed = []
    handle = ours.transformer.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[1]))
    try:
        generate(ours, ids, max_new_tokens=6, attention_mask=mask, eos_id=None)
    finally:
        handle.remove()
    assert fed == [ids.size(1)] + [1] * 5  # prefill with T tokens, then one token per new step


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(tiny_hf_dir):
    ours = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    ids, mask = prompts(50000, lengths=(5, 3))
    sample = dict(max_new_tokens=6, attention_mask=mask, temperature=1.0, eos_id=None)
    a = generate(ours, ids, seed=123, **sample)
    assert torch.equal(a, generate(ours, ids, seed=123, **sample))
    assert not torch.equal(a, generate(ours, ids, seed=124, **sample))  # near-uniform over 50,257 tokens
    greedy = generate(ours, ids, max_new_tokens=6, attention_mask=mask, eos_id=None)
    assert torch.equal(generate(ours, ids, seed=1, top_k=1, **sample), greedy)
    assert torch.equal(generate(ours, ids, seed=1, top_p=1e-9, **sample), greedy)
    assert not ours.training


def test_sample_next_top_k_and_top_p_keep_only_the_head_of_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {0, 1}
    # top_p=0.7: tokens 0 and 1 (0.5 before token 1 is < 0.7; 0.8 before token 2 is >= 0.7)
    nucleus = sample_next(logits, temperature=1.0, top_p=0.7, generator=g)
    assert set(nucleus.tolist()) == {0, 1}
    everything = sample_next(logits, temperature=1.0, generator=g)
    assert set(everything.tolist()) == {0, 1, 2, 3}
    assert sample_next(logits[:1], temperature=0.0).tolist() == [0]


def test_generate_rejects_bad_arguments():
    model = GPT2(GPT2Config.from_name("tiny", n_positions=16)).eval()
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, 3, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="exceed the context of 16"):
        generate(model, ids, 14)  # the 13th new token would be fed back at position 16
    assert generate(model, ids, 13, eos_id=None).shape == (2, 13)  # the last token is never fed back
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, 0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, 2, temperature=1.0, top_p=0.0)
