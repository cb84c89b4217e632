"""MVAD: multi-view anomaly detection with Multi-View Adaptive Selection (MVAS), in plain PyTorch.

Paper: H. He, J. Zhang, G. Tian, C. Wang, L. Xie, "Learning Multi-view Anomaly Detection with Efficient
Adaptive Selection", arXiv:2407.11935 (IEEE TMM). Official code: github.com/lewandofskee/MVAD
(model/mvad.py, on the ADer framework). Where paper and code differ we follow the code, said at the line.
RD4AD: Deng and Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding",
arXiv:2201.10703. Data: Real-IAD, arXiv:2403.12580, github.com/Tencent/AnomalyDetection_Real-IAD.

The method in five steps (the STEP comments of `MVAD.features`, `forward` and `anomaly_map`):
    STEP 1  images (B, V, 3, H, W) -> frozen ResNet34, stages 1-3 (the teacher): 64@H/4, 128@H/8, 256@H/16
    STEP 2  per scale, MVAS blocks (paper: "Overall Architecture", X_o = LN(MVAS(X_i + P)) + X_i): each
            view's windows attend to the top-k windows of the other views (`mvas_attention`)
    STEP 3  OCBE bottleneck (512@H/32) -> de-ResNet34 decoder (the student): the three teacher scales
    STEP 4  loss = 5 * sum over scales of MSE(teacher, student) (paper: "Multi-Scale MSE")
    STEP 5  anomaly map = sum over scales of upsampled (1 - cos(teacher, student)) / 9, Gaussian sigma 4;
            image score = max of its map, sample score = max over its views (eval.py)

Shape legend (the same letters in every file): B samples, V views per sample, N images ((sample, view)
pairs, e.g. B*V), n items in a list (samples of a split, scores), C channels, H x W image, h x w feature
map, S scales, m heads, d = C / m channels per head, T tokens per attention unit (an MVAS window; an
IDIF view). Here also: a = n_win windows per side, A = a*a windows, Q query windows holding image
tokens, k top-k windows, M = (V-1) A candidate windows; the key/value window table has `rows` rows.

Run: `python train.py --method mvad --category zipper`; tests: `python -m pytest tests/test_mvad.py`.
A bad argument raises ValueError (Python's type for it; the command lines print it as one line).

Our choices where the paper is silent, and our extensions:
- Missing views (`view_mask`): never selected while k present windows exist, masked otherwise; maps zero.
- top-k is clamped to the number of candidate windows (the official code fails when k exceeds it).
- Encoder: torchvision's ResNet34 (IMAGENET1K_V1) for timm's `resnet34.bt_in1k`; offline, a random-init
  one whose BatchNorm statistics are calibrated on the training images (`FrozenEncoder.calibrate`).
- The positional embedding is computed for the actual feature size (official: fixed for 256 px inputs).
- `mvas=False`: no MVAS blocks, RD4AD with MVAD's OCBE (the papers' "RD" column).
- `routing`: "dot" is the official routing; "cosine" (pooled features L2-normalised) and "oracle" (the
  windows that see the same surface, from the synthetic renderer's geometry, passed in as `overlaps`)
  are diagnostics of ours, to tell a weak routing from a weak mechanism (bench/routing.py).
- `backbone="wide_resnet50_2"`: channels 256/512/1024 and RD4AD's de-WideResNet50-2 decoder.
"""
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils import flop_counter
from torchvision.models.resnet import Bottleneck


# ----------------------------------------------------------------------------- MVAS, pure functions


