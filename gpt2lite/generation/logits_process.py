"""Generation controls that read each sequence's tokens so far, as transformers' generate applies them:
repetition_penalty, no_repeat_ngram_size and min_new_tokens edit the next-token scores (transformers'
RepetitionPenalty-, NoRepeatNGram- and MinNewTokensLengthLogitsProcessor), and stop strings end a
sequence (StopStringCriteria).

`Controls` keeps the tokens of every sequence (prompt + new, (N, T + max_new_tokens)); beam search
reorders its rows as beams are chosen. Left padding is never read: a prompt starts at its first real token.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence

import torch


class Controls:
    """The token history of N sequences and the controls of one `generate` call that need it.

    input_ids, attention_mask: the left-padded prompts (N, T). decode: token ids -> text, needed for stop
    strings only.
    """

    def __init__(self, input_ids, attention_mask, config, vocab_size: int, decode: Optional[Callable] = None):
        N, T = input_ids.shape
        self.config = config
        self.tokens = input_ids.new_empty(N, T + config.max_new_tokens)  # (N, T + max_new)
        self.tokens[:, :T] = input_ids
        self.length = T  # tokens stored per row
        self.prompt_length = T
        self.first_real = (attention_mask != 0).int().argmax(dim=1)  # (N,) where each prompt starts
        self.stop = StopStrings(config.stop_strings, decode) if config.stop_strings else None
        self.seen = None  # (N, V) bool: the tokens each row holds, for the repetition penalty
        if config.repetition_penalty != 1.0:
            real = torch.arange(T, device=input_ids.device)[None, :] >= self.first_real[:, None]  # (N, T)
            seen = torch.zeros(N, vocab_size + 1, dtype=torch.bool, device=input_ids.device)
            seen.scatter_(1, torch.where(real, input_ids, vocab_size), True)  # padding -> a spare column
            self.seen = seen[:, :vocab_size].contiguous()

    @staticmethod
    def needed(config) -> bool:
        """Whether `config` asks for any control this class applies."""
        return (config.repetition_penalty != 1.0 or config.no_repeat_ngram_size > 0 or
                (config.min_new_tokens > 0 and config.eos_id is not None) or bool(config.stop_strings))

    def process(self, scores):
        """Apply the controls to next-token scores (N, V) float32, in transformers' order."""
        config = self.config
        if self.seen is not None:
            scores = self._repetition_penalty(scores)
        if config.no_repeat_ngram_size > 0:
            scores = self._no_repeat_ngram(scores)
        if config.eos_id is not None and self.length - self.prompt_length < config.min_new_tokens:
            scores = scores.clone()
            scores[:, config.eos_id] = float("-inf")
        return scores

    def _repetition_penalty(self, scores):
        """CTRL's penalty on every token the row holds (its prompt without padding, and its new tokens):
        a positive score is divided by the penalty, a negative one multiplied."""
        penalty = self.config.repetition_penalty
        penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
        return torch.where(self.seen, penalized, scores)

    def _no_repeat_ngram(self, scores):
        """Ban every token that would complete an n-gram the row already holds (padding excluded)."""
        n = self.config.no_repeat_ngram_size
        L = self.length
        if L < n:
            return scores
        tokens = self.tokens[:, :L]  # (N, L)
        suffix = tokens[:, L + 1 - n:]  # (N, n - 1): the last n - 1 tokens
        windows = tokens.unfold(1, n, 1)  # (N, L - n + 1, n)
        matches = (windows[..., :-1] == suffix[:, None, :]).all(dim=-1)  # (N, L - n + 1)
        starts = torch.arange(windows.size(1), device=tokens.device)
        matches &= starts[None, :] >= self.first_real[:, None]  # windows in the left padding do not count
        V = scores.size(1)
        banned = torch.zeros(scores.size(0), V + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(matches, windows[..., -1], V), True)  # unmatched -> a spare column
        return scores.masked_fill(banned[:, :V], float("-inf"))

    def stopped(self, rows: Sequence[int], next_tokens: Sequence[int]) -> List[bool]:
        """For each (row, next token): whether appending the token completes a stop string."""
        if self.stop is None:
            return [False] * len(rows)
        K = self.stop.window
        tails = self.tokens[:, max(0, self.length - K + 1):self.length].tolist()  # (N, <= K - 1)
        first = (self.first_real - max(0, self.length - K + 1)).clamp(min=0).tolist()
        return [self.stop.completes(tails[row][first[row]:] + [token]) for row, token in zip(rows, next_tokens)]

    def append(self, token, parents=None):
        """Extend every row by token (N,); with parents (N,), row i first becomes a copy of row parents[i]
        (beam search keeping the beams it chose)."""
        if parents is not None:
            self.tokens[:, :self.length] = self.tokens[parents, :self.length]
            self.first_real = self.first_real[parents]
            if self.seen is not None:
                self.seen = self.seen[parents]
        self.tokens[:, self.length] = token
        self.length += 1
        if self.seen is not None:
            self.seen.scatter_(1, token[:, None], True)


class StopStrings:
    """Whether a sequence's text now contains one of `strings`, ending in its last token's text.

    As transformers' StopStringCriteria: the match may begin in earlier tokens (or in the prompt) and may
    end inside the last token ("st" + "opper" completes "stop"); a stop string that lies wholly in earlier
    tokens does not count again. decode: token ids -> text (e.g. gpt2lite.Tokenizer().decode).
    """

    def __init__(self, strings: Sequence[str], decode: Optional[Callable]):
        if decode is None:
            raise ValueError("stop_strings need a tokenizer to decode tokens: pass tokenizer=gpt2lite.Tokenizer() "
                             "(or any object with .decode(ids), or a function ids -> str)")
        self.strings = tuple(strings)
        self.decode = decode
        # every token decodes to at least one byte, so the last K tokens hold any match that ends in the last one
        self.window = max(len(s.encode("utf-8")) for s in self.strings)

    def completes(self, ids: List[int]) -> bool:
        """ids: the last tokens of a sequence (at most `window`); True if the last one completes a stop string."""
        before, now = self.decode(ids[:-1]), self.decode(ids)
        # the text before the last token (a UTF-8 character split across tokens may decode differently)
        unchanged = len(os.path.commonprefix([before, now]))
        return any(now.rfind(s) + len(s) > unchanged for s in self.strings if s in now)
