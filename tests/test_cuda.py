"""GPU checks of the CUDA code paths, which CI (CPU only) never runs.

On CUDA, F.scaled_dot_product_attention takes its flash / memory-efficient kernels (with and without
dropout), the chunked linear cross-entropy runs cuBLAS matmuls, autocast and fp16 training with a
GradScaler become possible, and NF4 quantization, LoRA and the KV cache run on the device. Each test compares
with a reference (transformers / peft on the same device, the CPU, or an uninterrupted run) and states
its tolerance.

    python -m pytest -q tests/test_cuda.py                          # on a GPU machine
    GPT2LITE_TEST_DEVICE=cpu python -m pytest -q tests/test_cuda.py  # smoke-test this file on the CPU

Every test is skipped when CUDA is not available, unless GPT2LITE_TEST_DEVICE names another device: the
CPU override runs the same tests on the CPU (fp16 training, which needs CUDA, is skipped) so that the
tests' own logic can be checked without a GPU. It checks the tests, not the CUDA kernels.

Needs torch, transformers, peft, safetensors; not datasets, rouge-score or sacrebleu (nothing used here
imports them), nor ../shared/data.
"""

import copy
import math
import os

import pytest
import torch

DEVICE = os.environ.get("GPT2LITE_TEST_DEVICE", "cuda")
DEVICE_TYPE = torch.device(DEVICE).type
ON_CUDA = DEVICE_TYPE == "cuda"
if ON_CUDA:
    # Bit-exact resume needs deterministic cuBLAS, whose workspace size is fixed when cuBLAS is first used:
    # set at import, i.e. at collection, before any test of the session touches the GPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from conftest import hf_gpt2_config  # noqa: E402

from gpt2lite import GPT2, GPT2Config, generate  # noqa: E402
from gpt2lite.model.architectures import ARCHITECTURES  # noqa: E402
from gpt2lite.training.checkpoint import load_checkpoint  # noqa: E402
from gpt2lite.peft import LoRALinear, add_lora, load_adapter, save_adapter  # noqa: E402
from gpt2lite.quantization import quantize_nf4  # noqa: E402
from gpt2lite.peft.lora.add import lora_trainable_parameters  # noqa: E402
from gpt2lite.quantization.nf4 import dequantize_nf4_tensor, quantize_nf4_tensor  # noqa: E402
from gpt2lite.training.config import TrainConfig  # noqa: E402
from gpt2lite.training.loop import train
from helpers import TOKENS, batch  # noqa: E402
from train_helpers import (Crash, collate_lm, crash_at, lm_examples, pattern_examples, resume_config,  # noqa: E402
                           tiny_model)

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (GPT2LITE_TEST_DEVICE=cpu runs these tests on the CPU)")]
if not ON_CUDA:
    pytestmark.append(pytest.mark.usefixtures("one_thread"))  # see conftest.py

TRANSPOSED = ARCHITECTURES["gpt2"].transposed  # HF Conv1D weights, stored (in, out)
PAD = 50256

# Tolerances. Errors are measured relative to the reference's largest magnitude (its max |logit| or, per
# parameter, its max |gradient|), so that one number fits the tiny and the 124M model.
#
# float32: TF32 is off (ieee_fp32_matmuls below), so both stacks compute in IEEE float32 and differ only in
# the order of their sums (other kernels, chunked loss vs full logits): measured on the CPU <= 7e-7 for
# logits (124M included) and <= 6e-7 for gradients. 1e-5 and 1e-4 leave 10-100x room for the GPU's kernels;
# a real error (a wrong mask, scale, position or transpose) is of order 1e-2 or more.
FP32_LOGITS_RTOL = 1e-5
FP32_GRAD_RTOL = 1e-4
FP32_LOSS_ATOL = 2e-5  # a loss near ln(50257) = 10.8: a few float32 roundings; measured 1e-6 on the CPU
# bfloat16 keeps 8 significant bits: one rounding moves a value by up to 2^-8 (0.4%) of it, and the two
# stacks round at different points through the layers. Measured on the CPU (autocast): tiny 0.4% (a
# single rounding of the bf16 logits), 124M 1.0%; gradients (max error / max) 0.9%, loss 5e-5.
BF16_LOGITS_RTOL = 4e-2
BF16_GRAD_RTOL = 5e-2
BF16_LOSS_ATOL = 1e-2


