"""The Hugging Face bridge: read and write checkpoints that transformers reads and writes.

Loading: a hub id is downloaded (and cached) through huggingface_hub; a local directory is read directly:
config.json here, the weights (model.safetensors, pytorch_model.bin, or a sharded index of either) a tensor
at a time through hf_weights.CheckpointReader, checked against the model before any is read. What differs
between architectures (config.json's fields, weights stored transposed (GPT-2's Conv1D), buffers to ignore)
comes from their records in architectures.py.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional, Sequence

import torch

from gpt2lite.model.architectures import architecture
from gpt2lite.model.config import GPT2Config
from gpt2lite.dtypes import torch_dtype
from gpt2lite.errors import CheckpointError
from gpt2lite.files import atomic_write, atomic_write_text, read_json_object
from gpt2lite.hub.quantized import load_quantized
from gpt2lite.hub.weights import WEIGHT_FILES, CheckpointReader, model_for_checkpoint

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- locating


OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")  # models' and datasets'
MODEL_PATTERNS = ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors")
LOCAL_MODEL_HINT = ("GPT2.from_pretrained('/path/to/dir'), where the directory holds config.json and "
                    "model.safetensors (or pytorch_model.bin), e.g. one written by save_pretrained()")


def resolve(name_or_path: str, allow_patterns=MODEL_PATTERNS, local_hint: str = LOCAL_MODEL_HINT,
            what: str = "directory") -> str:
    """A local directory as it is; a hub id downloaded (the files matching allow_patterns) into the HF cache.
    local_hint: how to do without the network, for the error raised when the download fails; what: the
    kind of directory, for the error raised when a local path does not exist."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise CheckpointError(f"{name_or_path!r} is a file; pass the directory that holds config.json and the weights")
    if looks_like_path(name_or_path):
        raise CheckpointError(f"no {what} {name_or_path!r}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id=name_or_path,
            allow_patterns=list(allow_patterns),
        )
    except Exception as error:  # offline, unknown repo, no network: say what to do instead
        switch = offline_switch(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))  # those huggingface_hub reads
        raise CheckpointError(
            f"could not get {name_or_path!r} from the Hugging Face Hub"
            f"{f' ({switch} is set)' if switch else ''}: {type(error).__name__}: {error}\n"
            f"To load weights without the network, pass a local directory instead: {local_hint}."
        ) from None


def looks_like_path(name_or_path: str) -> bool:
    """Whether a name is meant as a local path rather than a hub id ("user/model"): it starts with ".", "/"
    or "~", has more than one "/", exists (a file), or lies in an existing directory ("runs/mine" when
    runs/ exists)."""
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.path.exists(name_or_path):
        return True
    parent = os.path.dirname(name_or_path)
    return bool(parent) and os.path.isdir(parent)


def offline_switch(switches: Sequence[str] = OFFLINE_SWITCHES) -> Optional[str]:
    """The name of the first of `switches` (environment variables) that is set, or None. Set means a value
    huggingface_hub and datasets read as true: 1, ON, YES or TRUE in any case."""
    for switch in switches:
        if os.environ.get(switch, "").upper() in ("1", "ON", "YES", "TRUE"):
            return switch
    return None


def _download_bin_if_needed(directory: str, name_or_path: str) -> str:
    """Hub repos without safetensors (older ones) only have pytorch_model.bin: fetch it then."""
    if any(os.path.exists(os.path.join(directory, f)) for f in WEIGHT_FILES) or os.path.isdir(name_or_path):
        return directory
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=name_or_path, allow_patterns=["config.json", "pytorch_model*.bin*"])


