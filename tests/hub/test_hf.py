"""Parity with transformers: checkpoints that transformers writes load into gpt2lite with the same logits,
loss and gradients, and checkpoints gpt2lite writes load into transformers with the same logits."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_LABELS, hf_gpt2_config

import gpt2lite
from gpt2lite import GPT2, GPT2Config, GPT2ForSequenceClassification
from gpt2lite.model.architectures import ARCHITECTURES
from helpers import batch, hf_lm

transformers = pytest.importorskip("transformers")

TRANSPOSED = ARCHITECTURES["gpt2"].transposed  # HF Conv1D weights, stored (in, out)


def hf_classifier(directory):
    return transformers.GPT2ForSequenceClassification.from_pretrained(str(directory)).eval()


def max_diff_at_real_tokens(ours, theirs, mask):
    # Only positions holding real tokens are compared. A padding query's output is never used (no loss,
    # no prediction reads it) and is implementation-defined: transformers lets it attend per its own
    # convention, gpt2lite lets it attend to itself only (so that nothing is NaN). Real tokens never attend
    # to padding in either, so they must agree.
    return (ours - theirs)[mask.bool()].abs().max().item()


# --------------------------------------------------------------------------------------------- LM parity


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_tiny_logits_match_transformers(tiny_hf_dir, padding):
    theirs_model, ours_model = hf_lm(tiny_hf_dir), GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    ids, mask = batch(padding=padding)
    with torch.no_grad():
        theirs = theirs_model(ids, attention_mask=mask).logits
        ours = ours_model(ids, attention_mask=mask)
        # positions counted from each row's first real token, passed to both
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs_pos = theirs_model(ids, attention_mask=mask, position_ids=positions).logits
        ours_pos = ours_model(ids, attention_mask=mask, position_ids=positions)
    assert ours.shape == theirs.shape == (3, 12, 50257)
    assert max_diff_at_real_tokens(ours, theirs, mask) <= 1e-5
    assert max_diff_at_real_tokens(ours_pos, theirs_pos, mask) <= 1e-5
    assert torch.isfinite(ours).all() and torch.isfinite(ours_pos).all()  # padded positions included


@pytest.fixture(scope="module")
def gpt2_124m_pair(gpt2_124m_hf):
    """(gpt2lite model, transformers model) with the same random 124M weights, both in eval mode."""
    directory, theirs_model = gpt2_124m_hf
    return GPT2.from_pretrained(str(directory)).eval(), theirs_model


@pytest.mark.parametrize("padding", [None, "left"])
def test_gpt2_124m_logits_match_transformers(gpt2_124m_pair, padding):
    ours_model, theirs_model = gpt2_124m_pair
    assert ours_model.config == GPT2Config.from_name("gpt2")
    ids, mask = batch(B=2, T=12, seed=3, padding=padding)
    with torch.no_grad():
        theirs = theirs_model(ids, attention_mask=mask).logits
        ours = ours_model(ids, attention_mask=mask)
    assert max_diff_at_real_tokens(ours, theirs, mask) <= 1e-4


def test_gpt2_124m_loss_matches_transformers(gpt2_124m_pair):
    """The training loss at 124M (gradients are compared on the tiny model, where backward is cheap)."""
    ours_model, theirs_model = gpt2_124m_pair
    ids, mask = batch(B=2, T=12, seed=4, padding="left")
    labels = training_labels(ids, mask)
    with torch.no_grad():
        theirs_loss = theirs_model(ids, attention_mask=mask, labels=labels).loss
        ours_loss = ours_model(ids, attention_mask=mask, labels=labels)
    assert abs(ours_loss.item() - theirs_loss.item()) <= 1e-5


def test_gpt2_124m_classifier_matches_transformers(gpt2_124m_hf):
    """A 124M classifier built from a plain GPT-2 checkpoint equals transformers' class with the same weights."""
    directory, theirs_lm = gpt2_124m_hf
    torch.manual_seed(0)
    ours_model = GPT2ForSequenceClassification.from_pretrained(str(directory), num_labels=NUM_LABELS).eval()
    with torch.device("meta"):  # no second random init of 124M weights: assign the same tensors
        theirs_model = transformers.GPT2ForSequenceClassification(
            transformers.GPT2Config(num_labels=NUM_LABELS, pad_token_id=50256))
    state = {k: v for k, v in theirs_lm.state_dict().items() if k.startswith("transformer.")}
    state["score.weight"] = ours_model.score.weight.detach().clone()
    theirs_model.load_state_dict(state, strict=True, assign=True)
    theirs_model.eval()
    ids, mask = batch(B=2, T=8, seed=14, padding="left")
    with torch.no_grad():
        diff = (ours_model(ids, attention_mask=mask) - theirs_model(ids, attention_mask=mask).logits).abs().max()
    assert diff.item() <= 1e-4


def training_labels(ids, mask):
    """Labels for a left-padded batch: -100 at padding and at each row's first real token.

    The first real token of a left-padded row would be predicted from the last padding position, whose
    output is meaningless (and differs between implementations), so a correct batch never labels it.
    """
    first_real = (mask.cumsum(-1) == 1) & (mask == 1)
    return ids.masked_fill((mask == 0) | first_real, -100)


