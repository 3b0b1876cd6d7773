"""An independent float64 NumPy GPTQ, written from ../shared/docs/gptq-reference.md sections 1.6, 2.1-2.4 only.

Plain loops over blocks and columns, as the reference `fasterquant` is written; it imports nothing from gptq_jax.
Used by the tests as the yardstick for gptq_jax.{quantizer, hessian, solver}.
"""

from __future__ import annotations

import numpy as np


def minmax_params(x: np.ndarray, bits: int, sym: bool):
    """Per row of x (rows, cols): (scale, zero) float64, section 2.3."""
    maxq = 2**bits - 1
    x = np.asarray(x, np.float64)
    rows = x.shape[0]
    scale = np.empty(rows)
    zero = np.empty(rows)
    for r in range(rows):
        xmin = min(x[r].min(), 0.0) if x.shape[1] else 0.0
        xmax = max(x[r].max(), 0.0) if x.shape[1] else 0.0
        if sym:
            xmax = max(abs(xmin), xmax)
            if xmin < 0:
                xmin = -xmax
        if xmin == 0 and xmax == 0:
            xmin, xmax = -1.0, 1.0
        scale[r] = (xmax - xmin) / maxq
        zero[r] = (maxq + 1) / 2 if sym else np.round(-xmin / scale[r])
    return scale, zero


def mse_params(x: np.ndarray, bits: int, sym: bool, norm: float = 2.4, grid: int = 100, maxshrink: float = 0.8):
    """Section 2.4: shrink the min-max range by p = 1 - i/grid, keep the first p minimising sum |q - x|^norm."""
    maxq = 2**bits - 1
    x = np.asarray(x, np.float64)
    scale = np.empty(x.shape[0])
    zero = np.empty(x.shape[0])
    for r in range(x.shape[0]):
        xmin = min(x[r].min(), 0.0)
        xmax = max(x[r].max(), 0.0)
        if sym:
            xmax = max(abs(xmin), xmax)
            if xmin < 0:
                xmin = -xmax
        if xmin == 0 and xmax == 0:
            xmin, xmax = -1.0, 1.0
        best = np.inf
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            s = (p * xmax - p * xmin) / maxq
            z = (maxq + 1) / 2 if sym else np.round(-(p * xmin) / s)
            q = np.clip(np.round(x[r] / s) + z, 0, maxq)
            err = np.sum(np.abs(s * (q - z) - x[r]) ** norm)
            if err < best:
                best, scale[r], zero[r] = err, s, z
    return scale, zero


def quantize_codes(w: np.ndarray, scale, zero, bits: int, prefer=None, tie_tol: float = 0.0) -> np.ndarray:
    """clamp(round(w / scale) + zero, 0, maxq), round half to even.

    Rounding ties are decided by float rounding: an exact tie in real arithmetic (e.g. a symmetric group's most
    negative value maps to exactly -(maxq+1)/2 + 1/2) may go either way in float32 or float64. Where w / scale is
    within `tie_tol` of a half-integer and `prefer` (codes from another implementation) holds one of the two
    neighbouring codes, that code is taken, so a legitimate tie-break does not cascade through the rest of the row.
    """
    maxq = 2**bits - 1
    t = w / scale
    q = np.clip(np.round(t) + zero, 0, maxq)
    if prefer is not None and tie_tol > 0:
        lo = np.clip(np.floor(t) + zero, 0, maxq)
        hi = np.clip(np.floor(t) + 1 + zero, 0, maxq)
        near = np.abs((t - np.floor(t)) - 0.5) < tie_tol
        take = near & ((prefer == lo) | (prefer == hi))
        q = np.where(take, prefer, q)
    return q


def hessian(batches) -> tuple[np.ndarray, int]:
    """Section 2.1 running average over batches shaped (batch, seq, K) or (tokens, K) (= one sequence)."""
    H = None
    n = 0
    for x in batches:
        x = np.asarray(x, np.float64)
        if x.ndim == 2:
            x = x[None]
        m = x.shape[0]
        x = x.reshape(-1, x.shape[-1])
        if H is None:
            H = np.zeros((x.shape[1], x.shape[1]))
        H *= n / (n + m)
        n += m
        x = np.sqrt(2 / n) * x
        H += x.T @ x
    return H, n


def gar_perm(diag: np.ndarray, group_size: int) -> np.ndarray:
    """GPTQModel's group-aware reordering (section 1.6), written from its description: full groups ordered by
    decreasing max diag (stable), columns inside each group by decreasing diag (stable), a short tail group last."""
    K = diag.size
    nfull = K // group_size
    groups = [np.arange(g * group_size, (g + 1) * group_size) for g in range(nfull)]
    order = sorted(range(nfull), key=lambda g: -diag[groups[g]].max())  # sorted() is stable
    parts = [groups[g][np.argsort(-diag[groups[g]], kind="stable")] for g in order]
    return np.concatenate(parts + [np.arange(nfull * group_size, K)])