def window_grid(h: int, w: int, n_win: int) -> tuple[int, int, int, int]:
    """(th, tw, rows, cols): the size in tokens of the windows of an h x w map cut into n_win x
    n_win windows (zero-padded at the bottom/right to a multiple of n_win), and the rows and
    columns of windows that hold image tokens. With padding the last ones can hold padding only:
    64 -> 70 at n_win 14 gives windows of 5 x 5 tokens, 13 of the 14 rows hold image tokens."""
    th, tw = -(-h // n_win), -(-w // n_win)  # ceil
    return th, tw, -(-h // th), -(-w // tw)


def image_windows(h: int, w: int, n_win: int, device=None) -> torch.Tensor:
    """The indices, among all a*a windows (row-major), of the rows x cols windows that hold image
    tokens (`window_grid`): the query windows of `window_partition(..., image_only=True)`. Returns (Q,)."""
    _, _, rows, cols = window_grid(h, w, n_win)
    return (torch.arange(rows, device=device)[:, None] * n_win + torch.arange(cols, device=device)).flatten()


def window_partition(x: torch.Tensor, n_win: int, image_only: bool = False) -> torch.Tensor:
    """Zero-pads h and w at the bottom/right to a multiple of n_win and cuts n_win x n_win windows.

    Args:
        x: (..., h, w, C) feature map(s), channels last.
        n_win: a, the number of windows per side (not the window size).
        image_only: keep only the rows x cols windows that hold image tokens (`window_grid`):
            what `mvas_attention` needs of the query, whose padding-only windows are cropped away.
    Returns:
        (..., a*a, T, C) (image_only: (..., rows*cols, T, C)) with T = ceil(h/a) * ceil(w/a);
        windows row-major, tokens inside a window row-major (the official order).
    """
    *lead, h, w, C = x.shape
    th, tw, rows, cols = window_grid(h, w, n_win)
    rows, cols = (rows, cols) if image_only else (n_win, n_win)
    x = F.pad(x, (0, 0, 0, cols * tw - w, 0, rows * th - h))  # (..., hp, wp, C), zeros at the bottom/right
    x = x.reshape(*lead, rows, th, cols, tw, C).transpose(-4, -3)  # (..., rows, cols, th, tw, C)
    return x.reshape(*lead, rows * cols, th * tw, C)  # (..., rows*cols, T, C)


def window_unpartition(windows: torch.Tensor, n_win: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`: stitches the windows back and crops the padding.

    Args:
        windows: (..., a*a, T, C) from `window_partition` of an (..., h, w, C) map, or
            (..., rows*cols, T, C) from it with image_only.
        n_win: a, windows per side.
        h, w: the size before padding.
    Returns:
        (..., h, w, C).
    """
    *lead, n, _, C = windows.shape
    th, tw, rows, cols = window_grid(h, w, n_win)
    rows, cols = (rows, cols) if n == rows * cols else (n_win, n_win)
    x = windows.reshape(*lead, rows, cols, th, tw, C).transpose(-4, -3)  # (..., rows, th, cols, tw, C)
    x = x.reshape(*lead, rows * th, cols * tw, C)  # (..., hp, wp, C)
    return x[..., :h, :w, :]  # (..., h, w, C)


def mvas_routing(q_pooled: torch.Tensor, kv_pooled: torch.Tensor, topk: int,
                 present: torch.Tensor | None = None, routing: str = "dot",
                 overlap: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MVAS routing: correlates every query window with every window of the other views on
    mean-pooled features and keeps the top-k candidates per query window. No learnable parameters.

    Args:
        q_pooled: (N, A, C) the query view's windows (`window_partition`, A <= a*a) averaged over
            their T tokens (padded zeros count in the mean, as in the official code).
        kv_pooled: (N, M, C) the same for the windows of all other views together, view-major
            (M = (V-1) a*a).
        topk: k, clamped to M.
        present: optional (N, M) bool, False for the windows of missing views (our extension:
            their logits are -inf, so they are chosen only when fewer than k others exist).
        routing: "dot", the official routing; two diagnostics of ours (see MVADConfig.routing):
            "cosine", the same on L2-normalised pooled features, and "oracle", the candidates
            ranked by `overlap`, ties (no overlap at all included) broken by the dot logits.
        overlap: (N, A, M) for "oracle": the share of each query window's object surface that each
            candidate window sees (synthetic.window_overlaps, from the renderer's geometry).
    Returns:
        A_c: (N, A, M) the correlation logits (q_pooled * C^-0.5) @ kv_pooled^T.
        index: (N, A, k) I_m^K, the selected candidate windows per query window.
    """
    C = q_pooled.shape[-1]
    # A_c = A_s (A_m)^T; the pooled features are detached: the routing is an index choice, not a
    # learned path. With the official window counts some windows hold padding only (27 of 196 at
    # 64x64 with a = 14): they are candidates with logit 0, picked when every real window scores
    # below 0, as in the official code
    q, kv = q_pooled.detach(), kv_pooled.detach()
    if routing == "cosine":  # a dot product favours windows with large features; the cosine does not
        q, kv = F.normalize(q, dim=-1), F.normalize(kv, dim=-1)
    logits = (q * C ** -0.5) @ kv.transpose(1, 2)  # (N, A, M), FULL C
    if present is not None:
        logits = logits.masked_fill(~present[:, None, :], float("-inf"))
    k = min(topk, kv_pooled.shape[1])
    # the official code computes softmax routing weights too but never uses them: left out
    if routing != "oracle":
        return logits, logits.topk(k, dim=-1).indices  # (N, A, M), (N, A, k)
    # two sort keys: by the dot logits, then (stable) by the overlap, missing views last
    order = logits.argsort(dim=-1, descending=True, stable=True)  # (N, A, M)
    shares = overlap if present is None else overlap.masked_fill(~present[:, None, :], -1.0)
    order = order.gather(-1, shares.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    return logits, order[..., :k]  # (N, A, M), (N, A, k)


def mvas_windows(q: torch.Tensor, table: torch.Tensor, pooled: torch.Tensor, candidates: torch.Tensor,
                 topk: int, num_heads: int = 8, present: torch.Tensor | None = None, routing: str = "dot",
                 overlap: torch.Tensor | None = None) -> torch.Tensor:
    """STEPS 2-4 of MVAS on windows already cut: routing, gather, windowed attention.

    The keys/values come from a table of windows that can serve many query views: MultiViewFusion
    cuts and pools every view of a batch once per scale and each query view names its candidates,
    the windows of its sample's other views, by their rows in that table.

    Args:
        q: (N, Q, T, C) the query views' windows (`window_partition` of query + P; all a*a, or
            only those holding image tokens, whose outputs are not cropped away).
        table: (rows, T, C) key/value windows, the other views' raw features (`window_partition`).
        pooled: (rows, C) table.mean(dim=1), the windows' mean-pooled features for the routing.
        candidates: (N, M) long, the table rows of each query's candidate windows, in the official
            order (view-major: the windows of its first other view, then of the second, ...).
        topk: k, clamped to M. num_heads: m.
        present: optional (N, M) bool, False for candidates of missing views (see mvas_attention).
        routing, overlap: see `mvas_routing` (overlap (N, Q, M): the rows of the query windows in q).
    Returns:
        (N, Q, T, C) the attention output per query window.
    """
    N, A, T, C = q.shape  # A = Q query windows
    d = C // num_heads
    # STEP 2 (arXiv:2407.11935, MVAS, "Multi-View Windows Adaptive Selection"): A_c, I_m^K = TopK_Index(A_c)
    _, index = mvas_routing(q.detach().mean(dim=2), pooled[candidates], topk, present, routing, overlap)  # (N, A, k)
    k = index.shape[-1]
    rows = candidates.gather(1, index.flatten(1))  # (N, A*k) table rows of the selected windows

    # STEP 3 (same section): gather the selected windows' raw tokens, K_m^K = V_m^K: whole windows at once
    selected = table.index_select(0, rows.flatten()).view(N * A, k * T, C)  # (N*A, k*T, C)

    # STEP 4 ("Neighbourhood Correlative Cross-Attention"): X_s^o = Attention(Q_s, K_m^K, V_m^K) per
    # window, m heads, no projections, scale C^-0.5 (see mvas_attention); padded zero tokens are not
    # masked (as in the official code)
    q = q.reshape(N * A, T, num_heads, d).transpose(1, 2)  # (N*A, m, T, d), a view
    kv = selected.view(N * A, k * T, num_heads, d).transpose(1, 2)  # (N*A, m, k*T, d), a view
    if present is None:
        out = windowed_attention(q, kv, C ** -0.5)  # (N*A, m, T, d)
    else:
        # windows of missing views are selected only when fewer than k present ones exist: masked out
        valid = present.gather(1, index.flatten(1)).view(N * A, 1, 1, k)  # selected window present?
        out = windowed_attention(q, kv, C ** -0.5, valid.repeat_interleave(T, dim=-1))  # (N*A, m, T, d)
    return out.transpose(1, 2).reshape(N, A, T, C)  # (N, A, T, C)


def windowed_attention(q: torch.Tensor, kv: torch.Tensor, scale: float,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kv^T * scale) kv per window and head (keys = values), False in mask = left out; a
    query whose keys are all left out gets a zero output (its logits are kept finite, then zeroed).

    q: (N*Q, m, T, d) per query window; kv: (N*Q, m, k*T, d); mask: None or broadcastable to
    (N*Q, m, T, k*T). Returns (N*Q, m, T, d). PyTorch's fused kernel without gradients and on a GPU
    (not measured there); on a CPU with gradients the formula, since the fused backward is slow for
    MVAS's 8-channel heads (forward + backward of MVAS at 128 px input, scale 0, freed memory reused
    as train.py runs, 2-core AMD EPYC: 135 ms fused, 74 ms by the formula). Not by window size:
    bench/attention.py table 0c times both at every MVAD scale from 96 to 256 px input, and on a
    2-core AMD EPYC with AVX-512 the formula was the faster at each (the fused kernel 1.05x to 3.8x
    slower, 1.8x at the official scale 0), so there was no size to switch at.
    """
    any_valid = None if mask is None else mask.any(dim=-1, keepdim=True)  # (..., 1) a key left?
    if mask is not None:
        mask = mask | ~any_valid  # a query with no key left attends to all of them, then is zeroed
    if q.is_cuda or not (torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad)):
        out = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, scale=scale)  # (N*Q, m, T, d)
    else:
        attn = (q * scale) @ kv.transpose(-2, -1)  # (N*Q, m, T, k*T)
        if mask is not None:
            attn = attn.masked_fill(~mask, float("-inf"))
        out = attn.softmax(dim=-1) @ kv  # (N*Q, m, T, d)
    return out if any_valid is None else out * any_valid


def mvas_attention(query: torch.Tensor, others: torch.Tensor, n_win: int, topk: int,
                   num_heads: int = 8, view_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-View Adaptive Selection: each window of the query view attends to the tokens of the
    top-k most correlated windows among all windows of the other views. No learnable parameters.

    Args:
        query: (N, h, w, C) the query view's features plus the positional embedding.
        others: (N, V-1, h, w, C) the other views' raw features (keys = values, no projections).
        n_win: a, windows per side; h and w are zero-padded to a multiple of it.
        topk: k, windows selected per query window, over the windows of all other views together
            (clamped to the number of candidate windows).
        num_heads: m; channels are split head-major (head i gets channels i*d .. (i+1)*d - 1).
        view_mask: optional (N, V-1) bool, True = that other view is present (our extension:
            windows of missing views are never selected and never attended to; a query with no
            present other view gets a zero output).
    Returns:
        (N, h, w, C) the attention output (no output projection).

    The official code scales by C^-0.5 with the FULL channel dim, for the routing and for every
    head (standard multi-head attention would use d^-0.5); we follow the code. Same outputs as
    `mvas_attention_reference` (the plain version, as the official module computes), faster: the
    query windows that hold padding only are skipped (27 of 196 at 64 x 64, 75 of 196 at 32 x 32
    with a = 14: the official code computes and crops them), the selected windows are gathered
    whole from a flat table instead of through an expanded token index, and the attention is fused
    where that is faster (`windowed_attention`).

    Counting FLOPs: on CPU tensors FlopCounterMode alone does not see the fused attention's kernel
    and counts the routing only (17 M of 125 M FLOPs at the official scale 0); `counted_flops`, or
    tensors on the meta device, count it all (`mvas_flops(..., image_only=True)`).
    """
    N, h, w, C = query.shape
    # STEP 1 (arXiv:2407.11935, MVAS, "Neighbourhood Attention Window"): X -> X_a (v, a^2, hw/a^2, c), zero
    # padding included (only the query windows that hold image tokens: the others' outputs would be cropped in STEP 5)
    q = window_partition(query, n_win, image_only=True)  # (N, Q, T, C), Q <= A
    table = window_partition(others, n_win)  # (N, V-1, A, T, C)
    _, n_other, A, T, _ = table.shape
    table = table.reshape(N * n_other * A, T, C)  # (N*(V-1)*A, T, C), view-major per query
    candidates = torch.arange(N * n_other * A, device=query.device).view(N, n_other * A)  # (N, M)
    present = None if view_mask is None else view_mask.repeat_interleave(A, dim=1)  # (N, M)

    # STEPS 2-4 ("Multi-View Windows Adaptive Selection", "Neighbourhood Correlative Cross-Attention"):
    # routing, gather, attention (see `mvas_windows`)
    out = mvas_windows(q, table, table.detach().mean(dim=1), candidates, topk, num_heads, present)  # (N, Q, T, C)

    # STEP 5 ("Neighbourhood Correlative Cross-Attention"): un-window to Y_s^o (h, w, c), crop the padding
    return window_unpartition(out, n_win, h, w)  # (N, h, w, C)


def full_cross_attention(query: torch.Tensor, others: torch.Tensor, num_heads: int = 8) -> torch.Tensor:
    """Dense baseline: every query token attends to every token of all other views, with the same
    scaling (full C), heads and (absent) projections as `mvas_attention`. Through PyTorch's fused
    attention, which streams the (h*w x (V-1)*h*w) matrix instead of holding it (8 views at
    64x64 would need 32 GiB for it); `full_cross_attention_reference` is the naive formula.
    Counting FLOPs: on CPU tensors FlopCounterMode alone does not see the fused kernel and counts 0
    (of 17,180 M at the official scale 0); `counted_flops`, or tensors on the meta device, count it
    (`cross_attention_flops`).

    Args:
        query: (N, h, w, C) the query view (plus positional embedding).
        others: (N, V-1, h, w, C) the other views' raw features.
        num_heads: m.
    Returns:
        (N, h, w, C).
    """
    N, h, w, C = query.shape
    d = C // num_heads
    q = query.reshape(N, h * w, num_heads, d).transpose(1, 2)  # (N, m, h*w, d)
    kv = others.reshape(N, -1, num_heads, d).transpose(1, 2)  # (N, m, (V-1)*h*w, d)
    out = F.scaled_dot_product_attention(q, kv, kv, scale=C ** -0.5)  # (N, m, h*w, d)
    return out.transpose(1, 2).reshape(N, h, w, C)


# ----------------------------------------------------------------------------- plain reference versions


def mvas_attention_reference(query: torch.Tensor, others: torch.Tensor, n_win: int, topk: int,
                             num_heads: int = 8, view_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MVAS written as plainly as the official module computes it (bit-exact to it): the other
    views are padded and cut for every call, the windows gathered token by token through an
    expanded index, the attention matrix held in full. Same arguments and result as
    `mvas_attention`; the tests and bench/attention.py compare the fast version with this one."""
    N, h, w, C = query.shape
    scale = C ** -0.5

    # STEP 1 (arXiv:2407.11935, MVAS, "Neighbourhood Attention Window"): X -> X_a (v, a^2, hw/a^2, c)
    q = window_partition(query, n_win)  # (N, a*a, T, C), zero padding included
    kv = window_partition(others, n_win).flatten(1, 2)  # (N, (V-1)*a*a, T, C), view-major
    _, A, T, _ = q.shape

    # STEP 2 ("Multi-View Windows Adaptive Selection"): A_c and I_m^K = TopK_Index(A_c) (see `mvas_routing`)
    present = None if view_mask is None else view_mask.repeat_interleave(A, dim=1)  # (N, (V-1)*A)
    _, index = mvas_routing(q.detach().mean(dim=2), kv.detach().mean(dim=2), topk, present)  # (N, A, k)
    k = index.shape[-1]

    # STEP 3 (same section): gather the selected windows' raw tokens: K_m^K = V_m^K
    gather_index = index.reshape(N, A * k, 1, 1).expand(-1, -1, T, C)
    selected = torch.gather(kv, 1, gather_index).reshape(N, A, k * T, C)  # (N, A, k*T, C)

    # STEP 4 ("Neighbourhood Correlative Cross-Attention"): X_s^o = Attention(Q_s, K_m^K, V_m^K) per window
    d = C // num_heads
    q = q.reshape(N, A, T, num_heads, d).transpose(2, 3)  # (N, A, m, T, d)
    kv = selected.reshape(N, A, k * T, num_heads, d).transpose(2, 3)  # (N, A, m, k*T, d)
    attn = (q * scale) @ kv.transpose(-2, -1)  # (N, A, m, T, k*T)
    if view_mask is None:
        attn = attn.softmax(dim=-1)
    else:
        valid = torch.gather(present, 1, index.flatten(1)).reshape(N, A, 1, 1, k)
        valid = valid.repeat_interleave(T, dim=-1)  # (N, A, 1, 1, k*T)
        keep = valid | ~valid.any(dim=-1, keepdim=True)
        attn = attn.masked_fill(~keep, float("-inf")).softmax(dim=-1) * valid
    out = attn @ kv  # (N, A, m, T, d)

    # STEP 5 (same section): un-window to Y_s^o (h, w, c) and crop the padding
    out = out.transpose(2, 3).reshape(N, A, T, C)  # (N, A, T, C)
    return window_unpartition(out, n_win, h, w)  # (N, h, w, C)


def full_cross_attention_reference(query: torch.Tensor, others: torch.Tensor, num_heads: int = 8) -> torch.Tensor:
    """`full_cross_attention` by the naive formula softmax(q k^T C^-0.5) v, holding the whole
    (m x h*w x (V-1)*h*w) attention matrix. Same arguments and result."""
    N, h, w, C = query.shape
    d = C // num_heads
    q = query.reshape(N, h * w, num_heads, d).transpose(1, 2)  # (N, m, h*w, d)
    kv = others.reshape(N, -1, num_heads, d).transpose(1, 2)  # (N, m, (V-1)*h*w, d)
    attn = ((q * C ** -0.5) @ kv.transpose(-2, -1)).softmax(dim=-1)  # (N, m, h*w, (V-1)*h*w)
    out = attn @ kv  # (N, m, h*w, d)
    return out.transpose(1, 2).reshape(N, h, w, C)


# ----------------------------------------------------------------------------- FLOP accounting


def mvas_flops(h: int, w: int, c: int, n_other: int, n_win: int, topk: int, image_only: bool = False) -> int:
    """Exact FLOPs of MVAS for one query view as FlopCounterMode counts them (derived in notebooks/03_complexity.ipynb);
    image_only: only the query windows that hold image tokens, as `mvas_attention` computes them."""
    a = n_win
    th, tw, rows, cols = window_grid(h, w, a)
    T = th * tw  # tokens per padded window
    queries = rows * cols if image_only else a * a  # query windows
    k = min(topk, n_other * a * a)
    routing = 2 * queries * c * (n_other * a * a)
    attention = 2 * queries * (2 * T * c * k * T)  # Q K^T and A V in each query window
    return routing + attention


def cross_attention_flops(h: int, w: int, c: int, n_other: int) -> int:
    """Exact FLOPs of one `full_cross_attention` call for one query view, 4 v (hw)^2 c (notebook 03)."""
    return 2 * 2 * (h * w) * c * (n_other * h * w)


# torch 2.14's FlopCounterMode has formulas for the fused attention's GPU kernels and counts the meta
# device's version as matrix products, but has none for its CPU kernel: counted on CPU tensors,
# `full_cross_attention` is 0 FLOPs and `mvas_attention` only its routing. The same formulas, for it:
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(grad, q, k, v),
}


def counted_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call fn(*args, **kwargs) as FlopCounterMode counts them (2 per multiply-add;
    elementwise operations, softmax and top-k are not counted), on any device: on a CPU the fused
    attention's kernel included (CPU_ATTENTION_FLOPS), so a forward counts what it counts on the meta
    device. A fused backward counts as on a GPU (it recomputes the attention matrix)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- small helpers


def detr_sine_embedding(h: int, w: int, c: int, device=None) -> torch.Tensor:
    """DETR's sine positional embedding (normalize=True, scale 2*pi, temperature 1e4).

    Args:
        h, w: feature size; c: channels (a multiple of 4), half for y, half for x.
    Returns:
        (h, w, c) with channels [pos_y, pos_x], each interleaving sin and cos.
    """
    n = c // 2
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + 1e-6) * 2 * math.pi
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + 1e-6) * 2 * math.pi
    i = torch.arange(n, dtype=torch.float32, device=device)
    freq = 1e4 ** (2 * torch.div(i, 2, rounding_mode="floor") / n)  # (n,)
    pos_y, pos_x = y[:, None] / freq, x[:, None] / freq  # (h, n), (w, n)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)  # (h, n)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)  # (w, n)
    return torch.cat((pos_y[:, None, :].expand(h, w, n), pos_x[None, :, :].expand(h, w, n)), dim=2)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zeroes the whole residual branch of a sample with probability p and
    rescales the kept ones by 1/(1-p). x: (N, ...), one draw per N."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def cosine_distance_map(teacher: torch.Tensor, student: torch.Tensor, size) -> torch.Tensor:
    """1 - cosine similarity over channels, bilinearly upsampled (align_corners=True, as ADer).

    Args:
        teacher, student: (N, C, h, w) one scale.
        size: (H, W) output size (or an int).
    Returns:
        (N, H, W).
    """
    d = 1.0 - F.cosine_similarity(teacher, student, dim=1)  # (N, h, w)
    return F.interpolate(d[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]  # (N, H, W)


def _reflect_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices of a length-n axis extended by `radius` on both sides with scipy's 'reflect' rule
    (d c b a | a b c d | d c b a: the edge sample is repeated), for any radius."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing with scipy.ndimage.gaussian_filter's defaults (kernel truncated
    at 4 sigma, 'reflect' borders), as the official code applies to each map. In the maps' own
    dtype even under bf16 autocast, which would round the scores to 3 significant digits and tie
    the pixels that the metrics rank.

    Args:
        maps: (..., H, W).
        sigma: standard deviation in pixels (official: 4).
    Returns:
        (..., H, W).
    """
    *lead, H, W = maps.shape
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=maps.device, dtype=maps.dtype)
    out = maps.reshape(-1, 1, H, W)  # (N, 1, H, W)
    with torch.autocast("cuda" if maps.is_cuda else "cpu", enabled=False):  # (meta tensors: no autocast)
        out = out[:, :, _reflect_index(H, radius, maps.device), :]  # (N, 1, H + 2r, W)
        out = F.conv2d(out, kernel.view(1, 1, -1, 1))  # (N, 1, H, W)
        out = out[:, :, :, _reflect_index(W, radius, maps.device)]  # (N, 1, H, W + 2r)
        out = F.conv2d(out, kernel.view(1, 1, 1, -1))  # (N, 1, H, W)
    return out.reshape(*lead, H, W)


def reconstruction_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    """Multi-scale MSE: sum over scales of mean((teacher - student)^2), in float32 (the features may
    be bf16 under autocast). Lists of S (N, C, h, w) -> scalar."""
    return sum(F.mse_loss(s.float(), t.float()) for t, s in zip(teacher, student))


# ----------------------------------------------------------------------------- frozen encoder

# arch -> (torchvision builder, the ImageNet weights; for wide_resnet50_2 V1, the RD4AD/ADer one)
ENCODERS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    "wide_resnet50_2": (torchvision.models.wide_resnet50_2,
                        torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1),
}


ENCODER_STRIDES = (4, 8, 16)  # of the ResNet stages 1-3: the feature maps are H/4, H/8, H/16
ROUTINGS = ("dot", "cosine", "oracle")  # MVADConfig.routing


def encoder_channels(arch: str) -> tuple[int, int, int]:
    """The channels of stages 1-3 of an ENCODERS ResNet: 64, 128, 256 for the BasicBlock ones
    (resnet18, resnet34), four times as many for the Bottleneck one (wide_resnet50_2)."""
    expansion = 4 if arch == "wide_resnet50_2" else 1
    return (64 * expansion, 128 * expansion, 256 * expansion)


def read_torch_file(path, what: str, kind: str, fix: str = ""):
    """torch.load(path) to the CPU with weights_only=True (tensors and plain containers, no code run).
    A file torch cannot read raises ValueError with one line (the scripts print it as their other
    errors): "<what>: not a readable <kind> (<exception type>)[; <fix>]"."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, foreign or tampered file: torch raises many different types
        raise ValueError(f"{what}: not a readable {kind} ({type(e).__name__})" + (f"; {fix}" if fix else "")) from None


def imagenet_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision looks for an ImageNet file: <torch hub dir>/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


class FrozenEncoder(nn.Module):
    """A torchvision ResNet's stages 1-3, frozen and always in eval mode (the teacher).

    weights: "imagenet" (torchvision's weights API: the torch hub cache, downloaded when online;
    fails with a ValueError naming the file and folder when neither works), "auto" (ImageNet when
    available, else a random-init encoder, said in one line), "none" (random init) or a path to a
    torchvision/timm state dict of the network. A random-init encoder has `needs_calibration` True
    until `calibrate` has re-estimated its BatchNorm statistics; the flag is a buffer, so checkpoints
    carry it together with the statistics. The network-specific part is `networks`, `unused`,
    `take_stages` and `forward`: uniad.FrozenEfficientNet replaces them for EfficientNet-B4 and keeps
    the rest (weights, calibration, always eval).
    """

    networks = ENCODERS  # the networks that take_stages cuts, by name
    unused = ("layer4.", "fc.")  # the layers left out, which a weights file need not hold

    def __init__(self, arch: str = "resnet34", weights: str = "auto"):
        super().__init__()
        if arch not in self.networks:
            raise ValueError(f"--backbone {arch!r} is unknown; choose one of: {', '.join(self.networks)}")
        build, _ = self.networks[arch]
        net = build(weights=None)
        state = self._read_weights(arch, weights)
        if state is not None:
            try:
                missing, unexpected = net.load_state_dict(state, strict=False)
            except RuntimeError:  # wrong tensor shapes
                raise ValueError(f"--weights {weights}: the tensors do not fit a {arch} (another "
                                 f"architecture's file?); give a torchvision/timm {arch} state dict")
            missing = [k for k in missing if not k.startswith(self.unused)]
            if missing or unexpected:
                raise ValueError(f"--weights {weights}: not a {arch} state dict (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}); give a torchvision/timm {arch} file")
        self.take_stages(net, arch)
        self.register_buffer("bn_ready", torch.tensor(state is not None))
        self.requires_grad_(False)
        self.train(False)

    def take_stages(self, net: nn.Module, arch: str) -> None:
        """Keeps the ResNet's stem and stages 1-3 (layer4 and fc are left out) and their widths."""
        self.conv1, self.bn1, self.layer1, self.layer2, self.layer3 = \
            net.conv1, net.bn1, net.layer1, net.layer2, net.layer3
        self.channels = encoder_channels(arch)  # stages 1-3
        self.strides = ENCODER_STRIDES  # of stages 1-3

    def _read_weights(self, arch: str, weights: str) -> dict | None:
        """The state dict to load, or None for random init (after saying why, for "auto")."""
        if weights == "none":
            return None
        if weights in ("auto", "imagenet"):
            imagenet = self.networks[arch][1]
            file = imagenet_file(imagenet)
            try:  # reads the hub cache, else downloads (offline: URLError)
                return imagenet.get_state_dict(progress=False)
            except Exception as e:  # torch raises many different types for a failed download or read
                if file.is_file():
                    raise ValueError(f"{file}: cannot be read ({type(e).__name__}); delete or replace it")
                where = f"{file.name} into {file.parent} (from {imagenet.url})"
                if weights == "imagenet":
                    raise ValueError(f"--weights imagenet: the ImageNet {arch} file is missing and cannot "
                                     f"be downloaded ({type(e).__name__}); put {where}, or use --weights auto")
                print(f"warning: ImageNet {arch} weights not found ({file}) and the download failed "
                      f"({type(e).__name__}); continuing with a random-init "
                      f"encoder whose BatchNorm statistics will be calibrated on the training images. "
                      f"For the paper's setting put {where}", file=sys.stderr)
                return None
        path = Path(weights)
        if not path.is_file():
            raise ValueError(f"--weights {weights!r}: no such file; use auto, imagenet, none or a path "
                             f"to a {arch} state dict")
        state = read_torch_file(path, f"--weights {weights}", "state dict")
        if not isinstance(state, dict):
            raise ValueError(f"--weights {weights}: holds a {type(state).__name__}, not a state dict")
        return state

    @property
    def needs_calibration(self) -> bool:
        """True while the BatchNorm statistics are torchvision's random-init ones (mean 0, var 1)."""
        return not bool(self.bn_ready)

    def train(self, mode: bool = True):
        """Always eval: the teacher's BatchNorm statistics must not follow the training batches."""
        return super().train(False)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Re-estimates every BatchNorm's running mean/var once: a train-mode forward over `batches`
        ((N, 3, H, W) each) with momentum None (cumulative average), then back to eval."""
        norms = [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None
            bn.training = True
        seen = 0
        for x in batches:
            self(x.to(self.bn_ready.device))
            seen += 1
        for bn in norms:
            bn.momentum = 0.1  # torchvision's default
        self.train(False)
        if seen == 0:
            raise ValueError("calibrating the encoder needs at least one training batch; the training set is empty")
        self.bn_ready.fill_(True)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (N, 3, H, W) ImageNet-normalised -> stages 1-3: (N, C_s, H/4, ...), ... (N, C_s, H/16, ...)."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)  # (N, 64, H/4, W/4)
        f1 = self.layer1(x)  # (N, C0, H/4, W/4)
        f2 = self.layer2(f1)  # (N, C1, H/8, W/8)
        f3 = self.layer3(f2)  # (N, C2, H/16, W/16)
        return [f1, f2, f3]


# ----------------------------------------------------------------------------- MVAS blocks


class MVASBlock(nn.Module):
    """One MVAS block with the official post-norm wiring (the paper writes
    X_o = LN(MVAS(X_i + P)) + X_i; the code puts the residual inside the norm and adds an MLP):
        x = LN(x + DropPath(MVAS(x + P, X_others)));  x = LN(x + MLP(x))
    """

    def __init__(self, dim: int, n_win: int, topk: int, num_heads: int, mlp_ratio: int,
                 dropout: float, drop_path: float, routing: str = "dot"):
        super().__init__()
        self.n_win, self.topk, self.num_heads, self.drop_prob = n_win, topk, num_heads, drop_path
        self.routing = routing
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, pos, table, pooled, candidates, present=None, overlap=None):
        """x: (N, h, w, C) query views; pos: (h, w, C); table, pooled, candidates, present, overlap:
        the other views' windows as `mvas_windows` takes them. Returns (N, h, w, C)."""
        N, h, w, C = x.shape
        q = window_partition(x + pos, self.n_win, image_only=True)  # (N, Q, T, C), see mvas_attention
        fused = mvas_windows(q, table, pooled, candidates, self.topk, self.num_heads, present,
                             self.routing, overlap)  # (N, Q, T, C)
        fused = window_unpartition(fused, self.n_win, h, w)  # (N, h, w, C)
        x = self.norm1(x + drop_path(fused, self.drop_prob, self.training))  # (N, h, w, C)
        return self.norm2(x + self.mlp(x))  # (N, h, w, C)


class MultiViewFusion(nn.Module):
    """MVAS blocks at one scale. Every view in turn is the query; the other views' raw encoder
    features are its keys/values in every block (not updated between blocks). Norms and MLPs are
    shared by all views: the official code loops over the views with the same modules; we run the
    V queries as one batch, which is the same computation (DropPath draws per query view, as there).
    The keys/values being the same in every block and for every query, the views are padded, cut
    into windows and pooled once per scale (the official code does it per block and query view)."""

    def __init__(self, dim: int, depth: int, n_win: int, topk: int, num_heads: int, mlp_ratio: int,
                 dropout: float, drop_path: float, routing: str = "dot"):
        super().__init__()
        self.n_win = n_win
        self.blocks = nn.ModuleList(MVASBlock(dim, n_win, topk, num_heads, mlp_ratio, dropout, drop_path, routing)
                                    for _ in range(depth))

    def forward(self, feats: torch.Tensor, view_mask: torch.Tensor | None = None,
                overlap: torch.Tensor | None = None) -> torch.Tensor:
        """feats: (B, V, C, h, w) one scale of the encoder; view_mask: (B, V) bool or None; overlap:
        (B, V, A, M) for routing "oracle" (see `MVAD.features`), else None.
        Returns (B, V, C, h, w), the fused features."""
        B, V, C, h, w = feats.shape
        x = feats.permute(0, 1, 3, 4, 2)  # (B, V, h, w, C)
        A = self.n_win * self.n_win
        # STEP 1 for the keys/values: every view's windows, rows (b, v, window) of one table
        table = window_partition(x, self.n_win).flatten(0, 2)  # (B*V*A, T, C)
        # for view i, the other views in order (0..i-1, i+1..V-1), as the official torch.cat
        other = torch.tensor([[j for j in range(V) if j != i] for i in range(V)], device=feats.device)
        first_row = (torch.arange(B, device=feats.device)[:, None, None] * V + other) * A  # (B, V, V-1)
        candidates = first_row[..., None] + torch.arange(A, device=feats.device)  # (B, V, V-1, A)
        candidates = candidates.reshape(B * V, (V - 1) * A)  # (B*V, M), view-major
        present = None if view_mask is None else \
            view_mask[:, other].reshape(B * V, V - 1).repeat_interleave(A, dim=1)  # (B*V, M)
        pos = detr_sine_embedding(h, w, C, device=feats.device).to(feats.dtype)  # (h, w, C)
        pooled = table.mean(dim=1)  # (B*V*A, C)
        if overlap is not None:  # the rows of the query windows, those that hold image tokens
            overlap = overlap.reshape(B * V, A, -1)[:, image_windows(h, w, self.n_win, feats.device)]  # (B*V, Q, M)
        x = x.reshape(B * V, h, w, C)  # (B*V, h, w, C)
        for block in self.blocks:
            x = block(x, pos, table, pooled, candidates, present, overlap)  # (B*V, h, w, C)
        return x.reshape(B, V, h, w, C).permute(0, 1, 4, 2, 3)  # (B, V, C, h, w)


# ----------------------------------------------------------------------------- bottleneck, decoder


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, bias: bool = False) -> nn.Sequential:
    """Conv (same padding) -> BatchNorm -> ReLU, the OCBE unit."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=bias),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def rd4ad_init(module: nn.Module) -> None:
    """RD4AD/official init: Kaiming-normal (fan_out) convolutions, BatchNorm weight 1 and bias 0;
    transposed convolutions keep PyTorch's default (they are not nn.Conv2d)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class OCBE(nn.Module):
    """One-class bottleneck embedding with the official MVAD fusion of the three fused scales
    (channels c0, c1, c2 = 64, 128, 256 for ResNet34):
        fpn0 = ReLU(BN(conv3x3 s2 c0->c1)(m0));  fpn1 = ReLU(BN(conv1x1 c1->c1)(m1)) + fpn0
        s = ReLU(BN(conv3x3 s2 c1->c2)(fpn1)) + ReLU(BN(conv1x1 c2->c2)(m2));  s = ReLU(BN(conv1x1)(s))
        out = 3 ResNet Bottlenecks (planes c2/2, the first stride 2) -> 2*c2 channels at H/32.
    The 1x1 convolutions keep their bias before BatchNorm, as in the official code."""

    def __init__(self, channels: tuple[int, int, int], num_blocks: int = 3):
        super().__init__()
        c0, c1, c2 = channels
        self.down0 = conv_bn_relu(c0, c1, 3, stride=2)
        self.proj1 = conv_bn_relu(c1, c1, 1, bias=True)
        self.down1 = conv_bn_relu(c1, c2, 3, stride=2)
        self.proj2 = conv_bn_relu(c2, c2, 1, bias=True)
        self.merge = conv_bn_relu(c2, c2, 1, bias=True)
        shortcut = nn.Sequential(nn.Conv2d(c2, 2 * c2, 1, stride=2, bias=False), nn.BatchNorm2d(2 * c2))
        self.layer = nn.Sequential(Bottleneck(c2, c2 // 2, stride=2, downsample=shortcut),
                                   *[Bottleneck(2 * c2, c2 // 2) for _ in range(num_blocks - 1)])
        rd4ad_init(self)

    def forward(self, m0, m1, m2):
        """m0, m1, m2: (N, c0, H/4, W/4), (N, c1, H/8, W/8), (N, c2, H/16, W/16) fused features.
        Returns (N, 2*c2, H/32, W/32)."""
        fpn0 = self.down0(m0)  # (N, c1, H/8, W/8)
        fpn1 = self.proj1(m1) + fpn0  # (N, c1, H/8, W/8)
        s = self.down1(fpn1) + self.proj2(m2)  # (N, c2, H/16, W/16)
        return self.layer(self.merge(s))  # (N, 2*c2, H/32, W/32)


class DeBasicBlock(nn.Module):
    """RD4AD's reversed ResNet basic block: a 2x2 stride-2 transposed conv replaces the strided
    3x3 conv (and the 1x1 strided shortcut) when the block upsamples."""

    def __init__(self, c_in: int, c_out: int, upsample: bool):
        super().__init__()
        self.conv1 = (nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=False) if upsample
                      else nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=False),
                                       nn.BatchNorm2d(c_out)) if upsample else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DeBottleneck(nn.Module):
    """RD4AD's reversed bottleneck (de-WideResNet50-2: inner width c_out / 2)."""

    def __init__(self, c_in: int, c_out: int, upsample: bool):
        super().__init__()
        width = c_out // 2
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = (nn.ConvTranspose2d(width, width, 2, stride=2, bias=False) if upsample
                      else nn.Conv2d(width, width, 3, padding=1, bias=False))
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=False),
                                       nn.BatchNorm2d(c_out)) if upsample else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class Decoder(nn.Module):
    """The student: RD4AD's reversed ResNet (de-ResNet34: 3, 4, 6 blocks), each stage upsampling x2
    with its first block: 2*c2@H/32 -> c2@H/16 -> c1@H/8 -> c0@H/4."""

    def __init__(self, channels: tuple[int, int, int], block=DeBasicBlock, depths=(3, 4, 6)):
        super().__init__()
        c0, c1, c2 = channels
        stages, c_in = [], 2 * c2
        for c_out, depth in zip((c2, c1, c0), depths):
            stages.append(nn.Sequential(block(c_in, c_out, upsample=True),
                                        *[block(c_out, c_out, upsample=False) for _ in range(depth - 1)]))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        rd4ad_init(self)

    def forward(self, x):
        """x: (N, 2*c2, H/32, W/32). Returns [(N, c0, H/4, W/4), (N, c1, H/8, W/8), (N, c2, H/16, W/16)],
        ordered like the teacher's stages."""
        outs = []
        for stage in self.stages:
            x = stage(x)  # (N, C_s, 2h, 2w): c2@H/16, then c1@H/8, then c0@H/4
            outs.append(x)
        return outs[::-1]


# ----------------------------------------------------------------------------- config and model


def check_field(cfg, name: str, ok: bool, allowed: str, paper: str) -> None:
    """One step of a config's check (its `__post_init__` checks the fields one by one, in order, so
    that a test may use fields checked before it): unless ok, a one-line ValueError naming the field,
    its value, what it allows and the paper's or official value."""
    if not ok:
        raise ValueError(f"{name} {getattr(cfg, name)!r} must be {allowed}; {paper}")


def is_count(value, least: int = 1) -> bool:
    """Whether value is a whole number (not a bool) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_recipe(cfg, source: str, values: tuple[str, str, str, str] = ("0.005", "1e-4", "5", "0.8")) -> None:
    """`check_field` for the fields of TrainingRecipe that every trained method's config has; source says
    whose values the defaults are ("official", or where the paper is silent, whose we took), values what
    they are (base_lr, weight_decay, clip, lr_decay_at; MVAD's official ones unless given)."""
    base_lr, weight_decay, clip, lr_decay_at = values
    check_field(cfg, "base_lr", cfg.base_lr > 0, "positive", f"{source}: {base_lr}")
    check_field(cfg, "weight_decay", cfg.weight_decay >= 0, "at least 0 (0: no decay)", f"{source}: {weight_decay}")
    check_field(cfg, "clip", cfg.clip > 0, "positive", f"{source}: {clip}")
    check_field(cfg, "lr_decay_at", 0 < cfg.lr_decay_at <= 1, "in (0, 1] (1: never)", f"{source}: {lr_decay_at}")



def check_weights(cfg, source: str = "the paper") -> None:
    """`check_field` for the frozen encoder's `weights` field that every config has (FrozenEncoder reads
    it: auto, imagenet, none or a state dict file); source says whose setting ImageNet is."""
    check_field(cfg, "weights", isinstance(cfg.weights, str) and cfg.weights != "",
                "auto, imagenet, none or a file", f"{source}: ImageNet")

@dataclass
class TrainingRecipe:
    """The optimiser recipe that train.py applies to a trained method (AdamW, betas (0.9, 0.999)),
    the fields its config shares; the values are the official MVAD code's
    (lewandofskee/MVAD configs/mvad/mvad_realiad.py). A config without it (PatchCore) trains nothing."""
    base_lr: float = 0.005  # rate per 16 images: lr = base_lr * images per step / 16 (ADer's rule); official: 0.005
    weight_decay: float = 1e-4  # AdamW weight decay, on weights only (not biases and norms; 0: none); official: 1e-4
    clip: float = 5.0  # gradient-norm clip; official: 5
    lr_decay_at: float = 0.8  # the rate drops x0.1 after this share of the epochs (1: never); official: epoch 80 of 100


@dataclass
class MVADConfig(TrainingRecipe):
    backbone: str = "resnet34"  # frozen teacher: resnet34 (paper), resnet18, or wide_resnet50_2 (RD4AD's)
    weights: str = "auto"  # teacher weights: auto | imagenet | none | <path>; paper: ImageNet
    image_size: int = 256  # input height = width in pixels, a multiple of 32; paper: 256
    n_win: tuple[int, ...] = (14, 9, 6)  # MVAS windows per side a at the 3 scales; official: 14, 9, 6
    topk: int = 4  # windows of the other views each query window attends to (K); official: 4
    # how MVAS chooses those windows: "dot", the official top-k of pooled dot products; two diagnostics of
    # ours: "cosine" (the same on L2-normalised features) and "oracle" (the k windows that see most of the
    # query window's surface, from the synthetic renderer's geometry: an upper bound for any routing)
    routing: str = "dot"
    blocks: tuple[int, ...] = (1, 2, 4)  # MVAS blocks at the 3 scales (0: none at that scale); official: 1, 2, 4
    num_heads: int = 8  # attention heads in MVAS; official: 8
    mlp_ratio: int = 4  # hidden width of the block MLP, in multiples of C; official: 4
    dropout: float = 0.1  # dropout inside the block MLP; official: 0.1
    drop_path: float = 0.1  # stochastic depth on the MVAS branch; official: 0.1
    loss_weight: float = 5.0  # multiplies the multi-scale MSE; official: 5 (ADer's L2Loss lam)
    blur_sigma: float = 4.0  # Gaussian smoothing of the anomaly maps, pixels; official: 4
    mvas: bool = True  # the MVAS blocks; False: none at all, RD4AD (the "RD" column of the papers' tables)
    # the optimiser: TrainingRecipe's fields (base_lr, weight_decay, clip, lr_decay_at), the official values

    def __post_init__(self):
        """Checks every field: a ValueError naming it, its value, its range and the official value."""
        check_field(self, "backbone", self.backbone in ENCODERS, f"one of {', '.join(ENCODERS)}",
                    "the paper uses resnet34")
        check_weights(self)
        check_field(self, "image_size", is_count(self.image_size) and self.image_size % 32 == 0,
                    "a multiple of 32 for MVAD (--image-size)", "official: 256")
        sides = [self.image_size // stride for stride in ENCODER_STRIDES]  # h_s, the feature maps' sides
        fits = len(self.n_win) == 3 and all(is_count(a) and a <= h for a, h in zip(self.n_win, sides))
        check_field(self, "n_win", fits, f"3 window counts (one per scale), each from 1 to its scale's feature "
                    f"side ({', '.join(map(str, sides))} at image_size {self.image_size})", "official: 14, 9, 6")
        check_field(self, "topk", is_count(self.topk), "at least 1 (one above the candidate windows is clamped)",
                    "official: 4")
        check_field(self, "routing", self.routing in ROUTINGS, f"one of {', '.join(ROUTINGS)} (cosine, oracle: "
                    "our diagnostics)", "official: dot")
        check_field(self, "blocks", len(self.blocks) == 3 and all(is_count(n, least=0) for n in self.blocks),
                    "3 block counts (one per scale), each at least 0", "official: 1, 2, 4")
        channels = encoder_channels(self.backbone)
        check_field(self, "num_heads", is_count(self.num_heads) and all(c % self.num_heads == 0 for c in channels),
                    f"a divisor of every scale's channel count ({', '.join(map(str, channels))} for "
                    f"{self.backbone})", "official: 8")
        check_field(self, "mlp_ratio", is_count(self.mlp_ratio), "at least 1", "official: 4")
        check_field(self, "dropout", 0 <= self.dropout < 1, "in [0, 1)", "official: 0.1")
        check_field(self, "drop_path", 0 <= self.drop_path < 1, "in [0, 1)", "official: 0.1")
        check_field(self, "loss_weight", self.loss_weight > 0, "positive", "official: 5")
        check_field(self, "blur_sigma", self.blur_sigma > 0, "positive", "official: 4")
        check_field(self, "mvas", isinstance(self.mvas, bool), "true or false", "the paper: true")
        check_recipe(self, "official")


class MVAD(nn.Module):
    """Frozen encoder -> per-scale MVAS fusion -> OCBE -> de-ResNet decoder (the student)."""

    def __init__(self, cfg: MVADConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = FrozenEncoder(cfg.backbone, cfg.weights)
        channels = self.encoder.channels  # (64, 128, 256) for ResNet18/34
        self.fusion = nn.ModuleList(
            MultiViewFusion(c, depth, n_win, cfg.topk, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, cfg.drop_path,
                            cfg.routing)
            for c, depth, n_win in zip(channels, cfg.blocks, cfg.n_win)) if cfg.mvas else None
        self.bottleneck = OCBE(channels)
        block = DeBottleneck if cfg.backbone == "wide_resnet50_2" else DeBasicBlock
        self.decoder = Decoder(channels, block)

    def features(self, images: torch.Tensor, view_mask: torch.Tensor | None = None,
                 overlaps: list[torch.Tensor] | None = None):
        """Teacher and student features.

        Args:
            images: (B, V, 3, H, W) ImageNet-normalised, V >= 2, H = W = image_size.
            view_mask: (B, V) bool, True = view present, or None (all present).
            overlaps: routing "oracle" only: per scale (B, V, A, M), the share of each window's object
                surface that each candidate window of the other views sees (M = (V-1) A candidates in
                MultiViewFusion's order; synthetic.WithOverlaps adds them to the synthetic data's items).
        Returns:
            teacher, student: lists of S = 3 tensors (B*V, C_s, h_s, w_s), sample-major.
        """
        if images.dim() != 5 or images.shape[1] < 2 or images.shape[2] != 3 \
                or images.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"MVAD expects images (B, V>=2, 3, {self.cfg.image_size}, {self.cfg.image_size}), "
                             f"got {tuple(images.shape)}; set --image-size to the data's size")
        B, V, _, H, W = images.shape
        if view_mask is not None and (view_mask.shape != (B, V) or view_mask.dtype != torch.bool):
            raise ValueError(f"view_mask must be a (B, V) = ({B}, {V}) bool tensor, got "
                             f"{tuple(view_mask.shape)} {view_mask.dtype}")
        if self.fusion is not None and (self.cfg.routing == "oracle") != (overlaps is not None):
            raise ValueError("routing 'oracle' ranks windows by the renderer's geometry: the overlaps "
                             "(synthetic.WithOverlaps) are needed with it and only with it")
        # MVAD STEP 1 of 5 (arXiv:2407.11935, "Overall Architecture of MVAD"): the frozen pre-trained
        # encoder sees every view separately: X_i^j for scale j
        teacher = self.encoder(images.flatten(0, 1))  # S x (B*V, C_s, h_s, w_s)
        # MVAD STEP 2 of 5 (same section, the MVAS block): per scale X_o^j = LN^j(MVAS^j(X_i^j + P)) + X_i^j
        # (in the code's post-norm form, see MVASBlock): each view attends to the top-k windows of the others.
        # Without them (mvas=False, RD4AD) the encoder's features go straight to the OCBE.
        fused = teacher if self.fusion is None else [
            fuse(t.unflatten(0, (B, V)), view_mask, None if overlaps is None else overlaps[s]).flatten(0, 1)
            for s, (fuse, t) in enumerate(zip(self.fusion, teacher))]  # S x (B*V, C_s, h_s, w_s)
        # MVAD STEP 3 of 5 (RD4AD, arXiv:2201.10703: one-class bottleneck embedding, reverse distillation;
        # the scales fused as the official model/mvad.py): OCBE, then the student decoder reconstructs the
        # teacher's scales
        bottleneck = self.bottleneck(*fused)  # (B*V, 2*C_2, H/32, W/32)
        student = self.decoder(bottleneck)  # S x (B*V, C_s, h_s, w_s)
        return teacher, student

    def forward(self, images: torch.Tensor, overlaps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """images: (B, V, 3, H, W) (overlaps: see `features`) -> scalar training loss: loss_weight *
        multi-scale MSE."""
        teacher, student = self.features(images, overlaps=overlaps)
        # MVAD STEP 4 of 5 (arXiv:2407.11935, "Multi-Scale MSE"; STEPS 1-3 in `features`): multi-scale MSE
        # between encoder and decoder features, x5 (ADer's L2Loss lam)
        return self.cfg.loss_weight * reconstruction_loss(teacher, student)

    @torch.no_grad()
    def anomaly_map(self, images: torch.Tensor, view_mask: torch.Tensor | None = None,
                    overlaps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Anomaly maps at input resolution (call model.eval() first: BatchNorm running statistics).

        Args:
            images: (B, V, 3, H, W); view_mask: (B, V) bool or None; overlaps: see `features`.
        Returns:
            (B, V, H, W) float32: sum over scales of upsampled (1 - cos), / 9 (ADer's 'add' mode:
            scales x sum of the unit weights), Gaussian sigma 4; zeros for missing views.
        """
        teacher, student = self.features(images, view_mask, overlaps)
        B, V, _, H, W = images.shape
        # MVAD STEP 5 of 5 (RD4AD's map, as the official code; STEPS 1-3 in `features`): 1 - cos per scale,
        # upsampled and summed, then smoothed
        maps = sum(cosine_distance_map(t.float(), s.float(), (H, W)) for t, s in zip(teacher, student))
        maps = gaussian_blur(maps / 9.0, self.cfg.blur_sigma).reshape(B, V, H, W)  # (B, V, H, W)
        if view_mask is not None:
            maps = maps * view_mask[:, :, None, None]
        return maps