@pytest.fixture(autouse=True)
def ieee_fp32_matmuls():
    """float32 matmuls in full float32 (PyTorch's default; set here in case the environment allows TF32,
    whose 10-bit mantissa would need float32 tolerances a hundred times looser)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.fixture
def deterministic():
    """Deterministic kernels (embedding and index backward, flash / memory-efficient attention backward,
    cuBLAS with a fixed workspace): the same inputs give the same bits. An op without a deterministic
    implementation raises instead of silently breaking bit-exactness."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def autocast(precision: str):
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(DEVICE_TYPE, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def hf_lm(directory):
    return transformers.GPT2LMHeadModel.from_pretrained(str(directory)).to(DEVICE).eval()


def ours_lm(directory):
    return GPT2.from_pretrained(str(directory), device=DEVICE).eval()


def padded_batch(B, T, seed, padding=None, vocab=50000):
    """test_hf's batch on DEVICE: random ids (B, T) below the pad id and a mask (B, T), row 0 full, row r
    padded with 3r pad tokens on the left or the right."""
    ids, mask = batch(B, T, seed, padding, vocab)
    return ids.to(DEVICE), mask.to(DEVICE)


def positions_of(mask):
    """Positions counted from each row's first real token (left padding gets position 0), as generate does."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def rel_max_diff(got, want, where=None):
    """max |got - want| / max |want|, over the positions `where` (a bool mask over the leading dims) if given.

    Only real tokens are compared: a padding query's output is never used, and is implementation-defined
    (gpt2lite lets it attend to itself so that nothing is NaN; transformers has its own convention)."""
    got, want = got.float(), want.float()
    if where is not None:
        got, want = got[where], want[where]
    return ((got - want).abs().max() / want.abs().max()).item()


def training_labels(ids, mask):
    """-100 at padding and at each row's first real token (predicted from a padding position, whose output
    is meaningless), the token elsewhere: what a correct left-padded batch labels."""
    first_real = (mask.cumsum(-1) == 1) & (mask == 1)
    return ids.masked_fill((mask == 0) | first_real, -100)


# ------------------------------------------------------------------------------------------ 1. logits


def check_logits_against_transformers(ours, theirs, ids, mask):
    """float32 logits against transformers' on the same device; then both under bf16 autocast, against each
    other and against the float32 logits."""
    kwargs = {} if mask is None else dict(attention_mask=mask, position_ids=positions_of(mask))
    real = None if mask is None else mask.bool()
    with torch.no_grad():
        want = theirs(ids, **kwargs).logits
        got = ours(ids, **kwargs)
        with autocast("bf16"):
            want_bf16 = theirs(ids, **kwargs).logits
            got_bf16 = ours(ids, **kwargs)
    assert got.device.type == DEVICE_TYPE and got.dtype == torch.float32
    assert torch.isfinite(got).all()  # every position, padding included
    error = rel_max_diff(got, want, real)
    assert error <= FP32_LOGITS_RTOL, f"float32 logits differ from transformers' by {error:.2e} of the max"
    assert got_bf16.dtype == want_bf16.dtype == torch.bfloat16  # autocast really ran the LM head in bf16
    assert not torch.equal(got_bf16.float(), got)
    pair = rel_max_diff(got_bf16, want_bf16, real)
    assert pair <= BF16_LOGITS_RTOL, f"bf16 logits differ from transformers' bf16 logits by {pair:.2e}"
    for name, logits in (("gpt2lite", got_bf16), ("transformers", want_bf16)):
        error = rel_max_diff(logits, want, real)
        assert error <= BF16_LOGITS_RTOL, f"{name}'s bf16 logits differ from the fp32 logits by {error:.2e}"


@pytest.mark.parametrize("padding", [None, "left"])
def test_tiny_logits_match_transformers_fp32_and_bf16(tiny_hf_dir, padding):
    ids, mask = padded_batch(B=3, T=16, seed=0, padding=padding)
    check_logits_against_transformers(ours_lm(tiny_hf_dir), hf_lm(tiny_hf_dir), ids,
                                      None if padding is None else mask)


@pytest.mark.parametrize("padding", [None, "left"])
def test_gpt2_124m_logits_match_transformers_fp32_and_bf16(gpt2_124m_hf, padding):
    directory, _ = gpt2_124m_hf  # the fixture's model stays on the CPU for the other test files
    ours = ours_lm(directory)
    assert ours.config == GPT2Config.from_name("gpt2")
    ids, mask = padded_batch(B=2, T=16, seed=3, padding=padding)
    check_logits_against_transformers(ours, hf_lm(directory), ids, None if padding is None else mask)


# --------------------------------------------------------------------------------- 2. loss and gradients


def unpadded_batch():
    """No padding (SDPA's causal path without a mask: flash in bf16, memory-efficient in fp32), half of the
    positions unlabelled."""
    ids, _ = padded_batch(B=4, T=32, seed=8)
    dropped = torch.rand(ids.shape, generator=torch.Generator().manual_seed(9)) < 0.5
    return ids, None, ids.masked_fill(dropped.to(DEVICE), -100)


def left_padded_lm_batch():
    """Left padding (a boolean mask for SDPA), and a third of the other positions unlabelled."""
    ids, mask = padded_batch(B=4, T=32, seed=5, padding="left")
    labels = training_labels(ids, mask)
    dropped = torch.rand(ids.shape, generator=torch.Generator().manual_seed(6)) < 0.3
    return ids, mask, labels.masked_fill(dropped.to(DEVICE), -100)


def summarization_batch():
    """Right padding (as tasks.batching.collate pads) and labels only on each row's last real tokens (the
    summary after an unlabelled prompt): rows of 32, 29, 26, 23 tokens with summaries of 4, 6, 8, 10."""
    ids, mask = padded_batch(B=4, T=32, seed=7, padding="right")
    labels = torch.full_like(ids, -100)
    for row in range(ids.size(0)):
        end = int(mask[row].sum())
        start = end - (4 + 2 * row)
        labels[row, start:end] = ids[row, start:end]
    return ids, mask, labels


BATCHES = {"unpadded": unpadded_batch, "left_padded": left_padded_lm_batch, "summarization": summarization_batch}


def loss_and_gradients(model, batch, precision, hf: bool, loss_scale: float = 1.0):
    """The loss and {name: gradient} (in gpt2lite's layout) of one forward and backward pass."""
    ids, mask, labels = batch
    model.zero_grad(set_to_none=True)
    with autocast(precision):
        out = model(ids, attention_mask=mask, labels=labels)
        loss = out.loss if hf else out
    (loss.float() * loss_scale).backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.t() if hf and name.endswith(TRANSPOSED) else p.grad
        grads[name] = grad.float() / loss_scale
    return loss.item(), grads


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("batch_name", sorted(BATCHES))
def test_loss_and_every_gradient_match_transformers(tiny_hf_dir, batch_name, precision):
    """The chunked linear cross-entropy (gradients formed in its forward) and SDPA's backward on the device,
    against transformers' full logits and autograd: the loss and every parameter's gradient (the tied wte
    collects the embedding and LM-head gradients in both). Eval mode: dropout off, gradients still flow."""
    batch = BATCHES[batch_name]()
    loss, grads = loss_and_gradients(ours_lm(tiny_hf_dir), batch, precision, hf=False)
    want_loss, want_grads = loss_and_gradients(hf_lm(tiny_hf_dir), batch, precision, hf=True)
    loss_atol, grad_rtol = (FP32_LOSS_ATOL, FP32_GRAD_RTOL) if precision == "fp32" else (BF16_LOSS_ATOL,
                                                                                           BF16_GRAD_RTOL)
    assert math.isfinite(loss) and abs(loss - want_loss) <= loss_atol, (loss, want_loss)
    assert grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        assert grads[name].device.type == DEVICE_TYPE
        error = rel_max_diff(grads[name], want)
        assert error <= grad_rtol, f"{name}: gradient differs from transformers' by {error:.2e} of its max"


def test_fp16_scaled_gradients_match_transformers(tiny_hf_dir):
    """fp16 training as train() does it: autocast, and backward of the loss times the GradScaler's initial
    scale (2^16), gradients divided by it. (A regression test: the LM head's loss once formed its logits'
    gradients in float16 in the forward pass, before the scale, and lost those below float16's range.) Compared on the wte rows that are no input and no target, whose
    gradient is the LM head's softmax term alone (the one fp16 underflow hits), and on every parameter.

    Tolerance: transformers under the same fp16 scheme is 4e-4 (norm) from float32 on those rows and 8e-4
    elsewhere (measured on the CPU); 1e-2 is 10x that."""
    if not ON_CUDA and not torch.amp.autocast_mode.is_autocast_available(DEVICE_TYPE):
        pytest.skip(f"no fp16 autocast on {DEVICE_TYPE}")
    ids = padded_batch(B=4, T=64, seed=3)[0]
    batch = (ids, None, ids)
    precision = "fp16"
    _, grads = loss_and_gradients(ours_lm(tiny_hf_dir), batch, precision, hf=False, loss_scale=2.0 ** 16)
    _, want_grads = loss_and_gradients(hf_lm(tiny_hf_dir), batch, precision, hf=True, loss_scale=2.0 ** 16)
    untouched = torch.ones(50257, dtype=torch.bool, device=DEVICE)
    untouched[ids.flatten()] = False
    got, want = grads["transformer.wte.weight"][untouched], want_grads["transformer.wte.weight"][untouched]
    error = ((got - want).norm() / want.norm()).item()
    assert error <= 1e-2, f"LM-head gradient on non-target rows differs from transformers' by {error:.1%} (norm)"
    for name, want in want_grads.items():
        error = ((grads[name] - want).norm() / want.norm()).item()
        assert error <= 1e-2, f"{name}: fp16 gradient differs from transformers' by {error:.2e} (norm)"


# ------------------------------------------------------------------------------------------ 3. dropout


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_dropout_in_train_mode(precision):
    """Attention dropout alone (the SDPA kernels' own dropout on CUDA: memory-efficient in fp32, flash in
    bf16): active in train mode, finite loss and gradients, reproducible from a seed; also with a padding
    mask."""
    torch.manual_seed(0)
    config = GPT2Config.from_name("tiny").replace(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.1)
    model = GPT2(config).to(DEVICE).train()
    ids, mask = padded_batch(B=2, T=32, seed=1)

    def loss_of(seed=None, **kwargs):
        if seed is not None:
            torch.manual_seed(seed)  # seeds the CUDA generator too
        with autocast(precision):
            return model(ids, labels=ids, **kwargs)

    first, second = loss_of(), loss_of()
    assert math.isfinite(first.item()) and math.isfinite(second.item())
    assert first.item() != second.item()  # a new dropout mask each call
    model.eval()
    without_dropout = loss_of()
    assert loss_of().item() == without_dropout.item() != first.item()
    model.train()
    a, b = loss_of(seed=123), loss_of(seed=123)
    assert torch.equal(a, b)  # the same seed draws the same mask
    a.backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().max() > 0
    model.zero_grad(set_to_none=True)
    ids, mask = padded_batch(B=3, T=24, seed=2, padding="left")  # a boolean mask with dropout
    with autocast(precision):
        loss = model(ids, attention_mask=mask, labels=training_labels(ids, mask))
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------ 4. training loop


def train_config(output_dir, **overrides):
    return TrainConfig(**{**dict(output_dir=str(output_dir), device=DEVICE, lr=3e-3, batch_size=8, epochs=None,
                                 max_steps=30, warmup_steps=3, clip=1.0, eval_each_epoch=False,
                                 progress_bar=False), **overrides})


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_on_device_in_each_precision(tmp_path, precision):
    """30 steps of gpt2lite.training.loop on a learnable corpus: every loss finite, and the last five average below
    half the first (measured on the CPU: 4.57 -> 1.4 in fp32); bf16 and fp16 close to fp32 at the first step
    (the same weights and batch: only the autocast rounding differs); fp16 with an enabled GradScaler."""
    if precision == "fp16" and not ON_CUDA:
        pytest.skip("fp16 training needs CUDA (a GradScaler)")
    model = tiny_model(0)
    summary = train(model, pattern_examples(16), train_config(tmp_path / precision, precision=precision),
                    collate_fn=collate_lm)
    losses = [loss for _, loss in summary["history"]["train"]]
    assert len(losses) == 30 and all(math.isfinite(loss) for loss in losses), losses
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert all(p.device.type == DEVICE_TYPE for p in model.parameters())
    assert summary["peak_memory_mb"] > 0 and summary["skipped_steps"] == 0
    scaler = load_checkpoint(str(tmp_path / precision / "checkpoint.pt"))["scaler"]
    if precision == "fp16":
        # the GradScaler was enabled: its state (a disabled scaler saves {}) holds a finite positive scale
        assert scaler.get("scale", 0) > 0 and math.isfinite(scaler["scale"]), scaler
    else:
        assert scaler == {}
    if precision != "fp32":
        reference = train(tiny_model(0), pattern_examples(16), train_config(tmp_path / "fp32", max_steps=1),
                          collate_fn=collate_lm)["history"]["train"][0][1]
        assert losses[0] != reference  # autocast really ran
        assert abs(losses[0] - reference) < 0.05, (losses[0], reference)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_on_device_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, deterministic, precision):
    """As tests/training/test_resume.py, on the device: dropout on, a crash at step 5, resumed from the step-3
    checkpoint into a model with other weights; losses, validation losses and final weights equal those of
    the uninterrupted run exactly. Exact because the kernels are deterministic (fixture) and the checkpoint
    restores the CUDA generator that draws the dropout masks."""
    data, eval_data = lm_examples(10), lm_examples(3, seed=1)

    def config(name, **overrides):
        return resume_config(tmp_path / name, device=DEVICE, precision=precision, **overrides)

    model_a = tiny_model(0, dropout=0.1)
    a = train(model_a, data, config("a"), eval_dataset=eval_data, collate_fn=collate_lm)
    with pytest.raises(Crash):
        train(tiny_model(0, dropout=0.1), data, config("b"), eval_dataset=eval_data, collate_fn=collate_lm,
              on_log=crash_at(5))
    checkpoint = load_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))
    assert checkpoint["state"]["step"] == 3
    if ON_CUDA:
        assert "cuda" in checkpoint["rng"][0]  # the dropout RNG of the GPU is saved
    model_b = tiny_model(5, dropout=0.1)
    b = train(model_b, data, config("b", resume_from=str(tmp_path / "b" / "checkpoint.pt")),
              eval_dataset=eval_data, collate_fn=collate_lm)
    assert [s for s, _ in b["history"]["train"]] == list(range(1, 9))
    assert b["history"]["train"] == a["history"]["train"], (a["history"]["train"], b["history"]["train"])
    assert b["history"]["val"] == a["history"]["val"]
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert pb.device.type == DEVICE_TYPE
        assert torch.equal(pa, pb), f"{name}: max difference {(pa - pb).abs().max().item():.2e}"
    # and dropout really was on: without it the first loss differs
    c = train(tiny_model(0), data, config("c", max_steps=1, eval_every=None), collate_fn=collate_lm)
    assert c["history"]["train"][0] != a["history"]["train"][0]


