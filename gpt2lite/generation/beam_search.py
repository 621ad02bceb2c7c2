"""Beam search with the KV cache, step for step as transformers 5's generate (num_beams > 1, no sampling).

Each prompt keeps num_beams running beams. At every step the 2 * num_beams best continuations over all
beams (by summed log-probability, after the controls) are taken; those that end (eos, a stop string, or
max_new_tokens) become finished hypotheses if they rank in the top num_beams, scored
sum(log p) / n_new ** length_penalty; the best num_beams that do not end run on. A prompt stops adding
hypotheses once it holds num_beams of them and (transformers' heuristic) its best running beam, scored
at the current length, cannot beat the worst; early_stopping=True also stops it as soon as it holds
num_beams. Generation stops when no prompt can improve, or (early_stopping) every prompt is full, or every
continuation ends. The best hypothesis of each prompt is returned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPOSSIBLE = -1.0e9  # transformers' score for "never choose this"


def gather_beams(tensor, index):
    """tensor (B, K, ...) -> (B, k, ...): the beams `index` (B, k) of each row."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


@torch.no_grad()
def beam_search(model, cache, logits, mask, next_position, config, history=None):
    """Beam search from prefilled prompts: cache holds B rows, logits (B, 1, V) are the prompts' last,
    mask (B, T) and next_position (B, 1) as gpt2lite.generation.decoding makes them. history: the controls over the
    B * num_beams beams (None: none asked). Returns the best hypothesis per prompt, (B, n_new), padded
    with pad_id after the shorter ones."""
    beams, max_new = config.num_beams, config.max_new_tokens
    B, device = logits.size(0), logits.device
    pad_id = config.eos_id if config.pad_id is None else config.pad_id
    fill = 0 if pad_id is None else pad_id  # with neither, no hypothesis ends before max_new_tokens
    cache.repeat_interleave(beams)
    mask = mask.repeat_interleave(beams, dim=0)  # (B * nb, T)
    next_position = next_position.repeat_interleave(beams, dim=0)  # (B * nb, 1)
    logits = logits.repeat_interleave(beams, dim=0)  # (B * nb, 1, V)

    top_beams = torch.arange(2 * beams, device=device) < beams  # (2nb,) only these may become hypotheses
    row_offset = torch.arange(B, device=device)[:, None] * beams  # (B, 1) flat index of each row's beam 0
    running = torch.full((B, beams, max_new), fill, dtype=torch.long, device=device)  # new tokens per beam
    running_scores = torch.zeros(B, beams, device=device)
    running_scores[:, 1:] = IMPOSSIBLE  # at first all beams are equal: expand only the first
    hypotheses = Hypotheses(running.clone())
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)

    for step in range(max_new):
        top_scores, parent, token, candidates = top_candidates(logits, history, running, running_scores, step)
        ends = candidates_end(history, config, parent + row_offset, token, step)  # (B, 2nb)

        # the best num_beams candidates that do not end run on
        alive_scores = top_scores + ends.to(torch.float32) * IMPOSSIBLE
        chosen = torch.topk(alive_scores, beams).indices  # (B, nb)
        running = gather_beams(candidates, chosen)
        running_scores = gather_beams(alive_scores, chosen)
        running_parent = gather_beams(parent, chosen) + row_offset  # (B, nb) flat index of each beam's parent

        # the candidates that end, among the top num_beams, join the hypotheses if they beat one
        scores = top_scores / ((step + 1) ** config.length_penalty)
        full = hypotheses.is_finished.all(dim=-1, keepdim=True) & config.early_stopping  # (B, 1)
        scores += full.to(torch.float32) * IMPOSSIBLE
        scores += (~improvable).to(torch.float32) * IMPOSSIBLE
        hypotheses.add(candidates, scores, ends & top_beams[None, :], step + 1)

        # can any prompt still improve? (transformers' heuristic: the best running beam at today's length)
        best_running = running_scores[:, :1] / ((step + 1) ** config.length_penalty)  # (B, 1)
        improvable = improvable & (best_running > hypotheses.worst()).any(dim=-1, keepdim=True)
        all_full = bool(hypotheses.is_finished.all()) and config.early_stopping
        if not bool(improvable.any()) or all_full or bool(ends.all()):
            break

        parents, tokens = running_parent.flatten(), running[:, :, step].flatten()  # (B * nb,)
        cache.reorder(parents)
        if history is not None:
            history.append(tokens, parents)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(tokens[:, None], attention_mask=mask, position_ids=next_position, kv_cache=cache)
        next_position = next_position + 1
    return hypotheses.best()  # (B, n_new)


