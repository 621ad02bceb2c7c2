"""The network: GPT2Config and its presets (config), the config.json mapping (config_json), attention, GPT-2
(gpt2) and GPT-Neo (gpt_neo), the Architecture records (architectures), the checks of input values
(input_checks), and module surgery: matching module names and replacing modules (surgery)."""

from gpt2lite.model.architectures import ARCHITECTURES, Architecture, architecture
from gpt2lite.model.attention import CausalSelfAttention, attention_mask_for
from gpt2lite.model.config import PRESETS, GPT2Config
from gpt2lite.model.gpt2 import GPT2, GPT2ForSequenceClassification, GPT2Model, count_parameters

__all__ = ["GPT2Config", "PRESETS", "GPT2", "GPT2ForSequenceClassification", "GPT2Model", "count_parameters",
           "CausalSelfAttention", "attention_mask_for", "Architecture", "ARCHITECTURES", "architecture"]
