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
docs/method.md's definition); the two rows of a pair share a tile, so the cross term needs no extra projection. Backward
recomputes each tile and turns it into dLoss/dz in place, then accumulates `grad_h += dz W`, `grad_W += dz^T h` in
float32:

    dlog p(label)/dz = 1[v = label] - p        dH/dz = -p (log p + H)
    dKL/dz_c = p_c - p_r                      dKL/dz_r = p_r (log p_r - log p_c - KL)
"""

import os
import types
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput
from trl.kernels.chunked_logprob import _addmm_fp32  # fp32 accumulation of bf16 products (pinned TRL)
from trl.trainer.utils import maybe_gather_lm_head_ctx

from diversity_simpo.layout import response_positions

try:  # Triton comes with PyTorch's CUDA builds on Linux; without it (this CPU build) the tiles fold in torch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

VOCAB_TILE = 32768  # logits per row of a tile; the rows per tile come from `tile_elements`
TRITON_BLOCK = 1024  # columns per step of a Triton program


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
    """Patch `model.forward`: with `fused_preference_head=True` it returns a `FusedPreferenceOutput` (see above), for
    TRL's layout or, given `hidden_index` (`PackedPairs.source`), a packed one; without, it is the original forward,
    so generation and saving are unchanged. Under PEFT, patch the base model."""
    original_forward = model.forward

    def forward(self, *args, fused_preference_head=False, labels=None, kl_pairs=0, hidden_index=None, **kwargs):
        if not fused_preference_head:
            return original_forward(*args, **({} if labels is None else {"labels": labels}), **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # looked up per call: PEFT replaces it
        if hidden_index is not None:  # a packed layout: its hidden states [R, T, H] back in TRL's [2B, L, H]
            hidden = hidden.reshape(-1, hidden.shape[-1])[hidden_index]
        head = self.get_output_embeddings()
        return preference_head(hidden, head.weight, head.bias, labels, kl_pairs, tile_elements)

    model.forward = types.MethodType(forward, model)


def preference_head(hidden, weight, bias, labels, kl_pairs, tile_elements):
    """`FusedPreferenceOutput` for hidden states `[2B, L, H]` and TRL's concatenated labels `[2B, L]` (-100 outside
    responses); the logits at position t predict the label at t + 1, as in TRL. `kl_pairs`: B, or 0 for no KL."""
    rows, length, size = hidden.shape
    labels = labels.to(hidden.device)
    label_mask = response_positions(labels, length)
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


def _head_tile(weight, bias, start, compute_dtype):
    """Rows [start, start + VOCAB_TILE) of the head's weight and bias, in the compute dtype."""
    w = weight[start : start + VOCAB_TILE].to(compute_dtype)
    return w, None if bias is None else bias[start : start + VOCAB_TILE].to(compute_dtype)


def _project(h, w, b, buffer):
    """The logits tile `h w^T + b` written into the top-left of `buffer`. The logits are in the compute dtype, as the
    model's own head computes them, so that a bf16 model's fused logits are its unfused logits; every fold and every
    gradient upcasts them to float32."""
    tile = buffer[: h.shape[0], : w.shape[0]]
    torch.mm(h, w.t(), out=tile)
    if b is not None:
        tile.add_(b)
    return tile


def _tiles(rows, hidden, weight, bias, compute_dtype):
    """(vocab start, logits tile [rows, <= VOCAB_TILE]) over the vocabulary, in one reused buffer."""
    h = hidden.index_select(0, rows).to(compute_dtype)
    vocab = weight.shape[0]
    buffer = torch.empty(rows.numel(), min(vocab, VOCAB_TILE), dtype=compute_dtype, device=hidden.device)
    for start in range(0, vocab, VOCAB_TILE):
        yield start, _project(h, *_head_tile(weight, bias, start, compute_dtype), buffer)