# ------------------------------------------------------------------------------------------ 5. NF4 / QLoRA


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_quantization_on_device_equals_the_cpu(double_quant):
    """The 4-bit codes are computed by exact operations (block absmax, IEEE division, bucketize against the
    same midpoints), so they are bit-identical on both devices, as are plain absmax constants. Double
    quantization centres the constants on their float32 mean, a reduction summed in another order on the
    GPU (a rounding or two apart): only a constant within that rounding of a midpoint of the 8-bit map can
    move to the neighbouring level."""
    torch.manual_seed(0)
    weight = torch.randn(768, 768) * 0.02  # 9216 blocks of 64, 36 blocks of 256 constants
    cpu = quantize_nf4_tensor(weight, double_quant)
    device = quantize_nf4_tensor(weight.to(DEVICE), double_quant)
    assert device.packed.device.type == DEVICE_TYPE
    assert torch.equal(device.packed.cpu(), cpu.packed)
    if not double_quant:
        assert torch.equal(device.absmax.cpu(), cpu.absmax)
        assert torch.equal(dequantize_nf4_tensor(device).cpu(), dequantize_nf4_tensor(cpu))
        return
    got, want = device.quantized_absmax, cpu.quantized_absmax
    torch.testing.assert_close(got.offset.cpu(), want.offset, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.scale.cpu(), want.scale, rtol=1e-5, atol=0)
    step = (got.codes.cpu().long() - want.codes.long()).abs()
    assert step.max() <= 1 and int((step > 0).sum()) <= want.codes.numel() // 1000, int((step > 0).sum())


