"""A Hugging Face checkpoint's weight files, read whole or a tensor at a time, in gpt2lite's names and layout.

The weights are model.safetensors, pytorch_model.bin, or a sharded index of either (model.safetensors.index.json:
a weight_map from each tensor name to its shard file). CheckpointReader reads safetensors one tensor at a time
(the shapes come from the headers, no data), so a loader never holds the whole checkpoint; a .bin cannot be read
in parts and is loaded whole. hf_to_gpt2lite is the renaming and transposition on the way in; hf.py is the
bridge that uses them (and gpt2lite_to_hf, the way out).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Dict, List, Optional

import torch

from gpt2lite.model.architectures import Architecture
from gpt2lite.model.config import GPT2Config
from gpt2lite.errors import CheckpointError
from gpt2lite.files import read_json_object

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def hf_to_gpt2lite(state: Dict[str, torch.Tensor], arch: Architecture) -> Dict[str, torch.Tensor]:
    """Rename (add the 'transformer.' prefix bare GPT2Model checkpoints lack), transpose Conv1D weights,
    drop buffers."""
    out = {}
    for key, tensor in state.items():
        if any(re.search(pattern, key) for pattern in arch.ignored):
            continue
        if not key.startswith(("transformer.", "lm_head.", "score.")):
            key = "transformer." + key
        if key.endswith(arch.transposed):
            tensor = tensor.t()
        out[key] = tensor
    return out


def read_state_dict(directory: str) -> Dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (checkpoint names and layout), from a single file or a sharded index."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        if not name.endswith(".index.json"):
            return load_weights_file(path)
        state = {}
        for shard_path in shard_paths(path, directory):
            state.update(load_weights_file(shard_path))
        return state
    raise CheckpointError(
        f"{directory!r} holds no weights: expected one of {', '.join(WEIGHT_FILES)}"
    )


def safetensors_files(directory: str) -> Optional[List[str]]:
    """The safetensors file(s) of a checkpoint directory (one, or the shards of an index); None if it has
    only pytorch_model.bin weights."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path) or "safetensors" not in name:
            continue
        return shard_paths(path, directory) if name.endswith(".index.json") else [path]
    return None


def shard_paths(index_path: str, directory: str) -> List[str]:
    """The paths of the shards a sharded checkpoint's index (model.safetensors.index.json) lists, each checked
    to exist in `directory`, the index's own."""
    index = read_json_object(index_path, "not an object ({\"weight_map\": {...}}, a sharded checkpoint index)",
                             "the file is probably truncated or corrupted: download or save the checkpoint again")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path} has no weight_map (an object from each weight name to its shard "
                              "file); it is not a sharded checkpoint index: download or save the checkpoint again")
    shards = sorted(set(weight_map.values()))
    missing = [shard for shard in shards if not os.path.exists(os.path.join(directory, shard))]
    if missing:
        raise CheckpointError(f"{index_path} names the shard {missing[0]}, which is missing from {directory}")
    return [os.path.join(directory, shard) for shard in shards]


def load_weights_file(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of one .safetensors or .bin file (a .bin with weights_only=True: no code runs)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"could not read {path}: {type(error).__name__}: {error}. The file is probably truncated or "
            "corrupted (an interrupted download?); delete it and download or save it again."
        ) from None


def require_float_weight(key: str, tensor: torch.Tensor, directory: str):
    """Every weight gpt2lite loads is floating point: an integer tensor means a corrupted or foreign file."""
    if not tensor.is_floating_point():
        raise CheckpointError(
            f"{key} in {directory!r} holds {tensor.dtype} values, not floating-point weights; the "
            "checkpoint is corrupted or not a model's weights (gpt2lite loads float32, float16 or bfloat16)")


