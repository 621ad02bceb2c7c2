"""The model every method starts from: pretrained weights, or a fallback that says plainly what it is.

    base = load_base_model("gpt2")   # from a local directory or the hub
    base.kind                        # "pretrained", "offline-pretrained" or "random"
    base.description                 # where the weights came from; a fallback names itself NOT GPT-2
    model = copy_for_run(base, MethodConfig(name="qlora"))  # a run's own copy (QLoRA's: read again in 4 bits)

Offline, with fallback_pretrain, the fallback is a small model pretrained here on the standard library's
docstrings (gpt2lite.experiment.pretrain); without it, a randomly initialised model. Either way a warning is logged.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from gpt2lite.model.config import GPT2Config
from gpt2lite.model.gpt2 import GPT2, GPT2ForSequenceClassification, count_parameters
from gpt2lite.hub.pretrained import hub_reachable

logger = logging.getLogger(__name__)


@dataclass
class BaseModel:
    """The model every method starts from (each run works on its own deep copy).

    kind: "pretrained" (the requested weights), "offline-pretrained" (no pretrained GPT-2 could be loaded;
    a small model pretrained here on the standard library's docstrings, see gpt2lite.experiment.pretrain) or
    "random" (randomly initialised: quality figures mean nothing).
    """

    model: torch.nn.Module
    description: str
    kind: str = "pretrained"
    source: Optional[str] = None  # the directory or hub id the weights were read from (None: random init)

    @property
    def random_init(self) -> bool:
        return self.kind == "random"


def load_base_model(name_or_path: str = "gpt2", num_labels: Optional[int] = None, fallback_preset: str = "tiny",
                    allow_random_init: bool = True, seed: int = 0,
                    fallback_pretrain: Optional["PretrainConfig"] = None,
                    load_options: Optional[dict] = None) -> BaseModel:
    """Pretrained weights from a local directory or the hub. Where they cannot be had (offline): with
    fallback_pretrain, a small model pretrained offline per those settings (gpt2lite.experiment.pretrain; cached, so
    only the first run pays for it); otherwise a randomly initialised `fallback_preset` model. Either way
    the description says plainly that it is not GPT-2.
    num_labels: build a GPT2ForSequenceClassification (a new, random score head on the pretrained body).
    load_options: from_pretrained's, for the pretrained weights (MethodConfig.load_options(): QLoRA's
    quantize-on-load); a fallback model is built in float. A path that is not a directory (./x, /x, a/b/c,
    one under an existing directory) is a CheckpointError ("no directory ..."), never a fallback."""
    from gpt2lite.errors import CheckpointError
    from gpt2lite.hub.pretrained import looks_like_path

    cls = GPT2ForSequenceClassification if num_labels else GPT2
    kwargs = {"num_labels": num_labels} if num_labels else {}
    local = os.path.isdir(name_or_path) or looks_like_path(name_or_path)
    if local or hub_reachable():
        try:
            model = cls.from_pretrained(name_or_path, **kwargs, **(load_options or {}))
            return BaseModel(model, f"pretrained weights: {name_or_path}", kind="pretrained", source=name_or_path)
        except CheckpointError as error:
            if local or not allow_random_init:
                raise
            reason = str(error).splitlines()[0]
    else:
        reason = "the Hugging Face Hub is unreachable"
    if not allow_random_init:
        raise CheckpointError(f"could not load {name_or_path!r}: {reason}")
    if fallback_pretrain is not None:
        return _offline_pretrained(cls, kwargs, fallback_pretrain, name_or_path, reason)
    config = GPT2Config.from_name(fallback_preset, pad_token_id=50256)
    torch.manual_seed(seed)
    model = cls(config, **kwargs)
    _, total = count_parameters(model)
    description = (f"RANDOMLY INITIALISED '{fallback_preset}' model ({config.n_layer} layers, n_embd={config.n_embd}, "
                   f"context {config.n_positions}, {total / 1e6:.1f}M parameters), NOT GPT-2: could not load "
                   f"{name_or_path!r} ({reason}). Quality numbers are not meaningful; efficiency numbers are real.")
    logger.warning(description)
    return BaseModel(model, description, kind="random")


def _offline_pretrained(cls, kwargs: dict, settings, name_or_path: str, reason: str) -> BaseModel:
    """The offline fallback with a pretrained small model (gpt2lite.experiment.pretrain), described as what it is."""
    from gpt2lite.experiment.pretrain import load_or_pretrain

    logger.warning("could not load %r (%s): using a small model pretrained offline instead (the first run "
                   "pretrains it, a few minutes; later runs load it from the cache)", name_or_path, reason)
    _, metadata = load_or_pretrain(settings)
    model = cls.from_pretrained(metadata["directory"], **kwargs)
    config = model.config
    _, total = count_parameters(model)
    origin = "loaded from the cache" if metadata["from_cache"] else f"pretrained now in {metadata['pretrain_seconds']:.0f}s"
    description = (
        f"SMALL OFFLINE-PRETRAINED '{settings.preset}' model, NOT GPT-2 ({config.n_layer} layers, n_embd="
        f"{config.n_embd}, context {config.n_positions}, {total / 1e6:.1f}M parameters, GPT-2's tokenizer): could "
        f"not load {name_or_path!r} ({reason}), so it was pretrained for {settings.steps} steps "
        f"({metadata['trained_tokens'] / 1e6:.1f}M tokens) on the Python standard library's docstrings and comments "
        f"(held-out loss {metadata['heldout_loss_full_vocab']:.2f}; {origin}: {metadata['directory']}). The "
        "summarization task's validation and test docstrings were left out of that corpus. Quality figures show "
        "that the methods work; they are not GPT-2 results.")
    logger.warning(description)
    return BaseModel(model, description, kind="offline-pretrained", source=metadata["directory"])


def copy_for_run(base: BaseModel, method=None) -> torch.nn.Module:
    """A run's own copy of the base model, to adapt and train (the base stays as it was for the next run).

    method: a MethodConfig (or None). A method with load options (QLoRA: quantize-on-load) over a float base
    read from a checkpoint gets its copy read again from base.source with those options, so that the run
    never holds a float copy; the base's other tensors (a classifier's new score head) are copied into it,
    so that it equals a copy of the base quantized afterwards. Otherwise: a deep copy."""
    options = method.load_options() if method is not None else {}
    if not options or base.source is None or _is_quantized(base.model):
        return copy.deepcopy(base.model)
    cls = type(base.model)
    kwargs = {"num_labels": base.model.config.num_labels} if cls is GPT2ForSequenceClassification else {}
    model = cls.from_pretrained(base.source, **kwargs, **options)
    own = model.state_dict()
    shared = {k: v for k, v in base.model.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    return model.train(base.model.training)


def _is_quantized(model: torch.nn.Module) -> bool:
    from gpt2lite.quantization.linear import nf4_layers

    return bool(nf4_layers(model))
