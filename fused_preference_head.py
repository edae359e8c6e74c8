"""Fused LM head for preference training: SimPO's log-probabilities and the diversity term's entropy and paired KL
straight from the hidden states, without ever materialising the `[2B, L, V]` logits.

`add_fused_preference_head(model)` patches `model.forward` the way TRL's `add_fused_lm_head` does: called with
`fused_preference_head=True` (and `labels`, `kl_pairs`), it runs the backbone once on TRL's concatenated batch and
returns a `FusedPreferenceOutput` instead of logits. The loss then runs inside the model's forward, which is where
DeepSpeed ZeRO-3 gathers the LM head (and re-gathers it in backward, through TRL's `maybe_gather_lm_head_ctx`).

The head `z = h W^T + b` is evaluated in tiles of `rows x VOCAB_TILE` logits (`rows` from `tile_elements`) and folded
into per-token online statistics; with `lse = log sum_v exp z_v`, `p = softmax(z)`:

    log p(label)   = z_label - lse
    entropy        = lse - sum_v p_v z_v                                      (= -sum_v p_v log p_v)
    KL(r || c)     = sum_v p_r,v (z_r,v - z_c,v) - lse_r + lse_c

KL pairs position t of chosen row b with position t of rejected row b + B, where both are response positions (the
README's definition); the two rows of a pair share a tile, so the cross term needs no extra projection. Backward
recomputes each tile and turns it into dLoss/dz in place, then accumulates `grad_h += dz W`, `grad_W += dz^T h` in
float32:

    dlog p(label)/dz = 1[v = label] - p        dH/dz = -p (log p + H)
    dKL/dz_c = p_c - p_r                      dKL/dz_r = p_r (log p_r - log p_c - KL)
"""

import types
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput
from trl.kernels.chunked_logprob import _addmm_fp32  # fp32 accumulation of bf16 products (pinned TRL)
from trl.trainer.utils import maybe_gather_lm_head_ctx

VOCAB_TILE = 32768


@dataclass
class FusedPreferenceOutput(ModelOutput):
    """Per-token outputs of the fused head; every field is 0 outside the positions it is defined at.

    log_probs    [2B, L]  log-probability of the next-token label, at response positions (labels shifted by one)
    entropy      [2B, L]  entropy of the next-token distribution, at response positions
    kl           [B, L]   KL(P_rejected || P_chosen) where chosen row b and rejected row b + B are both responses
    label_mask   [2B, L]  response positions;  pair_mask [B, L]: positions where `kl` is defined
    mean_logits  [2B, L]  mean over the vocabulary of the logits at every position (TRL's `logits/*` metrics)
    """

    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    pair_mask: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None


def fused_head_refusal(model):
    """Why the fused head cannot run on `model` (one line), or None when it can."""
    config = model.config.get_text_config()
    if getattr(config, "is_encoder_decoder", False):
        return "fused_lm_head supports decoder-only models; set fused_lm_head: false for an encoder-decoder model"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return (
            f"fused_lm_head needs the output head to be a plain linear layer, and this model's is "
            f"{type(head).__name__} (an adapter or a quantised head?); set fused_lm_head: false, or leave lm_head out "
            "of lora_target_modules and lora_modules_to_save"
        )
    scaling = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    scaled = [k for k in scaling if getattr(config, k, None) not in (None, 1, 1.0)]
    if scaled:
        return f"fused_lm_head supports unscaled logits, and this model sets {scaled[0]}; set fused_lm_head: false"
    if getattr(config, "output_router_logits", False):
        return "fused_lm_head does not compute a mixture-of-experts auxiliary loss; set fused_lm_head: false"
    return None


