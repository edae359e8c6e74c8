"""How typical each scored candidate is under a model: its mean token log-probability, the rarity DivPO chooses by.

One pass of the model training starts from, before the first step:
  - each candidate is tokenised exactly as TRL's CPO trainer tokenises a pair (its chat-template step, then its own
    `tokenize_row`: BOS once, the prompt's last token moved into the reply when the two merge, EOS appended), so the
    tokens averaged are the labels training reads (untruncated);
  - the log-probabilities come from TRL's fused LM head (`add_fused_lm_head`: the positions whose label is a reply
    token, in tiles, float32 statistics; no `[N, L, V]` logits), on this rank's accelerator (the device training
    runs on; under ZeRO-3 the weights are gathered once for the pass, as TRL gathers them for generation);
  - the rows go in fixed groups of `rows_per_forward` (group g: rows g*G .. g*G+G-1), every candidate of a group in
    one padded forward, and group g runs on rank g mod world size; every rank then holds every row's values. A
    row's values so come from the same forward, of the same shape, on any number of ranks.
"""

import contextlib
import functools
import os
import sys
import time
import types

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPOTrainer lives in trl.experimental in TRL 1.x; we pin TRL
from trl.data_utils import maybe_apply_chat_template
from trl.experimental.cpo import CPOTrainer
from trl.trainer.utils import add_fused_lm_head


def tokenised_candidates(tokenizer, row):
    """(input_ids, labels) of each candidate of `row` ({prompt, candidates}) as TRL's CPO trainer makes a chosen
    sequence of them: labels -100 on the prompt."""
    trl = types.SimpleNamespace(processing_class=tokenizer, is_encoder_decoder=False, max_length=sys.maxsize)
    trl.build_tokenized_answer = functools.partial(CPOTrainer.build_tokenized_answer, trl)
    sequences = []
    for reply in row["candidates"]:
        pair = maybe_apply_chat_template({"prompt": row["prompt"], "chosen": reply, "rejected": reply}, tokenizer)
        tokens = CPOTrainer.tokenize_row(trl, pair)
        sequences.append((tokens["chosen_input_ids"], tokens["chosen_labels"]))
    return sequences


def candidate_logps(model, tokenizer, rows, device, rows_per_forward=1, shared=True):
    """Each candidate's mean token log-probability under `model`, a list per row of `rows` ({prompt, candidates}),
    computed on `device` (module docstring). `shared`: the groups are spread over the ranks and every rank returns
    every row's values; else this process scores all of `rows` alone (a candidates shard, which one rank writes)."""
    world, rank = _world() if shared else (1, 0)
    groups = range(0, len(rows), rows_per_forward)
    mine = [start for g, start in enumerate(groups) if g % world == rank]
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    if partitioned:  # ZeRO-3 weights are shards (on this rank's device) until gathered
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
    else:
        gather = contextlib.nullcontext()
        model.to(device)
    started, results = time.perf_counter(), {}
    # A PEFT model (a LoRA round's adapter) wraps the transformers model, whose layers hold the adapter in place: the
    # fused head goes on that model, whose forward returns hidden states to it (PeftModel's returns logits)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training, patched = model.training, "forward" in vars(causal_lm)
    forward = causal_lm.forward
    add_fused_lm_head(causal_lm)  # `fused_lm_head=True` returns per-token log-probabilities; the plain forward is kept
    model.eval()
    try:
        with gather, torch.no_grad():
            for start in mine:
                group = rows[start : start + rows_per_forward]
                sequences = [s for row in group for s in tokenised_candidates(tokenizer, row)]
                means = iter(_mean_logps(causal_lm, sequences, tokenizer.pad_token_id or 0, device))
                for index, row in enumerate(group, start):
                    results[index] = [next(means) for _ in row["candidates"]]
    finally:
        model.train(was_training)
        if patched:
            causal_lm.forward = forward
        else:
            del causal_lm.forward
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    seconds = time.perf_counter() - started
    if rank == 0 and shared:
        candidates = sum(len(row["candidates"]) for row in rows)
        print(f"rarity pass: {len(rows)} rows ({candidates} candidates) on {device} x {world} in {seconds:.1f} s "
              f"({len(rows) / max(seconds, 1e-9):.1f} rows/s)", file=sys.stderr)  # fmt: skip
    return [results[i] for i in range(len(rows))]


def _mean_logps(model, sequences, pad_id, device):
    """The mean over each sequence's label positions of log p(label), one right-padded forward."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    output = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), labels=labels.to(device),
        fused_lm_head=True,
    )  # fmt: skip
    mask = output.label_mask.float()
    return ((output.log_probs.float() * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()


def _world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0