def test_nf4_model_on_device(tiny_hf_dir):
    """quantize_nf4 on a model on the device keeps every buffer there; a model quantized on the CPU and moved
    to the device dequantizes to the CPU's weights exactly and gives the CPU's logits (float32 tolerance)."""
    ids = padded_batch(B=2, T=16, seed=4)[0]
    on_device = ours_lm(tiny_hf_dir)
    names = quantize_nf4(on_device)
    assert len(names) == 8
    for module in on_device.modules():
        for buffer in module.buffers(recurse=False):
            assert buffer.device.type == DEVICE_TYPE
    on_cpu = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    quantize_nf4(on_cpu)
    moved = copy.deepcopy(on_cpu).to(DEVICE)
    for name in names:
        cpu_weight = on_cpu.get_submodule(name).dequantize()
        assert torch.equal(moved.get_submodule(name).dequantize().cpu(), cpu_weight), name
        packed = on_device.get_submodule(name).weight_packed
        assert torch.equal(packed.cpu(), on_cpu.get_submodule(name).weight_packed), name
    with torch.no_grad():
        want = on_cpu(ids.cpu())
        got = moved(ids)
        quantized_here = on_device(ids)
    assert rel_max_diff(got.cpu(), want) <= FP32_LOGITS_RTOL
    assert torch.isfinite(quantized_here).all()
    assert rel_max_diff(quantized_here.cpu(), want) <= 1e-2  # at most a few constants one 8-bit level apart