def add_fused_preference_head(model, tile_elements):
    """Patch `model.forward`: with `fused_preference_head=True` it returns a `FusedPreferenceOutput` (see above);
    without, it is the original forward, so generation and saving are unchanged. Under PEFT, patch the base model."""
    original_forward = model.forward

    def forward(self, *args, fused_preference_head=False, labels=None, kl_pairs=0, **kwargs):
        if not fused_preference_head:
            return original_forward(*args, **({} if labels is None else {"labels": labels}), **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # [2B, L, H]; looked up per call: PEFT replaces it
        head = self.get_output_embeddings()
        return preference_head(hidden, head.weight, head.bias, labels, kl_pairs, tile_elements)

    model.forward = types.MethodType(forward, model)


def preference_head(hidden, weight, bias, labels, kl_pairs, tile_elements):
    """`FusedPreferenceOutput` for hidden states `[2B, L, H]` and TRL's concatenated labels `[2B, L]` (-100 outside
    responses); the logits at position t predict the label at t + 1, as in TRL. `kl_pairs`: B, or 0 for no KL."""
    rows, length, size = hidden.shape
    labels = labels.to(hidden.device)
    label_mask = torch.zeros(rows, length, dtype=torch.bool, device=hidden.device)
    label_mask[:, :-1] = labels[:, 1:] != -100
    targets = torch.zeros(rows, length, dtype=torch.long, device=hidden.device)
    targets[:, :-1] = labels[:, 1:].clamp(min=0)
    pair_mask = label_mask[:kl_pairs] & label_mask[kl_pairs : 2 * kl_pairs]
    pair_chosen = pair_mask.flatten().nonzero().squeeze(-1)
    pair_rejected = pair_chosen + kl_pairs * length
    paired = torch.zeros_like(label_mask)
    paired[:kl_pairs], paired[kl_pairs : 2 * kl_pairs] = pair_mask, pair_mask
    single = (label_mask & ~paired).flatten().nonzero().squeeze(-1)
    with maybe_gather_lm_head_ctx(weight, bias):
        log_probs, entropy, kl = _FusedHeadFunction.apply(
            hidden.reshape(-1, size), weight, bias, targets.flatten(), pair_chosen, pair_rejected, single, tile_elements
        )
        with torch.no_grad():  # the mean logit is h . mean_v(W) + mean(b): no projection needed
            mean_weight = weight.float().mean(0)
            mean_logits = hidden.float() @ mean_weight + (bias.float().mean() if bias is not None else 0.0)
    return FusedPreferenceOutput(
        log_probs=log_probs.view(rows, length),
        entropy=entropy.view(rows, length),
        kl=kl.new_zeros(pair_mask.shape).masked_scatter(pair_mask, kl),
        label_mask=label_mask,
        pair_mask=pair_mask,
        mean_logits=mean_logits,
    )


def _row_chunks(pair_chosen, pair_rejected, single, rows_per_tile):
    """(row indices, number of pairs, pair slice): pair chunks hold n chosen rows then their n rejected rows."""
    half = max(1, rows_per_tile // 2)
    for start in range(0, pair_chosen.numel(), half):
        end = min(start + half, pair_chosen.numel())
        yield torch.cat([pair_chosen[start:end], pair_rejected[start:end]]), end - start, slice(start, end)
    for start in range(0, single.numel(), rows_per_tile):
        yield single[start : start + rows_per_tile], 0, None


def _compute_dtype(tensor):
    kind = tensor.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else tensor.dtype


def _project(hidden, weight, bias):
    """float32 logits tile `hidden @ weight^T + bias`, from inputs in the compute dtype (as the model's head computes
    them, so that a bf16 model's fused logits are its unfused logits)."""
    tile = hidden @ weight.t()
    if bias is not None:
        tile = tile + bias
    return tile.float()


class _FusedHeadFunction(torch.autograd.Function):
    """(log_probs [M], entropy [M], kl [K]) of the rows `pair_chosen`, `pair_rejected` and `single` of `hidden [M, H]`;
    0 at rows that are in none of them. See the module docstring for the math."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, pair_chosen, pair_rejected, single, tile_elements):
        ctx.set_materialize_grads(False)
        compute_dtype = _compute_dtype(hidden)
        vocab = weight.shape[0]
        rows_per_tile = max(2, tile_elements // min(vocab, VOCAB_TILE))
        lse = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        log_probs, entropy = torch.zeros_like(lse), torch.zeros_like(lse)
        kl = torch.zeros(pair_chosen.numel(), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for rows, n, pairs in _row_chunks(pair_chosen, pair_rejected, single, rows_per_tile):
                h, t = hidden.index_select(0, rows).to(compute_dtype), targets[rows]
                # Running statistics relative to the running max m (so that a confident model's small entropy and
                # KL are not differences of large numbers): s = sum e, zp = sum e (z - m), e = exp(z - m); for pairs
                # cross = sum e_r (z_c - m_c), in the rejected row's scale.
                m = s = zp = cross = None
                target_logit = torch.zeros(rows.numel(), device=hidden.device)
                for start in range(0, vocab, VOCAB_TILE):
                    end = min(start + VOCAB_TILE, vocab)
                    z = _project(h, weight[start:end].to(compute_dtype), None if bias is None else bias[start:end])
                    local = t - start
                    in_tile = (local >= 0) & (local < end - start)
                    picked = z.gather(1, local.clamp(0, end - start - 1).unsqueeze(-1)).squeeze(-1)
                    target_logit = torch.where(in_tile, picked, target_logit)
                    new_m = z.amax(-1) if m is None else torch.maximum(m, z.amax(-1))
                    z.sub_(new_m.unsqueeze(-1))
                    e = z.exp()
                    if m is None:
                        s, zp = e.sum(-1), torch.linalg.vecdot(e, z)
                        cross = torch.linalg.vecdot(e[n:], z[:n]) if n else None
                    else:
                        delta = m - new_m
                        scale = delta.exp()
                        if n:
                            cross = scale[n:] * (cross + delta[:n] * s[n:]) + torch.linalg.vecdot(e[n:], z[:n])
                        zp = scale * (zp + delta * s) + torch.linalg.vecdot(e, z)
                        s = scale * s + e.sum(-1)
                    m = new_m
                log_s = s.log()
                lse[rows] = m + log_s
                log_probs[rows] = (target_logit - m) - log_s
                entropy[rows] = log_s - zp / s
                if n:
                    kl[pairs] = (zp[n:] - cross) / s[n:] - log_s[n:] + log_s[:n]
        ctx.save_for_backward(hidden, weight, bias, targets, pair_chosen, pair_rejected, single, lse, entropy, kl)
        ctx.tile_elements, ctx.compute_dtype = tile_elements, compute_dtype
        return log_probs, entropy, kl

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, grad_kl):
        hidden, weight, bias, targets, pair_chosen, pair_rejected, single, lse, entropy, kl = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        compute_dtype, device = ctx.compute_dtype, hidden.device
        zeros = torch.zeros_like(lse)
        g_logp = zeros if grad_log_probs is None else grad_log_probs.float()
        g_ent = zeros if grad_entropy is None else grad_entropy.float()
        g_kl = torch.zeros_like(kl) if grad_kl is None else grad_kl.float()
        with maybe_gather_lm_head_ctx(weight, bias), torch.autocast(device.type, enabled=False):
            vocab = weight.shape[0]
            rows_per_tile = max(2, ctx.tile_elements // min(vocab, VOCAB_TILE))
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if needs_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if needs_weight else None
            grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if needs_bias else None
            for rows, n, pairs in _row_chunks(pair_chosen, pair_rejected, single, rows_per_tile):
                h, t, row_lse = hidden.index_select(0, rows).to(compute_dtype), targets[rows], lse[rows]
                gl, ge = g_logp[rows], g_ent[rows]
                # dLoss/dz = -p * (a * log p + c) per row (+ the label's one-hot and the KL cross terms below)
                a, c = ge.clone(), gl + ge * entropy[rows]
                if n:
                    gk = g_kl[pairs]
                    a[n:] -= gk
                    c[:n] -= gk
                    c[n:] += gk * kl[pairs]
                grad_h = torch.zeros(rows.numel(), hidden.shape[1], dtype=torch.float32, device=device)
                for start in range(0, vocab, VOCAB_TILE):
                    end = min(start + VOCAB_TILE, vocab)
                    w = weight[start:end].to(compute_dtype)
                    log_p = _project(h, w, None if bias is None else bias[start:end]).sub_(row_lse.unsqueeze(-1))
                    p = log_p.exp()
                    grad = log_p  # overwritten in place, row block by row block
                    if n:  # rejected rows first: their KL gradient reads the chosen rows' log p
                        grad[n:].mul_(a[n:, None]).addcmul_(log_p[:n], gk[:, None]).add_(c[n:, None]).mul_(p[n:])
                        grad[:n].mul_(a[:n, None]).add_(c[:n, None]).mul_(p[:n]).addcmul_(p[n:], gk[:, None])
                    else:
                        grad.mul_(a[:, None]).add_(c[:, None]).mul_(p)
                    grad.neg_()
                    local = t - start
                    hit = ((local >= 0) & (local < end - start)).nonzero().squeeze(-1)
                    grad.index_put_((hit, local[hit]), gl[hit], accumulate=True)
                    grad = grad.to(compute_dtype)
                    if grad_hidden is not None:
                        _addmm_fp32(grad_h, grad, w)
                    if grad_weight is not None:
                        _addmm_fp32(grad_weight[start:end], grad.t(), h)
                    if grad_bias is not None:
                        grad_bias[start:end] += grad.sum(0, dtype=torch.float32)
                if grad_hidden is not None:
                    grad_hidden.index_copy_(0, rows, grad_h)
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            *(None,) * 5,
        )
