"""SimPO with a diversity term: TRL's CPOTrainer plus one extra loss on the logits it already computes.

    loss           = simpo_loss + diversity_weight * diversity_loss
    diversity_loss = -alpha * entropy + (1 - alpha) * kl

`simpo_loss` is TRL's own (`loss_type="simpo"`). Both parts of the term are means over pairs, like SimPO's
length-normalised reward (B pairs; chosen row b pairs with rejected row b + B):

    entropy = 1/B sum_b  1/|R_b| sum_{t in R_b} H(softmax(z_b,t))              R_b: chosen row b's response positions
    kl      = 1/B sum_b  1/|S_b| sum_{t in S_b} KL(P_b+B,t || P_b,t)           S_b: positions in R_b that are response
                                                                                positions of row b + B too (0 if none)

Why per pair, not per token of the micro-batch: one optimizer step must depend only on the pairs in it, not on how
they are split into micro-batches or ranks. The Trainer averages micro-batch losses and DDP averages ranks, so any
loss that is a mean over the pairs of its micro-batch (SimPO's is) gives the mean over all pairs of the step, for any
split into equal-sized micro-batches. A mean over the micro-batch's tokens would weigh the tokens of a micro-batch of
short replies more than those of one of long replies. Per pair needs no token count from other micro-batches or
ranks, and each reply weighs the same whatever its length, as in SimPO's reward.

`_EntropyAndKL` computes both from TRL's logits; with `fused_lm_head` the same quantities come from
`diversity_simpo/fused_head.py`, without the `[2B, L, V]` logits. With `prefix_sharing` or `padding_free` the
backbone runs on a packed layout of the same batch (`diversity_simpo/layout.py`) and everything above reads the
same numbers.
"""

import os
import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPOTrainer lives in trl.experimental in TRL 1.x; we pin TRL
from trl.experimental.cpo import CPOConfig, CPOTrainer

from diversity_simpo.fused_head import add_fused_preference_head, fused_head_refusal
from diversity_simpo.layout import FLEX_BLOCK, layout_refusal, mean_of_row_means, pack_pairs, response_positions


@dataclass
class DiversitySimPOConfig(CPOConfig):
    """`CPOConfig` with SimPO defaults and the diversity term's fields.

    Note on `simpo_gamma`: TRL's `simpo_gamma` is the absolute target margin gamma of the SimPO paper (the loss is
    `-log sigmoid(beta * (avg_logp_chosen - avg_logp_rejected) - gamma)`), not the paper's `gamma / beta` ratio.
    With `beta=2.5, simpo_gamma=0.7` the ratio is 0.28.
    """

    loss_type: str = field(default="simpo", metadata={"help": "Preference loss; `simpo` for this tool."})
    cpo_alpha: float = field(default=0.0, metadata={"help": "Weight of CPO's NLL term; 0 gives pure SimPO."})
    simpo_gamma: float = field(default=0.7, metadata={"help": "SimPO target reward margin gamma (absolute)."})
    beta: float = field(default=2.0, metadata={"help": "SimPO reward scale beta (the paper uses 2.0-2.5)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False for TRL's collator."})
    # TRL defaults the deprecated `gradient_checkpointing` to True, which makes transformers warn on every run; leave
    # both names unset so that either one works when given (`activation_checkpointing` is the current name).
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing."}
    )
    diversity_weight: float = field(
        default=0.05, metadata={"help": "Weight of the diversity loss added to the SimPO loss (>= 0; 0 disables it)."}
    )
    diversity_alpha: float = field(
        default=0.1, metadata={"help": "Share of the entropy term in the diversity loss, in [0, 1]; the rest is KL."}
    )
    diversity_chunk_elements: int = field(
        default=2**21,
        metadata={
            "help": "Logit elements (positions x vocabulary) processed at once by the diversity term and the fused "
            "head; bounds their extra memory to a few float32 buffers of this size, whatever the vocabulary."
        },
    )
    fused_lm_head: bool = field(
        default=False,
        metadata={
            "help": "Compute SimPO's log-probabilities and the diversity term from the hidden states in tiles, "
            "never materialising the [2B, L, V] logits (same numbers, far less memory)."
        },
    )

    prefix_sharing: bool = field(
        default=False,
        metadata={
            "help": "One sequence per pair: the shared prompt once, then the chosen and the rejected reply, each "
            "seeing only the prompt and itself (same numbers as two rows; needs sdpa, eager or flex_attention)."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Pack the micro-batch's sequences end to end in one row, with no padding and attention blocked "
            "across sequences (same numbers; needs sdpa, eager or flex_attention)."
        },
    )

    def __post_init__(self):
        _check_range("diversity_weight", self.diversity_weight, 0.0, float("inf"), "a number >= 0")
        _check_range("diversity_alpha", self.diversity_alpha, 0.0, 1.0, "a number in [0, 1]")
        _check_range("diversity_chunk_elements", self.diversity_chunk_elements, 1, float("inf"), "an integer >= 1")
        if self.diversity_weight > 0 and self.loss_type != "simpo":
            warnings.warn(
                f"diversity_weight={self.diversity_weight} with loss_type={self.loss_type!r}: the diversity term is "
                "added to that loss too, but this tool is tuned and tested for loss_type='simpo'.",
                stacklevel=2,
            )
        super().__post_init__()