def test_qlora_bf16_training_on_device_keeps_the_4bit_weights(tmp_path):
    """QLoRA as used: NF4 base computing in bf16, bf16 autocast, LoRA adapters (float32) trained by AdamW on
    a fixed batch, all on the device: the loss falls (as tests/quantization/test_nf4.py requires on the CPU: last < 0.9 x
    first, and the lowest), the packed weights, constants and frozen biases stay bit-identical."""
    torch.manual_seed(2)
    config = GPT2Config.from_name("tiny").replace(vocab_size=512, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = GPT2(config).to(DEVICE)
    quantize_nf4(model, compute_dtype=torch.bfloat16)  # quantized on the device
    add_lora(model, rank=8, alpha=16, targets=["c_attn", "c_proj", "c_fc"])
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 8 and all(m.lora_A.weight.device.type == DEVICE_TYPE for m in lora)
    assert all(m.lora_A.weight.dtype == torch.float32 for m in lora)  # adapters of a bf16 base stay float32
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    losses = []
    for _ in range(20):
        with autocast("bf16"):
            loss = model(ids, labels=ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses
    after = model.state_dict()
    assert any(k.endswith("weight_packed") for k in frozen)
    for key, value in frozen.items():
        assert torch.equal(after[key], value), key


# ----------------------------------------------------------------------------------------------- 6. LoRA

LORA_CASES = {"lora": ({}, {}), "dora_bias_all": ({"dora": True, "bias": "all"}, {"use_dora": True, "bias": "all"})}


def perturb(parameters, seed):
    """Move every trainable tensor away from its initial value (B from zero), drawn on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_((torch.randn(p.shape, generator=generator) * 0.05).to(p.device))


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_on_device_matches_peft_both_ways(tiny_hf_dir, tmp_path, case):
    """The same adapter weights in gpt2lite and peft, both on the device, through peft's file format in both
    directions (an adapter saved from device tensors, and one loaded into a model on the device): the
    logits agree to float32 rounding (FP32_LOGITS_RTOL), and differ from the base model's."""
    peft = pytest.importorskip("peft")
    ours_options, peft_options = LORA_CASES[case]
    tokens = TOKENS.to(DEVICE)
    with torch.no_grad():
        base = hf_lm(tiny_hf_dir)(input_ids=tokens).logits

    model = add_lora(ours_lm(tiny_hf_dir), rank=4, alpha=8, targets=["c_attn", "c_proj"], **ours_options)
    perturb(lora_trainable_parameters(model, ours_options.get("bias", "none")), seed=1)
    with torch.no_grad():
        expected = model(tokens)
    save_adapter(model, str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(str(tiny_hf_dir)), str(tmp_path / "ours")).to(DEVICE).eval()
    with torch.no_grad():
        got = theirs(input_ids=tokens).logits
    assert rel_max_diff(got, expected) <= FP32_LOGITS_RTOL
    assert rel_max_diff(base, expected) > 1e-3  # the adapter matters, so agreeing is meaningful

    theirs = peft.get_peft_model(hf_lm(tiny_hf_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "c_attn", "c_proj"], **peft_options))
    perturb([p for p in theirs.parameters() if p.requires_grad], seed=2)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=tokens).logits
    theirs.save_pretrained(str(tmp_path / "peft"))
    model = load_adapter(ours_lm(tiny_hf_dir), str(tmp_path / "peft"))
    assert all(p.device.type == DEVICE_TYPE for p in model.parameters())
    with torch.no_grad():
        got = model(tokens)
    assert rel_max_diff(got, expected) <= FP32_LOGITS_RTOL
    assert rel_max_diff(base, expected) > 1e-3


