"""One measured training run in its own process, for benchmarks/estimate.py: `python estimate_child.py SPEC`.

SPEC (JSON): checkpoint (a directory), method (MethodConfig fields), batch_size, seq_len, precision,
activation_checkpointing, steps. The run is `gpt2lite finetune`'s model path: load_base_model with the
method's load options (QLoRA: 4-bit while loading), peft.apply, then train() for `steps` optimizer steps on
random tokens of exactly seq_len (labels at every position). Prints one JSON line prefixed RESULT with the
process's peak resident set (VmHWM, the ru_maxrss of this process alone) and train()'s peak_memory_mb.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

RESULT_PREFIX = "RESULT "


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def measure(spec: dict) -> dict:
    import torch

    from gpt2lite.experiment.base_model import load_base_model
    from gpt2lite.peft import MethodConfig, apply
    from gpt2lite.training.config import TrainConfig
    from gpt2lite.training.loop import train

    method = MethodConfig.from_value(spec["method"])
    base = load_base_model(spec["checkpoint"], allow_random_init=False, load_options=method.load_options())
    load_peak = vm_hwm_mb()
    model = apply(base.model, method)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(spec["batch_size"] * spec["steps"]):
        ids = torch.randint(0, model.config.vocab_size, (spec["seq_len"],), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        config = TrainConfig(output_dir=output_dir, batch_size=spec["batch_size"], max_steps=spec["steps"],
                             epochs=None, precision=spec["precision"], progress_bar=False, shuffle=False,
                             activation_checkpointing=spec["activation_checkpointing"], device=spec.get("device"))
        summary = train(model, rows, config)
    return {"peak_rss_mb": vm_hwm_mb(), "load_peak_rss_mb": load_peak, "train_peak_memory_mb": summary["peak_memory_mb"],
            "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    print(RESULT_PREFIX + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