def assert_same_gradients(ours_model, theirs_model, atol, rtol=1e-4):
    """Every parameter's gradient agrees, HF's Conv1D gradients transposed to nn.Linear's layout."""
    ours = dict(ours_model.named_parameters())
    theirs = dict(theirs_model.named_parameters())
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for name, p in theirs.items():
        expected = p.grad.t() if name.endswith(TRANSPOSED) else p.grad
        assert ours[name].grad is not None, name
        torch.testing.assert_close(ours[name].grad, expected, atol=atol, rtol=rtol, msg=name)


def test_tiny_loss_and_gradients_match_transformers(tiny_hf_dir):
    theirs_model, ours_model = hf_lm(tiny_hf_dir), GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    ids, mask = batch(B=4, T=16, seed=5, padding="left")
    labels = training_labels(ids, mask)
    labels[:, :5] = -100  # a prompt without targets, as in summarization
    theirs_loss = theirs_model(ids, attention_mask=mask, labels=labels).loss
    theirs_loss.backward()
    ours_loss = ours_model(ids, attention_mask=mask, labels=labels)
    ours_loss.backward()
    assert abs(ours_loss.item() - theirs_loss.item()) <= 1e-5
    assert_same_gradients(ours_model, theirs_model, atol=1e-7)


def test_training_mode_with_zero_dropout_matches_transformers(tiny_hf_dir):
    """pdrop 0 in train mode is the same computation as eval mode, in both libraries."""
    config = hf_gpt2_config(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    theirs_model = transformers.GPT2LMHeadModel.from_pretrained(str(tiny_hf_dir), config=config).train()
    loaded = GPT2.from_pretrained(str(tiny_hf_dir))
    ours_model = GPT2(loaded.config.replace(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)).train()
    ours_model.load_state_dict(loaded.state_dict())
    ids, mask = batch(B=2, T=10, seed=6, padding="right")
    labels = ids.masked_fill(mask == 0, -100)
    theirs_model(ids, attention_mask=mask, labels=labels).loss.backward()
    ours_loss = ours_model(ids, attention_mask=mask, labels=labels)
    ours_loss.backward()
    assert_same_gradients(ours_model, theirs_model, atol=1e-7)


# ------------------------------------------------------------------------------------ classification parity


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_classifier_logits_loss_gradients_match_transformers(tiny_hf_classifier_dir, padding):
    theirs_model = hf_classifier(tiny_hf_classifier_dir)
    ours_model = GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir)).eval()
    assert ours_model.num_labels == NUM_LABELS and ours_model.config.pad_token_id == 50256
    ids, mask = batch(B=3, T=10, seed=7, padding=padding)
    labels = torch.tensor([0, 7, 19])
    theirs_out = theirs_model(ids, attention_mask=mask, labels=labels)
    ours_logits = ours_model(ids, attention_mask=mask)
    assert ours_logits.shape == (3, NUM_LABELS)
    assert (ours_logits - theirs_out.logits).abs().max().item() <= 1e-5
    # without a mask both find the last real token from pad_token_id
    with torch.no_grad():
        no_mask_diff = (ours_model(ids) - theirs_model(ids).logits).abs().max().item()
    assert no_mask_diff <= 1e-5
    theirs_out.loss.backward()
    ours_loss = ours_model(ids, attention_mask=mask, labels=labels)
    ours_loss.backward()
    assert abs(ours_loss.item() - theirs_out.loss.item()) <= 1e-5
    assert_same_gradients(ours_model, theirs_model, atol=1e-7)


def test_classifier_built_from_plain_gpt2_checkpoint(tiny_hf_dir, tmp_path):
    torch.manual_seed(0)
    ours_model = GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_dir), num_labels=NUM_LABELS).eval()
    assert ours_model.score.weight.shape == (NUM_LABELS, 64)
    assert torch.isfinite(ours_model.score.weight).all() and ours_model.score.weight.std() > 0
    body = transformers.GPT2Model.from_pretrained(str(tiny_hf_dir)).eval()
    ids, mask = batch(B=3, T=10, seed=8, padding="left")
    with torch.no_grad():
        hidden = body(ids, attention_mask=mask).last_hidden_state  # left padding: last token at T-1
        expected = ours_model.score(hidden[:, -1])
        ours = ours_model(ids, attention_mask=mask)
    assert (ours - expected).abs().max().item() <= 1e-5
    # and transformers reads what gpt2lite saves (pad id set, as HF needs it for batches)
    ours_model.save_pretrained(str(tmp_path))
    theirs_model = hf_classifier(tmp_path)
    theirs_model.config.pad_token_id = 50256
    with torch.no_grad():
        assert (theirs_model(ids, attention_mask=mask).logits - ours).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------- round trips


