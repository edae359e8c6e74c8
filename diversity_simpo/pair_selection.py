"""Which two of a prompt's scored candidates are trained as its pair (`pair_selection`).

A row of scored candidates holds a prompt, replies y_1..y_n and their scores s_1..s_n (a reward model's, say): the data
the SimPO authors train their strongest models on (princeton-nlp/llama3-ultrafeedback-armorm). Two rules:

    best_vs_worst  chosen = the highest score, rejected = the lowest: the SimPO authors' on-policy recipe (numpy's
                   argmax and argmin there, so the first of tied candidates; here too)
    divpo          DivPO (Lanchantin et al., 2025, "Diverse Preference Optimization", arXiv 2501.18101) with its
                   model-probability criterion. The quality bar is t = max(s) - rho * (max(s) - min(s)), rho a
                   fraction of the row's score range (`divpo_rho`, as in the paper and Meta's fairseq2 code). Among
                   the candidates that meet it (s >= t) the chosen reply is the rarest: the lowest mean token
                   log-probability under the model training starts from; among those below it (s < t) the rejected
                   reply is the most typical: the highest. rho = 0 keeps only the best-scored replies as chosen; a
                   larger rho lets more good-enough replies compete on rarity. (fairseq2 draws the rejected reply
                   from a band near the lowest score, s <= min(s) + rho * (max(s) - min(s)); at rho = 0.5 the two
                   rules meet.)

The same reply sampled twice is normal for short answers: a rejected candidate whose text equals the chosen one is
passed over (and if every reply below the bar is a copy of the rarest good one, the next rarest is chosen). A row
with no two different replies on the two sides (every score equal, or one reply) makes no pair: it
is skipped and counted by the caller, never turned into a pair that teaches nothing.
"""

import math

import torch


def best_vs_worst(scores, replies):
    """(chosen index, rejected index) or None: the first highest score against the first lowest whose reply differs."""
    chosen = max(range(len(scores)), key=lambda i: (scores[i], -i))
    below = [i for i in range(len(scores)) if scores[i] < scores[chosen] and replies[i] != replies[chosen]]
    if not below:
        return None
    return chosen, min(below, key=lambda i: (scores[i], i))


def divpo(scores, logps, rho, replies):
    """(chosen index, rejected index) or None, by DivPO's rule (module docstring); `logps` the candidates' mean token
    log-probabilities. Ties go to the first candidate."""
    high, low = max(scores), min(scores)
    bar = high - rho * (high - low)
    for chosen in sorted((i for i in range(len(scores)) if scores[i] >= bar), key=lambda i: (logps[i], i)):
        below = [i for i in range(len(scores)) if scores[i] < bar and replies[i] != replies[chosen]]
        if below:  # else every reply below the bar is this one again: the next rarest good reply
            return chosen, min(below, key=lambda i: (-logps[i], i))
    return None


def candidate_logps(model, tokenizer, rows):
    """Each candidate's mean token log-probability under `model`, as a list per row: the prompt rendered by TRL's own
    chat-template step (as training renders it), the reply's tokens and the end-of-turn token scored. Each row is
    one forward pass of its own candidates, the same on any rank. Under DDP and DeepSpeed the rows are split across
    the ranks and the results gathered, so every rank ends with all of them (ZeRO-3: the weights are gathered once
    for the pass, as TRL gathers them for generation)."""
    import contextlib

    from trl.data_utils import maybe_apply_chat_template

    world, rank = _world()
    mine = list(range(rank, len(rows), world))
    device = next(model.parameters()).device
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    gather = contextlib.nullcontext()
    if partitioned:  # ZeRO-3 weights are shards until gathered
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
    results = {}
    was_training = model.training
    model.eval()
    with gather, torch.no_grad():
        for index in mine:
            row = rows[index]
            sequences = []
            for reply in row["candidates"]:
                text = maybe_apply_chat_template({"prompt": row["prompt"], "completion": reply}, tokenizer)
                prompt_ids = tokenizer(text["prompt"], add_special_tokens=False).input_ids
                reply_ids = tokenizer(text["completion"], add_special_tokens=False).input_ids
                if not text["completion"].endswith(tokenizer.eos_token or "\0"):
                    reply_ids = [*reply_ids, tokenizer.eos_token_id]
                sequences.append((prompt_ids, reply_ids))
            results[index] = _mean_logps(model, sequences, tokenizer.pad_token_id or 0, device)
    model.train(was_training)
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    return [results[i] for i in range(len(rows))]


def _mean_logps(model, sequences, pad_id, device):
    width = max(len(p) + len(r) for p, r in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    in_reply = torch.zeros(len(sequences), width, dtype=torch.bool)
    for row, (prompt, reply) in enumerate(sequences):
        ids[row, : len(prompt) + len(reply)] = torch.tensor(prompt + reply)
        mask[row, : len(prompt) + len(reply)] = 1
        in_reply[row, len(prompt) : len(prompt) + len(reply)] = True
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()[:, :-1]
    targets = ids[:, 1:].to(device)
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    scored = in_reply[:, 1:].to(device)
    return ((logp * scored).sum(-1) / scored.sum(-1).clamp(min=1)).tolist()


def _world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def is_score(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def select_divpo(dataset, model, tokenizer, rho, counts=None):
    """The pairs DivPO chooses from rows {prompt, candidates, scores, row_id} (diversity_simpo/data.py), with the
    candidates' mean token log-probabilities under `model` (the model training starts from), as a Dataset of
    {prompt, chosen, rejected, row_id}; `counts` receives how many rows made a pair."""
    import hashlib
    import json

    from datasets import Dataset

    from diversity_simpo.data import one_kind

    rows = dataset.to_list()
    logps = candidate_logps(model, tokenizer, rows)
    pairs, choices = [], []
    for row, row_logps in zip(rows, logps, strict=True):
        texts = [json.dumps(reply, ensure_ascii=False) for reply in row["candidates"]]
        choice = divpo(row["scores"], row_logps, rho, texts)
        choices.append((row["row_id"], choice))
        if choice is None:
            continue
        pair = {
            "prompt": row["prompt"],
            "chosen": row["candidates"][choice[0]],
            "rejected": row["candidates"][choice[1]],
        }
        pairs.append(pair | {k: row[k] for k in ("row_id", "reference") if k in row})
    if counts is not None:
        counts.update(
            kept=len(pairs), skipped_no_preference=counts.get("skipped_no_preference", 0) + len(rows) - len(pairs)
        )
        # which candidates each row's pair is, as one fingerprint: the same on any number of ranks, and on resume
        counts["pairs_sha256"] = hashlib.sha256(json.dumps(choices).encode()).hexdigest()
    return Dataset.from_list(one_kind(pairs))
