"""Prefix-shared and padding-free layouts of TRL's concatenated preference batch.

TRL's layout (the default) is two rows per pair, prompt + chosen and prompt + rejected, padded to the longest row:
each prompt runs through the model twice, and padding runs through it too. Here the same batch is laid out as

    prefix_sharing:  one sequence per pair:  [shared prefix | chosen suffix | rejected suffix]
    padding_free:    every sequence of the micro-batch in one row, end to end, with no padding between them

and every number the loss reads is the one TRL's layout gives, because each token sees exactly the context and the
position it has there:

    token   attends to                                                           position id
    prefix  earlier prefix tokens                                                 its index t
    chosen  the prefix, earlier chosen tokens                                     its index t in prompt + chosen
    rejected  the prefix, earlier rejected tokens (never the chosen suffix)       its index t in prompt + rejected

and nothing across sequences. The shared prefix of a pair is the longest common token prefix of its two rows: TRL
tokenises prompt + reply per side, so the prompt's last token can differ between them, and replies that begin alike
share those tokens too (exact: the same tokens at the same positions have the same hidden states).

`source[r, t]` maps position t of TRL's row r (2B rows: B chosen, then B rejected) to the position of the packed
batch whose hidden state is the one TRL's layout has there. The LM head needs only the positions that predict a
response token (`response[r, t]`: TRL's label at t + 1 is not -100); the first rejected token is predicted from the
prefix's last position, which chosen and rejected share. With `logits_to_keep` the model projects exactly those,
once each (`keep`), and `logits_in_trl_layout` puts them back where TRL's code reads them; the fused head instead
gathers the hidden states through `source` and projects the response positions itself. So TRL's loss, its metrics,
the diversity term and the fused head all run unchanged on TRL's layout, and the packed layout is only how the
backbone computes it.
"""

from dataclasses import dataclass
from functools import cached_property

import torch

# Attention implementations that take an arbitrary mask exactly: a 4D boolean mask (sdpa), an additive float mask
# (eager: a boolean one would be added to the scores, silently wrong) or a FlexAttention BlockMask.
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
FLEX_BLOCK = 128  # FlexAttention's block size: its rows are padded to a multiple (a ragged last block fails backward)


def layout_refusal(model, prefix_sharing, padding_free):
    """Why `model` cannot run the shared or padding-free layout (one line), or None when it can."""
    if not (prefix_sharing or padding_free):
        return None
    names = ", ".join(n for n, on in (("prefix_sharing", prefix_sharing), ("padding_free", padding_free)) if on)
    config = model.config.get_text_config()
    if getattr(config, "is_encoder_decoder", False):
        return f"{names} supports decoder-only models; set {names.split(',')[0]}: false"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in MASKED_ATTENTION:
        return (
            f"{names} needs an attention implementation that honours a custom mask ({', '.join(MASKED_ATTENTION)}), "
            f"and this model uses {attention!r}; set attn_implementation: sdpa (or flex_attention on a GPU)"
        )
    if getattr(config, "output_router_logits", False):
        return f"{names} does not compute a mixture-of-experts auxiliary loss; set {names.split(',')[0]}: false"
    return None


@dataclass
class PackedPairs:
    """A micro-batch of B pairs laid out for one forward pass (module docstring).

    input_ids, position_ids  [R, T]   the packed rows (padding, where rows differ in length, at the end)
    document                 [R, T]   the sequence a token belongs to; -1 on padding
    branch                   [R, T]   0 shared prefix (or a whole unshared sequence), 1 chosen suffix, 2 rejected
    source                   [2B, L]  flat index into [R * T] of TRL's position (r, t); 0 where TRL has padding
    response                 [2B, L]  TRL's positions whose logits the loss reads
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    document: torch.Tensor
    branch: torch.Tensor
    source: torch.Tensor
    response: torch.Tensor

    @property
    def tokens(self):
        """Tokens the model processes (padding included), beside TRL's 2B x L."""
        return self.input_ids.numel()

    def attention_mask(self, attn_implementation):
        """The mask in the form `attn_implementation` takes: [R, 1, T, T] boolean (True attends) for sdpa, additive
        float for eager, a BlockMask for flex_attention. A padding token attends to the padding before it and to
        itself, so that no row of the mask is empty (an empty row is NaN under sdpa)."""
        if attn_implementation == "flex_attention":
            return self._block_mask()
        query_doc, key_doc = self.document.unsqueeze(2), self.document.unsqueeze(1)  # [R, T, 1], [R, 1, T]
        query_branch, key_branch = self.branch.unsqueeze(2), self.branch.unsqueeze(1)
        length = self.document.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=self.document.device).tril()
        mask = ((query_doc == key_doc) & ((key_branch == 0) | (key_branch == query_branch)) & causal).unsqueeze(1)
        if attn_implementation == "eager":
            return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)
        return mask

    def _block_mask(self):
        from torch.nn.attention.flex_attention import create_block_mask

        document, branch = self.document, self.branch

        def mask_mod(b, h, q, k):
            return (
                (document[b, q] == document[b, k]) & (k <= q) & ((branch[b, k] == 0) | (branch[b, k] == branch[b, q]))
            )

        rows, length = document.shape
        return create_block_mask(mask_mod, rows, None, length, length, device=document.device)

    def model_inputs(self, attn_implementation):
        """Keyword arguments of the model's forward for this layout (the cache off: it would ignore the mask)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask(attn_implementation),
            "position_ids": self.position_ids,
            "use_cache": False,
        }

    @cached_property
    def keep(self):
        """[R, T] boolean: the packed positions whose logits the loss reads (each once; `logits_to_keep`)."""
        keep = torch.zeros(self.input_ids.numel(), dtype=torch.bool, device=self.input_ids.device)
        keep[self.source[self.response]] = True
        return keep.view(self.input_ids.shape)

    def logits_in_trl_layout(self, kept_logits):
        """[2B, L, V] logits in TRL's layout from the kept positions' logits [K, V] (row-major order of `keep`):
        TRL's value at every response position, 0 elsewhere (nothing reads them)."""
        rank = torch.cumsum(self.keep.flatten(), 0) - 1  # position of each kept packed position in kept_logits
        rows, length = self.response.shape
        logits = kept_logits.new_zeros(rows, length, kept_logits.shape[-1])
        logits[self.response] = kept_logits[rank[self.source[self.response]]]
        return logits