class _FoldState:
    """Online statistics of a chunk's rows over the vocabulary tiles seen so far, relative to the running max m (so
    that a confident model's small entropy and KL are not differences of large numbers):
        s = sum_v e_v,  zp = sum_v e_v (z_v - m),  e_v = exp(z_v - m),  target = z_label
    and, for the rejected row of each pair, mc = the chosen row's running max and
        cross = sum_v e_r,v (z_c,v - mc), in the rejected row's scale."""

    def __init__(self, rows, pairs, device):
        self.m = torch.full((rows,), float("-inf"), device=device)
        self.s, self.zp, self.target = (torch.zeros(rows, device=device) for _ in range(3))
        self.mc = torch.full((pairs,), float("-inf"), device=device)
        self.cross = torch.zeros(pairs, device=device)


def _fold_torch(tile, targets, start, state, n):
    """Fold one logits tile into `state` (see `_FoldState`), in torch ops (the CPU path)."""
    z = tile.float()
    local = targets - start
    in_tile = (local >= 0) & (local < z.shape[1])
    picked = z.gather(1, local.clamp(0, z.shape[1] - 1).unsqueeze(-1)).squeeze(-1)
    state.target = torch.where(in_tile, picked, state.target)
    new_m = torch.maximum(state.m, z.amax(-1))
    delta = state.m - new_m
    scale = delta.exp()
    z.sub_(new_m.unsqueeze(-1))
    e = z.exp()
    seen = state.s > 0  # before the first tile m is -inf: nothing to rescale
    if n:
        delta_c = state.mc - new_m[:n]
        shift = torch.where(seen[n:], delta_c * state.s[n:], 0.0)
        state.cross = scale[n:] * (state.cross + shift) + torch.linalg.vecdot(e[n:], z[:n])
        state.mc = new_m[:n]
    state.zp = scale * (state.zp + torch.where(seen, delta * state.s, 0.0)) + torch.linalg.vecdot(e, z)
    state.s = scale * state.s + e.sum(-1)
    state.m = new_m


def _fold_triton(tile, targets, start, state, n):
    """`_fold_torch` as Triton kernels, one program per row: one read of the tile (two for the rejected rows)."""
    # (rows, their partner rows): chosen rows, then rejected rows with their chosen rows; or all rows, unpaired
    launches = [(slice(0, n), None), (slice(n, 2 * n), slice(0, n))] if n else [(slice(None), None)]
    for rows, partner in launches:
        block = tile[rows]
        _fold_kernel[(block.shape[0],)](
            block,
            tile[partner] if partner else block,
            tile.stride(0),
            targets[rows],
            state.m[rows],
            state.s[rows],
            state.zp[rows],
            state.target[rows],
            state.mc,
            state.cross,
            start,
            N_COLS=tile.shape[1],
            HAS_PARTNER=partner is not None,
            BLOCK=TRITON_BLOCK,
        )


def _grad_torch(tile, targets, start, lse, a, c, gl, gk, n):
    """Overwrite one logits tile with dLoss/dz: -p (a log p + c) + gl 1[v = label], plus for pairs (chosen rows
    [0, n), rejected rows [n, 2n)) the KL cross terms -gk p_r (chosen) and -gk p_r log p_c (rejected)."""
    log_p = tile.float().sub_(lse.unsqueeze(-1))
    p = log_p.exp()
    grad = log_p  # overwritten in place, row block by row block
    if n:  # rejected rows first: their KL gradient reads the chosen rows' log p
        grad[n:].mul_(a[n:, None]).addcmul_(log_p[:n], gk[:, None]).add_(c[n:, None]).mul_(p[n:])
        grad[:n].mul_(a[:n, None]).add_(c[:n, None]).mul_(p[:n]).addcmul_(p[n:], gk[:, None])
    else:
        grad.mul_(a[:, None]).add_(c[:, None]).mul_(p)
    grad.neg_()
    local = targets - start
    hit = ((local >= 0) & (local < tile.shape[1])).nonzero().squeeze(-1)
    grad.index_put_((hit, local[hit]), gl[hit], accumulate=True)
    tile.copy_(grad)


def _grad_triton(tile, targets, start, lse, a, c, gl, gk, n):
    """`_grad_torch` as one Triton kernel; a pair's two rows share a program, which reads both before writing."""
    rows = n if n else tile.shape[0]
    _grad_kernel[(rows, triton.cdiv(tile.shape[1], TRITON_BLOCK))](
        tile, tile.stride(0), targets, lse, a, c, gl, gk if n else gl, start, n,
        N_COLS=tile.shape[1], PAIRED=n > 0, BLOCK=TRITON_BLOCK,
    )  # fmt: skip