class CheckpointReader:
    """The tensors of a checkpoint directory, read one at a time, in gpt2lite's names and layout.

    `shapes` maps every gpt2lite key to its shape (read from the headers, no data); `get(key)` reads one.
    """

    def __init__(self, directory: str, arch: Architecture):
        self.arch = arch
        self.directory = directory
        self.files: Dict[str, tuple] = {}  # gpt2lite key -> (safetensors file, checkpoint key)
        self.shapes: Dict[str, torch.Size] = {}
        self.loaded: Optional[Dict[str, torch.Tensor]] = None  # a .bin checkpoint, read whole
        files = safetensors_files(directory)
        if files is None:
            self.loaded = hf_to_gpt2lite(read_state_dict(directory), arch)  # a .bin cannot be read in parts
            self.shapes = {key: tensor.shape for key, tensor in self.loaded.items()}
            return
        from safetensors import safe_open

        for path in files:
            try:
                with safe_open(path, framework="pt") as handle:
                    for name in handle.keys():
                        shape = handle.get_slice(name).get_shape()
                        # hf_to_gpt2lite on a shape-only tensor: the renaming and transposition of the real one
                        for key, meta in hf_to_gpt2lite({name: torch.empty(shape, device="meta")}, arch).items():
                            self.files[key], self.shapes[key] = (path, name), meta.shape
            except Exception as error:
                raise CheckpointError(f"could not read {path}: {type(error).__name__}: {error}. The file is probably "
                                      "truncated or corrupted; delete it and download or save it again.") from None

    def get(self, key: str) -> torch.Tensor:
        """One tensor (gpt2lite name and layout), read from disk now."""
        if self.loaded is not None:
            tensor = self.loaded.pop(key)
        else:
            from safetensors import safe_open

            path, name = self.files[key]
            try:
                with safe_open(path, framework="pt") as handle:  # closed again: its pages leave the resident set
                    tensor = hf_to_gpt2lite({name: handle.get_tensor(name)}, self.arch)[key]
            except Exception as error:
                raise CheckpointError(f"could not read {name} from {path}: {type(error).__name__}: {error}. The file "
                                      "is probably truncated or corrupted; delete it and download or save it "
                                      "again.") from None
        require_float_weight(key, tensor, self.directory)
        return tensor


def model_for_checkpoint(cls, config: GPT2Config, directory: str, shapes: Dict[str, torch.Size],
                         num_labels: Optional[int] = None):
    """The `cls` model on the meta device that a checkpoint with these tensor shapes (gpt2lite names) loads
    into, after checking that they match. Returns (model, the checkpoint keys to load, new tensors the
    checkpoint lacks (a new classification head), whether lm_head is to be tied to wte)."""
    kwargs = {}
    if cls.__name__.endswith("ForSequenceClassification"):
        if "score.weight" in shapes:
            found = shapes["score.weight"][0]
            if num_labels is not None and num_labels != found:
                raise CheckpointError(f"the checkpoint's score head has {found} labels, num_labels={num_labels} was asked for")
            num_labels = found
        elif config.pad_token_id is None:
            # a new head: GPT-2 has no pad token; batches are padded with eos, as transformers users do
            config = config.replace(pad_token_id=config.eos_token_id)
        kwargs["num_labels"] = num_labels if num_labels is not None else config.num_labels
    with torch.device("meta"):
        model = cls(config, **kwargs)
    expected = model.state_dict()
    tied = config.tie_word_embeddings and "lm_head.weight" in expected
    if tied:  # lm_head is the same matrix as transformer.wte
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    keys = set(shapes)
    for head in ("lm_head.weight", "score.weight"):  # a language model from a classifier or the reverse
        if head not in expected and head in keys:
            keys.discard(head)
            logger.info("ignoring %s from %s: %s has no such head", head, directory, cls.__name__)
    new = {}
    if "score.weight" in expected and "score.weight" not in keys:  # a new classification head
        new["score.weight"] = torch.empty(expected["score.weight"].shape).normal_(0.0, config.initializer_range)
    missing = sorted(set(expected) - keys - set(new))
    unexpected = sorted(keys - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint in {directory!r} does not match {cls.__name__}({config.model_type}, "
            f"n_layer={config.n_layer}): missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for key in expected:  # in module order: the first mismatch is the one to fix
        if key in keys and tuple(shapes[key]) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{key}: the checkpoint has shape {tuple(shapes[key])}, the model expects "
                f"{tuple(expected[key].shape)}; config.json and the weights disagree (a checkpoint of another size?)"
            )
    return model, sorted(keys), new, tied
