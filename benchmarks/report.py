"""Model FLOP accounting, the side-by-side table and the target checks of the benchmark.

FLOPs are counted for the work a step must do, the same for both stacks:
- Matmul weights only (the 4 linear layers of each block and the LM head, which is wte): 2 FLOPs per weight
  and token forward; backward 2 more for the input gradient where a gradient has to flow (a trainable
  parameter lies at or below that layer) and 2 more for the weight gradient where the weight trains.
  So full fine-tuning costs 6N per token (N = those weights, 124M for gpt2; biases, LayerNorms and wpe are
  left out, under 1 %), frozen layers that gradients pass through 4N, layers below every trainable
  parameter 2N (forward only).
- The LM head counts only at positions that carry a label: a step needs no logits anywhere else.
- LoRA adapters: 6 * r * (in + out) per token and adapted layer; the NF4 dequantization of QLoRA is not counted.
- Attention: 4 * T * C per token and layer forward (QK^T and AV over the full T x T square, as PaLM's MFU
  counts it, not halved for causality), times 3 in blocks that gradients pass through.
- Soft prompts lengthen every row by their virtual tokens, which count like real ones.
"""

from __future__ import annotations

from dataclasses import dataclass

TARGETS = (  # (label, mode, workload, metric, minimum or maximum, bound)
    ("LoRA tokens/s, summarization", "lora", "summarization", "speed", "min", 1.5),
    ("LoRA tokens/s, LM", "lora", "lm", "speed", "min", 1.1),
    ("full FT tokens/s, LM", "full", "lm", "speed", "min", 1.25),
    ("full FT tokens/s, summarization", "full", "summarization", "speed", "min", 1.25),
)
MEMORY_TARGET = 0.6
GENERATION_TARGET = 2.0
PEAK_FRACTION_TARGET = 0.75


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    mlp_dim: int
    vocab_size: int


def training_flops(shape: Shape, mode: str, batch: int, seq_len: int, labelled: int,
                   lora_rank: int = 8, n_virtual: int = 20, last_n: int = 2) -> float:
    """Model FLOPs of one training step (see the module docstring). labelled: positions with a target."""
    C, F = shape.n_embd, shape.mlp_dim
    block_weights = C * 3 * C + C * C + C * F + F * C
    rows = seq_len + (n_virtual if mode == "prompt" else 0)
    tokens = batch * rows
    attention_forward = 4 * rows * C * tokens  # per layer
    total = 0.0
    for layer in range(shape.n_layer):
        forward = 2 * block_weights * tokens + attention_forward
        if mode == "full" or (mode == "last2" and layer >= shape.n_layer - last_n):
            total += 3 * forward  # input and weight gradients
        elif mode in ("lora", "qlora", "prompt"):
            total += 2 * 2 * block_weights * tokens + 3 * attention_forward  # input gradients only
            if mode in ("lora", "qlora"):  # attn.c_attn, attn.c_proj, mlp.c_proj adapted
                adapter_weights = lora_rank * ((C + 3 * C) + (C + C) + (F + C))
                total += 6 * adapter_weights * tokens
        else:
            total += forward  # below every trainable parameter: forward only
    head = 2 * C * shape.vocab_size * labelled
    total += head * (3 if mode == "full" else 2)
    return total


def ratio(numerator, denominator):
    return None if not numerator or not denominator else numerator / denominator


def _fmt(value, spec="{:.2f}", missing="–"):
    return missing if value is None else spec.format(value)