# ---------------------------------------------------------------------------------------------- reading


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub (HF_ENDPOINT) answers within `timeout` seconds; False at once when an
    offline switch is set. Checked before hub calls because `datasets` retries an unreachable hub for half a
    minute. The question goes through huggingface_hub's own HTTP session, as the downloads will: through
    the proxy that HTTPS_PROXY / HTTP_PROXY name, with its offline mode. Any HTTP answer counts as reachable;
    a connection, proxy or timeout error (or huggingface_hub's OfflineModeIsEnabled) as unreachable. The
    offline switches are offline_switch's."""
    if offline_switch() is not None:
        return False
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # httpx2/httpx/requests errors by huggingface_hub version, or OfflineModeIsEnabled
        logger.info("the Hugging Face Hub at %s is unreachable: %s: %s", constants.ENDPOINT, type(error).__name__,
                    error)
        return False
    return True


def read_config(directory: str) -> GPT2Config:
    """GPT2Config from a checkpoint directory's config.json, through its architecture's mapping."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{directory!r} has no config.json; is it a Hugging Face model directory?")
    d = read_json_object(path, 'expected an object of config fields ({"model_type": "gpt2", "n_embd": 768, ...})',
                         "download or save the checkpoint again")
    try:
        return architecture(d.get("model_type", "gpt2")).config_from_hf(d)
    except CheckpointError:
        raise
    except KeyError as missing:
        raise CheckpointError(f"{path} lacks the field {missing}") from None
    except (TypeError, ValueError) as error:  # GPT2Config's validation: a wrong type, n_embd % n_head, ...
        raise CheckpointError(f"{path}: {error}") from None


def load_pretrained(cls, name_or_path: str, dtype=None, device=None, num_labels: Optional[int] = None,
                    quantize: Optional[str] = None, **quantize_options):
    """`cls` with the weights of a checkpoint. quantize="nf4" reads it a tensor at a time and stores the
    blocks' linear weights in 4 bits as it goes (gpt2lite.hub.quantized; options: compute_dtype, double_quant)."""
    directory = _download_bin_if_needed(resolve(name_or_path), name_or_path)
    config = read_config(directory)
    if quantize is not None:
        return load_quantized(cls, directory, config, quantize, dtype=dtype, device=device, num_labels=num_labels,
                              **quantize_options)
    if quantize_options:
        raise TypeError(f"{sorted(quantize_options)} are options of quantize='nf4'; pass quantize too, or drop them")
    reader = CheckpointReader(directory, architecture(config.model_type))
    model, keys, new, tied = model_for_checkpoint(cls, config, directory, reader.shapes, num_labels)
    dtype = torch_dtype(dtype)
    # a tensor at a time, so that a transposed weight's copy and its source are never all held at once
    state = {key: reader.get(key).to(device=device, dtype=dtype).contiguous() for key in keys}
    state.update({key: tensor.to(device=device, dtype=dtype) for key, tensor in new.items()})
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    return model.eval()  # as transformers does: dropout off until training asks for it


# ---------------------------------------------------------------------------------------------- writing


def gpt2lite_to_hf(model) -> Dict[str, torch.Tensor]:
    """The model's tensors under transformers' names and layout (the reverse of hf_weights.hf_to_gpt2lite)."""
    arch = architecture(model.config.model_type)
    out = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # transformers re-ties it on load
        if key.endswith(arch.transposed):
            tensor = tensor.t()
        out[key] = tensor.detach().to("cpu").contiguous()
    return out


def save_pretrained(model, directory: str):
    """Write model.safetensors and config.json into `directory` as transformers' save_pretrained does."""
    from safetensors.torch import save_file

    config = model.config
    arch = architecture(config.model_type)
    with torch.device("meta"):  # tensors a plain model lacks (adapters, 4-bit layers) have no place in HF's format
        extra = sorted(set(model.state_dict()) - set(type(model)(config).state_dict()))
    if extra:
        raise CheckpointError(
            f"the model holds tensors a Hugging Face checkpoint has no place for ({extra[:3]}...): adapters or "
            "quantized layers. Fold LoRA in first (gpt2lite.peft.merge_and_unload(model)) or save the adapter "
            "alone (gpt2lite.peft.save_adapter(model, directory))"
        )
    hf_config = arch.config_to_hf(config)
    hf_config["architectures"] = [arch.hf_class_names.get(type(model).__name__, type(model).__name__)]
    if config.num_labels is not None and hf_config["architectures"][0].endswith("ForSequenceClassification"):
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    hf_config["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    state = gpt2lite_to_hf(model)
    atomic_write(os.path.join(directory, "model.safetensors"),
                 lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_text(os.path.join(directory, "config.json"), json.dumps(hf_config, indent=2))
