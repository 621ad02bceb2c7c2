"""The bounds a step is measured against: its matmul floor and, for decoding, the memory-bandwidth bound.

Matmul floor (`step_floor`): every GEMM one training step of GPT-2 must do, each shape timed alone at the
step's precision (bf16 tensors for "bf16", float32 for "fp32"), summed over the step:
- each block's four linear layers (c_attn C->3C, attn.c_proj C->C, c_fc C->4C, mlp.c_proj 4C->C):
  forward (N, in) @ (in, out); input gradient (N, out) @ (out, in) where a gradient must flow (every layer
  but block 0's c_attn under LoRA, whose input comes from frozen embeddings); weight gradient
  (out, N) @ (N, in) where the weight trains (full);
- attention: q k^T and p v forward, and the four backward products (dv, dp, dq, dk), batched over B x heads;
- the LM head at the labelled positions: forward, input gradient, and weight gradient under full (wte trains);
- LoRA (rank r on c_attn, attn.c_proj, mlp.c_proj): A and B forward, their input and weight gradients.
N = B x T rows. Nothing else of the step (elementwise work, softmax, layer norm, the optimizer) is in it, so
step time / floor says how much of the step is not matrix multiplication.

Bandwidth (`bandwidth`): the best of a few reads of a large float32 tensor (torch.sum, bytes read / s)
and copies (bytes read + written / s), with the step's thread count.

Decode bound (`decode_bound`): generating `new_tokens` tokens for a batch after a prompt reads, per decoding
step, every weight once (blocks and the LM head) and the KV cache so far; the prompt's prefill is bounded by
the matmul peak instead. bound seconds = prefill FLOPs / matmul peak + sum over steps of bytes / bandwidth.
"""

from __future__ import annotations

import statistics
import time

import torch

LORA_TARGETS = ("c_attn", "attn.c_proj", "mlp.c_proj")


