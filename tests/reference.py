"""The diversity term written straight from its specification, in float64, one position at a time.

Deliberately independent of diversity_simpo_trainer: no index arithmetic, no chunks, no custom backward.
"""

import torch
from conftest import DEVICE


def diversity_reference(logits, labels):
    """(entropy, kl) for TRL's concatenated batch: logits [2B, L, V], labels [2B, L'] with -100 outside responses.

    Means over pairs: each chosen reply's mean entropy over its response positions, each pair's mean KL(rejected ||
    chosen) over the positions that are response positions in both rows (0 for a pair with none), then the mean of
    each over the B pairs.
    """
    z = logits.double()
    rows, length, _ = z.shape
    pairs = rows // 2
    labels = torch.cat([labels, labels.new_full((rows, max(0, length - labels.shape[1])), -100)], dim=1)

    def is_response(row, t):  # logits at t predict the label at t + 1
        return t + 1 < length and labels[row, t + 1].item() != -100

    zero = z.sum() * 0  # keeps the graph so that gradients are defined (and zero)
    pair_entropies, pair_kls = [], []
    for b in range(pairs):
        entropies, kls = [], []
        for t in range(length):
            if not is_response(b, t):
                continue
            log_p = torch.log_softmax(z[b, t], dim=-1)
            entropies.append(-(log_p.exp() * log_p).sum())
            if is_response(pairs + b, t):
                log_q = torch.log_softmax(z[pairs + b, t], dim=-1)
                kls.append((log_q.exp() * (log_q - log_p)).sum())
        pair_entropies.append(torch.stack(entropies).mean() if entropies else zero)
        pair_kls.append(torch.stack(kls).mean() if kls else zero)
    return torch.stack(pair_entropies).mean(), torch.stack(pair_kls).mean()


def random_batch(pairs=3, length=9, vocab=13, seed=0):
    """Random logits and TRL-style labels: a prompt (-100), a response, then right padding (-100) per row."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * pairs, length, vocab, generator=generator) * 2
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=generator)
    for row in range(2 * pairs):
        prompt = int(torch.randint(1, length // 2, (), generator=generator))
        end = int(torch.randint(prompt + 1, length + 1, (), generator=generator))
        labels[row, :prompt] = -100
        labels[row, end:] = -100
    return logits.to(DEVICE), labels.to(DEVICE)


def label_logprob_reference(logits, labels):
    """[2B, L] float64 log-probability of the next-token label at each response position (0 elsewhere): the logits at
    t predict the label at t + 1; prompt and padding labels are -100."""
    z = logits.double()
    rows, length, _ = z.shape
    out = torch.zeros(rows, length, dtype=torch.float64, device=z.device)
    for row in range(rows):
        for t in range(length - 1):
            label = labels[row, t + 1].item() if t + 1 < labels.shape[1] else -100
            if label != -100:
                out[row, t] = torch.log_softmax(z[row, t], dim=-1)[label]
    return out


def reply_logit_reference(logits, labels):
    """(logits/chosen, logits/rejected) in float64: each reply's mean, over its response positions, of the mean logit
    over the vocabulary, then the mean over the B chosen and the B rejected replies."""
    z = logits.double()
    rows, length, _ = z.shape
    replies = []
    for row in range(rows):
        means = [z[row, t].mean() for t in range(length - 1) if t + 1 < labels.shape[1] and labels[row, t + 1] != -100]
        replies.append(torch.stack(means).mean())
    return torch.stack(replies[: rows // 2]).mean().item(), torch.stack(replies[rows // 2 :]).mean().item()