def _use_triton(device):
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


class _FusedHeadFunction(torch.autograd.Function):
    """(log_probs [M], entropy [M], kl [K]) of the rows `pair_chosen`, `pair_rejected` and `single` of `hidden [M, H]`;
    0 at rows that are in none of them. See the module docstring for the math."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, pair_chosen, pair_rejected, single, tile_elements):
        ctx.set_materialize_grads(False)
        compute_dtype = _compute_dtype(hidden)
        fold = _fold_triton if _use_triton(hidden.device) else _fold_torch
        rows_per_tile = max(2, tile_elements // min(weight.shape[0], VOCAB_TILE))
        lse = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        log_probs, entropy = torch.zeros_like(lse), torch.zeros_like(lse)
        kl = torch.zeros(pair_chosen.numel(), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for rows, n, pairs in _row_chunks(pair_chosen, pair_rejected, single, rows_per_tile):
                t = targets[rows]
                state = _FoldState(rows.numel(), n, hidden.device)
                for start, tile in _tiles(rows, hidden, weight, bias, compute_dtype):
                    fold(tile, t, start, state, n)
                log_s = state.s.log()
                lse[rows] = state.m + log_s
                log_probs[rows] = (state.target - state.m) - log_s
                entropy[rows] = log_s - state.zp / state.s
                if n:
                    kl[pairs] = (state.zp[n:] - state.cross) / state.s[n:] - log_s[n:] + log_s[:n]
        ctx.save_for_backward(hidden, weight, bias, targets, pair_chosen, pair_rejected, single, lse, entropy, kl)
        ctx.tile_elements, ctx.compute_dtype = tile_elements, compute_dtype
        return log_probs, entropy, kl

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, grad_kl):
        hidden, weight, bias, targets, pair_chosen, pair_rejected, single, lse, entropy, kl = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        compute_dtype, device = ctx.compute_dtype, hidden.device
        grad_tile = _grad_triton if _use_triton(device) else _grad_torch
        zeros = torch.zeros_like(lse)
        g_logp = zeros if grad_log_probs is None else grad_log_probs.float()
        g_ent = zeros if grad_entropy is None else grad_entropy.float()
        g_kl = torch.zeros_like(kl) if grad_kl is None else grad_kl.float()
        with maybe_gather_lm_head_ctx(weight, bias), torch.autocast(device.type, enabled=False):
            vocab = weight.shape[0]
            rows_per_tile = max(2, ctx.tile_elements // min(vocab, VOCAB_TILE))
            chunks = []
            for rows, n, pairs in _row_chunks(pair_chosen, pair_rejected, single, rows_per_tile):
                gl, ge = g_logp[rows], g_ent[rows]
                # dLoss/dz = -p (a log p + c) per row, plus the label's one-hot and the KL cross terms
                a, c = ge.clone(), gl + ge * entropy[rows]
                gk = g_kl[pairs] if n else None
                if n:
                    a[n:] -= gk
                    c[:n] -= gk
                    c[n:] += gk * kl[pairs]
                h = hidden.index_select(0, rows).to(compute_dtype)
                chunks.append((rows, h, (targets[rows], lse[rows], a, c, gl, gk, n)))
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if needs_hidden else None
            # The weight's gradient is written tile by tile in its own dtype: only one float32 tile of it exists.
            grad_weight = torch.empty_like(weight) if needs_weight else None
            grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if needs_bias else None
            buffer = torch.empty(rows_per_tile, min(vocab, VOCAB_TILE), dtype=compute_dtype, device=device)
            for start in range(0, vocab, VOCAB_TILE):
                w, b = _head_tile(weight, bias, start, compute_dtype)
                weight_tile = torch.zeros(w.shape, dtype=torch.float32, device=device) if needs_weight else None
                for rows, h, tile_args in chunks:
                    tile = _project(h, w, b, buffer)
                    grad_tile(tile, tile_args[0], start, *tile_args[1:])
                    if grad_hidden is not None:
                        part = torch.zeros(rows.numel(), hidden.shape[1], dtype=torch.float32, device=device)
                        _addmm_fp32(part, tile, w)
                        grad_hidden.index_add_(0, rows, part)
                    if weight_tile is not None:
                        _addmm_fp32(weight_tile, tile.t(), h)
                    if grad_bias is not None:
                        grad_bias[start : start + w.shape[0]] += tile.sum(0, dtype=torch.float32)
                if weight_tile is not None:
                    grad_weight[start : start + w.shape[0]] = weight_tile
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            grad_weight,
            None if grad_bias is None else grad_bias.to(bias.dtype),
            *(None,) * 5,
        )


if triton is not None:

    @triton.jit
    def _fold_kernel(
        tile_ptr, partner_ptr, stride, targets_ptr, m_ptr, s_ptr, zp_ptr, target_ptr, mc_ptr, cross_ptr, start,
        N_COLS: tl.constexpr, HAS_PARTNER: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One program per row: `_fold_torch` for one row, block by block along the tile.
        row = tl.program_id(0).to(tl.int64)
        m, s, zp = tl.load(m_ptr + row), tl.load(s_ptr + row), tl.load(zp_ptr + row)
        if HAS_PARTNER:
            mc, cross = tl.load(mc_ptr + row), tl.load(cross_ptr + row)
        for offset in range(0, N_COLS, BLOCK):
            cols = offset + tl.arange(0, BLOCK)
            mask = cols < N_COLS
            z = tl.load(tile_ptr + row * stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(z, axis=0))
            scale = tl.exp(m - new_m)
            shifted = tl.where(mask, z - new_m, 0.0)
            e = tl.where(mask, tl.exp(shifted), 0.0)
            if HAS_PARTNER:
                zc = tl.load(partner_ptr + row * stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
                new_mc = tl.maximum(mc, tl.max(zc, axis=0))
                shift_c = tl.where(s > 0, (mc - new_mc) * s, 0.0)
                cross = scale * (cross + shift_c) + tl.sum(e * tl.where(mask, zc - new_mc, 0.0), axis=0)
                mc = new_mc
            zp = scale * (zp + tl.where(s > 0, (m - new_m) * s, 0.0)) + tl.sum(e * shifted, axis=0)
            s = scale * s + tl.sum(e, axis=0)
            m = new_m
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        tl.store(zp_ptr + row, zp)
        if HAS_PARTNER:
            tl.store(mc_ptr + row, mc)
            tl.store(cross_ptr + row, cross)
        local = tl.load(targets_ptr + row) - start
        if (local >= 0) & (local < N_COLS):
            tl.store(target_ptr + row, tl.load(tile_ptr + row * stride + local).to(tl.float32))

    @triton.jit
    def _grad_kernel(
        tile_ptr, stride, targets_ptr, lse_ptr, a_ptr, c_ptr, gl_ptr, gk_ptr, start, n,
        N_COLS: tl.constexpr, PAIRED: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One program per row (per pair when PAIRED: chosen row i, rejected row i + n) and block of columns.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N_COLS
        ptr = tile_ptr + row * stride + cols
        log_p = tl.load(ptr, mask=mask, other=0.0).to(tl.float32) - tl.load(lse_ptr + row)
        p = tl.exp(log_p)
        one_hot = tl.where(cols + start == tl.load(targets_ptr + row), tl.load(gl_ptr + row), 0.0)
        grad = one_hot - p * (tl.load(a_ptr + row) * log_p + tl.load(c_ptr + row))
        if PAIRED:
            other = row + n
            other_ptr = tile_ptr + other * stride + cols
            log_q = tl.load(other_ptr, mask=mask, other=0.0).to(tl.float32) - tl.load(lse_ptr + other)
            q = tl.exp(log_q)
            gk = tl.load(gk_ptr + row)
            grad -= gk * q
            other_hot = tl.where(cols + start == tl.load(targets_ptr + other), tl.load(gl_ptr + other), 0.0)
            other_grad = other_hot - q * (tl.load(a_ptr + other) * log_q + gk * log_p + tl.load(c_ptr + other))
            tl.store(other_ptr, other_grad.to(tile_ptr.dtype.element_ty), mask=mask)
        tl.store(ptr, grad.to(tile_ptr.dtype.element_ty), mask=mask)
