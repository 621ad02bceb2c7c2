"""bf16 autocast on the CPU: gpt2lite against transformers + peft under the same torch.autocast("cpu",
torch.bfloat16), against its own float32 path, attention with dropout, and precision="auto".

Tolerance. bf16 keeps 8 significant bits: one rounding moves a value by up to 2^-9 (0.2 %) of itself, and the
two stacks round in different places (gpt2lite's chunked loss, its attention, the order of sums), so their
results cannot agree more closely than bf16 autocast moves the reference away from its own float32 result.
That distance, measured in each test, is the yardstick: gpt2lite must be within BF16_SLACK times it (plus a
small floor for values that bf16 happens to barely move). Measured on the tiny model: gradients 0.5 % apart
from the reference's (relative norm), at most 0.97 times the yardstick; losses 1.3e-5 (relative) apart. A path that left bf16 (ran in float32) or
rounded more (a softmax or a loss in bf16) would show up as a loss equal to float32's or an error several
times the yardstick.
"""

import json

import pytest
import torch

from gpt2lite import GPT2
from gpt2lite.kernels.attention import dropout_attention
from gpt2lite.peft import add_lora, load_adapter
from gpt2lite.training.precision import cpu_has_native_bf16, resolve_precision
from gpt2lite.training.config import TrainConfig
from gpt2lite.training.loop import train

BF16_SLACK = 2.0
FLOOR = 2e-3  # relative gradient error below which any two bf16 computations count as equal (about 2^-9)
LOSS_FLOOR = 2.5e-4  # relative: an eighth of one bf16 rounding (2^-9), so a loss reduced in bf16 would fail
LORA_TARGETS = ["c_attn", "c_proj"]
CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # stored (in, out) by transformers


def batch(seed=0, B=2, T=24):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50257, (B, T), generator=generator)
    labels = ids.masked_fill(torch.rand(B, T, generator=generator) > 0.7, -100)
    return ids, labels


def loss_and_grads(model, bf16: bool, hf: bool):
    """(loss, {name: grad in gpt2lite's layout}) of one forward/backward, under bf16 autocast or not."""
    model.zero_grad(set_to_none=True)
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=labels).loss if hf else model(ids, labels=labels)
    loss.backward()
    grads = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            continue
        name = name.removeprefix("base_model.model.").replace(".default", "")
        grad = parameter.grad
        if hf and name.endswith(CONV1D):
            grad = grad.t()
        grads[name] = grad
    return loss.item(), grads


def relative_error(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


def check_against_reference(ours_model, hf_model):
    """gpt2lite under bf16 autocast is as close to transformers(+peft) under bf16 as bf16 itself moves
    transformers from float32; and it really ran in bf16 (its loss moved from its own float32 loss)."""
    hf32_loss, hf32 = loss_and_grads(hf_model, bf16=False, hf=True)
    hf16_loss, hf16 = loss_and_grads(hf_model, bf16=True, hf=True)
    ours32_loss, ours32 = loss_and_grads(ours_model, bf16=False, hf=False)
    ours16_loss, ours16 = loss_and_grads(ours_model, bf16=True, hf=False)
    assert abs(ours32_loss - hf32_loss) < 1e-5  # the same weights: float32 agrees exactly
    assert ours16_loss != ours32_loss  # autocast reached gpt2lite's matmuls
    loss_yardstick = abs(hf16_loss - hf32_loss)
    assert abs(ours16_loss - hf16_loss) <= BF16_SLACK * loss_yardstick + LOSS_FLOOR * abs(hf32_loss)
    assert abs(ours16_loss - ours32_loss) <= BF16_SLACK * loss_yardstick + LOSS_FLOOR * abs(hf32_loss)
    assert sorted(ours16) == sorted(hf16) and ours16
    for name, grad in ours16.items():
        assert grad.dtype == torch.float32, name  # float32 parameters get float32 gradients
        yardstick = relative_error(hf16[name], hf32[name])
        assert relative_error(grad, hf16[name]) <= BF16_SLACK * yardstick + FLOOR, name
        assert relative_error(grad, ours32[name]) <= BF16_SLACK * yardstick + FLOOR, name
    return ours16


def test_full_finetuning_loss_and_every_gradient_match_transformers_under_bf16(tiny_hf_dir):
    import transformers

    hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(tiny_hf_dir)).eval()
    check_against_reference(GPT2.from_pretrained(str(tiny_hf_dir)).eval(), hf_model)


