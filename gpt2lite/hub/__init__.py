"""Checkpoints and Hugging Face files: resolving hub ids, the offline switch and whether the Hub answers, pretrained load and save
(pretrained), weight files (weights), quantize-on-load (quantized), tokenizer files (tokenizer_files)."""

from gpt2lite.hub.pretrained import hub_reachable, load_pretrained, offline_switch, resolve, save_pretrained
from gpt2lite.hub.tokenizer_files import save_tokenizer_files
from gpt2lite.hub.weights import CheckpointReader, read_state_dict

__all__ = ["load_pretrained", "save_pretrained", "resolve", "offline_switch", "hub_reachable", "CheckpointReader", "read_state_dict",
           "save_tokenizer_files"]
