"""Set-up shared by the parity and adapter tests: the token batch, cached base models, random-init
transformers checkpoints, a few AdamW steps. (Training-loop tests have theirs in train_helpers.py.)"""

import copy

import torch

from gpt2lite import GPT2

# Two real GPT-2 sentences of 10 tokens: "The quick brown fox jumps over the lazy dog." and "I like a good
# book about my dog and it"
TOKENS = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
                       [40, 588, 257, 922, 1492, 546, 616, 3290, 290, 340]])

LOADED = {}


def load(directory, cls=GPT2):
    """A fresh copy of the checkpoint's model in eval mode (each checkpoint is read once per session)."""
    key = (str(directory), cls)
    if key not in LOADED:
        LOADED[key] = cls.from_pretrained(str(directory)).eval()
    return copy.deepcopy(LOADED[key])


def hf_lm(directory):
    """transformers' GPT2LMHeadModel from a checkpoint directory, in eval mode."""
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(str(directory)).eval()


def save_random(model_class, config, directory, seed):
    """A random-init transformers `model_class(config)` (seeded) written to `directory` by save_pretrained;
    returns the model in eval mode."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.save_pretrained(str(directory))
    return model


def adamw_steps(model, ids, steps, lr, weight_decay=0.01, labels=None) -> list:
    """`steps` AdamW steps on model(ids, labels=labels, or ids for a next-token loss) over the trainable
    parameters; the losses, step by step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids if labels is None else labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def batch(B=3, T=12, seed=0, padding="left", vocab=50000):
    """Random token ids below the pad id 50256, with a (B, T) mask: row 0 full, the others padded with 50256."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padding is not None:
        for row in range(1, B):
            n_pad = min(T - 1, 3 * row)
            pad = slice(0, n_pad) if padding == "left" else slice(T - n_pad, T)
            mask[row, pad] = 0
            ids[row, pad] = 50256
    return ids, mask