def test_lora_loss_and_adapter_gradients_match_peft_under_bf16(tiny_hf_dir, tmp_path):
    """LoRA on c_attn and both c_proj, B perturbed so that A gets gradients; adapters stay float32."""
    import peft
    import transformers

    hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(tiny_hf_dir))
    theirs = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                                           fan_in_fan_out=True))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(GPT2.from_pretrained(str(tiny_hf_dir)), str(tmp_path))
    grads = check_against_reference(ours.eval(), theirs.eval())
    assert len(grads) == 2 * 3 * 2  # lora_A and lora_B of 3 layers in 2 blocks: the base is frozen
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "lora_" in n)


def test_bf16_base_keeps_float32_adapters_as_peft_does(tiny_hf_dir):
    """peft's autocast_adapter_dtype: a bf16 model's LoRA weights are float32, and its forward runs."""
    model = add_lora(GPT2.from_pretrained(str(tiny_hf_dir), dtype="bfloat16"), rank=4, alpha=8,
                     targets=LORA_TARGETS)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=labels).backward()
    assert layer.lora_B.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("causal", [True, False])
def test_dropout_attention_under_autocast_matches_float32_attention_of_the_bf16_inputs(causal):
    """Under autocast, dropout_attention takes bf16 q, k, v like scaled_dot_product_attention; its output and
    gradients equal float32 textbook attention (same dropout mask) on those inputs to bf16 precision, and
    the mask is the same draw as in float32."""
    B, NH, T, HS, dropout, scale = 2, 3, 16, 8, 0.25, 8 ** -0.5
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, NH, T, HS, generator=generator).requires_grad_() for _ in range(3))
    grad_out = torch.randn(B, NH, T, HS, generator=generator)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    mask = None if causal else (allowed | torch.eye(T, dtype=torch.bool)).expand(B, 1, T, T)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dropout_attention(q, k, v, mask, causal, dropout, scale)
    assert out.dtype == torch.bfloat16
    out.backward(grad_out.bfloat16())
    ours = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
    torch.manual_seed(1)
    keep = torch.rand(B, NH, T, T) >= dropout  # the function's one random draw, in float32 as it draws
    rounded = [t.detach().bfloat16().float().requires_grad_() for t in (q, k, v)]
    scores = (rounded[0] @ rounded[1].transpose(-2, -1) * scale).masked_fill(~allowed, float("-inf"))
    want_out = (scores.softmax(-1) * keep / (1 - dropout)) @ rounded[2]
    want_out.backward(grad_out.bfloat16().float())
    want = [want_out.detach()] + [t.grad for t in rounded]
    for got, expected in zip(ours, want):
        assert relative_error(got, expected) < 1e-2  # a few bf16 roundings (2^-9 each) deep


def test_train_in_bf16_tracks_fp32_and_auto_follows_the_hardware(tiny_hf_dir, tmp_path, caplog, monkeypatch):
    from train_helpers import collate_lm, lm_examples

    def run(name, precision):
        config = TrainConfig(output_dir=str(tmp_path / name), batch_size=2, max_steps=3, lr=1e-3,
                             precision=precision, progress_bar=False, device="cpu")
        return train(GPT2.from_pretrained(str(tiny_hf_dir)), lm_examples(6), config, collate_fn=collate_lm)

    fp32, bf16 = run("fp32", "fp32"), run("bf16", "bf16")
    fp32_losses = [loss for _, loss in fp32["history"]["train"]]
    bf16_losses = [loss for _, loss in bf16["history"]["train"]]
    assert bf16_losses != fp32_losses and bf16_losses == pytest.approx(fp32_losses, rel=1e-2)
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    with caplog.at_level("INFO", logger="gpt2lite.training.precision"):
        auto = run("auto", "auto")
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert auto["precision"] == expected
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["precision"] == expected
    assert f"precision='auto': {expected}" in caplog.text
    monkeypatch.setattr("gpt2lite.training.precision.cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # an explicit choice is kept


def test_cpu_bf16_detection_reads_proc_cpuinfo_without_torch_capabilities(monkeypatch):
    with_torch = cpu_has_native_bf16()
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags) == with_torch


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("bf8", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="bf8")