def test_gpt2lite_checkpoint_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    ours_model = GPT2(GPT2Config.from_name("tiny")).eval()
    ours_model.save_pretrained(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    theirs_model = hf_lm(tmp_path)
    ids, mask = batch(B=2, T=9, seed=9, padding="left")
    with torch.no_grad():
        diff = max_diff_at_real_tokens(ours_model(ids, attention_mask=mask),
                                       theirs_model(ids, attention_mask=mask).logits, mask)
    assert diff <= 1e-5
    reloaded = GPT2.from_pretrained(str(tmp_path))
    for name, tensor in ours_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight


def test_gpt2lite_classifier_round_trip(tiny_hf_classifier_dir, tmp_path):
    ours_model = GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir)).eval()
    ours_model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and len(config["id2label"]) == NUM_LABELS
    theirs_model = hf_classifier(tmp_path)
    ids, mask = batch(B=3, T=8, seed=10, padding="left")
    with torch.no_grad():
        assert (theirs_model(ids, attention_mask=mask).logits - ours_model(ids, attention_mask=mask)).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------- weight formats


def _reference_logits(directory, ids):
    with torch.no_grad():
        return hf_lm(directory)(ids).logits


def _assert_loads_like(directory, reference_dir):
    ids, _ = batch(B=2, T=8, seed=11, padding=None)
    with torch.no_grad():
        ours = GPT2.from_pretrained(str(directory)).eval()(ids)
    assert (ours - _reference_logits(reference_dir, ids)).abs().max().item() <= 1e-5


def _copy_config(src, dst):
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_pytorch_model_bin_loads(tiny_hf_dir, tmp_path):
    _copy_config(tiny_hf_dir, tmp_path)
    torch.save(hf_lm(tiny_hf_dir).state_dict(), tmp_path / "pytorch_model.bin")
    _assert_loads_like(tmp_path, tiny_hf_dir)


def test_sharded_safetensors_loads(tiny_hf_dir, tmp_path):
    hf_lm(tiny_hf_dir).save_pretrained(str(tmp_path), max_shard_size="1MB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "model.safetensors.index.json").exists()
    _assert_loads_like(tmp_path, tiny_hf_dir)


def test_sharded_pytorch_bin_loads(tiny_hf_dir, tmp_path):
    _copy_config(tiny_hf_dir, tmp_path)
    state = hf_lm(tiny_hf_dir).state_dict()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in part}, tmp_path / name)
        weight_map.update({k: name for k in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_loads_like(tmp_path, tiny_hf_dir)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_bare_gpt2model_keys_with_attention_buffers_load(tiny_hf_dir, tmp_path, fmt):
    """Like the hub's gpt2 checkpoint: GPT2Model keys (no 'transformer.' prefix) plus attn.bias buffers."""
    from safetensors.torch import save_file

    _copy_config(tiny_hf_dir, tmp_path)
    body = transformers.GPT2Model.from_pretrained(str(tiny_hf_dir))
    state = {k: v.contiguous() for k, v in body.state_dict().items()}
    n_positions = body.config.n_positions
    for i in range(body.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, n_positions)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert not any(k.startswith("transformer.") for k in state)
    if fmt == "safetensors":
        save_file(state, str(tmp_path / "model.safetensors"))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    _assert_loads_like(tmp_path, tiny_hf_dir)


# ----------------------------------------------------------------------------------------- dtype and device


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bfloat16", torch.float32])
def test_from_pretrained_dtype_and_device(tiny_hf_dir, dtype):
    reference = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    model = GPT2.from_pretrained(str(tiny_hf_dir), dtype=dtype, device="cpu").eval()
    want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert {p.dtype for p in model.parameters()} == {want}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.lm_head.weight is model.transformer.wte.weight
    ids, mask = batch(B=2, T=8, seed=12, padding="left")
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask)
        got = model(ids, attention_mask=mask).float()
    # the weights are the same ones, rounded: the logits agree to the dtype's precision
    tolerance = 1e-6 if want == torch.float32 else 0.05 * expected.abs().max().item()
    assert max_diff_at_real_tokens(got, expected, mask) <= tolerance
    assert torch.isfinite(got).all()


def test_from_pretrained_on_meta_device_allocates_nothing(tiny_hf_dir):
    model = GPT2.from_pretrained(str(tiny_hf_dir), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert gpt2lite.count_parameters(model)[1] == sum(
        p.numel() for p in hf_lm(tiny_hf_dir).parameters())


def test_transformers_and_gpt2lite_configs_agree(tiny_hf_dir):
    ours = GPT2.from_pretrained(str(tiny_hf_dir)).config
    theirs = hf_gpt2_config()
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon",
                 "activation_function", "resid_pdrop", "embd_pdrop", "attn_pdrop", "eos_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_labels_loss_uses_only_labelled_positions_like_full_logits(tiny_hf_dir):
    """The label-positions-only loss equals cross-entropy over the full logits, and so do the gradients."""
    model = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    ids, mask = batch(B=3, T=14, seed=13, padding="left")
    labels = training_labels(ids, mask)
    labels[:, :6] = -100
    loss = model(ids, attention_mask=mask, labels=labels)
    loss.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids, attention_mask=mask)
    full = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    full.backward()
    assert abs(loss.item() - full.item()) <= 1e-5
    for name, p in model.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, atol=1e-7, rtol=1e-5, msg=name)