# ----------------------------------------------------------------------------------------- 7. generation


def left_padded_prompts(vocab, lengths, seed=0):
    """Left-padded random prompts of different lengths (ids, mask) on DEVICE, padded with PAD."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, T - n:] = torch.randint(0, vocab, (n,), generator=g)
        mask[row, T - n:] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


def test_greedy_generation_equals_transformers_for_left_padded_prompts(tiny_hf_dir):
    """Token for token (fp32): the prefill with a padding mask, then 11 single-token steps on the KV cache."""
    theirs = hf_lm(tiny_hf_dir)
    ours = ours_lm(tiny_hf_dir)
    ids, mask = left_padded_prompts(50000, lengths=(9, 4, 6, 1))
    theirs.generation_config.eos_token_id = PAD
    expected = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                               pad_token_id=PAD, eos_token_id=PAD)[:, ids.size(1):]
    got = generate(ours, ids, max_new_tokens=12, attention_mask=mask)
    assert got.shape == (4, 12) and got.device.type == DEVICE_TYPE
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory):
    """A tiny random model over 64 tokens with a wide init (0.2): its next-token distributions are peaked,
    so greedy choices are far from ties (as test_generate.py's small_vocab_pair)."""
    directory = tmp_path_factory.mktemp("peaked")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(hf_gpt2_config(vocab_size=64, initializer_range=0.2)).save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
def test_greedy_generation_runs_in_bf16(peaked_model_dir, mode):
    """Generation under bf16 autocast (float32 weights and cache) and with bf16 weights (bf16 cache): valid
    tokens, and each row's first token is the argmax of a plain forward pass in the same precision whenever
    that argmax is not a near-tie (the prefill through the cache computes the same logits)."""
    ids, mask = left_padded_prompts(64, lengths=(7, 3, 5))
    ids = ids.masked_fill(mask == 0, 0)
    if mode == "bf16_weights":
        model = GPT2.from_pretrained(str(peaked_model_dir), device=DEVICE, dtype=torch.bfloat16).eval()
        context = autocast("fp32")
    else:
        model = ours_lm(peaked_model_dir)
        context = autocast("bf16")
    with context:
        got = generate(model, ids, max_new_tokens=10, attention_mask=mask, eos_id=None)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=positions_of(mask))[:, -1].float()  # (B, V)
    assert got.shape == (3, 10) and got.dtype == torch.long and got.device.type == DEVICE_TYPE
    assert int(got.min()) >= 0 and int(got.max()) < 64
    top2 = logits.topk(2, dim=-1).values  # (B, 2)
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * top2[:, 0].abs()  # bf16 rounding is < 1% of a logit
    assert bool(clear.any())
    assert torch.equal(got[clear, 0], logits.argmax(-1)[clear])


# ------------------------------------------------------------------------------------- 8. weight tying


def test_moving_to_the_device_keeps_the_lm_head_tied(tiny_hf_dir):
    """lm_head.weight is transformer.wte.weight after .to(device), after from_pretrained(device=...), after
    a dtype change, and after an optimizer step on the device (one tensor, updated once)."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_name("tiny")).to(DEVICE)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.device.type == DEVICE_TYPE
    loaded = ours_lm(tiny_hf_dir)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight and loaded.lm_head.weight.device.type == DEVICE_TYPE
    converted = copy.deepcopy(loaded).to(torch.bfloat16).to(DEVICE)
    assert converted.lm_head.weight is converted.transformer.wte.weight
    assert converted.lm_head.weight.dtype == torch.bfloat16
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.transformer.wte.weight.detach().clone()
    ids = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    model(ids, labels=ids).backward()
    optimizer.step()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not torch.equal(model.transformer.wte.weight, before)
    assert model.lm_head.weight.grad is model.transformer.wte.weight.grad  # one gradient: head + embedding
    back = model.to("cpu")
    assert back.lm_head.weight is back.transformer.wte.weight