def _check_range(name, value, low, high, allowed):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise ValueError(f"{name}={value!r} is out of range: it must be {allowed}.")


class _EntropyAndKL(torch.autograd.Function):
    """Entropy of the chosen responses and KL(rejected || chosen), without keeping `[N, L, V]` float32 copies.

    Inputs (N = 2B rows: B chosen rows, then their B rejected rows, as TRL concatenates them):
        logits           [N, L, V]  model dtype; row b pairs with row b + B
        chosen_index     [P]        flat indices into logits.view(N*L, V) of the chosen rows' response positions
        rejected_index   [P]        the same positions in the paired rejected rows
        entropy_weight   [P]        1 / (B |R_b|) for a position of chosen row b (module docstring)
        kl_weight        [P]        1 / (B |S_b|) where the rejected row is a response position there too, else 0
        chunk_rows       int        positions processed at once
    Outputs:
        logits (the same tensor, passed through), entropy [], kl []

        entropy = sum_p entropy_weight[p] * H(softmax(z_cho[p])),        H(q) = -sum_v q_v log q_v
        kl      = sum_p kl_weight[p] * KL(softmax(z_rej[p]) || softmax(z_cho[p])),
                  KL(r || c) = sum_v r_v (log r_v - log c_v)

    Memory: forward saves nothing but the logits (which TRL's log-probability pass keeps anyway) and recomputes each
    chunk in backward. Backward adds the term's gradient in place into the gradient that TRL's SimPO loss sends back
    through the passed-through logits, so autograd never holds a second dense `[N, L, V]` gradient.
    """

    @staticmethod
    def forward(ctx, logits, chosen_index, rejected_index, entropy_weight, kl_weight, chunk_rows):
        flat = logits.detach().view(-1, logits.shape[-1])
        entropy = torch.zeros((), dtype=torch.float32, device=logits.device)
        kl = torch.zeros((), dtype=torch.float32, device=logits.device)
        for rows in _chunks(chosen_index.numel(), chunk_rows):
            log_c, log_r = _log_softmax_pair(flat, chosen_index[rows], rejected_index[rows])
            entropy -= ((log_c.exp() * log_c).sum(-1) * entropy_weight[rows]).sum()
            kl += ((log_r.exp() * (log_r - log_c)).sum(-1) * kl_weight[rows]).sum()
        ctx.save_for_backward(logits, chosen_index, rejected_index, entropy_weight, kl_weight)
        ctx.chunk_rows = chunk_rows
        ctx.set_materialize_grads(False)
        return logits, entropy, kl

    @staticmethod
    def backward(ctx, grad_logits, grad_entropy, grad_kl):
        logits, chosen_index, rejected_index, entropy_weight, kl_weight = ctx.saved_tensors
        if grad_logits is None:
            grad_logits = torch.zeros_like(logits)
        elif not grad_logits.is_contiguous():
            grad_logits = grad_logits.contiguous()
        g_ent = grad_entropy if grad_entropy is not None else 0.0
        g_kl = grad_kl if grad_kl is not None else 0.0
        flat = logits.detach().view(-1, logits.shape[-1])
        grad_flat = grad_logits.view(-1, logits.shape[-1])
        for rows in _chunks(chosen_index.numel(), ctx.chunk_rows):
            cho, rej = chosen_index[rows], rejected_index[rows]
            log_c, log_r = _log_softmax_pair(flat, cho, rej)
            p_c, p_r = log_c.exp(), log_r.exp()
            log_ratio = log_r - log_c
            w = (g_kl * kl_weight[rows]).unsqueeze(-1)
            e = (g_ent * entropy_weight[rows]).unsqueeze(-1)
            # dH/dz = -p (log p + H);  dKL/dz_cho = p_cho - p_rej;  dKL/dz_rej = p_rej (log p_rej - log p_cho - KL)
            entropy = -(p_c * log_c).sum(-1, keepdim=True)
            grad_c = -e * p_c * (log_c + entropy) + w * (p_c - p_r)
            grad_r = w * p_r * (log_ratio - (p_r * log_ratio).sum(-1, keepdim=True))
            grad_flat.index_add_(0, cho, grad_c.to(grad_flat.dtype))
            grad_flat.index_add_(0, rej, grad_r.to(grad_flat.dtype))
        return grad_logits, None, None, None, None, None