def gptq(W, H, *, bits: int, group_size: int, sym: bool, desc_act: bool, static_groups: bool,
         act_group_aware: bool = False, damp_percent: float = 0.01, block_size: int = 128, mse: float = 0.0, prefer_codes=None,
         tie_tol: float = 0.0, group_params: str = "reference"):
    """Section 2.2 in float64. Returns dict(codes (N, K) original order, scales (N, ngroups), zeros (N, ngroups),
    g_idx (K,), perm (K,), Q (N, K) dequantized, loss, ties: how many tie decisions took `prefer_codes`
    (codes (N, K) in original column order, see quantize_codes)).

    group_params="current": dynamic group parameters come from the fully updated weights (an eagerly updated copy
    of W), instead of the reference's global W that lacks the current block's updates.
    """
    W = np.array(W, np.float64)
    H = np.array(H, np.float64)
    N, K = W.shape
    maxq = 2**bits - 1

    def params(x):
        return mse_params(x, bits, sym, norm=mse) if mse else minmax_params(x, bits, sym)

    if group_size == -1:
        row_scale, row_zero = params(W)  # step 1: before dead-column zeroing

    dead = np.diag(H) == 0
    for k in np.nonzero(dead)[0]:
        H[k, k] = 1.0
    W[:, dead] = 0.0

    groups = []
    if static_groups and group_size != -1:
        for g0 in range(0, K, group_size):
            groups.append(params(W[:, g0:g0 + group_size]))

    perm = np.arange(K)
    if desc_act or act_group_aware:
        perm = gar_perm(np.diag(H), group_size) if act_group_aware else np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]

    H = H + damp_percent * np.mean(np.diag(H)) * np.eye(K)
    L = np.linalg.cholesky(H)
    Linv = np.linalg.inv(L)
    Hinv = Linv.T @ Linv
    U = np.linalg.cholesky(Hinv).T  # upper: U^T U = H^-1

    codes = np.zeros((N, K))
    Q = np.zeros((N, K))
    losses = np.zeros((N, K))
    ties = 0
    W_eager = W.copy()  # every column update applied at once (mathematically what the lazy blocks compute)
    dyn = {}  # group index (permuted order) -> (scale, zero)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            if group_size == -1:
                scale, zero = row_scale, row_zero
            elif static_groups:
                scale, zero = groups[perm[col] // group_size]
            else:
                if col % group_size == 0:
                    # from the global W: previous blocks' updates only (the reference's quirk)
                    src = W if group_params == "reference" else W_eager
                    dyn[col // group_size] = params(src[:, col:col + group_size])
                scale, zero = dyn[col // group_size]
            pref = None if prefer_codes is None else np.asarray(prefer_codes, np.float64)[:, perm[col]]
            q = quantize_codes(w, scale, zero, bits, pref, tie_tol)
            if pref is not None:
                ties += int(np.sum(q != quantize_codes(w, scale, zero, bits)))
            deq = scale * (q - zero)
            codes[:, col] = q
            Q[:, col] = deq
            losses[:, col] = (w - deq) ** 2 / d**2 / 2
            err = (w - deq) / d
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            W_eager[:, col:] -= np.outer(err, U[col, col:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    invperm = np.argsort(perm)
    codes = codes[:, invperm]
    Q = Q[:, invperm]
    if group_size == -1:
        scales, zeros = row_scale[:, None], row_zero[:, None]
        g_idx = np.zeros(K, np.int64)
    elif static_groups:
        scales = np.stack([g[0] for g in groups], 1)
        zeros = np.stack([g[1] for g in groups], 1)
        g_idx = np.arange(K) // group_size
    else:
        ng = len(dyn)
        scales = np.stack([dyn[g][0] for g in range(ng)], 1)
        zeros = np.stack([dyn[g][1] for g in range(ng)], 1)
        g_idx = (np.arange(K) // group_size)[invperm]  # g_idx[perm[i]] = i // G (section 1.6)
        if act_group_aware:  # processing group j is original group perm[j*G] // G: put parameters back there
            origin = perm[np.arange(ng) * group_size] // group_size
            scales, zeros = scales[:, np.argsort(origin)], zeros[:, np.argsort(origin)]
            g_idx = np.arange(K) // group_size
    return {"codes": codes, "scales": scales, "zeros": zeros, "g_idx": g_idx, "perm": perm, "Q": Q,
            "loss": losses.sum(), "U": U, "ties": ties}