def pack_pairs(input_ids, attention_mask, labels, prefix_sharing, padding_free, pad_token_id, multiple_of=1):
    """`PackedPairs` for TRL's concatenated batch: input_ids, attention_mask, labels [2B, L] (B chosen rows, then
    their B rejected rows; right-padded, labels -100 outside the replies). `multiple_of` pads the row length."""
    rows, length = input_ids.shape
    pairs = rows // 2
    lengths = attention_mask.sum(-1).tolist()
    ids = input_ids.tolist()
    sequences = []  # (tokens, position ids, branch, {TRL row: packed index of its position t, for t < its length})
    for b in range(pairs):
        chosen, rejected = ids[b][: lengths[b]], ids[pairs + b][: lengths[pairs + b]]
        if prefix_sharing:
            shared = _common_prefix(chosen, rejected)
            suffix = rejected[shared:]
            sequences.append(
                (
                    chosen + suffix,
                    list(range(len(chosen))) + list(range(shared, len(rejected))),
                    [0] * shared + [1] * (len(chosen) - shared) + [2] * len(suffix),
                    {
                        b: list(range(len(chosen))),
                        pairs + b: list(range(shared)) + list(range(len(chosen), len(chosen) + len(suffix))),
                    },
                )
            )
        else:
            for row, tokens in ((b, chosen), (pairs + b, rejected)):
                sequences.append((tokens, list(range(len(tokens))), [0] * len(tokens), {row: list(range(len(tokens)))}))
    groups = [sequences] if padding_free else [[s] for s in sequences]
    width = max(sum(len(s[0]) for s in group) for group in groups)
    width = -(-width // multiple_of) * multiple_of
    packed = {name: [] for name in ("input_ids", "position_ids", "document", "branch")}
    source = [[0] * length for _ in range(rows)]
    document = 0
    for r, group in enumerate(groups):
        row = {name: [] for name in packed}
        for tokens, positions, branch, where in group:
            start = r * width + len(row["input_ids"])
            for trl_row, indices in where.items():
                source[trl_row][: len(indices)] = [start + i for i in indices]
            row["input_ids"] += tokens
            row["position_ids"] += positions
            row["document"] += [document] * len(tokens)
            row["branch"] += branch
            document += 1
        pad = width - len(row["input_ids"])
        for name, value in (("input_ids", pad_token_id), ("position_ids", 0), ("document", -1), ("branch", 0)):
            packed[name].append(row[name] + [value] * pad)
    device = input_ids.device
    response = response_positions(labels, length)
    return PackedPairs(
        **{name: torch.tensor(value, device=device) for name, value in packed.items()},
        source=torch.tensor(source, device=device),
        response=response,
    )


def response_positions(labels, length):
    """[rows, length] boolean: the positions whose logits predict a response token (TRL's label at t + 1)."""
    response = torch.zeros(labels.shape[0], length, dtype=torch.bool, device=labels.device)
    width = min(length, labels.shape[1])
    response[:, : width - 1] = labels[:, 1:width] != -100
    return response


def mean_of_row_means(values, mask):
    """The mean over rows of each row's mean over its masked positions (0 for a row with none): values, mask [R, L],
    values 0 outside the mask. Rows are pairs in the loss (the fused head's outputs) and replies in the eval."""
    return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