def _chunks(n, size):
    return (slice(start, min(start + size, n)) for start in range(0, n, size))


def _log_softmax_pair(flat_logits, chosen_index, rejected_index):
    return (
        F.log_softmax(flat_logits.index_select(0, chosen_index).float(), dim=-1),
        F.log_softmax(flat_logits.index_select(0, rejected_index).float(), dim=-1),
    )


def entropy_and_kl(logits, labels, chunk_elements=2**21):
    """Diversity statistics of TRL's concatenated batch; returns `(logits, entropy, kl)`.

    logits [2B, L, V], labels [2B, L'] with -100 on prompt and padding (TRL's concatenated labels). Labels are padded
    to L with -100 and shifted, as TRL does: position t of the logits predicts labels[:, t + 1], and counts as a
    response position when that label is not -100. The returned logits are the input passed through the diversity
    term; feed them to the rest of the loss so its gradient joins theirs in place.
    """
    num_rows, length, vocab = logits.shape
    response_mask = response_positions(labels.to(logits.device), length)
    pairs = num_rows // 2
    chosen_mask, rejected_mask = response_mask[:pairs], response_mask[pairs:]
    shared_mask = chosen_mask & rejected_mask
    chosen_index = chosen_mask.flatten().nonzero().squeeze(-1)
    rejected_index = chosen_index + pairs * length
    pair = chosen_index // length
    # per position, 1 / (B * its pair's count): the sums over positions are then the means over pairs
    entropy_weight = (1.0 / (pairs * chosen_mask.sum(-1).clamp(min=1)))[pair]
    kl_weight = shared_mask.flatten()[chosen_index] / (pairs * shared_mask.sum(-1).clamp(min=1))[pair]
    chunk_rows = max(1, chunk_elements // vocab)
    return _EntropyAndKL.apply(
        logits, chosen_index, rejected_index, entropy_weight.float(), kl_weight.float(), chunk_rows
    )


def _row_means(values, mask):
    """Each row's mean of `values` [R, L] over its masked positions (0 for a row with none)."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)


class DiversitySimPOTrainer(CPOTrainer):
    """`CPOTrainer` whose loss is `simpo_loss + diversity_weight * diversity_loss` (see the module docstring).

    One forward pass per step: the diversity term reads the logits of TRL's own concatenated forward. It hooks in
    where TRL turns those logits into log-probabilities (`get_batch_logps`), and `get_batch_loss_metrics` adds the
    term to the parent's loss and logs `diversity/{loss,entropy,kl}` next to TRL's `rewards/*` and `logps/*`.
    With `diversity_weight == 0` both are the parent's, unchanged. With `fused_lm_head`, `concatenated_forward`
    returns what TRL's does (log-probabilities, mean logits, NLL) from the fused head instead, and stashes the term's
    statistics for `get_batch_loss_metrics`; the rest of TRL's loss and metrics is untouched.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.diversity_weight > 0 and self.is_encoder_decoder:
            raise ValueError("The diversity term supports decoder-only models; set diversity_weight: 0 for this one.")
        if self.args.fused_lm_head:
            refusal = fused_head_refusal(self.model)  # a PEFT model answers for its base, adapters included
            if refusal:
                raise ValueError(refusal)
            base = self.model.get_base_model() if is_peft_model(self.model) else self.model
            add_fused_preference_head(base, self.args.diversity_chunk_elements)
        refusal = layout_refusal(self.model, self.args.prefix_sharing, self.args.padding_free)
        if refusal:
            raise ValueError(refusal)
        self._attention = self.model.config.get_text_config()._attn_implementation
        # A completion that truncation to max_length leaves empty makes SimPO's length-normalised log-probability 0/0.
        self.train_dataset = _drop_empty_completions(self.train_dataset, "train", self.args.max_length)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {
                k: _drop_empty_completions(d, k, self.args.max_length) for k, d in self.eval_dataset.items()
            }
        elif self.eval_dataset is not None:
            self.eval_dataset = _drop_empty_completions(self.eval_dataset, "eval", self.args.max_length)

    def create_model_card(self, *args, **kwargs):
        """Nothing: TRL's generic card names no data, settings or results; the CLI writes this tool's at the end of
        the run (diversity_simpo/model_card.py)."""

    def concatenated_forward(self, model, batch):
        """TRL's outputs: per-reply log-probabilities, the logits' summary and the NLL term, from TRL's layout or the
        prefix-shared / padding-free one (`diversity_simpo/layout.py`), through TRL's code or, with `fused_lm_head`, the
        fused head. In place of the logits, each reply's mean logit over its response positions (the `logits/*`
        metrics, which TRL averages over every position, padding included: a number of the layout, not the pairs)."""
        inputs = self.concatenated_inputs(batch, padding_value=self.pad_token_id, device=self.accelerator.device)
        labels = inputs["concatenated_labels"]
        pairs = labels.shape[0] // 2
        layout = None
        if self.args.prefix_sharing or self.args.padding_free:
            layout = pack_pairs(
                inputs["concatenated_input_ids"],
                inputs["concatenated_attention_mask"],
                labels,
                self.args.prefix_sharing,
                self.args.padding_free,
                self.pad_token_id,
                FLEX_BLOCK if self._attention == "flex_attention" else 1,
            )
        if self.args.fused_lm_head:
            return self._fused_forward(model, inputs, layout, pairs)
        if layout is not None:  # TRL's code, given the packed forward's logits in its own layout
            packed_model = model

            def model(*args, **kwargs):
                kept = packed_model(**layout.model_inputs(self._attention), logits_to_keep=layout.keep)
                return types.SimpleNamespace(logits=layout.logits_in_trl_layout(kept.logits))

        chosen_logps, rejected_logps, chosen_logits, rejected_logits, *rest = super().concatenated_forward(model, batch)
        response = response_positions(labels, chosen_logits.shape[1])
        # each half reduced on its own, accumulating in float32: no copy of the [2B, L, V] logits
        chosen_reply, rejected_reply = (
            _row_means(z.detach().sum(-1, dtype=torch.float32) / z.shape[-1], mask)
            for z, mask in ((chosen_logits, response[:pairs]), (rejected_logits, response[pairs:]))
        )
        return chosen_logps, rejected_logps, chosen_reply, rejected_reply, *rest

    def _fused_forward(self, model, inputs, layout, pairs):
        labels = inputs["concatenated_labels"]
        if layout is None:
            model_inputs = {
                "input_ids": inputs["concatenated_input_ids"],
                "attention_mask": inputs["concatenated_attention_mask"],
            }
        else:
            model_inputs = {**layout.model_inputs(self._attention), "hidden_index": layout.source}
        out = model(
            **model_inputs,
            labels=labels,
            kl_pairs=pairs if self.args.diversity_weight > 0 else 0,
            fused_preference_head=True,
        )
        mask = out.label_mask
        logps = out.log_probs.sum(-1)
        if self.loss_type in ("ipo", "simpo"):  # TRL's average_log_prob
            logps = logps / mask.sum(-1)
        chosen = mask[:pairs]
        nll_loss = (
            torch.tensor(0.0, device=self.accelerator.device)
            if self.cpo_alpha == 0
            else -out.log_probs[:pairs].sum() / chosen.sum()
        )
        if self.args.diversity_weight > 0:
            self._diversity_stats = (
                mean_of_row_means(out.entropy[:pairs], chosen),
                mean_of_row_means(out.kl, out.pair_mask),
            )
        reply_logits = _row_means(out.mean_logits, mask)
        return logps[:pairs], logps[pairs:], reply_logits[:pairs], reply_logits[pairs:], nll_loss

    def get_batch_logps(self, logits, labels, average_log_prob=False, is_encoder_decoder=False):
        if self.args.diversity_weight > 0:
            logits, entropy, kl = entropy_and_kl(logits, labels, self.args.diversity_chunk_elements)
            self._diversity_stats = (entropy, kl)
        return super().get_batch_logps(logits, labels, average_log_prob, is_encoder_decoder)

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        loss, metrics = super().get_batch_loss_metrics(model, batch, train_eval)
        if self.args.diversity_weight > 0:
            loss = self._add_diversity_loss(loss, metrics, "eval_" if train_eval == "eval" else "")
        if train_eval == "train" and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss is {loss.item()} at step {self.state.global_step + 1} on dataset rows "
                f"{batch.get('row_id', '(unknown: add a row_id column)')}; training stopped before the optimizer "
                "step, and the checkpoints already written are intact. Check those rows, or lower learning_rate."
            )
        return loss, metrics

    def _get_grad_norm(self, model, grad_norm=None):
        # A finite loss can still have an overflowing gradient; stop before the optimizer writes it into the weights.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
            raise NonFiniteLossError(
                f"the gradient norm is {float(grad_norm)} at step {self.state.global_step + 1}; training stopped "
                "before the optimizer step, and the checkpoints already written are intact. Lower learning_rate."
            )
        return grad_norm

    def _add_diversity_loss(self, loss, metrics, prefix):
        entropy, kl = self._diversity_stats
        del self._diversity_stats
        alpha = self.args.diversity_alpha
        diversity_loss = -alpha * entropy + (1 - alpha) * kl
        loss = loss + self.args.diversity_weight * diversity_loss.to(loss.dtype)
        for name, value in (("loss", diversity_loss), ("entropy", entropy), ("kl", kl)):
            metrics[f"{prefix}diversity/{name}"] = self.accelerator.gather_for_metrics(value.detach()).mean().item()
        return loss


class NonFiniteLossError(FloatingPointError):
    """The training loss, or its gradient, became NaN or infinite."""


def _drop_empty_completions(dataset, split, max_length):
    """TRL-tokenized rows whose chosen or rejected labels hold no token, dropped with a count; none left is an error."""
    keep = dataset.filter(
        lambda row: any(t != -100 for t in row["chosen_labels"]) and any(t != -100 for t in row["rejected_labels"])
    )
    if len(keep) == 0:
        raise ValueError(
            f"every {split} pair has an empty chosen or rejected completion after truncation to max_length="
            f"{max_length}: raise max_length, or shorten the prompts"
        )
    if len(keep) < len(dataset):
        warnings.warn(
            f"skipped {len(dataset) - len(keep)} of {len(dataset)} {split} pairs whose chosen or rejected completion "
            f"is empty after truncation to max_length={max_length}",
            stacklevel=2,
        )
    return keep