def table(rows: list) -> str:
    """A markdown table of the training rows: one line per (workload, mode), with the precision both stacks
    trained in ("fp32", or "bf16" autocast; "–" in results written before the column existed)."""
    # On CUDA the memory that matters is the GPU's (torch.cuda.max_memory_allocated); RSS is mostly the
    # CUDA context there. On the CPU it is the process's peak RSS.
    on_gpu = any("peak_gpu_bytes" in (row.get("gpt2lite") or row.get("reference") or {}) for row in rows)
    memory, memory_key, ratio_key = (("peak GPU memory GB", "peak_gpu_gb", "gpu_memory_ratio") if on_gpu
                                     else ("peak RSS GB", "peak_rss_gb", "memory_ratio"))
    for row in rows:
        for side in (row.get("reference"), row.get("gpt2lite")):
            if side is not None and "peak_gpu_bytes" in side:
                side["peak_gpu_gb"] = side["peak_gpu_bytes"] / 1e9
    head = ("| workload | mode | precision | ref s/step | gpt2lite s/step | ref tok/s | gpt2lite tok/s | speed x | "
            f"ref {memory} | gpt2lite {memory} | memory x | gpt2lite GFLOP/s (% peak) | ref GFLOP/s (% peak) |")
    lines = [head, "|" + "---|" * 13]
    for row in rows:
        ref, lite = row.get("reference"), row.get("gpt2lite")

        def get(side, key):
            return None if side is None else side.get(key)

        def flops(side):
            if side is None:
                return "–"
            return f"{side['achieved_flops'] / 1e9:.1f} ({100 * side['peak_fraction']:.0f}%)"

        lines.append(
            f"| {row['workload']} | {row['mode']} | {row.get('precision', '–')} | {_fmt(get(ref, 'median_step_s'))} | {_fmt(get(lite, 'median_step_s'))} "
            f"| {_fmt(get(ref, 'tokens_per_s'), '{:.0f}')} | {_fmt(get(lite, 'tokens_per_s'), '{:.0f}')} "
            f"| {_fmt(row.get('speed_ratio'))} | {_fmt(get(ref, memory_key))} | {_fmt(get(lite, memory_key))} "
            f"| {_fmt(row.get(ratio_key))} | {flops(lite)} | {flops(ref)} |"
        )
    return "\n".join(lines)


def generation_table(generation: dict) -> str:
    ref, lite = generation.get("reference"), generation.get("gpt2lite")
    lines = ["| generation | ref new tok/s | gpt2lite new tok/s | speed x | ref peak RSS GB | gpt2lite peak RSS GB |",
             "|---|---|---|---|---|---|"]
    get = lambda side, key: None if side is None else side.get(key)  # noqa: E731
    lines.append(f"| {generation['description']} | {_fmt(get(ref, 'new_tokens_per_s'), '{:.1f}')} "
                 f"| {_fmt(get(lite, 'new_tokens_per_s'), '{:.1f}')} | {_fmt(generation.get('speed_ratio'))} "
                 f"| {_fmt(get(ref, 'peak_rss_gb'))} | {_fmt(get(lite, 'peak_rss_gb'))} |")
    return "\n".join(lines)


def check_targets(rows: list, generation: dict) -> list:
    """[(label, measured, bound, held)] for every target the run measured."""
    checks = []
    by_key = {(r["workload"], r["mode"]): r for r in rows}
    for label, mode, workload, metric, kind, bound in TARGETS:
        row = by_key.get((workload, mode))
        if row and row.get("speed_ratio") is not None:
            checks.append((label + f" >= {bound}x", row["speed_ratio"], bound, row["speed_ratio"] >= bound))
    for row in rows:
        key, name = ("gpu_memory_ratio", "peak GPU memory") if "gpu_memory_ratio" in row else ("memory_ratio", "peak RSS")
        if row.get(key) is not None:
            checks.append((f"{name} {row['mode']}, {row['workload']} <= {MEMORY_TARGET}x", row[key],
                           MEMORY_TARGET, row[key] <= MEMORY_TARGET))
    if generation and generation.get("speed_ratio") is not None:
        checks.append((f"greedy generation new tokens/s >= {GENERATION_TARGET}x", generation["speed_ratio"],
                       GENERATION_TARGET, generation["speed_ratio"] >= GENERATION_TARGET))
    for row in rows:
        lite = row.get("gpt2lite")
        if row["mode"] == "full" and lite is not None:
            checks.append((f"full FT ({row['workload']}) achieved FLOP/s >= {PEAK_FRACTION_TARGET:.0%} of matmul peak",
                           lite["peak_fraction"], PEAK_FRACTION_TARGET, lite["peak_fraction"] >= PEAK_FRACTION_TARGET))
    return checks


def targets_table(checks: list) -> str:
    lines = ["| target | measured | held |", "|---|---|---|"]
    for label, measured, _, held in checks:
        lines.append(f"| {label} | {measured:.2f} | {'yes' if held else '**no**'} |")
    return "\n".join(lines)
