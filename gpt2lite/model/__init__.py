"""The network: GPT2Config and its presets, the config.json mapping, attention, GPT-2 and GPT-Neo, the Architecture
records, the checks of input values, and module surgery (matching module names, replacing modules)."""