def step_gemms(n_layer: int, C: int, n_head: int, vocab: int, B: int, T: int, labelled: int, mode: str,
               rank: int = 8) -> list:
    """[(name, (m, k, n), batch, count)]: the step's GEMMs, an (m, k) @ (k, n) product `batch` times batched,
    `count` times per step. mode: "full" or "lora"."""
    if mode not in ("full", "lora"):
        raise ValueError(f"the matmul floor is defined for full and lora, got {mode!r}")
    N, hs = B * T, C // n_head
    layers = {"c_attn": (C, 3 * C), "attn.c_proj": (C, C), "c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}
    gemms = []
    for name, (d_in, d_out) in layers.items():
        gemms.append((f"{name} forward", (N, d_in, d_out), 1, n_layer))
        # under LoRA block 0's c_attn reads the frozen embeddings: no gradient flows below it
        input_grads = n_layer - 1 if (mode == "lora" and name == "c_attn") else n_layer
        gemms.append((f"{name} input grad", (N, d_out, d_in), 1, input_grads))
        if mode == "full":
            gemms.append((f"{name} weight grad", (d_out, N, d_in), 1, n_layer))
        if mode == "lora" and name in LORA_TARGETS:
            gemms += [(f"{name} lora forward A", (N, d_in, rank), 1, n_layer),
                      (f"{name} lora forward B", (N, rank, d_out), 1, n_layer),
                      (f"{name} lora input grad B", (N, d_out, rank), 1, n_layer),
                      (f"{name} lora input grad A", (N, rank, d_in), 1, input_grads),
                      (f"{name} lora weight grad B", (d_out, N, rank), 1, n_layer),
                      (f"{name} lora weight grad A", (rank, N, d_in), 1, n_layer)]
    heads = B * n_head
    gemms += [("attention q k^T", (T, hs, T), heads, n_layer), ("attention p v", (T, T, hs), heads, n_layer),
              ("attention backward (dv, dq, dk)", (T, T, hs), heads, 3 * n_layer),
              ("attention backward dp", (T, hs, T), heads, n_layer)]
    gemms += [("lm head forward", (labelled, C, vocab), 1, 1), ("lm head input grad", (labelled, vocab, C), 1, 1)]
    if mode == "full":
        gemms.append(("lm head weight grad", (vocab, labelled, C), 1, 1))
    return gemms


def time_gemm(shape, batch: int, dtype, repeats: int = 5) -> float:
    """Median seconds of one (m, k) @ (k, n) product (batched `batch` times when batch > 1)."""
    m, k, n = shape
    lead = (batch,) if batch > 1 else ()
    a, b = torch.randn(*lead, m, k, dtype=dtype), torch.randn(*lead, k, n, dtype=dtype)
    out = torch.empty(*lead, m, n, dtype=dtype)
    seconds = []
    for _ in range(2 + repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[2:])


def step_floor(spec: dict) -> dict:
    """Seconds of the step's GEMMs timed alone (module docstring); spec: preset, mode, batch_size, seq_len,
    labelled (positions with a target), precision."""
    from gpt2lite import GPT2Config

    config = GPT2Config.from_name(spec["preset"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    gemms = step_gemms(config.n_layer, config.n_embd, config.n_head, config.vocab_size, spec["batch_size"],
                       spec["seq_len"], spec["labelled"], spec["mode"])
    by_gemm, total, flops = {}, 0.0, 0.0
    for name, shape, batch, count in gemms:
        seconds = time_gemm(shape, batch, dtype) * count
        by_gemm[name] = by_gemm.get(name, 0.0) + seconds
        total += seconds
        flops += 2 * shape[0] * shape[1] * shape[2] * batch * count
    return dict(floor_s=total, gemm_flops=flops, floor_flops_per_s=flops / total, by_gemm=by_gemm,
                dtype=str(dtype))


def bandwidth(spec: dict) -> dict:
    """Memory bandwidth in bytes/s: the best of `repeats` sums (read) and copies (read + write) of a
    spec["megabytes"] float32 tensor."""
    n = int(spec.get("megabytes", 512) * 2 ** 20 // 4)
    a, b = torch.ones(n), torch.empty(n)
    read, copy = [], []
    for _ in range(spec.get("repeats", 5)):
        start = time.perf_counter()
        a.sum()
        read.append(4 * n / (time.perf_counter() - start))
        start = time.perf_counter()
        b.copy_(a)
        copy.append(8 * n / (time.perf_counter() - start))
    return dict(read_bytes_per_s=max(read), copy_bytes_per_s=max(copy), bytes_per_s=max(max(read), max(copy)))


def decode_bound(n_layer: int, C: int, vocab: int, n_positions: int, B: int, prompt_len: int, new_tokens: int,
                 weight_bytes: int, bytes_per_s: float, peak_flops: float) -> dict:
    """The fastest greedy generation could run (module docstring). weight_bytes: bytes per weight as stored
    (4 for float32). Returns seconds, new tokens/s and the bytes one decoding step reads at the end."""
    block_weights = n_layer * 12 * C * C  # c_attn 3C^2 + c_proj C^2 + c_fc 4C^2 + mlp.c_proj 4C^2 per block
    weights = (block_weights + vocab * C + n_positions * C) * weight_bytes
    prefill_s = 2 * (block_weights + vocab * C) * B * prompt_len / peak_flops
    decode_s, step_bytes = 0.0, 0
    for step in range(1, new_tokens):  # the first new token comes out of the prefill
        cache = 2 * n_layer * B * (prompt_len + step) * C * weight_bytes  # keys and values read
        step_bytes = weights + cache
        decode_s += step_bytes / bytes_per_s
    seconds = prefill_s + decode_s
    return dict(seconds=seconds, prefill_s=prefill_s, decode_s=decode_s, new_tokens_per_s=B * new_tokens / seconds,
                last_step_bytes=step_bytes)