def top_candidates(logits, history, running, running_scores, step: int):
    """The 2 * num_beams best continuations of each prompt's beams by summed log-probability (after the
    controls): enough that num_beams of them can run on even if num_beams end. logits (B * nb, 1, V),
    running (B, nb, max_new) and running_scores (B, nb) are the beams'. Returns their scores, parent beams
    and tokens, (B, 2nb) each, and their sequences (B, 2nb, max_new) with the new token at `step`."""
    B, beams, _ = running.shape
    log_probs = F.log_softmax(logits[:, -1, :].float(), dim=-1)  # (B * nb, V)
    if history is not None:
        log_probs = history.process(log_probs)
    V = log_probs.size(-1)
    totals = (log_probs.view(B, beams, V) + running_scores[:, :, None]).view(B, beams * V)
    top_scores, top_index = torch.topk(totals, 2 * beams)  # (B, 2nb)
    parent, token = top_index // V, top_index % V  # (B, 2nb) each
    candidates = gather_beams(running, parent)  # (B, 2nb, max_new)
    candidates[:, :, step] = token
    return top_scores, parent, token, candidates


def candidates_end(history, config, rows, token, step: int):
    """(B, 2nb) bool: whether each candidate (its beam's flat row, its token) ends its sequence."""
    if step + 1 == config.max_new_tokens:
        return torch.ones_like(token, dtype=torch.bool)
    ends = token == config.eos_id if config.eos_id is not None else torch.zeros_like(token, dtype=torch.bool)
    if history is not None and history.stop is not None:
        hits = history.stopped(rows.flatten().tolist(), token.flatten().tolist())
        ends = ends | torch.tensor(hits, dtype=torch.bool, device=token.device).view_as(token)
    return ends


class Hypotheses:
    """The num_beams best finished sequences of each prompt, best first: tokens (B, nb, max_new) padded
    after each one's length, scores (B, nb); a slot without a real hypothesis scores IMPOSSIBLE."""

    def __init__(self, empty):
        B, beams, _ = empty.shape
        self.tokens = empty  # (B, nb, max_new)
        self.scores = torch.full((B, beams), IMPOSSIBLE, device=empty.device)
        self.lengths = torch.zeros(B, beams, dtype=torch.long, device=empty.device)
        self.is_finished = torch.zeros(B, beams, dtype=torch.bool, device=empty.device)

    def add(self, candidates, scores, just_finished, length: int):
        """Keep the best num_beams of the hypotheses and the candidates (B, 2nb, max_new) that just
        finished (B, 2nb) with `scores` (B, 2nb), each `length` tokens long."""
        scores = scores + (~just_finished) * IMPOSSIBLE  # the others cannot be chosen
        merged = torch.cat([self.scores, scores], dim=1)  # (B, 3nb)
        best = torch.topk(merged, self.scores.size(1)).indices  # (B, nb)
        self.tokens = gather_beams(torch.cat([self.tokens, candidates], dim=1), best)
        self.scores = gather_beams(merged, best)
        self.is_finished = gather_beams(torch.cat([self.is_finished, just_finished], dim=1), best)
        lengths = torch.full_like(just_finished, length, dtype=torch.long)
        self.lengths = gather_beams(torch.cat([self.lengths, lengths], dim=1), best)

    def worst(self):
        """(B, nb): the worst hypothesis score of a prompt whose slots are all real, else IMPOSSIBLE."""
        return torch.where(self.is_finished, self.scores.min(dim=1, keepdim=True).values, IMPOSSIBLE)

    def best(self):
        """(B, n_new): each prompt's best hypothesis, cut to the longest of them."""
        return self.tokens[:, 0, :int(self.lengths[:, 0].max())]
