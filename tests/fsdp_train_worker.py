"""Run by tests/test_fsdp.py under `python -m torch.distributed.run --nproc_per_node 2`, in one of three modes
(argv[2]), writing into the directory argv[1]:

    cases    every method of CASES trained 4 steps with strategy "ddp" and then "fsdp" in the same process
             group: summaries, each rank's final trainable weights (after consolidation), the exports
             (save_pretrained, save_adapter) from rank 0, and what each rank's 4-bit base held while sharded;
             the QLoRA case once more, loaded shard by shard (fsdp_load.load_sharded); then, in argv[3], the full fine-tuning FSDP run once more, SIGKILLed by rank 0 at step 3 (after
             the checkpoint of step 2), which ends the launch (one launch fewer than a separate one)
    resume   that run resumed from its checkpoint-shards/ to the end
"""

import gc
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fsdp_cases import CASES, case_config, case_model  # noqa: E402
from train_helpers import collate_lm, lm_examples, tiny_model  # noqa: E402

from gpt2lite.training.checkpoint import trainable_state_dict  # noqa: E402
from gpt2lite.peft.adapter_io import save_adapter  # noqa: E402
from gpt2lite.quantization.linear import nf4_layers  # noqa: E402
from gpt2lite.training.loop import train  # noqa: E402


def watch_4bit_base(model, report: dict):
    """Record, at the first forward while sharded, what the rank holds of each 4-bit layer: the types, dtypes
    and local sizes of its tensors, and (inside a block's forward, unsharded) the dtype FSDP gathered."""
    from torch.distributed.tensor import DTensor

    def at_root_forward(module, args, kwargs):
        if "sharded" in report:
            return
        report["sharded"] = []
        for name, layer in nf4_layers(model).items():
            for tensor_name, t in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
                local = t.to_local() if isinstance(t, DTensor) else t
                report["sharded"].append({"layer": name, "tensor": tensor_name, "dtensor": isinstance(t, DTensor),
                                          "dtype": str(t.dtype), "numel": t.numel(), "local_numel": local.numel(),
                                          "weight_numel": layer.in_features * layer.out_features})

    def at_layer_forward(layer, args):
        report.setdefault("gathered", {"weight_packed": str(layer.weight_packed.dtype),
                                       "dtensor": isinstance(layer.weight_packed, DTensor)})

    model.register_forward_pre_hook(at_root_forward, with_kwargs=True)
    next(iter(nf4_layers(model).values())).register_forward_pre_hook(at_layer_forward)


def train_case(output_dir: str, method: str, strategy: str, on_log=None, resume=False):
    model = case_model(method)
    report = {}
    if method == "qlora" and strategy == "fsdp":
        watch_4bit_base(model, report)
    config = case_config(os.path.join(output_dir, f"{method}-{strategy}"), method, strategy=strategy,
                         resume_from=os.path.join(output_dir, f"{method}-{strategy}") if resume else None)
    summary = train(model, lm_examples(8), config, eval_dataset=lm_examples(3, seed=1), collate_fn=collate_lm,
                    on_log=on_log)
    return model, summary, report


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage this process holds (a DTensor's: its local shard), counted once."""
    from torch.distributed.tensor import DTensor

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = (obj.to_local() if isinstance(obj, DTensor) else obj).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def model_bytes(model) -> int:
    from torch.distributed.tensor import DTensor

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum((t.to_local() if isinstance(t, DTensor) else t).untyped_storage().nbytes() for t in tensors)


def train_streamed(output_dir: str):
    """QLoRA loaded shard by shard (fsdp_load.load_sharded) from a checkpoint of the cases' tiny model, with the
    random state case_model leaves (the same LoRA draws), then trained as the qlora-fsdp case; records the
    live tensor bytes as each 4-bit layer is filled (the moments its quantized copy is held), the whole
    4-bit model's bytes and the largest layer's (float weight and 4-bit copy)."""
    from gpt2lite.experiment.fsdp_load import load_sharded

    base = os.path.join(output_dir, "base")
    whole = case_model("qlora")
    report = {"whole_4bit_model_bytes": model_bytes(whole),
              "largest_layer_bytes": max(4 * m.in_features * m.out_features + m.quantized_bytes()
                                         for m in nf4_layers(whole).values())}
    if dist.get_rank() == 0:
        tiny_model(0).save_pretrained(base)
    dist.barrier()
    del whole
    tiny_model(0)  # the random state case_model("qlora") draws its LoRA from
    baseline, peak = live_tensor_bytes(), []
    model = load_sharded(base, CASES["qlora"], on_tensor=lambda name: peak.append(live_tensor_bytes()) if "absmax" in name else None)
    report.update(peak_loading_bytes=max(peak) - baseline, model_bytes=model_bytes(model))
    config = case_config(os.path.join(output_dir, "qlora-streamed"), "qlora", strategy="fsdp")
    summary = train(model, lm_examples(8), config, eval_dataset=lm_examples(3, seed=1), collate_fn=collate_lm)
    return model, summary, report


def write_results(output_dir, method, strategy, model, summary, report):
    rank, directory = dist.get_rank(), os.path.join(output_dir, f"{method}-{strategy}")
    torch.save(trainable_state_dict(model), os.path.join(directory, f"trainable_rank{rank}.pt"))
    with open(os.path.join(directory, f"report_rank{rank}.json"), "w") as f:
        json.dump(report, f)
    if rank == 0:
        with open(os.path.join(directory, "run_summary.json"), "w") as f:
            json.dump(summary, f)
        if method == "full":
            model.save_pretrained(os.path.join(directory, "hf"))
        elif method in ("lora", "prompt"):
            save_adapter(model, os.path.join(directory, "adapter"))


def main(output_dir, mode, crash_dir=None):
    torch.set_num_threads(1)
    if mode == "cases":
        for method in CASES:
            for strategy in ("ddp", "fsdp"):
                write_results(output_dir, method, strategy, *train_case(output_dir, method, strategy))
        write_results(output_dir, "qlora", "streamed", *train_streamed(output_dir))
        dist.barrier()
        if dist.get_rank() == 0:
            open(os.path.join(output_dir, "cases_done"), "w").close()

        def kill_at_step_3(record):
            if record["type"] == "train" and record["step"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)

        train_case(crash_dir, "full", "fsdp", on_log=kill_at_step_3)
    else:
        write_results(output_dir, "full", "fsdp", *train_case(output_dir, "full", "fsdp", resume=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
