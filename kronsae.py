"""KronSAE: sparse autoencoders with a Kronecker-factorised encoder and the mAND
activation, beside the TopK SAE it improves on. A minimal, single-file reference
implementation.

Papers (equation numbers are KronSAE's own):
  - Kurochkin, Aksenov, Laptev, Gavrilov, Balagansky 2025, "Kronecker Factorization
    Improves Efficiency and Interpretability of Sparse Autoencoders", arXiv 2505.22255
    (KronSAE, mAND, eqs. 1-7, appendix A.1).
  - Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093
    (the TopK SAE and the AuxK loss).

Shape letters used in the comments:
  B  tokens in a batch            d  input width (d_in)
  F  dictionary size (latents)    k  active latents per token
  h  heads                        m, n  pre-latents per head, F = h*m*n
  E  encoder rows: F for TopK, h*(m+n) for KronSAE
  S  rows gathered per token      L  AuxK's dead latents
  k_aux  dead latents per token that AuxK trains (about d/2)
  H  heads kept by KronSAE's selection, R  rank pairs that can reach its top k

"kernel" alone means a composition of u and v (mAND, or the ablation's others);
"the sparse kernels" are section 3's autograd functions.

Part 1, the method:
  1. mAND (eq. 3)   2. The SAEs (eqs. 1-4)   3. The sparse kernels
  4. Losses         5. Training
Part 2, the tooling: sections 6-18.

Python:  train(KronSAE(d_in=512, h=512, m=2, n=8, k=32), batches, TrainConfig())
Shell:   python kronsae.py --help
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import errno
import functools
import hashlib
import html
import importlib.metadata
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as nnf
from tqdm.auto import tqdm

# #####################################################################################
# PART 1: THE METHOD. It reads like the paper, in its order, and knows nothing of
# files, models or processes.
# #####################################################################################

# ================================================================ 1. mAND (eq. 3)


def sqrt_prod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(a * b) where a * b > 0, and exactly 0 elsewhere, with finite gradients
    (large near 0: gradient clipping bounds them).

    The square root's gradient is infinite at 0, so the inner `where` shows it only
    positive numbers. (The paper's listing takes sqrt(a * b + 1e-5) instead, which
    leaves inactive pairs at 0.003: the AND is no longer an AND.)
    """
    t = a * b
    active = t > 0
    safe = torch.where(active, t, torch.ones_like(t))
    return torch.where(active, torch.sqrt(safe), torch.zeros_like(t))


def mand(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """mAND (eq. 3): z[..., i, j] = sqrt(u_i v_j) if u_i > 0 and v_j > 0, else 0.

    u (..., m) and v (..., n) give z (..., m, n): the square root of the Kronecker
    product ReLU(u) (x) ReLU(v) of eq. 4, flattened row-major as i*n + j.
    """
    return mand_pair(u[..., :, None], v[..., None, :])


def mand_pair(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """mAND of broadcastable u and v, elementwise: sqrt(ReLU(u) ReLU(v))."""
    return sqrt_prod(u.relu(), v.relu())


class Kernel(NamedTuple):
    """A way of composing a head's u_i and v_j into one latent (the ablation, sec. 13).

    Calling it composes broadcastable u and v. `degree` says how it scales: u and v
    multiplied by t multiply the latent by t**degree. `signed` is True when two
    negative inputs can make a positive latent, which KronSAE's selection must know.
    """

    compose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    degree: int
    signed: bool

    def __call__(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.compose(u, v)


def relu_product(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ReLU(u) ReLU(v): mAND without the square root."""
    return u.relu() * v.relu()


def signed_product(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ReLU(u v): the plain product, so two negative inputs make a positive latent."""
    return (u * v).relu()


KERNELS = {
    "mand": Kernel(mand_pair, degree=1, signed=False),  # eq. 3, the default
    "relu_product": Kernel(relu_product, degree=2, signed=False),
    "product": Kernel(signed_product, degree=2, signed=True),
}

# ================================================================ 2. The SAEs (eqs. 1-4)


def check_positive(**sizes):
    """Refuse any size that is not a positive integer, naming it."""
    for name, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")


class Encoding(NamedTuple):
    """What an encoder pass returns. The aux fields are None unless dead latents
    were given (AuxK)."""

    values: torch.Tensor  # (B, k) the latents' activations, >= 0
    indices: torch.Tensor  # (B, k) their indices into the dictionary
    aux_values: Optional[torch.Tensor] = None  # (B, k_aux) the top dead latents
    aux_indices: Optional[torch.Tensor] = None  # (B, k_aux)
    dead_ids: Optional[torch.Tensor] = None  # (L,) every dead latent, ascending


class SparseAutoencoder(nn.Module):
    """What both SAEs share (eq. 1):

        x_hat = sum over the k active latents l of f_l W_dec[l], plus b_dec.

    Parameters: W_enc (E, d), b_enc (E,), W_dec (F, d) with unit rows, b_dec (d,).
    The encoder centres its input first, W_enc (x - b_dec) + b_enc (Gao et al.).

    A subclass says how its E encoder rows become F latents, through four hooks:
    `select`, `scores_of`, `rows_of` and `activation`.
    """

    latents_per_head = 1  # KronSAE groups m*n latents in a head; TopK, one each

    def __init__(self, d_in: int, dict_size: int, k: int, enc_rows: int):
        super().__init__()
        check_positive(d_in=d_in, dict_size=dict_size, k=k)
        if k > dict_size:
            raise ValueError(f"k must be <= F, got k={k}, F={dict_size}")
        self.d_in = d_in
        self.F = dict_size
        self.k = k
        self.W_enc = nn.Parameter(torch.empty(enc_rows, d_in))
        self.b_enc = nn.Parameter(torch.zeros(enc_rows))
        self.W_dec = nn.Parameter(torch.empty(dict_size, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    # The four hooks a subclass gives.

    def select(self, pre: torch.Tensor, k: int) -> torch.Tensor:
        """(B, E) encoder scores -> (B, k) indices of the k largest latents."""
        raise NotImplementedError

    def scores_of(self, pre: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """(B, E) encoder scores and (L,) latent ids -> (B, L) scores that rank those
        latents as their values do (TopK: before its ReLU)."""
        raise NotImplementedError

    def rows_of(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, L) latent ids -> (B, S) the encoder rows they are computed from, laid
        out as `activation` expects them."""
        raise NotImplementedError

    def activation(self, pre_rows: torch.Tensor) -> torch.Tensor:
        """(B, S) the encoder scores at rows_of's rows -> (B, L) the latents' values."""
        raise NotImplementedError

    # The encoder and decoder, written once for both SAEs.

    def check_input(self, x: torch.Tensor):
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"input's last dimension must be d_in={self.d_in}, "
                f"got shape {tuple(x.shape)}"
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) -> values (B, k), indices (B, k): the top k latents."""
        encoding = self.encode_with_aux(x)
        return encoding.values, encoding.indices

    def encode_with_aux(
        self,
        x: torch.Tensor,
        dead: Optional[torch.Tensor] = None,
        dead_count: Optional[int] = None,
    ) -> Encoding:
        """encode, plus the top k_aux dead latents when a (F,) bool mask `dead` is
        given (AuxK). Pass `dead_count`, the mask's number of True, when you know it:
        otherwise it is read from the device, and the step waits for it."""
        self.check_input(x)

        # Scores for the selection only: no gradient flows through `pre`.
        # The gradients flow through gather_linear, below, for the chosen rows.
        # They stay in the weights' dtype under autocast: bfloat16 scores would
        # choose other latents near the k-th, and so other gradients.
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            x_centred = x.to(self.W_enc.dtype) - self.b_dec
            pre = torch.addmm(self.b_enc, x_centred, self.W_enc.T)  # (B, E)
        indices = self.select(pre, self.k)  # (B, k)

        if dead is None:
            k_aux = 0
        else:
            dead_ids = true_indices(dead, dead_count)  # (L,)
            k_aux = min(self.d_in // 2, len(dead_ids))  # Gao et al.
        if k_aux == 0:
            rows = self.rows_of(indices)
            values = self.activation(self.gather_linear(x, rows, pre))  # (B, k)
            return Encoding(values, indices)

        # AuxK: the top k_aux dead latents join the same gather, so a single sparse
        # encoder backward serves both losses.
        best_dead = self.scores_of(pre, dead_ids).topk(k_aux, dim=-1).indices
        aux_indices = dead_ids[best_dead]  # (B, k_aux)
        chosen = torch.cat([indices, aux_indices], dim=1)  # (B, k + k_aux)
        values = self.activation(self.gather_linear(x, self.rows_of(chosen), pre))

        k = self.k
        return Encoding(values[:, :k], indices, values[:, k:], aux_indices, dead_ids)

    def gather_linear(self, x, rows, pre) -> torch.Tensor:
        """(B, S) of (x - b_dec) W_enc[rows]^T + b_enc[rows], read from `pre`, with
        the gradients of x, W_enc, b_enc and b_dec (section 3)."""
        return GatherLinear.apply(x, self.b_dec, self.W_enc, self.b_enc, rows, pre)

    def sparse_decode(
        self,
        values: torch.Tensor,
        indices: torch.Tensor,
        among: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """sum over l of values[b, l] W_dec[indices[b, l]]: (B, k) -> (B, d).

        It reads only the rows used: O(k d) per token, not O(F d). `among`, when
        given, is a short ascending list that every index comes from (AuxK's dead
        latents); the kernel may then use one dense product on those rows."""
        return decode_rows(values, indices, self.W_dec, among)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.sparse_decode(values, indices) + self.b_dec  # (B, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = self.encode(x)
        return self.decode(values, indices)

    # The unit-norm decoder constraint.

    @torch.no_grad()
    def normalize_decoder_(self):
        """Unit-norm decoder rows. Runs after every optimiser step."""
        norms = self.W_dec.norm(dim=-1, keepdim=True)  # (F, 1)
        self.W_dec /= norms.clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad_(self):
        """Drop the part of each decoder row's gradient that lies along the row: it
        only changes the row's norm, which normalize_decoder_ undoes. Runs after
        backward(), before clipping and step()."""
        g = self.W_dec.grad
        W = self.W_dec
        if g is None:
            return

        # g_f -= <g_f, W_f> W_f for every row f, which holds for unit rows. The dot
        # products are a batch of (1, d) x (d, 1) products: no (F, d) temporary.
        along = torch.bmm(g.unsqueeze(1), W.unsqueeze(2)).view(-1, 1)  # (F, 1)
        g.addcmul_(along, W, value=-1.0)


class TopKSAE(SparseAutoencoder):
    """f = TopK(ReLU(W_enc (x - b_dec) + b_enc)), x_hat = W_dec^T f + b_dec
    (eq. 1; Gao et al. 2024). The encoder starts as the decoder's copy."""

    def __init__(self, d_in: int, dict_size: int, k: int):
        super().__init__(d_in, dict_size, k, enc_rows=dict_size)
        W = nnf.normalize(torch.randn(dict_size, d_in), dim=-1)
        self.W_dec.data = W
        self.W_enc.data = W.clone()

    def select(self, pre, k):  # (B, F) -> (B, k)
        return pre.topk(k, dim=-1).indices

    def scores_of(self, pre, latents):  # (B, F), (L,) -> (B, L)
        return pre[:, latents]

    def rows_of(self, latents):  # each latent is one encoder row
        return latents

    def activation(self, pre_rows):  # (B, S) -> (B, S): eq. 1's ReLU
        return pre_rows.relu()

    def flops_per_token(self) -> int:
        """eq. 7, in multiply-accumulates: the dense encoder d*F, the decoder k*d."""
        return self.d_in * self.F + self.k * self.d_in


class KroneckerSAE(SparseAutoencoder):
    """The parameters, the init and the shapes that both KronSAEs share.

    Head g has m + n encoder rows, [P_g; Q_g]. With x~ = x - b_dec:

        u_g = P_g x~ + b,   v_g = Q_g x~ + b                          eq. 2
        z[g, i, j] = mAND(u_g, v_g)[i, j]                             eqs. 3-4
                   = sqrt(ReLU(u_g,i) ReLU(v_g,j)),  latent g*m*n + i*n + j
        f = TopK over all F = h*m*n latents,  x_hat = W_dec^T f + b_dec   eq. 1

    `kernel` swaps mAND for another composition (the ablation, section 13).
    """

    def __init__(
        self,
        d_in: int,
        h: int,
        m: int,
        n: int,
        k: int,
        kernel: str = "mand",
        dict_size: Optional[int] = None,
    ):
        check_positive(m=m, n=n, h=h)
        if kernel not in KERNELS:
            raise ValueError(
                f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}"
            )
        if dict_size not in (None, h * m * n):
            raise ValueError(
                f"need F = h*m*n, got F={dict_size}, h*m*n={h}*{m}*{n}={h * m * n}"
            )
        super().__init__(d_in, h * m * n, k, enc_rows=h * (m + n))
        self.h = h
        self.m = m
        self.n = n
        self.latents_per_head = m * n
        self.kernel = kernel

        # Paper A.1: draw the encoder rows; the decoder row of latent (g, i, j) is
        # P_g,i + Q_g,j, normalised. Both biases start at zero.
        W_enc = nnf.normalize(torch.randn(h * (m + n), d_in), dim=-1)
        P, Q = W_enc.view(h, m + n, d_in).split([m, n], dim=1)  # (h, m, d), (h, n, d)
        W_dec = (P[:, :, None] + Q[:, None, :]).reshape(-1, d_in)  # (F, d)
        self.W_enc.data = W_enc
        self.W_dec.data = nnf.normalize(W_dec, dim=-1)

    def flops_per_token(self) -> int:
        """eq. 7, as KronSAE spends them: the encoder, mAND, the decoder k*d."""
        encoder = self.d_in * self.h * (self.m + self.n)
        composition = self.m * self.n * self.h
        return encoder + composition + self.k * self.d_in

    def split(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h*(m+n)) -> u (B, h, m), v (B, h, n)."""
        per_head = pre.view(-1, self.h, self.m + self.n)
        return per_head.split([self.m, self.n], dim=-1)


class NaiveKronSAE(KroneckerSAE):
    """KronSAE as the paper's listing computes it (without its 1e-5, section 1): all
    F latents, TopK, a dense (B, F) code and a dense decoder, O(F d) per token.
    Read this one first; it is for reading and for the tests, and `train` takes
    KronSAE, below.

    KronSAE, below, is the same SAE (parameters, init, values and gradients) with no
    F-sized work per token, and the tests hold it to that.
    """

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, F): every latent's value, eqs. 2-4."""
        pre = (x - self.b_dec) @ self.W_enc.T + self.b_enc  # (B, E), eq. 2
        u, v = self.split(pre)  # (B, h, m), (B, h, n)
        z = KERNELS[self.kernel](u[..., :, None], v[..., None, :])  # (B, h, m, n)
        return z.flatten(1)  # (B, F), eq. 4's order

    def encode(self, x):
        top = self.scores(x).topk(self.k, dim=-1)
        return top.values, top.indices

    def forward(self, x):
        z = self.scores(x)  # (B, F)
        top = z.topk(self.k, dim=-1)
        code = torch.zeros_like(z).scatter(-1, top.indices, top.values)  # (B, F)
        return code @ self.W_dec + self.b_dec  # (B, d), the dense decoder


@functools.cache
def rank_pairs(m: int, n: int, k: int, device: torch.device) -> torch.Tensor:
    """(2, R): every rank pair (r, s), r < m and s < n, with (r + 1)(s + 1) <= k.

    Cached per device, so the selection builds it once rather than every step."""
    pairs = [
        (r, s)
        for r in range(min(m, k))
        for s in range(min(n, k))
        if (r + 1) * (s + 1) <= k
    ]
    return torch.tensor(pairs, device=device).T


class KronSAE(KroneckerSAE):
    """NaiveKronSAE's SAE, fast. The encoder costs O(h (m+n) d), not O(F d) (eq. 7);
    the top k is found without computing all F latents; the sparse kernels of
    section 3 touch the chosen rows only. (AuxK still scores every dead latent.)"""

    def select(self, pre: torch.Tensor, k: int) -> torch.Tensor:
        """(B, h*(m+n)) -> (B, k): the indices of the k largest of the F latents.

        It is exact for any k and every kernel, in three steps:

        1. Each head's upper bound, the largest latent it can make. For mAND and
           relu_product a latent grows with both p_i = ReLU(u_i) >= 0 and
           q_j = ReLU(v_j) >= 0, so a head's best comes from max(p) and max(q);
           the bound ranks heads by max(p) * max(q), which the square root of
           mAND does not reorder. For the signed product it is one of the four
           products of u's and v's extremes.
        2. Keep the H = min(k, h) heads with the best bounds. A head's bound is one
           of its own latents, so the kept heads hold H latents at least as large as
           any latent of a dropped head: no dropped head can reach the top k.
        3. Score the candidates in the kept heads and take the top k. Inside a head,
           sort p and q: the pair of p's r-th and q's s-th largest is matched or
           beaten by the (r + 1)(s + 1) - 1 other pairs with ranks at most (r, s),
           all in the same head. So only the R rank pairs with (r + 1)(s + 1) <= k
           can reach the top k.
        """
        # Rank in float32: bfloat16 products tie where the exact ones do not.
        pre = pre.float()

        # Step 1: (B, h) upper bounds.
        u, v = self.split(pre)  # (B, h, m), (B, h, n)
        head_best = self.head_bounds(u, v)  # (B, h)

        # Step 2: the u and v rows of the H best heads.
        heads = head_best.topk(min(k, self.h), dim=-1).indices  # (B, H)
        u, v = self.split_heads(pre, heads)  # (B, H, m), (B, H, n)

        # Step 3: score the candidates. Sorting costs more than it saves unless it
        # cuts the m*n pairs a head has by at least 4x; the signed product is not
        # monotone in p and q, so it always scores every pair.
        pairs = rank_pairs(self.m, self.n, k, pre.device)  # (2, R)
        if KERNELS[self.kernel].signed or 4 * pairs.shape[1] > self.m * self.n:
            slot, i, j = self.best_of_all_pairs(u, v, k)
        else:
            slot, i, j = self.best_of_rank_pairs(u, v, k, pairs)

        head = heads.gather(1, slot)  # (B, k)
        return head * self.latents_per_head + i * self.n + j  # eq. 4's order

    def split_heads(self, pre: torch.Tensor, heads: torch.Tensor) -> tuple:
        """pre (B, h*(m+n)), heads (B, H) -> those heads' u (B, H, m), v (B, H, n)."""
        per_head = pre.view(-1, self.h, self.m + self.n)  # (B, h, m+n)
        token = torch.arange(len(pre), device=pre.device)[:, None]  # (B, 1)
        kept = per_head[token, heads]  # (B, H, m+n)
        return kept.split([self.m, self.n], dim=-1)

    def head_bounds(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """u (B, h, m), v (B, h, n) -> (B, h): each head's largest latent (for the
        signed product, its largest u_i v_j before the ReLU)."""
        if not KERNELS[self.kernel].signed:
            return u.amax(-1).relu() * v.amax(-1).relu()  # max ReLU = ReLU max

        # The signed product's best is one of the four products of the extremes.
        u_ends = torch.stack([u.amax(-1), u.amin(-1)])  # (2, B, h)
        v_ends = torch.stack([v.amax(-1), v.amin(-1)])  # (2, B, h)
        corners = u_ends[:, None] * v_ends[None, :]  # (2, 2, B, h)
        return corners.flatten(0, 1).amax(0)

    def best_of_all_pairs(self, u, v, k):
        """The top k of every (i, j) pair in the kept heads: u (B, H, m), v (B, H, n)
        -> the kept head's slot, i and j, each (B, k)."""
        if not KERNELS[self.kernel].signed:
            u = u.relu()
            v = v.relu()
        products = u[..., :, None] * v[..., None, :]  # (B, H, m, n)
        best = products.flatten(1).topk(k, dim=-1).indices  # (B, k) into H*m*n
        slot = best // (self.m * self.n)
        within = best % (self.m * self.n)
        return slot, within // self.n, within % self.n

    def best_of_rank_pairs(self, u, v, k, pairs):
        """The top k of the rank pairs that can reach it, for latents >= 0 that grow
        with p = ReLU(u) and q = ReLU(v). Returns the slot, i and j, each (B, k)."""
        r, s = pairs  # (R,), (R,)
        p, i_sorted = u.relu().topk(min(self.m, k), dim=-1)  # (B, H, min(m, k))
        q, j_sorted = v.relu().topk(min(self.n, k), dim=-1)  # (B, H, min(n, k))

        candidates = p[..., r] * q[..., s]  # (B, H, R)
        best = candidates.flatten(1).topk(k, dim=-1).indices  # (B, k) into H*R
        slot = best // r.numel()  # which kept head, (B, k)
        pair = best % r.numel()  # which rank pair, (B, k)

        # Back from ranks to positions: the r-th largest p of this slot is at i.
        token = torch.arange(len(p), device=p.device)[:, None]  # (B, 1)
        i = i_sorted[token, slot, r[pair]]  # (B, k)
        j = j_sorted[token, slot, s[pair]]  # (B, k)
        return slot, i, j

    def rows_of(self, latents):
        """(B, S) -> (B, 2S): every latent's u row, then every latent's v row."""
        head = latents // self.latents_per_head
        within = latents % self.latents_per_head
        first_row = head * (self.m + self.n)
        u_rows = first_row + within // self.n
        v_rows = first_row + self.m + within % self.n
        return torch.cat([u_rows, v_rows], dim=-1)

    def scores_of(self, pre, latents):  # (B, E), (L,) -> (B, L)
        u_rows, v_rows = self.rows_of(latents).chunk(2, dim=-1)
        return KERNELS[self.kernel](pre[:, u_rows], pre[:, v_rows])

    def activation(self, pre_rows):
        """(B, 2S) -> (B, S): eq. 3 (or the kernel) on the chosen pairs only."""
        u, v = pre_rows.chunk(2, dim=-1)
        return KERNELS[self.kernel](u, v)


# ================================================================ 3. The sparse kernels
# Of the E encoder scores, only k (TopK) or 2k (KronSAE) per token reach the loss, so
# a backward pass needs O(B k d) work, not O(B E d); and the decoder needs k of the F
# rows per token. These kernels do that work. A learner may skip this section: the
# SAEs above call it by name (gather_linear, decode_rows). A copier takes it along.
#
# Each kernel has a dense twin, a scatter and ordinary GEMMs, faster when there are
# many rows per token (AuxK's k_aux ~ d/2 dead latents) or no sparse kernels at all.
# `prefer_dense` decides between the two; the crossovers, measured on an H100 and a
# 2-core AVX2 CPU, are about 1/32 and 1/10 of the rows per token (README).


def prefer_dense(rows_per_token: int, n_rows: int, device: torch.device) -> bool:
    """True when the dense twin, a product over all n_rows rows, beats the sparse
    kernels that touch rows_per_token rows a token."""
    if device.type not in ("cpu", "cuda") or not sparse_kernels_work(device):
        return True  # MPS and newer backends: no sparse CSR products
    crossover = 32 if device.type == "cuda" else 10
    return rows_per_token * crossover >= n_rows


def bag_sum(ids: torch.Tensor, table: torch.Tensor, weights: torch.Tensor):
    """out[b] = sum over s of weights[b, s] table[ids[b, s]]: (B, S) -> (B, d),
    without gathering a (B, S, d) tensor first."""
    weights = weights.to(table.dtype)
    return nnf.embedding_bag(ids, table, per_sample_weights=weights, mode="sum")


def csr(crow, col, values, size: tuple) -> torch.Tensor:
    """A sparse CSR matrix, without PyTorch's one-time "beta" notice."""
    with warnings.catch_warnings(action="ignore"):
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def weight_grad(W, rows, weights, x) -> Optional[torch.Tensor]:
    """dL/dW[r] = sum over (b, s) with rows[b, s] = r of weights[b, s] x[b].

    W (E, d), rows (B, S), weights (B, S), x (B, d). It is an (E, B) sparse matrix
    times x, O(B S d): the matrix in CSR form, its entries sorted by row, where
    repeated (r, b) entries add. The result is added into W.grad in place when that
    exists (train_step keeps it, because a fresh (F, d) tensor every step is slow to
    page in), and returned otherwise. So with W.grad kept, torch.autograd.grad gets
    None for W: set W.grad to None before such a call.
    """
    n_rows = len(W)
    flat_rows = rows.flatten()
    order = flat_rows.argsort(stable=True)
    sorted_rows = flat_rows[order]

    # Row pointers: where each row's entries start in the sorted list.
    row_ids = torch.arange(n_rows + 1, device=rows.device)
    crow = torch.searchsorted(sorted_rows, row_ids)  # (E + 1,)
    tokens = order // rows.shape[1]
    entries = weights.flatten()[order].to(W.dtype)
    code_t = csr(crow, tokens, entries, (n_rows, len(rows)))  # (E, B)

    # out= writes into the kept gradient: MKL would otherwise hold an (E, d) copy.
    # The sparse products have no bfloat16 kernel, so this runs in W's dtype.
    grad = torch.zeros_like(W) if W.grad is None else W.grad
    with torch.autocast(W.device.type, enabled=False):
        torch.addmm(grad, code_t, x.to(W.dtype), out=grad)

    # A kept W.grad already holds the sum: autograd receives None and adds nothing.
    return grad if W.grad is None else None


class GatherLinear(torch.autograd.Function):
    """A gather from a linear map that was computed once, without gradients.

    Forward: y[b, s] = (x[b] - shift) . W[rows[b, s]] + bias[rows[b, s]], which is
    pre[b, rows[b, s]] for pre = (x - shift) W^T + bias, already computed.
    Backward: only the gathered rows get gradients, O(B S d) (Gao et al. 2024), or
    through the dense twin when prefer_dense says so.
    x (B, d), shift (d,), W (E, d), bias (E,), rows (B, S), pre (B, E) -> (B, S).
    """

    @staticmethod
    def forward(ctx, x, shift, W, bias, rows, pre):
        ctx.save_for_backward(x - shift, W, rows)
        return pre.gather(1, rows)  # (B, S)

    @staticmethod
    def backward(ctx, grad_y):
        x_centred, W, rows = ctx.saved_tensors
        x_needs_grad = ctx.needs_input_grad[0]

        # Under autocast grad_y is bfloat16, and its sums over tokens (the biases')
        # stall there: they run in W's dtype. The GEMMs follow autocast.
        grad_y = grad_y.to(W.dtype)  # (B, S)
        if prefer_dense(rows.shape[1], len(W), x_centred.device):
            grads = gather_linear_backward_dense(
                x_centred, W, rows, grad_y, x_needs_grad
            )
        else:
            grads = gather_linear_backward_sparse(
                x_centred, W, rows, grad_y, x_needs_grad
            )
        grad_x, grad_W, grad_bias = grads

        # y depends on shift through -(shift . W[row]): dL/dshift = -(dL/dbias) W.
        with torch.autocast(W.device.type, enabled=False):
            grad_shift = -(grad_bias @ W)  # (d,)
        return grad_x, grad_shift, grad_W, grad_bias, None, None


def gather_linear_backward_dense(x_centred, W, rows, grad_y, x_needs_grad):
    """The dense twin: scatter grad_y into a (B, E) matrix G, then two GEMMs."""
    G = grad_y.new_zeros(len(rows), len(W)).scatter_add_(1, rows, grad_y)  # (B, E)
    grad_x = G @ W if x_needs_grad else None  # (B, d)
    grad_W = G.T @ x_centred  # (E, d)
    grad_bias = G.sum(0)  # (E,)
    return grad_x, grad_W, grad_bias


def gather_linear_backward_sparse(x_centred, W, rows, grad_y, x_needs_grad):
    """The gathered rows only: O(B S d)."""
    grad_x = bag_sum(rows, W, grad_y) if x_needs_grad else None  # (B, d)
    grad_W = weight_grad(W, rows, grad_y, x_centred)  # (E, d), or None if kept
    grad_bias = grad_y.new_zeros(len(W)).index_add_(0, rows.flatten(), grad_y.flatten())
    return grad_x, grad_W, grad_bias


class SparseDecode(torch.autograd.Function):
    """eq. 1's sparse decoder: out[b] = sum over s of values[b, s] W[rows[b, s]].

    values (B, S), rows (B, S), W (F, d) -> (B, d), in O(B S d). Backward: the
    values' gradient is g W^T sampled at the S used rows of each token (an SDDMM),
    and W's gradient goes through weight_grad.
    """

    @staticmethod
    def forward(ctx, values, rows, W):
        ctx.save_for_backward(values, rows, W)
        return bag_sum(rows, W, values)  # (B, d)

    @staticmethod
    def backward(ctx, grad_out):
        values, rows, W = ctx.saved_tensors
        grad_values, grad_W = sparse_decode_backward(values, rows, W, grad_out)
        return grad_values, None, grad_W


def sparse_decode_backward(values, rows, W, grad_out):
    """SparseDecode's gradients: grad_values (B, S) and grad_W (F, d), or None for
    grad_W when W.grad is kept (weight_grad added into it)."""
    # sampled_addmm has no bfloat16 kernel: keep its operands in W's dtype.
    grad_out = grad_out.to(W.dtype)  # (B, d)
    B, S = rows.shape
    crow = torch.arange(0, B * S + 1, S, device=rows.device)  # S entries a row
    zeros = grad_out.new_zeros(B * S)
    pattern = csr(crow, rows.flatten(), zeros, (B, len(W)))  # (B, F)
    with torch.autocast(W.device.type, enabled=False):
        sampled = torch.sparse.sampled_addmm(pattern, grad_out, W.T, beta=0)
    grad_values = sampled.values().view(B, S)  # (B, S)
    grad_W = weight_grad(W, rows, values, grad_out)  # (F, d)
    return grad_values, grad_W


def true_indices(mask: torch.Tensor, count: Optional[int] = None) -> torch.Tensor:
    """The ascending indices where the 1-d `mask` is True, as mask.nonzero() gives
    them. Given their `count`, the host need not wait for the device to learn the
    output's size: a stable sort puts the True entries first, in their order.
    The count must be right."""
    if count is None:
        return mask.nonzero().squeeze(1)
    order = torch.argsort(mask.to(torch.uint8), descending=True, stable=True)
    return order[:count]


def decode_rows(values, rows, W, among: Optional[torch.Tensor] = None):
    """sum over s of values[b, s] W[rows[b, s]], by SparseDecode or its dense twin.

    values (B, S), rows (B, S), W (F, d) -> (B, d). `among`, an ascending (L,) list
    holding every row used, lets the twin multiply by those L rows alone."""
    B, S = rows.shape
    n_rows = len(W) if among is None else len(among)  # the rows the twin multiplies
    if not prefer_dense(S, n_rows, rows.device):
        return SparseDecode.apply(values, rows, W)  # (B, d)
    values = values.to(W.dtype)  # bfloat16 values from outside autocast, too
    if among is None:
        code = values.new_zeros(B, len(W)).scatter_add(1, rows, values)  # (B, F)
        return code @ W  # (B, d)
    position = torch.searchsorted(among, rows.contiguous())  # (B, S) into among
    code = values.new_zeros(B, len(among)).scatter_add(1, position, values)  # (B, L)
    return code @ W[among]  # (B, L) (L, d) -> (B, d)


@functools.cache
def sparse_kernels_work(device: torch.device) -> bool:
    """Run a tiny problem, with repeated rows, through the sparse kernels and their
    dense twins on `device`, once. If a kernel raises or disagrees, warn once and
    let this device use the dense twins."""
    try:
        mismatch = sparse_kernels_mismatch(device)
    except Exception as err:  # any failure at all means: do not trust them here
        mismatch = f"{type(err).__name__}: {err}"
    if mismatch:
        warnings.warn(
            f"the sparse kernels failed a self-check on {device} ({mismatch}); "
            f"using the dense twins, which cost O(F d) per token instead of O(k d)",
            stacklevel=2,
        )
    return not mismatch


def sparse_kernels_mismatch(device: torch.device) -> str:
    """'' if the sparse kernels match their dense twins on a tiny problem, else the
    name of the first that does not."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 3, generator=g).to(device)  # (E, d)
    x = torch.randn(4, 3, generator=g).to(device)  # (B, d), also the output gradient
    values = torch.randn(4, 3, generator=g).to(device)  # (B, S)
    rows = torch.tensor([[0, 2, 2], [4, 4, 4], [1, 0, 3], [2, 2, 0]], device=device)

    with torch.autocast(device.type, enabled=False):
        sparse = gather_linear_backward_sparse(x, W, rows, values, True)
        dense = gather_linear_backward_dense(x, W, rows, values, True)
        names = ("gradient of x", "weight gradient", "bias gradient")
        for name, a, b in zip(names, sparse, dense):
            if not torch.allclose(a, b, atol=1e-5):
                return f"GatherLinear's {name}"

        # The decoder's twin, by hand: a dense code times W, and g W^T at the rows.
        code = torch.zeros(4, 5, device=device).scatter_add(1, rows, values)  # (B, E)
        if not torch.allclose(bag_sum(rows, W, values), code @ W, atol=1e-5):
            return "SparseDecode's output"
        grad_values, grad_W = sparse_decode_backward(values, rows, W, x)
        if not torch.allclose(grad_values, (x @ W.T).gather(1, rows), atol=1e-5):
            return "SparseDecode's values gradient"
        if not torch.allclose(grad_W, code.T @ x, atol=1e-5):
            return "SparseDecode's weight gradient"
    return ""


# ================================================================ 4. Losses


def total_variance(t: torch.Tensor) -> torch.Tensor:
    """sum over the batch of ||t - mean(t)||^2: the denominator of the FVU."""
    return (t - t.mean(0)).pow(2).sum()


def normalized_mse(
    target: torch.Tensor,
    recon: torch.Tensor,
    variance: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """||target - recon||^2 / total_variance(target): the batch FVU (Gao et al.).

    A caller that holds a slice of a batch passes the whole batch's variance."""
    if variance is None:
        variance = total_variance(target)
    return (target - recon).pow(2).sum() / variance.clamp_min(1e-12)


def reconstruction_loss(sae, x: torch.Tensor, enc: Encoding, variance=None) -> tuple:
    """(normalized_mse(x, x_hat), x_hat): eq. 1's reconstruction, scored as FVU."""
    x_hat = sae.decode(enc.values, enc.indices)  # (B, d)
    return normalized_mse(x, x_hat, variance), x_hat


def auxk_loss(
    sae, residual: torch.Tensor, enc: Encoding, variance=None
) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the top dead latents reconstruct the residual
    x - x_hat, without b_dec, so that dead latents get a gradient again."""
    if enc.aux_values is None:
        return residual.new_zeros(())
    aux_hat = sae.sparse_decode(enc.aux_values, enc.aux_indices, among=enc.dead_ids)
    return normalized_mse(residual, aux_hat, variance)


# ================================================================ 5. Training


def opt(default, help: str, **meta):
    """A config field with a one-line description (Part 2's CLI shows it in --help)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """The optimiser, its schedule and AuxK: what `train` needs besides an SAE and
    its batches."""

    steps: int = opt(1000, "optimiser steps per SAE")
    batch: int = opt(1024, "tokens per batch")
    lr: float = opt(8e-4, "peak learning rate (AdamW, paper A.1)")
    warmup: float = opt(0.1, "fraction of steps with linear warmup")
    min_lr: float = opt(1e-6, "learning rate at the end of the cosine decay")
    grad_clip: float = opt(1.0, "max global gradient norm; 0 = no clipping")
    aux_coef: float = opt(1 / 32, "AuxK loss weight (Gao et al. 2024); 0 = no AuxK")
    dead_tokens: int = opt(
        0,
        "a latent unused for this many tokens is dead; "
        "0 = auto (10% of training, at most 10M)",
    )

    @property
    def dead_after(self) -> int:
        """Tokens without firing that make a latent dead. Gao et al. use 10M, which
        short runs never reach."""
        return self.dead_tokens or min(
            10_000_000, max(1, self.steps * self.batch // 10)
        )

    def __post_init__(self):
        check_positive(steps=self.steps, batch=self.batch)
        if not (self.lr > 0 and 0 <= self.warmup < 1 and 0 <= self.min_lr <= self.lr):
            raise ValueError(
                f"need lr > 0, 0 <= warmup < 1, 0 <= min_lr <= lr; got lr={self.lr}, "
                f"warmup={self.warmup}, min_lr={self.min_lr}"
            )
        for name in ("grad_clip", "aux_coef", "dead_tokens"):
            value = getattr(self, name)
            if not value >= 0:  # NaN fails this too
                raise ValueError(f"{name} must be >= 0, got {name}={value}")


def lr_factor(step: int, total: int, warmup: float, floor: float) -> float:
    """Paper A.1: linear warmup over the first `warmup` share of the steps, then a
    cosine decay to `floor` times the peak."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_schedule(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    factor = partial(
        lr_factor, total=cfg.steps, warmup=cfg.warmup, floor=cfg.min_lr / cfg.lr
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(sae: nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW (A.1) without weight decay, which would fight the unit-norm decoder.
    Fused where it can be: no parameter-sized temporaries."""
    device = next(sae.parameters()).device
    fused = device.type in ("cpu", "cuda")  # one kernel for every parameter
    return torch.optim.AdamW(sae.parameters(), lr=lr, weight_decay=0.0, fused=fused)


class StepStats(NamedTuple):
    """One step's numbers. train_step fills them with 0-d tensors on the device,
    so that the step never waits for it; `read` returns them as floats."""

    loss: float  # the total loss that was optimised
    fvu: float  # FVU of the reconstruction x_hat, on this batch
    aux: float  # the AuxK term, before its weight
    active: float  # active latents, summed over tokens (L0 = active / tokens)
    tokens: float

    def read(self, *extra: torch.Tensor) -> tuple[StepStats, list[float]]:
        """These stats as floats, and `extra` 0-d tensors too, in one device read.
        A loss that is not finite raises FloatingPointError."""
        numbers = torch.stack([*self, *extra]).tolist()
        stats = StepStats(*numbers[: len(self)])
        if not math.isfinite(stats.loss):
            raise FloatingPointError(
                f"loss is {stats.loss} (fvu={stats.fvu}, aux={stats.aux})"
            )
        return stats, numbers[len(self) :]


def train_step(
    sae: SparseAutoencoder,
    optimizer,
    x: torch.Tensor,
    dead: torch.Tensor,
    cfg: TrainConfig,
    variance: Callable = total_variance,
    loss_fn: Callable = reconstruction_loss,
    dead_count: Optional[int] = None,
) -> tuple[StepStats, Encoding]:
    """One optimiser step on a batch x (B, d). Returns the stats, on the device, and
    the encoding.

    `dead` (F,) marks AuxK's latents, and `dead_count` is its number of True.
    `variance` gives a batch's total variance (data parallel: of every process's
    slice), and `loss_fn` the reconstruction term (or matryoshka_loss).
    """
    use_aux = cfg.aux_coef > 0
    enc = sae.encode_with_aux(x, dead if use_aux else None, dead_count)
    recon, x_hat = loss_fn(sae, x, enc, variance(x))

    residual = (x - x_hat).detach()
    aux_variance = variance(residual) if enc.aux_values is not None else None
    aux = auxk_loss(sae, residual, enc, aux_variance)
    loss = recon + cfg.aux_coef * aux

    # The gradients stay allocated between steps: weight_grad adds into them.
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    sae.remove_parallel_grad_()  # after backward, before clipping and the step
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    optimizer.step()
    sae.normalize_decoder_()  # after the step

    fvu = normalized_mse(x, x_hat.detach(), variance(x))
    active = (enc.values > 0).sum().float()
    tokens = torch.full((), float(len(x)), device=x.device)  # not a copy: a fill
    return StepStats(loss.detach(), fvu, aux.detach(), active, tokens), enc


def fire_counts(enc: Encoding, F: int) -> torch.Tensor:
    """(F,) how many of the batch's tokens each latent fired on (value > 0)."""
    fired = (enc.values > 0).flatten().float()
    return torch.zeros(F, device=fired.device).index_add_(
        0, enc.indices.flatten(), fired
    )


@torch.no_grad()
def start_b_dec_(sae: SparseAutoencoder, mean: torch.Tensor):
    """Gao et al. start a fresh SAE's b_dec at the data mean. An SAE whose b_dec
    is set already (one loaded from a checkpoint, say) keeps it."""
    if not sae.b_dec.any():
        sae.b_dec.copy_(mean)


def show_progress(bar, stats: StepStats, **more):
    """The loss, the training EV and L0 (and `more`) beside the progress bar."""
    bar.set_postfix(
        loss=f"{stats.loss:.4f}",
        ev_train=f"{1 - stats.fvu:.3f}",
        l0=f"{stats.active / stats.tokens:.1f}",
        **more,
    )


@dataclass
class TrainState:
    """What the loop carries from step to step: AdamW, its schedule (paper A.1), each
    latent's tokens since it last fired, the step and the losses so far."""

    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    tokens_since_fired: torch.Tensor  # (F,)
    step: int = 0
    losses: list = field(default_factory=list)

    @classmethod
    def fresh(cls, sae: SparseAutoencoder, cfg: TrainConfig) -> TrainState:
        optimizer = make_optimizer(sae, cfg.lr)
        since = torch.zeros(sae.F, dtype=torch.long, device=sae.W_dec.device)
        return cls(optimizer, make_schedule(optimizer, cfg), since)

    def finished(self, cfg: TrainConfig) -> bool:
        return self.step >= cfg.steps

    def advance(self):
        """Count one finished step: the step, and the schedule's next rate."""
        self.step += 1
        self.schedule.step()

    def progress_bar(self, sae: SparseAutoencoder, cfg: TrainConfig, progress: bool):
        name = type(sae).__name__
        return tqdm(
            desc=name,
            total=cfg.steps,
            initial=self.step,
            disable=not progress,
            leave=False,
        )

    def update_bar(self, bar):
        bar.update(1)


class StepHooks:
    """The places where Part 2's run_training joins this loop: its RunHooks add data
    parallel, bfloat16, timing, the training log, checkpoints and Ctrl-C. Here each
    is the plain default, so with these `train` is the method's loop and no more."""

    variance = staticmethod(total_variance)  # a batch's total variance (section 4)
    loss_fn = staticmethod(reconstruction_loss)  # the reconstruction term

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The first batch's mean, where a fresh b_dec starts."""
        return x.mean(0)

    def start_step(self, state: TrainState):
        """Before a step fetches its batch."""

    def precision(self):
        """The context of the step's forward, backward and update: none here
        (bfloat16 autocast in a bf16 run)."""
        return contextlib.nullcontext()

    def total(self, stats: StepStats, fired: torch.Tensor) -> tuple:
        """The step's stats and (F,) firing counts, for the whole batch: these
        here (under data parallel, the sums over the processes' slices)."""
        return stats, fired

    def end_step(self, state: TrainState):
        """After the step's one read from the device, before state.advance()."""

    def after_step(self, sae, state: TrainState, stats: StepStats, enc, dead_count):
        """After state.advance(): where a run logs, checkpoints or stops."""


def train(
    sae: SparseAutoencoder,
    batches: Iterator[torch.Tensor],
    cfg: TrainConfig,
    progress: bool = True,
    state: Optional[TrainState] = None,
    hooks: Optional[StepHooks] = None,
) -> list[float]:
    """Train `sae` in place for cfg.steps steps on batches (B, d). Returns the
    losses. `state` continues a run; `hooks` is how Part 2's run_training adds
    checkpoints, restarts and data parallel."""
    device = sae.W_dec.device
    state = state or TrainState.fresh(sae, cfg)
    hooks = hooks or StepHooks()

    # Gao et al.: a latent that has not fired for cfg.dead_after tokens is dead.
    # None are at the start; a run that continues reads how many it has.
    dead = state.tokens_since_fired >= cfg.dead_after  # (F,)
    dead_count = int(dead.sum()) if state.step else 0

    first = state.step
    with state.progress_bar(sae, cfg, progress) as bar:
        while not state.finished(cfg):
            step = state.step
            hooks.start_step(state)
            x = next(batches).to(device, non_blocking=True)
            if step == first:  # check the data once, and start b_dec at its mean
                sae.check_input(x)
                start_b_dec_(sae, hooks.mean(x))

            with hooks.precision():
                stats, enc = train_step(
                    sae,
                    state.optimizer,
                    x,
                    dead,
                    cfg,
                    variance=hooks.variance,
                    loss_fn=hooks.loss_fn,
                    dead_count=dead_count,
                )

            stats, fired = hooks.total(stats, fire_counts(enc, sae.F))
            state.tokens_since_fired += stats.tokens.long()
            state.tokens_since_fired.masked_fill_(fired > 0, 0)
            dead = state.tokens_since_fired >= cfg.dead_after

            # The step's one read from the device: its stats and the next dead count.
            stats, extra = stats.read(dead.sum())
            dead_count = int(extra[0])

            state.losses.append(stats.loss)
            hooks.end_step(state)
            state.advance()
            state.update_bar(bar)
            if step % 10 == 0 or state.finished(cfg):
                show_progress(bar, stats, dead=f"{dead_count / sae.F:.1%}")
            hooks.after_step(sae, state, stats, enc, dead_count)
    return state.losses


# #####################################################################################
# END OF THE METHOD. Everything below is tooling around it: data, real models,
# evaluation, checkpoints, progressive coding, the benchmark and the CLI. A learner
# can stop reading here.
# #####################################################################################

# PART 2: THE TOOLING

# ============================================================================= 6. Devices, seeds and processes


DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16")


def flag_of(name: str) -> str:
    """A config field's command-line flag: dict_size -> --dict-size."""
    return "--" + name.replace("_", "-")


def check_choice(name: str, value, choices: tuple):
    """Refuse a value outside `choices`, naming the flag and every choice."""
    if value not in choices:
        listed = f"{', '.join(choices[:-1])} or {choices[-1]}"
        raise ValueError(f"{flag_of(name)} must be {listed}, got {value!r}")


def check_seed(seed: int):
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")


def check_seeds(seeds: int):
    """A sweep's --seeds: how many seeds, from --seed on."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")


# The parsers of flags whose value is one string of several parts. They sit here, before
# the configs whose fields name them (opt's `parse`).


def comma_parts(text: str) -> tuple:
    """'a, b,,c' -> ('a', 'b', 'c'): the parts of a comma-separated flag."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def comma_ints(text: str) -> tuple:
    """'256,512,1024' -> (256, 512, 1024), for flags that take a list."""
    try:
        return tuple(int(part) for part in comma_parts(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def mn_shape(part: str) -> Optional[tuple]:
    """'2x8' -> (2, 8): a KronSAE shape (m, n) with m, n >= 1; None for anything else."""
    found = re.fullmatch(r"(\d+)x(\d+)", part.lower())
    if not found or min(int(found[1]), int(found[2])) < 1:
        return None
    return int(found[1]), int(found[2])


def kron_shapes(text: str) -> tuple:
    """'2x8,4x4' -> ((2, 8), (4, 4)): KronSAE shapes (m, n)."""
    shapes = tuple(mn_shape(part) for part in comma_parts(text))
    if not shapes or None in shapes:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated shapes MxN such as 2x8,4x4, got {text!r}"
        )
    return shapes


def zero_one(text: str) -> bool:
    """'1' -> True, '0' -> False: the benchmark's switches, which take a value."""
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")
    return text == "1"


def check_device(name: str):
    """The requested device exists on this machine (auto always does)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device cuda: no CUDA device is available (torch {torch.__version__}); "
            f"use --device cpu or auto"
        )
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError(
            "--device mps: the Apple MPS backend is not available here; use --device cpu or auto"
        )


class Dist(NamedTuple):
    """This process's place in a data-parallel run under torchrun; rank 0 of 1 otherwise."""

    rank: int = 0
    world: int = 1

    @property
    def sync(self) -> Sync:
        """Sum a tensor over the processes (torch.distributed's all-reduce), or None for one process."""
        if self.world == 1:
            return None

        def all_sum(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            torch.distributed.all_reduce(t)
            return t

        return all_sum


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Under torchrun (WORLD_SIZE > 1): join the process group, gloo on the CPU and nccl on CUDA, one GPU per
    process; every rank but 0 stays silent. Otherwise one process, and nothing happens."""
    device, world = pick_device(device_name), int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    if device.type == "cuda":
        local_rank, gpus = (
            int(os.environ.get("LOCAL_RANK", "0")),
            torch.cuda.device_count(),
        )
        if local_rank >= gpus:
            raise ValueError(
                f"torchrun: the process with LOCAL_RANK={local_rank} has no GPU of its own ({gpus} "
                f"visible); start at most {gpus} per node, or pass --device cpu"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo"
        )
    rank = torch.distributed.get_rank()
    if rank:
        # rank 0 alone prints, saves and writes the JSON
        sys.stdout = open(os.devnull, "w")
    return Dist(rank, world), device


def set_seed(seed: int):
    """One seed for Python, NumPy and torch: the same seed gives the same run on the CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    device = (
        torch.device(name)
        if name != "auto"
        else torch.device(
            "cuda"
            if torch.cuda.is_available()
            else "mps"
            if getattr(torch.backends, "mps", None) is not None
            and torch.backends.mps.is_available()
            else "cpu"
        )
    )
    return device


def finish_step_on_sigint():
    """A SIGINT handler that lets the current step finish: returns (stop, restore). stop(sae, state) is true
    once Ctrl-C was pressed; restore() puts the previous handler back."""
    pressed = []
    previous = signal.signal(
        signal.SIGINT, lambda signum, frame: pressed.append(signum)
    )
    return (lambda sae, state: bool(pressed)), (
        lambda: signal.signal(signal.SIGINT, previous)
    )


def wide_dtype(device) -> torch.dtype:
    """float64 for running sums; float32 on MPS, which has no float64 (its counts stay exact up to 2^24)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


# ============================================================================= 7. Files: atomic writes, JSON and figures


# What a failed write most often means, in words. A full disk ends a long run more often than anything else.
WRITE_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file would exceed the size limit on files (ulimit -f)",
    errno.EROFS: "the file system is read-only",
}


class WriteError(OSError):
    """A file could not be written; the message names it and the cause in words. Its temporary file is gone."""


def write_atomic(path, write: Callable):
    """write(f) into a temporary file beside `path`, then rename it over `path` (creating the folders): readers
    never see half a file, and a failed write leaves the old file as it was. An OSError (a full disk, a quota)
    becomes a WriteError. Writers pass bytes through Python's file object, whose errors are OSErrors."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        cause = WRITE_CAUSES.get(
            err.errno, err.strerror or f"the write fell short ({err})"
        )
        raise WriteError(f"could not write {path}: {cause}") from None


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), imported when a figure is asked for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """A matplotlib figure as a PNG, written atomically (write_atomic)."""
    write_atomic(path, lambda f: fig.savefig(f, dpi=90, format="png"))


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def npy_bytes(
    array: np.ndarray,
) -> bytes:  # np.save's own writes raise OSErrors without an errno
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def check_writable(path: str, flag: str, directory: bool = False):
    """Before any work: `path` can be written. It is an existing file (or folder, for a directory) with
    write permission, or a new one whose nearest existing ancestor is a writable folder; the missing
    folders are created when it is written."""
    p = Path(path).expanduser().absolute()
    if p.exists() and p.is_dir() != directory:
        raise ValueError(
            f"--{flag} {path} is {'a file' if directory else 'a directory'}, "
            f"expected {'a directory' if directory else 'a file'}"
        )
    ancestor = p if p.exists() else next(a for a in p.parents if a.exists())
    if not ancestor.is_dir() and ancestor != p:
        raise ValueError(
            f"--{flag} {path} cannot be written: {ancestor} is a file, not a folder"
        )
    if not os.access(ancestor, os.W_OK):
        raise ValueError(
            f"--{flag} {path} cannot be written: no write permission on {ancestor}"
        )


def json_safe(obj):
    """obj with every NaN or infinity replaced by None, so that the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str, obj, indent: Optional[int] = 2):
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False)
    write_atomic(path, lambda f: f.write(text.encode()))


# ============================================================================= 8. Data


@dataclass
class DataConfig:
    """Where the activations come from, and how they are prepared."""

    data: str = opt(
        "",
        "an activation store (a directory written by `harvest` or --save-acts), or a .pt or .npy "
        "tensor of shape (N, d); empty = synthetic block-correlated data",
    )
    model: str = opt(
        "",
        "a transformers model (hub name or local directory) to harvest activations from",
    )
    layer: int = opt(
        -1,
        "with --model: train on hidden_states[layer], the residual stream that enters "
        "block `layer` (blocks counted from 0): 0 is the embeddings, L >= 1 the output of "
        "block L-1, and the last (L = the number of blocks) the model's final hidden state "
        "(after the final norm, in GPT-2 and Llama). "
        "SAELens calls it blocks.L.hook_resid_pre; sparsify, the output of layers.{L-1}",
    )
    text: tuple = opt((), "with --model: text file(s) to tokenise into contexts")
    ctx: int = opt(128, "with --model: tokens per context")
    model_batch: int = opt(16, "with --model: contexts per forward pass")
    max_tokens: int = opt(
        1_000_000, "with --model: stop harvesting after this many tokens"
    )
    keep_first: bool = opt(
        False,
        "with --model: keep position 0, the attention sink (contexts start with BOS when "
        "the tokenizer has one, so the sink sits there)",
    )
    max_norm_ratio: float = opt(
        10.0,
        "drop tokens whose norm exceeds this many times the median norm (massive "
        "activations, attention sinks), in training, held-out and LM-cost data; "
        "0 = keep all",
    )
    norm_figure: str = opt(
        "",
        "save a histogram of the training tokens' norms, before and after that filter, "
        "here (PNG)",
    )
    normalize: bool = opt(
        False,
        "scale inputs so the mean norm is sqrt(d); folded back into the saved SAE",
    )
    save_acts: str = opt(
        "",
        "with --model: save the harvested activations for later --data runs: an activation "
        "store (a directory), or one tensor if the name ends in .pt",
    )
    dtype: str = opt(
        "float16", "the activation store's dtype: float16, bfloat16 or float32"
    )
    buffer_tokens: int = opt(
        1_000_000,
        "training from a store: shuffle this many rows at a time (the shuffle buffer)",
    )
    eval_tokens: int = opt(8192, "held-out tokens for the final metrics")

    def __post_init__(self):
        check_positive(
            eval_tokens=self.eval_tokens,
            ctx=self.ctx,
            model_batch=self.model_batch,
            max_tokens=self.max_tokens,
            buffer_tokens=self.buffer_tokens,
        )
        if self.dtype not in STORE_DTYPES:
            raise ValueError(
                f"--dtype must be one of {', '.join(STORE_DTYPES)}, got {self.dtype!r}"
            )
        if not self.max_norm_ratio >= 0:
            raise ValueError(
                f"--max-norm-ratio must be >= 0 (0 = no filter), got {self.max_norm_ratio}"
            )
        if self.data and self.model:
            raise ValueError("give --data or --model, not both")
        if self.model and (self.layer < 0 or not self.text):
            raise ValueError(
                f"--model needs --layer L >= 0 and --text FILE..., got layer={self.layer}, "
                f"text={list(self.text)}"
            )
        if self.save_acts and not self.model:
            raise ValueError(
                "--save-acts saves harvested activations, so it needs --model"
            )

    def check_inputs(self):
        """Before any work: every input file exists and can be read."""
        if self.data:
            check_data_path(self.data)
        for path in self.text:
            if not Path(path).is_file() or not os.access(path, os.R_OK):
                raise FileNotFoundError(
                    f"--text: file {path} does not exist or cannot be read"
                )
        local = Path(self.model).expanduser()
        if self.model.endswith(".gguf") and not local.is_file():
            raise FileNotFoundError(f"--model: file {self.model} does not exist")
        if (
            self.model.startswith((".", "/", "~"))
            and not self.model.endswith(".gguf")
            and not local.is_dir()
        ):
            raise FileNotFoundError(f"--model: directory {self.model} does not exist")


def check_data(x: torch.Tensor, d_in: Optional[int] = None):
    """Raise ValueError unless x is a finite (N, d_in) floating tensor."""
    if x.ndim != 2:
        raise ValueError(f"data must have shape (N, d), got shape {tuple(x.shape)}")
    if d_in is not None and x.shape[-1] != d_in:
        raise ValueError(
            f"data's last dimension must be d_in={d_in}, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"data must be floating point, got dtype {x.dtype}")
    bad = ~torch.isfinite(x)
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        rows = int(bad.any(-1).sum())
        raise ValueError(
            f"data has {int(bad.sum())} non-finite values (NaN or inf) out of {x.numel()}, "
            f"in {rows} of its {x.shape[0]} rows; first at [row, column] {where}"
        )


DATA_KINDS = (".pt", ".npy")


def check_data_path(path: str):
    """Before any work: `path` is a finished activation store, or a readable file of a supported kind."""
    if not Path(path).exists():
        raise FileNotFoundError(f"--data: file {path} does not exist")
    if Path(path).is_dir():
        if not Path(path, "manifest.json").is_file():
            raise ValueError(
                f"--data {path} is a directory but not a finished activation store (no manifest.json)"
            )
        return
    if Path(path).suffix not in DATA_KINDS or not Path(path).is_file():
        raise ValueError(
            f"--data must be a {' or '.join(DATA_KINDS)} file of shape (N, d), got {path}"
        )
    if not os.access(path, os.R_OK):
        raise ValueError(f"--data: {path} cannot be read (permission denied)")


def load_data(path: str) -> torch.Tensor:
    """A .pt (torch.save of a tensor) or .npy file holding an (N, d) array, as float32."""
    check_data_path(path)
    try:
        x = (
            torch.from_numpy(np.load(path))
            if path.endswith(".npy")
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    except Exception as err:  # a corrupt or foreign file: pickle, zip and numpy each raise their own errors
        raise ValueError(
            f"--data: could not read {path} ({type(err).__name__}: {str(err)[:120]})"
        ) from None
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{path} must hold a single tensor, got {type(x).__name__}")
    x = x.float() if x.is_floating_point() else x
    check_data(x)
    return x


# The synthetic default: block-correlated sparse features (KronSAE paper, section 5.1 and appendix B).
# synthetic.py builds its toy experiment on the same generator.


def block_covariance(
    F_true: int = 256,
    n_blocks: int = 8,
    n_off: int = 4,
    rho_in: tuple = (0.3, 0.8),
    rho_off: float = 0.25,
    seed: int = 0,
    sizes: tuple = (),
) -> torch.Tensor:
    """A block-structured correlation matrix S, shape (F_true, F_true), unit diagonal, positive definite.

    n_blocks diagonal blocks of different (random) sizes, or exactly `sizes` when given (they must sum to
    F_true), each with its own within-block correlation drawn from rho_in, plus n_off off-diagonal blocks
    linking random pairs of blocks with correlation +-rho_off.
    """
    if sizes and (sum(sizes) != F_true or min(sizes) < 1):
        raise ValueError(
            f"block sizes must be positive and sum to F_true={F_true}, got {list(sizes)}"
        )
    n_blocks = len(sizes) or n_blocks
    if not 1 <= n_blocks <= F_true:
        raise ValueError(
            f"need 1 <= n_blocks <= F_true, got n_blocks={n_blocks}, F_true={F_true}"
        )
    if not (0 <= rho_in[0] <= rho_in[1] < 1 and 0 <= rho_off < 1):
        raise ValueError(
            f"need 0 <= rho_in low <= high < 1 and 0 <= rho_off < 1, got {rho_in}, {rho_off}"
        )
    g = torch.Generator().manual_seed(seed)
    # different block sizes: cut [0, F_true) at n_blocks-1 distinct random points
    cuts = torch.randperm(F_true - 1, generator=g)[: n_blocks - 1].sort().values + 1
    edges = (
        list(itertools.accumulate(sizes, initial=0))
        if sizes
        else [0, *cuts.tolist(), F_true]
    )
    blocks = [(a, b) for a, b in zip(edges[:-1], edges[1:])]
    S = torch.zeros(F_true, F_true, dtype=torch.float64)
    for a, b in blocks:
        S[a:b, a:b] = rho_in[0] + (rho_in[1] - rho_in[0]) * torch.rand(
            (), generator=g, dtype=torch.float64
        )
    for _ in range(n_off if n_blocks > 1 else 0):
        i, j = torch.randperm(n_blocks, generator=g)[:2].tolist()
        sign = 1.0 if torch.rand((), generator=g) < 0.5 else -1.0
        (a, b), (c, e) = blocks[i], blocks[j]
        S[a:b, c:e] = S[c:e, a:b] = sign * rho_off
    S.fill_diagonal_(1.0)
    # project onto the positive-definite cone, then back to unit diagonal (a correlation matrix)
    evals, evecs = torch.linalg.eigh(S)
    S = evecs @ torch.diag(evals.clamp_min(1e-3)) @ evecs.T
    scale = S.diagonal().rsqrt()
    return (S * scale[:, None] * scale[None, :]).float()


def sparse_codes(
    n: int, F_true: int, k_true: int, generator: torch.Generator
) -> torch.Tensor:
    """TopK(ReLU(z)), z ~ N(0, I): (n, F_true) with k_true active entries per row."""
    z = torch.randn(n, F_true, generator=generator).relu()  # (n, F_true)
    top = z.topk(k_true, dim=-1)
    return torch.zeros_like(z).scatter_(-1, top.indices, top.values)


def sample_sparse(
    S: torch.Tensor, n: int, k_true: int, generator: torch.Generator
) -> torch.Tensor:
    """x_sparse = L TopK(ReLU(z)) with S = L L^T (appendix B). Returns (n, F_true).

    The codes are exchangeable, so Cov(x) = a S + c L 1 1^T L^T, where c < 0 is the slight
    anti-correlation that exactly-k sparsity puts between codes (about -1/F_true of a).
    """
    L = torch.linalg.cholesky(S.double()).float()  # (F_true, F_true)
    return sparse_codes(n, S.shape[0], k_true, generator) @ L.T  # (n, F_true)


def make_dataset(
    n: int,
    d: int = 128,
    F_true: int = 1024,
    k_true: int = 16,
    seed: int = 0,
    n_blocks: int = 32,
    n_off: int = 16,
) -> torch.Tensor:
    """Block-correlated SAE training data, shape (n, d): x = x_sparse D with D random unit rows (F_true, d).

    The true features are the rows of L^T D; their sparse codes co-occur by blocks, which is the
    structure KronSAE's heads are meant to capture. Deterministic given the seed.
    """
    S = block_covariance(F_true, n_blocks=n_blocks, n_off=n_off, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    # (F_true, d)
    D = torch.nn.functional.normalize(torch.randn(F_true, d, generator=g), dim=-1)
    return sample_sparse(S, n, k_true, g) @ D  # (n, d)


def split_data(
    data: torch.Tensor, eval_tokens: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded shuffle, then (train, held-out) with eval_tokens rows held out."""
    if data.shape[0] <= eval_tokens:
        raise ValueError(
            f"need more than eval_tokens={eval_tokens} rows of data, got {data.shape[0]}"
        )
    perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))
    return data[perm[eval_tokens:]], data[perm[:eval_tokens]]


def filter_report(
    norms: np.ndarray, threshold: float, median: float, variance_share: float
) -> dict:
    """What the filter drops, from the token norms: the count, its share of the tokens and of the raw variance,
    and the largest norm over the median before and after."""
    dropped, kept = norms > threshold, norms[norms <= threshold]
    return {
        "tokens": len(norms),
        "dropped": int(dropped.sum()),
        "dropped_share": float(dropped.mean()),
        "dropped_variance_share": variance_share,
        "median_norm": median,
        "threshold": threshold,
        "max_norm_over_median_before": float(norms.max()) / median,
        "max_norm_over_median_after": float(kept.max()) / median if len(kept) else None,
    }


def norm_report(x: torch.Tensor, threshold: float, median: float) -> dict:
    """filter_report for rows x (N, d); the raw-variance share is the sum over dropped rows of ||x - mean||^2
    over the same sum for all rows."""
    norms = x.norm(dim=-1)  # (N,)
    mean = x.sum(0, dtype=torch.float64) / x.shape[0]
    # (N,)
    spread = torch.cat(
        [(chunk.double() - mean).pow(2).sum(-1) for chunk in x.split(65536)]
    )
    share = float(spread[norms > threshold].sum() / spread.sum().clamp_min(1e-300))
    return filter_report(norms.numpy(), threshold, median, share)


def save_norm_histogram(x: torch.Tensor, threshold: float, path: str, title: str = ""):
    """Token norms on log-log axes, all of them and those the filter keeps: one glance shows whether a few
    tokens dominate."""
    plt = pyplot()
    norms = x.norm(dim=-1).double()
    median = float(norms.median())
    bins = np.logspace(
        math.log10(float(norms.min())), math.log10(float(norms.max())) + 1e-9, 90
    )
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    ax.hist(norms.numpy(), bins, color="tab:red", label=f"all {len(norms):,} tokens")
    ax.hist(
        norms[norms <= threshold].numpy(),
        bins,
        color="tab:blue",
        label="kept by the filter",
    )
    ax.axvline(median, color="k", lw=1, ls=":", label=f"median {median:.4g}")
    if math.isfinite(threshold):
        ax.axvline(
            threshold,
            color="k",
            lw=1,
            ls="--",
            label=f"threshold {threshold / median:g} x median",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="token norm ||x||",
        ylabel="tokens",
        title=title,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def finite_mask(x: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the rows of x (N, d) whose values and norm are all finite."""
    return x.isfinite().all(-1) & x.norm(dim=-1).isfinite()


def finite_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the rows of x (N, d) whose values and norm are all finite, how many were not). A row with a NaN or an
    inf is damage, not a massive activation, so it is counted apart from the norm filter and never reaches it."""
    finite = finite_mask(x)
    bad = int((~finite).sum())
    return (x[finite] if bad else x), bad


def check_some_finite(kept: int, bad: int, what: str):
    if bad and not kept:
        raise ValueError(
            f"all {bad} {what} are non-finite (NaN or inf); nothing is left to use"
        )


def print_filter_report(report: dict):
    bad = report.get("non_finite", {})
    if any(bad.values()):
        print(
            f"non-finite rows: dropped {bad['train']:,} training and {bad['held_out']:,} held-out "
            f"rows holding NaN or inf, apart from the massive-activation filter"
        )
    t, e, ratio = report["train"], report["held_out"], report["max_norm_ratio"]
    if t["dropped"] or e["dropped"]:
        print(
            f"massive activations: dropped {t['dropped']:,} of {t['tokens']:,} training tokens "
            f"({t['dropped_share']:.3%}, {t['dropped_variance_share']:.1%} of the raw variance) and "
            f"{e['dropped']:,} of {e['tokens']:,} held out, with norm > {ratio:g} x the median "
            f"{t['median_norm']:.4g}; largest norm {t['max_norm_over_median_before']:.1f} x the median before, "
            f"{t['max_norm_over_median_after']:.2f} x after"
        )
    else:
        print(
            f"massive activations: none above {ratio:g} x the median norm {t['median_norm']:.4g} "
            f"(largest {t['max_norm_over_median_before']:.2f} x)"
            if ratio
            else "massive activations: not filtered"
        )


def filter_massive(
    train: torch.Tensor,
    held_out: torch.Tensor,
    ratio: float,
    figure: str = "",
    title: str = "",
) -> tuple[torch.Tensor, ...]:
    """Drop the tokens whose norm exceeds ratio x the median training-token norm, from both splits alike:
    massive activations (Sun et al. 2024, arXiv 2402.17762), a few tokens with 100 to 10,000 times the median
    norm, usually attention sinks, which would otherwise hold most of the variance. ratio 0 keeps all.
    Rows that are not finite go first, whatever the ratio, and are counted apart (finite_rows).
    Returns (train, held_out, report), the report as norm_report gives it for each split."""
    train, train_bad = finite_rows(train)
    held_out, held_out_bad = finite_rows(held_out)
    check_some_finite(len(train), train_bad, "training rows")
    check_some_finite(len(held_out), held_out_bad, "held-out rows")
    median = float(train.norm(dim=-1).median())
    threshold = ratio * median if ratio else math.inf
    report = {
        "max_norm_ratio": ratio,
        "non_finite": {"train": train_bad, "held_out": held_out_bad},
        "train": norm_report(train, threshold, median),
        "held_out": norm_report(held_out, threshold, median),
    }
    if figure:
        save_norm_histogram(train, threshold, figure, title)
        print(f"norm histogram: {figure}")
    print_filter_report(report)
    return (
        train[train.norm(dim=-1) <= threshold],
        held_out[held_out.norm(dim=-1) <= threshold],
        report,
    )


class Rows(NamedTuple):
    """A source of training rows: `count` of them, and fetch(index (m,)) -> (m, d) float32."""

    count: int
    fetch: Callable[[torch.Tensor], torch.Tensor]


class ShuffledBatches:
    """The shuffle buffer: endless batches, each training row exactly once per epoch, in a fresh seeded order
    every epoch, so that a batch mixes many contexts. A last batch under half size joins the one before.

    `data` is an (N, d) tensor or a list of Rows (the shards of a store). When they hold more than `window`
    rows, each epoch visits the sources in a seeded order, `window` rows' worth at a time, and shuffles within
    that window: only the rows of the current batch are ever fetched. With rank and world (data parallel),
    each process gets its own slice of every global batch. state_dict() is the data cursor: the generator's
    state at the start of the epoch, the window and the position in it.
    """

    def __init__(
        self,
        data,
        batch: int,
        generator: torch.Generator,
        window: float = math.inf,
        rank: int = 0,
        world: int = 1,
        pin: bool = False,
    ):
        self.sources = (
            [Rows(data.shape[0], data.__getitem__)]
            if isinstance(data, torch.Tensor)
            else list(data)
        )
        self.batch, self.generator, self.window, self.rank, self.world = (
            batch,
            generator,
            window,
            rank,
            world,
        )
        self.pin = (
            pin  # page-locked batches, so that the copy to a GPU can overlap the step
        )
        self.new_epoch()

    def new_epoch(self):
        self.epoch_start = self.generator.get_state()
        order = list(range(len(self.sources)))
        # visit the sources in a seeded order
        if len(order) > 1 and sum(s.count for s in self.sources) > self.window:
            order = torch.randperm(len(order), generator=self.generator).tolist()
        self.windows, current = [], []
        for i in order:
            current.append(i)
            if sum(self.sources[j].count for j in current) >= self.window:
                self.windows, current = self.windows + [current], []
        self.windows += [current] if current else []
        self.window_index = -1
        self.next_window()

    def next_window(self):
        self.window_index += 1
        ids = self.windows[self.window_index]
        # window row -> source
        self.starts = np.cumsum([0] + [self.sources[i].count for i in ids])
        chunks = list(
            torch.randperm(int(self.starts[-1]), generator=self.generator).split(
                self.batch
            )
        )
        if len(chunks) > 1 and chunks[-1].numel() < self.batch // 2:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        self.chunks, self.position = chunks, 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        batch = self.next_rows()
        return batch.pin_memory() if self.pin else batch

    def next_rows(self) -> torch.Tensor:
        if self.position == len(self.chunks):
            if self.window_index + 1 == len(self.windows):
                self.new_epoch()
            else:
                self.next_window()
        chunk = self.chunks[self.position]
        self.position += 1
        part = chunk[
            self.rank * len(chunk) // self.world : (self.rank + 1)
            * len(chunk)
            // self.world
        ]
        ids = self.windows[self.window_index]
        if len(ids) == 1:
            return self.sources[ids[0]].fetch(part)
        # (m,) which source
        source = np.searchsorted(self.starts, part.numpy(), side="right") - 1
        out = None
        # fetch each source's rows at once, keep the batch's order
        for k in np.unique(source):
            at = torch.from_numpy(np.flatnonzero(source == k))
            rows = self.sources[ids[k]].fetch(part[at] - int(self.starts[k]))
            out = rows.new_empty(len(part), rows.shape[1]) if out is None else out
            out[at] = rows
        return out

    def state_dict(self) -> dict:
        return {
            "epoch_start": self.epoch_start,
            "window": self.window_index,
            "position": self.position,
        }

    def load_state_dict(self, state: dict):
        self.generator.set_state(state["epoch_start"])
        self.new_epoch()
        while self.window_index < state["window"]:
            self.next_window()
        self.position = state["position"]


def shuffled_batches(
    data: torch.Tensor, batch: int, generator: torch.Generator
) -> ShuffledBatches:
    return ShuffledBatches(data, batch, generator)


# ---------------------------------------------------------------- the activation store (harvest once, train many)
# A store is a directory: shard_00000.npy (n, d) activations, offsets_00000.npy (contexts + 1,) int64 row
# offsets of the whole contexts in that shard, norms_00000.npy (n,) float32 token norms, ..., and
# manifest.json, written last. bfloat16, which numpy lacks, is stored as its uint16 bit patterns.
# Version 2 adds what `inspect` needs to show text: contexts_00000.npy (contexts, T) int32, every token id of
# each context (BOS and specials included), positions_00000.npy (n,) int32, each row's position in its
# context, and the manifest's "tokenizer". Version 1 stores (without them) still train.
# While a store is written, in_progress.json marks it: the writer's arguments, the shards finished so far and
# where the writer's input stood after the last of them, rewritten atomically after each shard, so that a
# harvest stopped at any point (Ctrl-C, SIGKILL, a full disk) resumes after its last whole shard.

STORE_DTYPES = {
    "float16": (np.float16, torch.float16),
    "bfloat16": (np.uint16, torch.bfloat16),
    "float32": (np.float32, torch.float32),
}


PROGRESS = "in_progress.json"
PROGRESS_KEYS = {"args", "shards", "after", "d", "text"}  # what in_progress.json holds
SHARD_FILES = ("shard", "norms", "offsets")  # and, with text, contexts and positions


def store_files(directory) -> list[Path]:
    """The files of a store, finished or not, in `directory`, temporary ones included."""
    pattern = (
        r"((shard|norms|offsets|contexts|positions)_\d+\.npy"
        r"|manifest\.json|in_progress\.json)(\.tmp)?"
    )
    return (
        [p for p in Path(directory).glob("*") if re.fullmatch(pattern, p.name)]
        if Path(directory).is_dir()
        else []
    )


def read_progress(directory) -> dict:
    """The in_progress.json of a store being written."""
    path = Path(directory, PROGRESS)
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path} is damaged ({type(err).__name__}: {err}); harvest again with --overwrite"
        ) from None
    if not isinstance(progress, dict) or not PROGRESS_KEYS <= set(progress):
        raise ValueError(
            f"{path} is not a store's progress record; harvest again with --overwrite"
        )
    return progress


class StoreWriter:
    """Writes activations shard by shard as they come, whole contexts per shard. After each shard,
    in_progress.json records the shards finished, `args` (what the store is made from) and `after`, where the
    caller's input stood once they were in. `finish` writes the manifest last and atomically, then removes
    in_progress.json: a store without manifest.json is unfinished, never mistaken for whole. With
    resume=True the writer carries on after the last shard that in_progress.json lists."""

    def __init__(
        self,
        directory: str,
        dtype: str = "float16",
        shard_bytes: int = 1 << 26,
        args: Optional[dict] = None,
        resume: bool = False,
    ):
        self.directory, self.dtype, self.shard_bytes = (
            Path(directory),
            dtype,
            shard_bytes,
        )
        self.args, self.after, self.d, self.text, self.shards = (
            args or {},
            {},
            None,
            None,
            [],
        )
        self.pending, self.lengths, self.ids, self.positions = [], [], [], []
        self.directory.mkdir(parents=True, exist_ok=True)
        if resume:
            self.pick_up()
            return
        # An old store here (the CLI asked for --overwrite first). Its manifest goes first and the
        # marker is written next, so that no moment shows old shards as a finished store.
        Path(self.directory, "manifest.json").unlink(missing_ok=True)
        self.write_progress()
        for path in store_files(directory):
            if path.name != PROGRESS:
                path.unlink()

    def pick_up(self):
        """Carry on after the last shard that in_progress.json lists. Every other store file, such as the shard
        that was being written when the writer stopped, or a temporary file, is deleted, so it is redone."""
        progress = read_progress(self.directory)
        self.args, self.after = progress["args"], progress["after"]
        self.d, self.text, self.shards = (
            progress["d"],
            progress["text"],
            progress["shards"],
        )
        prefixes = SHARD_FILES + (("contexts", "positions") if self.text else ())
        finished = {f"{p}_{s['name']}.npy" for s in self.shards for p in prefixes}
        missing = sorted(finished - {p.name for p in store_files(self.directory)})
        if missing:
            raise ValueError(
                f"the unfinished store in {self.directory} lacks {', '.join(missing[:3])}, which "
                f"{PROGRESS} lists as written; harvest again with --overwrite"
            )
        for path in store_files(self.directory):
            if path.name not in finished and path.name != PROGRESS:
                path.unlink()

    def write_progress(self):
        write_json(
            self.directory / PROGRESS,
            {
                "format": "kronsae activation store, in progress",
                "args": self.args,
                "d": self.d,
                "text": self.text,
                "shards": self.shards,
                "after": self.after,
            },
        )

    def add(
        self,
        acts: torch.Tensor,
        lengths: list[int],
        ids: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        after: Optional[dict] = None,
    ):
        """acts (n, d): the kept rows of len(lengths) whole contexts, lengths[i] rows from context i; with the
        contexts' token ids (len(lengths), T) and each row's position in its context (n,), the store keeps the
        text. `after` is where the caller's input stands once these rows are in, saved with their shard."""
        if (ids is None) != (positions is None) or self.text not in (
            None,
            ids is not None,
        ):
            raise ValueError(
                "give every add() both the token ids and the positions, or neither"
            )
        self.text = ids is not None
        if self.text:
            self.ids.append(ids.to(torch.int32))
            self.positions.append(positions.to(torch.int32))
        self.d = acts.shape[1]
        limit = torch.finfo(STORE_DTYPES[self.dtype][1]).max
        if not torch.isfinite(acts).all() or float(acts.abs().max()) > limit:
            raise ValueError(
                f"activations reach {float(acts.abs().max()):.4g}, beyond --dtype {self.dtype}'s "
                f"largest value {limit:.4g}; use --dtype bfloat16 or float32"
            )
        self.pending.append(acts)
        self.lengths += lengths
        self.after = after if after is not None else self.after
        # float32 while pending
        if sum(a.numel() for a in self.pending) * 4 >= self.shard_bytes:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        acts = torch.cat(self.pending).float()
        name = f"{len(self.shards):05d}"
        cast = acts.to(STORE_DTYPES[self.dtype][1])
        array = (
            cast.view(torch.int16).numpy().view(np.uint16)
            if self.dtype == "bfloat16"
            else cast.numpy()
        )
        # of the stored values, so a reader gets the same
        norms = cast.float().norm(dim=-1).numpy()
        files = [
            ("shard", array),
            ("norms", norms),
            (
                "offsets",
                np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64),
            ),
        ]
        if self.ids:
            files += [
                ("contexts", torch.cat(self.ids).numpy()),
                ("positions", torch.cat(self.positions).numpy()),
            ]
        for prefix, value in files:
            write_atomic(
                self.directory / f"{prefix}_{name}.npy",
                lambda f: f.write(npy_bytes(value)),
            )
        self.shards.append(
            {"name": name, "tokens": acts.shape[0], "contexts": len(self.lengths)}
        )
        self.pending, self.lengths, self.ids, self.positions = [], [], [], []
        self.write_progress()  # only now is the shard whole

    def finish(self, **info) -> dict:
        self.flush()
        if not self.shards:
            raise ValueError(f"no activations to write to {self.directory}")
        norms = np.concatenate(
            [np.load(self.directory / f"norms_{s['name']}.npy") for s in self.shards]
        )
        manifest = {
            "format": "kronsae activation store",
            "version": 2 if self.text else 1,
            "d": self.d,
            "dtype": self.dtype,
            "tokens": int(sum(s["tokens"] for s in self.shards)),
            "contexts": int(sum(s["contexts"] for s in self.shards)),
            "shards": self.shards,
            "norms": {
                "median": float(np.median(norms)),
                "mean": float(norms.mean(dtype=np.float64)),
                "p99": float(np.quantile(norms, 0.99)),
                "max": float(norms.max()),
            },
            **info,
        }
        ratio = manifest.get("max_norm_ratio") or 0
        threshold = ratio * float(np.median(norms)) if ratio else math.inf
        kept = norms[norms <= threshold]
        manifest["norms"].update(
            above_threshold=int((norms > threshold).sum()),
            threshold=threshold,
            input_scale=math.sqrt(self.d) / float(kept.mean(dtype=np.float64)),
        )
        write_json(self.directory / "manifest.json", manifest)
        Path(self.directory, PROGRESS).unlink()
        return manifest


# Rows read at a time when a store's training rows are summed. Small on purpose: with the CLI's allocator setting
# (tune_cpu_allocator: no mmap, no trim), 8,192-row float64 chunks left holes in the heap that grew peak RSS with
# the store (100k -> 400k tokens at d=1024: +613 MB); 1,024-row chunks are reused and the growth is gone.
SUM_ROWS = 1024


class ActivationStore:
    """A finished store, memory-mapped: rows are read only when asked for, so it is never loaded whole. Each
    read maps the shard, copies the rows out and unmaps it, so that pages read once do not stay in the
    process's memory."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        path = self.directory / "manifest.json"
        if not path.is_file():
            advice = (
                "continue its harvest with the same arguments and --resume"
                if Path(directory, PROGRESS).is_file()
                else "run the harvest again into an empty --out"
            )
            raise ValueError(
                f"{directory} is not a finished activation store: manifest.json is missing "
                f"(an interrupted harvest leaves none; {advice})"
            )
        try:
            self.manifest = json.loads(path.read_text())
            self.d, self.dtype = self.manifest["d"], self.manifest["dtype"]
            self.shards = [
                np.load(self.directory / f"shard_{s['name']}.npy", mmap_mode="r")
                for s in self.manifest["shards"]
            ]
            self.norms = [
                np.load(self.directory / f"norms_{s['name']}.npy", mmap_mode="r")
                for s in self.manifest["shards"]
            ]
            self.offsets = [
                np.load(self.directory / f"offsets_{s['name']}.npy")
                for s in self.manifest["shards"]
            ]
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(
                f"activation store {directory} is damaged ({type(err).__name__}: {err})"
            ) from None
        for s, shard, offsets in zip(
            self.manifest["shards"], self.shards, self.offsets
        ):
            if shard.shape != (s["tokens"], self.d) or offsets[-1] != s["tokens"]:
                raise ValueError(
                    f"activation store {directory} is damaged: shard {s['name']} has shape "
                    f"{shard.shape}, the manifest says ({s['tokens']}, {self.d})"
                )

    @property
    def has_text(self) -> bool:
        return self.manifest.get("version", 1) >= 2

    def text(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """The token ids of shard `shard`'s contexts (contexts, T) and each row's position in its context (n,)."""
        if not self.has_text:
            raise ValueError(
                f"activation store {self.directory} has no token ids (it was written before stores "
                f"kept them); harvest it again with this version: python kronsae.py harvest --model "
                f"{self.manifest.get('model', 'M')} --layer {self.manifest.get('layer', 'L')} --text ... "
                f"--out NEW_STORE"
            )
        name = self.manifest["shards"][shard]["name"]
        return np.load(self.directory / f"contexts_{name}.npy"), np.load(
            self.directory / f"positions_{name}.npy"
        )

    def rows(self, shard: int, index) -> torch.Tensor:
        """Rows `index` of shard `shard` as float32, (m, d)."""
        mapped = np.load(
            self.directory / f"shard_{self.manifest['shards'][shard]['name']}.npy",
            mmap_mode="r",
        )
        t = torch.from_numpy(np.ascontiguousarray(mapped[np.asarray(index)]))
        del mapped
        return (t.view(torch.bfloat16) if self.dtype == "bfloat16" else t).float()

    def held_out_rows(self, eval_tokens: int, seed: int) -> list[np.ndarray]:
        """Per shard, (n,) bool: the rows of the whole contexts held out, chosen by the seed, until they hold
        eval_tokens rows."""
        counts = np.concatenate([np.diff(o) for o in self.offsets])  # rows per context
        if counts.sum() <= eval_tokens:
            raise ValueError(
                f"need more than eval_tokens={eval_tokens} rows of data, the store has {counts.sum()}"
            )
        order = torch.randperm(
            len(counts), generator=torch.Generator().manual_seed(seed)
        ).numpy()
        held = np.zeros(len(counts), dtype=bool)
        held[
            order[: int(np.searchsorted(np.cumsum(counts[order]), eval_tokens)) + 1]
        ] = True
        return np.split(
            np.repeat(held, counts), np.cumsum([len(n) for n in self.norms])[:-1]
        )

    def finite_rows(
        self, held: list[np.ndarray]
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """One pass over every row, SUM_ROWS at a time: per shard, (n,) bool, the rows whose values and stored
        norm are finite (a store damaged after its harvest, or written by another tool, may hold NaN or inf),
        and the float64 sum of the finite training rows (d,)."""
        finite, total = [], np.zeros(self.d)
        for k, (norms, h) in enumerate(zip(self.norms, held)):
            ok = np.isfinite(np.asarray(norms))
            for chunk in np.array_split(
                np.arange(len(ok)), max(1, len(ok) // SUM_ROWS)
            ):
                x = self.rows(k, chunk)
                ok[chunk] &= x.isfinite().all(-1).numpy()
                train = torch.from_numpy(ok[chunk] & ~h[chunk])
                total += x[train].double().sum(0).numpy()
            finite.append(ok)
        return finite, total

    def split(self, eval_tokens: int, seed: int, ratio: float):
        """Hold out whole contexts, chosen by the seed, until they hold eval_tokens rows; drop the rows that are
        not finite, counted apart, then every row whose norm exceeds ratio x the median training norm, as
        filter_massive does. Returns (training Rows per shard, held-out rows (n, d) in RAM, the filter's report,
        the input scale). Memory: the norms, one index per training row, the held-out rows and one chunk at a
        time."""
        held = self.held_out_rows(eval_tokens, seed)
        finite, total = self.finite_rows(held)
        norms = [np.asarray(n) for n in self.norms]
        train_norms = np.concatenate(
            [n[~h & f] for n, h, f in zip(norms, held, finite)]
        )
        bad = {
            "train": int(sum((~h & ~f).sum() for h, f in zip(held, finite))),
            "held_out": int(sum((h & ~f).sum() for h, f in zip(held, finite))),
        }
        check_some_finite(
            len(train_norms), bad["train"], f"training rows of {self.directory}"
        )
        middle = (len(train_norms) - 1) // 2  # the lower median, as torch
        median = float(np.partition(train_norms, middle)[middle])
        threshold = ratio * median if ratio else math.inf
        train, held_out, dropped = [], [], []
        for k, (n, h, f) in enumerate(zip(norms, held, finite)):
            index = np.flatnonzero(~h & f & (n <= threshold))
            train.append(
                Rows(
                    len(index),
                    lambda i, k=k, index=index: self.rows(k, index[i.numpy()]),
                )
            )
            held_out.append(self.rows(k, np.flatnonzero(h & f)))
            dropped.append(self.rows(k, np.flatnonzero(~h & f & (n > threshold))))
        held_out = torch.cat(held_out)
        check_some_finite(
            len(held_out), bad["held_out"], f"held-out rows of {self.directory}"
        )
        share = massive_share(torch.cat(dropped).double(), train_norms, total)
        report = {
            "max_norm_ratio": ratio,
            "non_finite": bad,
            "train": filter_report(train_norms, threshold, median, share),
            "held_out": norm_report(held_out, threshold, median),
        }
        held_out = held_out[held_out.norm(dim=-1) <= threshold][:eval_tokens]
        kept = train_norms[train_norms <= threshold]
        return (
            train,
            held_out,
            report,
            math.sqrt(self.d) / float(kept.mean(dtype=np.float64)),
        )


def massive_share(dropped: torch.Tensor, norms: np.ndarray, total: np.ndarray) -> float:
    """The dropped rows' share of the raw variance, sum over them of ||x - mean||^2 over the same sum for all
    training rows, from the dropped rows (n, d), every training row's norm and the rows' sum (d,)."""
    mean = total / len(norms)

    # sum of ||x - mean||^2 over rows with sum of ||x||^2 = sq and sum of x = sx
    def spread(sq, sx, count):
        return float(sq - 2 * mean @ sx + count * mean @ mean)

    outside = spread(float(dropped.pow(2).sum()), dropped.sum(0).numpy(), len(dropped))
    return outside / spread(
        float((norms.astype(np.float64) ** 2).sum()), total, len(norms)
    )


def input_scale(data: torch.Tensor) -> float:
    """The scalar c with mean ||c x|| = sqrt(d)."""
    return math.sqrt(data.shape[1]) / float(data.norm(dim=-1).mean())


@torch.no_grad()
def fold_input_scale_(sae: SparseAutoencoder, c: float):
    """An SAE trained on c*x becomes one for raw x: sae'(x) = sae(c x) / c, exactly.
    On c x the pre-activations are c u, with u those of sae' when b_enc and b_dec are divided by c. The
    activations are positively homogeneous of some degree (ReLU and mAND: sqrt(c u * c v) = c sqrt(u v),
    degree 1; the ablation's products, degree 2), so the latents are c^degree f(u). Dividing by c leaves
    c^(degree-1): scaling the encoder rows by a = c^((degree-1)/degree) puts it back (a = 1 for degree 1).
    The unit-norm W_dec stays as it is."""
    # ReLU (TopK): 1
    degree = KERNELS[sae.kernel].degree if hasattr(sae, "kernel") else 1
    a = c ** (1 - 1 / degree)
    sae.W_enc *= a
    sae.b_enc /= c / a
    sae.b_dec /= c


# ============================================================================= 9. The real-model path


class StopForward(Exception):
    """Raised by the capture hook: nothing after the layer we want needs to run."""


def load_lm(name: str, device, layer: Optional[int] = None, ctx: Optional[int] = None):
    """(model, tokenizer, causal) from a hub name, a local directory or a .gguf file, in eval mode. The layer
    index and the context length are checked against the config before any weights are loaded. A .gguf file
    (llama.cpp's format) is dequantised to float32 by transformers, which needs the gguf and accelerate packages."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    name, extra = model_source(name)
    loaded = partial(from_pretrained, name=name, extra=extra)
    config = loaded(AutoConfig.from_pretrained)
    if layer is not None:
        check_layer(config, layer)
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    if ctx is not None and positions and ctx > positions:
        raise ValueError(
            f"--ctx {ctx} is longer than {name}'s maximum of {positions} positions"
        )
    causal = is_causal_lm(config, extra)
    model = loaded((AutoModelForCausalLM if causal else AutoModel).from_pretrained)
    tokenizer = loaded(AutoTokenizer.from_pretrained)
    return model.to(device).eval(), tokenizer, causal


def is_causal_lm(config, extra: dict) -> bool:
    """Whether the config's saved architectures (GPT2LMHeadModel, ...) are causal LMs; a .gguf file (extra
    arguments) always holds one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return bool(extra) or any(a in causal_names for a in (config.architectures or []))


def model_source(name) -> tuple[str, dict]:
    """(name, from_pretrained's extra arguments) for a hub name, a local directory or a .gguf file."""
    name = str(name)
    if name.endswith(".gguf"):
        if not Path(name).expanduser().is_file():
            raise ValueError(f"model file {name} does not exist")
        return str(Path(name).expanduser().parent), {"gguf_file": Path(name).name}
    # a path, not a hub name
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise ValueError(
            f"model directory {name} does not exist; pass a local directory holding "
            f"config.json, the weights and the tokenizer, or a hub name"
        )
    return name, {}


def from_pretrained(load: Callable, name: str, extra: dict):
    try:
        return load(name, **extra)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load model {name!r} ({type(err).__name__}: {str(err)[:200]}). Without "
            f"network access pass a local directory, e.g. one written by save_pretrained()."
        ) from None


def check_layer(config, layer: int):
    """hidden_states has num_hidden_layers + 1 entries: 0 is the embeddings, L >= 1 the output of block L-1
    (blocks counted from 0), which is the input of block L."""
    n = config.num_hidden_layers
    if not 0 <= layer <= n:
        raise ValueError(
            f"layer must be in 0..{n} for this model ({n} blocks; 0 = embeddings), got {layer}"
        )


def find_blocks(model) -> nn.ModuleList:
    """The transformer blocks: the first ModuleList with num_hidden_layers entries (GPT-2, Llama, BERT, ...)."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(
        f"could not find the {n} transformer blocks of {type(model).__name__}"
    )


def layer_hooks(layer: int, blocks: Optional[int], blocks_name: Optional[str]) -> dict:
    """hidden_states[layer] by the names two libraries give it. SAELens (TransformerLens) names the input of
    block L blocks.L.hook_resid_pre. sparsify hooks module outputs by their path under the base model, so
    the output of block L-1 is `blocks_name`.{L-1} (layers.{L-1} on Llama-like models, h.{L-1} on GPT-2).
    None where a name would be wrong: the embeddings are no block's output, and the last entry (L = blocks)
    has the final norm applied, which neither library's hooks see. `blocks` or `blocks_name` may be None
    when unknown (a store harvested before stores recorded them)."""
    last = blocks is not None and layer >= blocks
    return {
        "saelens": None if last else f"blocks.{layer}.hook_resid_pre",
        "sparsify": None
        if last or layer == 0 or blocks_name is None
        else f"{blocks_name}.{layer - 1}",
    }


def model_hooks(model, layer: int) -> dict:
    """layer_hooks for a loaded model: its number of blocks, and the blocks' path under its base model."""
    blocks = find_blocks(model)
    name = next((n for n, m in model.base_model.named_modules() if m is blocks), None)
    return layer_hooks(layer, model.config.num_hidden_layers, name)


def block_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def layer_input_module(model, layer: int) -> Optional[nn.Module]:
    """The module whose input is hidden_states[layer]: block `layer`, or, at the last layer, the LM head, whose
    input is the final residual with the final norm applied. None for an encoder's last layer (no head)."""
    if layer < model.config.num_hidden_layers:
        return find_blocks(model)[layer]
    return model.get_output_embeddings()


@torch.inference_mode()
def residual_at(model, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """hidden_states[layer], (b, T, d): the input of block `layer` (of the LM head at the last layer). A
    pre-hook there captures it and stops the forward pass, so nothing after it runs."""
    check_layer(model.config, layer)
    module = layer_input_module(model, layer)
    if module is None:  # an encoder's last layer: run every block
        return model.base_model(
            input_ids=input_ids, output_hidden_states=True
        ).hidden_states[layer]
    captured = []

    def capture(module, args, kwargs):
        captured.append(block_input(args, kwargs))
        raise StopForward

    handle = module.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(input_ids=input_ids)
    except StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] / [SEP], <s>, or none)."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("hello")["input_ids"]
    start = next(i for i in range(len(wrapped)) if wrapped[i : i + len(plain)] == plain)
    return wrapped[:start], wrapped[start + len(plain) :]


def context_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens around each context: the tokenizer's own, and its BOS token first when it has one,
    whether or not it adds it by itself (never twice). With BOS first, the attention sink sits at position 0,
    which is dropped (SAELens does the same)."""
    before, after = special_wrapping(tokenizer)
    bos = tokenizer.bos_token_id
    if bos is not None and before[:1] != [bos]:
        before = [bos, *before]
    return before, after


def text_blocks(paths, block: int = 1 << 20) -> Iterator[str]:
    """The text files, about `block` characters at a time, cut at line ends; files are joined by a blank line."""
    for n, path in enumerate(paths):
        if not Path(path).is_file():
            raise FileNotFoundError(f"text file {path} does not exist")
        with open(path, errors="replace") as f:
            first = True
            while text := f.read(block) + f.readline():
                yield ("\n\n" if n and first else "") + text
                first = False


def iter_contexts(tokenizer, paths, ctx: int) -> Iterator[list[int]]:
    """Contexts of ctx token ids, wrapped as context_wrapping says, tokenised lazily: the text is read and
    tokenised only as far as the contexts taken from this iterator need."""
    before, after = context_wrapping(tokenizer)
    body = ctx - len(before) - len(after)
    if body < 1:
        raise ValueError(
            f"ctx={ctx} leaves no room for text after {len(before) + len(after)} special tokens"
        )
    ids = []
    for text in text_blocks(paths):
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        while len(ids) >= body:
            yield before + ids[:body] + after
            ids = ids[body:]


def make_contexts(
    tokenizer, paths, ctx: int, limit: Optional[int] = None
) -> torch.Tensor:
    """The first `limit` contexts (all when None) as an (N, ctx) tensor; the text past them is never read."""
    contexts = list(itertools.islice(iter_contexts(tokenizer, paths, ctx), limit))
    if not contexts:
        before, after = context_wrapping(tokenizer)
        body = ctx - len(before) - len(after)
        count = len(
            tokenizer(
                "".join(text_blocks(paths)), add_special_tokens=False, verbose=False
            )["input_ids"]
        )
        raise ValueError(
            f"text too short: {count} tokens in {list(map(str, paths))}, but one context of "
            f"ctx={ctx} needs {body} (plus {ctx - body} special tokens)"
        )
    return torch.tensor(contexts)


def token_mask(
    input_ids: torch.Tensor, special_ids, keep_first: bool = False
) -> torch.Tensor:
    """(N, T) bool: the positions to train on. Position 0 is the attention sink; special tokens are not text."""
    keep = ~torch.isin(
        input_ids, torch.tensor(sorted(special_ids), dtype=input_ids.dtype)
    )
    if not keep_first:
        keep[:, 0] = False
    return keep


def harvest(
    model,
    contexts: torch.Tensor,
    layer: int,
    mask: torch.Tensor,
    batch: int,
    max_tokens: int,
    progress: bool = True,
) -> torch.Tensor:
    """Activations hidden_states[layer] at the masked positions, (N_tokens, d) float32 on the CPU."""
    device = next(model.parameters()).device
    out, total = [], 0
    with tqdm(
        total=min(max_tokens, int(mask.sum())),
        unit="tok",
        unit_scale=True,
        desc=f"harvest layer {layer}",
        disable=not progress,
    ) as bar:
        for ids, keep in zip(contexts.split(batch), mask.split(batch)):
            # (n, d)
            acts = (
                residual_at(model, ids.to(device), layer)[keep.to(device)].float().cpu()
            )
            out.append(acts[: max_tokens - total])
            total += out[-1].shape[0]
            bar.update(out[-1].shape[0])
            if total >= max_tokens:
                break
    return torch.cat(out)


def store_args(ids: torch.Tensor, mask: torch.Tensor, rows: int) -> tuple:
    """StoreWriter.add's (lengths, ids, positions) for the first `rows` harvested rows (mask's order, row-major)
    of contexts ids (N, T): the rows each context gave, the token ids of those that gave any, the rows' positions."""
    where = mask.nonzero()[:rows]  # (rows, 2): context, position
    contexts, lengths = where[:, 0].unique_consecutive(return_counts=True)
    return lengths.tolist(), ids[contexts], where[:, 1]


class CE(NamedTuple):
    mean: float  # mean next-token cross-entropy over the counted positions
    counted: int  # positions averaged
    excluded: int  # positions left out: their input norm exceeded max_norm (massive activations)


def head_logits(model, h: torch.Tensor) -> torch.Tensor:
    """The LM head on final hidden states h (n, d) -> (n, vocab), with Gemma 2's logit soft-capping. Called
    as a function, not as the module, so that the hooks on the module do not run."""
    head = model.get_output_embeddings()
    logits = nnf.linear(h, head.weight, head.bias).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


@torch.inference_mode()
def head_is_separable(model, ids: torch.Tensor) -> bool:
    """Whether the model's logits are head_logits of the LM head's input, checked on one context: then the
    CE can be computed a chunk of positions at a time, in memory that does not grow with the batch."""
    captured = []
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda m, args: captured.append(args[0])
    )
    try:
        logits = model(input_ids=ids[:1]).logits.float()
    finally:
        handle.remove()
    return torch.allclose(head_logits(model, captured[0]), logits, rtol=1e-4, atol=1e-4)


def chunked_ce(model, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position from final hidden states h (n, d), a chunk of positions at a time: the
    (n, vocab) logits never exist whole, only about 64 MB of them."""
    chunk = max(1, (1 << 24) // model.get_output_embeddings().weight.shape[0])
    return torch.cat(
        [
            nnf.cross_entropy(head_logits(model, a), b, reduction="none")
            for a, b in zip(h.split(chunk), targets.split(chunk))
        ]
    )


@torch.inference_mode()
def next_token_ce(model, ids: torch.Tensor, chunked: bool, current: dict):
    """(b*(T-1),) the cross-entropy of each next token of ids (b, T). chunked: run
    up to the LM head, whose input a hook put in current["final"], then the CE a
    chunk at a time."""
    targets = ids[:, 1:].flatten()
    if not chunked:
        logits = model(input_ids=ids).logits[:, :-1].float()  # (b, T-1, vocab)
        return nnf.cross_entropy(logits.flatten(0, 1), targets, reduction="none")
    try:
        model(input_ids=ids)
    except StopForward:
        pass
    return chunked_ce(model, current["final"][:, :-1].flatten(0, 1), targets)


def spliced_ce(
    model,
    contexts: torch.Tensor,
    mask: torch.Tensor,
    layer: int,
    replace=None,
    batch: int = 16,
    max_norm: float = math.inf,
    chunked: bool = False,
) -> CE:
    """Next-token cross-entropy when hidden_states[layer] is replaced by replace(h) at the masked positions
    (None: the clean model). Positions whose activation norm exceeds max_norm keep their activation and are
    left out of the mean, in every pass alike, so clean, spliced and ablated CE stay comparable.
    chunked (see head_is_separable): stop at the LM head and compute the CE a chunk at a time."""
    device = next(model.parameters()).device
    current = {}

    def capture_head_input(module, args):
        current["final"] = args[0]
        raise StopForward

    def splice(module, args, kwargs):
        h = block_input(args, kwargs)
        current["massive"] = h.norm(dim=-1) > max_norm  # (b, T)
        if replace is None:
            return None
        keep = current["mask"] & ~current["massive"]
        new = h.clone()
        new[keep] = replace(h[keep].float()).to(h.dtype)
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    block = layer_input_module(model, layer)
    handles = [block.register_forward_pre_hook(splice, with_kwargs=True)]
    # registered after the splice, so at the last layer it sees the spliced input
    if chunked:
        handles.append(
            model.get_output_embeddings().register_forward_pre_hook(capture_head_input)
        )
    total = 0.0
    counted = 0
    excluded = 0
    try:
        for ids, keep in zip(contexts.split(batch), mask.split(batch)):
            ids = ids.to(device)
            current["mask"] = keep.to(device)
            ce = next_token_ce(model, ids, chunked, current)  # (b*(T-1),)
            count = ~current["massive"][:, :-1].flatten()  # (b*(T-1),)
            total += float(ce[count].sum())
            counted += int(count.sum())
            excluded += int((~count).sum())
    finally:
        for handle in handles:
            handle.remove()
    return CE(total / counted, counted, excluded)


def lm_cost(
    sae: SparseAutoencoder,
    model,
    contexts,
    mask,
    layer: int,
    batch: int,
    max_norm: float = math.inf,
) -> dict:
    """What splicing the SAE in costs the LM: clean, spliced and zero-ablated CE, and loss recovered. The CE
    is computed a chunk of positions at a time when the model allows it (head_is_separable)."""
    chunked = head_is_separable(model, contexts[:1].to(next(model.parameters()).device))
    clean = spliced_ce(model, contexts, mask, layer, None, batch, max_norm, chunked)
    spliced = spliced_ce(
        model, contexts, mask, layer, sae, batch, max_norm, chunked
    ).mean
    zero = spliced_ce(
        model, contexts, mask, layer, torch.zeros_like, batch, max_norm, chunked
    ).mean
    r = {
        "ce_clean": clean.mean,
        "ce_sae": spliced,
        "ce_zero": zero,
        "ce_positions": clean.counted,
        "ce_positions_excluded": clean.excluded,
        "ce_chunked": chunked,
    }
    # the layer does not matter to the LM here: the ratio is undefined, not 0 or 1
    if zero == clean.mean:
        return r | {
            "loss_recovered": None,
            "loss_recovered_reason": "zero-ablation CE equals the clean CE",
        }
    return r | {"loss_recovered": (zero - spliced) / (zero - clean.mean)}


def dropped_tokens(
    acts: torch.Tensor,
    threshold: float,
    contexts: torch.Tensor,
    mask: torch.Tensor,
    tokenizer,
    top: int = 8,
) -> dict:
    """Which tokens, at which positions, the norm filter dropped: the most common of each, with counts.
    acts (n, d) are the rows harvested from contexts (N, T) at `mask`, in order."""
    norms = acts.norm(dim=-1)
    # rows; non-finite ones are counted apart (finite_rows)
    dropped = ((norms > threshold) & norms.isfinite()).nonzero().squeeze(1)
    ids = contexts[mask][dropped]  # (n_dropped,)
    positions = torch.arange(contexts.shape[1]).expand_as(contexts)[mask][dropped]

    def most_common(values, name):
        v, c = values.unique(return_counts=True)
        order = c.argsort(descending=True)[:top]
        return {name(int(v[i])): int(c[i]) for i in order}

    return {
        "dropped_tokens": most_common(
            ids, lambda t: tokenizer.convert_ids_to_tokens(t)
        ),
        "dropped_positions": most_common(positions, str),
    }


def lm_contexts(cfg: DataConfig, tokenizer, seed: int):
    """The shuffled contexts (N, T) for --max-tokens of training rows and --eval-tokens held out, their
    token mask (N, T), and n_eval, the number of whole contexts held out at the front."""
    before, after = context_wrapping(tokenizer)

    # rows kept per context, at least: read only as much text as is needed
    per_context = max(1, cfg.ctx - len(before) - len(after) - 1)
    n_contexts = (cfg.max_tokens + cfg.eval_tokens) // per_context + 2
    contexts = make_contexts(tokenizer, cfg.text, cfg.ctx, n_contexts)

    generator = torch.Generator().manual_seed(seed)
    contexts = contexts[torch.randperm(contexts.shape[0], generator=generator)]
    mask = token_mask(contexts, tokenizer.all_special_ids, cfg.keep_first)

    n_eval = math.ceil(cfg.eval_tokens / max(1, int(mask[0].sum())))
    if n_eval >= contexts.shape[0]:
        raise ValueError(
            f"text too short: {contexts.shape[0]} contexts of {cfg.ctx} tokens, but holding out "
            f"eval_tokens={cfg.eval_tokens} takes {n_eval}; add text or lower --eval-tokens"
        )
    return contexts, mask, n_eval


def save_lm_acts(cfg: DataConfig, parts, contexts, mask, info: dict) -> None:
    """Write the harvested rows to --save-acts: a .pt file, or a store with `info` in its manifest.
    `parts` pairs each block of rows with the slice of contexts it came from."""
    if cfg.save_acts.endswith(".pt"):
        rows = torch.cat([acts for acts, _ in parts])
        write_atomic(cfg.save_acts, lambda f: f.write(torch_bytes(rows)))
    else:
        try:
            writer = StoreWriter(cfg.save_acts, cfg.dtype)
            for acts, part in parts:
                writer.add(acts, *store_args(contexts[part], mask[part], acts.shape[0]))
            writer.finish(**info)
        except WriteError as err:
            raise WriteError(
                f"{err}; the store in {cfg.save_acts} is unfinished and will be refused by training; "
                f"free some space, then run again with --overwrite"
            ) from None
    n_rows = sum(acts.shape[0] for acts, _ in parts)
    print(f"saved {n_rows} activations to {cfg.save_acts}")


def print_lm_notes(name: str, tokenizer, causal: bool) -> None:
    """Say what a model lacks that a user would otherwise assume: a BOS token, a causal LM head."""
    if tokenizer.bos_token_id is None:
        first = tokenizer.convert_ids_to_tokens(special_wrapping(tokenizer)[0])
        print(
            f"note: the tokenizer of {name} has no BOS token, so contexts start with its own special "
            f"tokens {first} or with text"
        )
    if not causal:
        print(
            f"note: {name} is not a causal LM, so there is no loss-recovered evaluation"
        )


def lm_data(
    cfg: DataConfig, seed: int, device
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Harvest hidden_states[layer] from --model on --text: (train acts, held-out acts, what lm_cost needs),
    with massive activations filtered out. Whole contexts are held out, so the LM cost is measured on text
    the SAE never saw."""
    model, tokenizer, causal = load_lm(cfg.model, device, cfg.layer, cfg.ctx)
    print_lm_notes(cfg.model, tokenizer, causal)

    contexts, mask, n_eval = lm_contexts(cfg, tokenizer, seed)
    train_part = slice(n_eval, None)
    eval_part = slice(n_eval)
    train_acts = harvest(
        model,
        contexts[train_part],
        cfg.layer,
        mask[train_part],
        cfg.model_batch,
        cfg.max_tokens,
    )
    eval_acts = harvest(
        model,
        contexts[eval_part],
        cfg.layer,
        mask[eval_part],
        cfg.model_batch,
        cfg.eval_tokens,
    )

    # how the activations were made, as a store's manifest would say it
    info = store_info(cfg, tokenizer, 0.0, model_hooks(model, cfg.layer))
    if cfg.save_acts:
        parts = [(train_acts, train_part), (eval_acts, eval_part)]
        save_lm_acts(cfg, parts, contexts, mask, info)

    raw = train_acts
    train_acts, eval_acts, report = filter_massive(
        train_acts,
        eval_acts,
        cfg.max_norm_ratio,
        cfg.norm_figure,
        f"{Path(cfg.model).name}, hidden_states[{cfg.layer}]",
    )
    threshold = report["train"]["threshold"]
    dropped = dropped_tokens(
        raw, threshold, contexts[train_part], mask[train_part], tokenizer
    )
    report["train"].update(dropped)
    report["harvest"] = info

    lm = {
        "model": model,
        "contexts": contexts[eval_part],
        "mask": mask[eval_part],
        "splice": causal,
        "max_norm": threshold,
        "report": report,
    }
    return train_acts, eval_acts, lm


def file_digest(path) -> dict:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"path": str(path), "bytes": Path(path).stat().st_size, "sha256": digest}


def store_info(cfg: DataConfig, tokenizer, seconds: float, hooks: dict) -> dict:
    """What a store's manifest says about how it was made: the model and layer (with `hooks`, its SAELens and
    sparsify names), the context, the treatment of BOS, position 0, special tokens and massive activations,
    and the text files with their hashes."""
    before, _ = special_wrapping(tokenizer)
    bos = tokenizer.bos_token_id
    return {
        "model": cfg.model,
        "tokenizer": cfg.model,
        "layer": cfg.layer,
        "hooks": hooks,
        "ctx": cfg.ctx,
        "harvest_seconds": seconds,
        "bos": "none"
        if bos is None
        else "added by the tokenizer"
        if before[:1] == [bos]
        else "prepended",
        "position_0": "kept" if cfg.keep_first else "dropped",
        "special_tokens": "dropped",
        "max_norm_ratio": cfg.max_norm_ratio,
        "massive_activations": "kept in the store; training drops them",
        "text": [file_digest(p) for p in cfg.text],
        "torch": torch.__version__,
    }


def harvest_args(cfg: DataConfig, shard_mb: float) -> dict:
    """What a harvest's store is made from, as its in_progress.json keeps it: `harvest --resume` with any of
    it changed would splice two different stores, so it is refused."""
    return {
        "model": cfg.model,
        "layer": cfg.layer,
        "text": [file_digest(p) for p in cfg.text],
        "ctx": cfg.ctx,
        "dtype": cfg.dtype,
        "max_tokens": cfg.max_tokens,
        "model_batch": cfg.model_batch,
        "keep_first": cfg.keep_first,
        "max_norm_ratio": cfg.max_norm_ratio,
        "shard_mb": shard_mb,
    }


class HarvestInterrupted(Exception):
    """Ctrl-C during a harvest; the message says what the store holds and how to continue it."""


def harvest_store(
    cfg: DataConfig,
    out: str,
    device,
    progress: bool = True,
    args: Optional[dict] = None,
    resume: bool = False,
) -> dict:
    """Write hidden_states[layer] of --model on --text to an activation store, shard by shard: the text is
    tokenised lazily and reading stops at max_tokens, so memory holds one model batch and one shard. With
    resume, carry on after the last whole shard of the store in progress in `out`, made from the same args."""
    args = args or harvest_args(cfg, 64.0)
    try:
        model, tokenizer, _ = load_lm(cfg.model, device, cfg.layer, cfg.ctx)
        return write_store(model, tokenizer, cfg, out, progress, args, resume)
    except WriteError as err:
        raise WriteError(
            f"{err}; the store in {out} is unfinished (it has no manifest.json) and will be refused "
            f"by training; free some space, then continue it with the same arguments and --resume "
            f"(or harvest again with --overwrite)"
        ) from None
    except KeyboardInterrupt:
        if not Path(out, PROGRESS).is_file():
            raise HarvestInterrupted(
                "interrupted before the harvest wrote anything"
            ) from None
        done = read_progress(out)
        tokens = sum(s["tokens"] for s in done["shards"])
        raise HarvestInterrupted(
            f"interrupted; the store in {out} is unfinished: {len(done['shards'])} whole shards, "
            f"{tokens:,} tokens; continue it with the same arguments and --resume"
        ) from None


def write_store(
    model,
    tokenizer,
    cfg: DataConfig,
    out: str,
    progress: bool,
    args: dict,
    resume: bool,
) -> dict:
    shard_bytes = max(1, int(args["shard_mb"] * 2**20))
    writer = StoreWriter(out, cfg.dtype, shard_bytes, args, resume)
    done = writer.after or {"contexts": 0, "tokens": 0, "seconds": 0.0}
    read, total = done["contexts"], done["tokens"]
    start = time.perf_counter() - done["seconds"]
    if resume:
        print(
            f"resuming the harvest in {out} after {len(writer.shards)} whole shards: "
            f"{total:,} tokens of {read:,} contexts"
        )
    # the contexts already in the store are tokenised again, but never run through the model
    contexts = itertools.islice(iter_contexts(tokenizer, cfg.text, cfg.ctx), read, None)
    with tqdm(
        total=cfg.max_tokens,
        initial=total,
        unit="tok",
        unit_scale=True,
        desc=f"harvest layer {cfg.layer}",
        disable=not progress,
    ) as bar:
        while total < cfg.max_tokens and (
            batch := list(itertools.islice(contexts, cfg.model_batch))
        ):
            ids = torch.tensor(batch)  # (b, T)
            mask = token_mask(ids, tokenizer.all_special_ids, cfg.keep_first)
            acts = harvest(
                model,
                ids,
                cfg.layer,
                mask,
                len(ids),
                cfg.max_tokens - total,
                progress=False,
            )
            read, total = read + len(batch), total + acts.shape[0]
            after = {
                "contexts": read,
                "tokens": total,
                "seconds": time.perf_counter() - start,
            }
            writer.add(acts, *store_args(ids, mask, acts.shape[0]), after=after)
            bar.update(acts.shape[0])
    seconds = time.perf_counter() - start
    hooks = model_hooks(model, cfg.layer)
    return finish_store(writer, tokenizer, cfg, out, total, seconds, hooks)


def finish_store(
    writer: StoreWriter,
    tokenizer,
    cfg: DataConfig,
    out: str,
    total: int,
    seconds: float,
    hooks: dict,
) -> dict:
    if total < cfg.max_tokens:
        print(
            f"note: the text ran out after {total:,} tokens, before --max-tokens {cfg.max_tokens:,}"
        )
    manifest = writer.finish(**store_info(cfg, tokenizer, seconds, hooks))
    print(
        f"wrote {manifest['tokens']:,} tokens of {manifest['contexts']:,} contexts to {out} in "
        f"{len(manifest['shards'])} shards ({manifest['dtype']}); {total / seconds:,.0f} tokens/s, "
        f"{seconds / total * 1e6 / 60:.1f} min per million tokens; {manifest['norms']['above_threshold']} "
        f"tokens above {cfg.max_norm_ratio:g} x the median norm"
    )
    return manifest


# ============================================================================= 10. Evaluation


class Moments:
    """Running per-dimension sums, for Var over a whole data set (float64: on the CPU for MPS, which has none)."""

    def __init__(self):
        self.count, self.sum, self.sumsq = 0, 0.0, 0.0

    def add(self, x: torch.Tensor):
        x = x.to("cpu" if x.device.type == "mps" else x.device, torch.float64)
        self.count += x.shape[0]
        self.sum = self.sum + x.sum(0)
        self.sumsq = self.sumsq + x.pow(2).sum(0)

    def total_variance(self) -> float:  # sum over dims of Var
        mean = self.sum / self.count
        return float((self.sumsq / self.count - mean.pow(2)).sum())


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, data: torch.Tensor, batch: int = 4096) -> dict:
    """Held-out metrics on a common footing for any SAE.

    ev = 1 - Var(x - x_hat) / Var(x) (the paper's explained variance), fvu = 1 - ev, l0 = mean active
    latents per token, dead_fraction = share of latents that never fire on `data`, aux_loss = the AuxK
    loss with those dead latents.
    """
    device = sae.W_dec.device
    x_m, r_m, l0, fired = (
        Moments(),
        Moments(),
        0,
        torch.zeros(sae.F, dtype=torch.long, device=device),
    )
    for x in data.split(batch):
        x = x.to(device)
        values, indices = sae.encode(x)
        x_m.add(x)
        r_m.add(x - sae.decode(values, indices))
        l0 += int((values > 0).sum())
        fired += torch.bincount(indices[values > 0], minlength=sae.F)
    dead = fired == 0
    aux_num, e_m = 0.0, Moments()
    if dead.any():
        for x in data.split(batch):
            x = x.to(device)
            enc = sae.encode_with_aux(x, dead)
            e = x - sae.decode(enc.values, enc.indices)
            aux_num += float(
                (e - sae.sparse_decode(enc.aux_values, enc.aux_indices)).pow(2).sum()
            )
            e_m.add(e)
    total, error = x_m.total_variance(), r_m.total_variance()
    if x_m.count < 2 or not total > 1e-12 * float(x_m.sumsq.sum() / x_m.count):
        raise ValueError(
            f"EV is undefined on {x_m.count} rows of {'constant' if x_m.count > 1 else 'too little'} "
            f"data: it needs at least 2 rows that vary"
        )
    if not math.isfinite(error):
        raise FloatingPointError(
            f"the reconstruction error is {error} on {x_m.count} rows: the SAE is broken"
        )
    ev = 1.0 - error / total
    return {
        "ev": ev,
        "fvu": 1.0 - ev,
        "l0": l0 / x_m.count,
        "dead_fraction": float(dead.float().mean()),
        "aux_loss": aux_num / max(e_m.total_variance() * e_m.count, 1e-12)
        if dead.any()
        else 0.0,
    }


def format_table(header: list[str], rows: list[list]) -> str:
    """The one table printer: cells as strings, the first column left-aligned and the others right-aligned,
    a rule under the header."""
    cells = [list(map(str, row)) for row in [header, *rows]]
    widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(w) if c else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(row, widths))
        )
        for row in cells
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def results_table(rows: list[dict]) -> str:
    """The main job's comparison: one row per SAE's metrics, with the steps, tokens and seconds it trained."""
    return format_table(
        [
            "SAE",
            "F",
            "k",
            "steps",
            "tokens",
            "EV",
            "L0",
            "dead %",
            "enc FLOPs/tok",
            "params",
            "ms/step",
            "train s",
        ],
        [
            [
                ARCHS[r["arch"]].label(r),
                r["dict_size"],
                r["k"],
                r["steps"],
                f"{r['tokens']:,}",
                f"{r['ev']:.4f}",
                f"{r['l0']:.1f}",
                f"{100 * r['dead_fraction']:.1f}",
                f"{r['encoder_flops_per_token']:,}",
                f"{r['params']:,}",
                f"{r['ms_per_step']:.1f}",
                f"{r['seconds']:.1f}",
            ]
            for r in rows
        ],
    )


def mean_std(values: list[float]) -> dict:
    """{"mean", "std"} of repeated measurements (seeds, set-ups); std is the sample std (n - 1), 0 for one value."""
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0}


# ============================================================================= 11. Checkpoints and runs

Sync = Optional[
    Callable[[torch.Tensor], torch.Tensor]
]  # data parallel: a tensor's sum over the processes


class SAELensForm(NamedTuple):
    """How `export --to saelens` writes one SAE type (saelens_config, saelens_weights)."""

    architecture: str  # cfg.json's "architecture"
    shape: Callable  # (an SAE) -> its cfg.json fields beyond d_in and d_sae
    encoder: str  # the name of the encoder's (d_in, rows) matrix
    bias: str  # and of its bias
    registered: bool  # loads only after kronsae.register_saelens()


class Arch(NamedTuple):
    """Everything the tooling knows of one SAE type. ARCHS holds one entry per
    type, and every command asks it rather than testing names or classes, so a
    third type would be one more entry."""

    name: str  # in config.json, --arch, OUT/<name> and the tables
    cls: type
    fields: dict  # each constructor argument -> the attribute it is read back from
    build: Callable  # (SAEConfig, d_in) -> a fresh SAE
    label: Callable  # (a config.json dict) -> its name in the results table
    bench_name: Callable  # (an SAE) -> its row's name in bench
    latents_per_head: Callable  # (SAEConfig) -> what Matryoshka prefixes divide by
    prunes_heads: bool  # `progressive` prunes whole heads, not single latents
    head_view: bool  # `inspect` shows its heads and pre-latents
    saelens: SAELensForm  # how `export --to saelens` writes it
    # What sets each dimension of each weight, so that `load` can refuse a
    # config.json that does not match its weights by naming the field.
    dimensions: dict


def weight_dimensions(encoder_rows: str, dictionary: str) -> dict:
    """What sets each dimension of each weight, for `load`'s messages."""
    return {
        "W_enc": (encoder_rows, "d_in"),
        "b_enc": (encoder_rows,),
        "W_dec": (dictionary, "d_in"),
        "b_dec": ("d_in",),
    }


# The architecture name register_saelens() gives KronSAE in SAELens's registry
SAELENS_KRON = "kronsae"


def build_topk(c, d_in: int) -> TopKSAE:
    return TopKSAE(d_in=d_in, dict_size=c.dict_size, k=c.k)


def build_kron(c, d_in: int) -> KronSAE:
    return KronSAE(d_in, c.heads, c.m, c.n, c.k, c.kernel, dict_size=c.dict_size)


TOPK = Arch(
    name="topk",
    cls=TopKSAE,
    fields={"d_in": "d_in", "dict_size": "F", "k": "k"},
    build=build_topk,
    label=lambda config: TOPK.name,
    bench_name=lambda sae: TOPK.name,
    latents_per_head=lambda c: 1,
    prunes_heads=False,
    head_view=False,
    saelens=SAELensForm(
        architecture="topk",
        shape=lambda sae: {"k": sae.k, "rescale_acts_by_decoder_norm": False},
        encoder="W_enc",
        bias="b_enc",
        registered=False,
    ),
    dimensions=weight_dimensions("dict_size", "dict_size"),
)
KRON = Arch(
    name="kron",
    cls=KronSAE,
    fields={"d_in": "d_in", "h": "h", "m": "m", "n": "n", "k": "k", "kernel": "kernel"},
    build=build_kron,
    label=lambda config: f"kron h={config['h']} m={config['m']} n={config['n']}",
    bench_name=lambda sae: f"kron_{sae.m}x{sae.n}",
    latents_per_head=lambda c: c.m * c.n,
    prunes_heads=True,
    head_view=True,
    saelens=SAELensForm(
        architecture=SAELENS_KRON,
        shape=lambda sae: {
            "h": sae.h,
            "m": sae.m,
            "n": sae.n,
            "k": sae.k,
            "kernel": sae.kernel,
        },
        encoder="W_pre",
        bias="b_pre",
        registered=True,
    ),
    dimensions=weight_dimensions("h*(m+n)", "h*m*n"),
)
ARCHS = {arch.name: arch for arch in (TOPK, KRON)}
BASELINE = TOPK.name  # what the others are compared with: --match, ablate, bench


def arch_of(sae: SparseAutoencoder) -> Arch:
    """The registry entry of `sae`'s type (NaiveKronSAE, the listing, has none)."""
    for arch in ARCHS.values():
        if type(sae) is arch.cls:
            return arch
    kinds = " or ".join(a.cls.__name__ for a in ARCHS.values())
    raise ValueError(
        f"cannot save a {type(sae).__name__}: checkpoints hold a {kinds} only. A "
        f"NaiveKronSAE's state_dict loads into a KronSAE of the same shape, which is "
        f"the same SAE: save that"
    )


def sae_config(sae: SparseAutoencoder) -> dict:
    """The constructor arguments that rebuild `sae`, with its architecture's name (config.json)."""
    arch = arch_of(sae)
    return {
        "arch": arch.name,
        **{arg: getattr(sae, attr) for arg, attr in arch.fields.items()},
    }


def build_sae(config: dict) -> SparseAutoencoder:
    """The SAE that a config.json describes, from its constructor arguments alone: what else the file
    says (its provenance) is for readers, and configs written before it was there read the same."""
    arch = ARCHS[config["arch"]]
    return arch.cls(**{arg: config[arg] for arg in arch.fields if arg in config})


def num_params(sae: nn.Module) -> int:
    return sum(p.numel() for p in sae.parameters())


def save(sae: SparseAutoencoder, directory: str, provenance: Optional[dict] = None):
    """Write sae.safetensors and config.json, each atomically (write_atomic). config.json holds the
    constructor arguments and, when given, the checkpoint's `provenance` (checkpoint_provenance, section
    11), so that one folder says where it came from. Non-finite weights are refused: the last finite
    checkpoint stays."""
    from safetensors.torch import save as safetensors_bytes

    # An SAE with no checkpoint format is refused before anything is written.
    config = sae_config(sae)
    bad = [name for name, t in sae.state_dict().items() if not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(
            f"refusing to save non-finite weights ({', '.join(bad)}) to {directory}"
        )
    weights = {
        name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()
    }
    write_atomic(
        Path(directory, "sae.safetensors"),
        lambda f: f.write(safetensors_bytes(weights)),
    )
    config = sae_config(sae)
    if provenance is not None:
        config["provenance"] = provenance
    write_json(Path(directory, "config.json"), config)


def saved_provenance(directory: str) -> dict:
    """The provenance in a checkpoint's config.json. A checkpoint saved before config.json carried it gets
    it rebuilt from its run's ../run.json, and from the store's manifest when it trained on one; {} when
    there is neither."""
    config = json.loads(Path(directory, "config.json").read_text())
    if "provenance" in config:
        return config["provenance"]
    run = Path(directory).parent / "run.json"
    if not run.is_file():
        return {}
    try:
        s = Settings.from_dict(json.loads(run.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{run} is not a run's settings ({type(err).__name__}: {err}), so the provenance of "
            f"{directory} is unknown"
        ) from None
    manifest = Path(s.data.data, "manifest.json")
    report = {}
    if s.data.data and manifest.is_file():
        report["store"] = json.loads(manifest.read_text())
    return checkpoint_provenance(s, report)


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names for floating point


def planned_sae(build: Callable[[], SparseAutoencoder]) -> SparseAutoencoder:
    """The SAE build() makes, on the meta device: its parameters have shapes and dtypes but no memory, so
    a config claiming 10^9 latents costs nothing to look at."""
    with torch.device("meta"):
        return build()


def weights_header(path) -> dict[str, tuple[tuple, str]]:
    """Each tensor's (shape, dtype) in a safetensors file, read from its header alone: no tensor is loaded."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {
                name: (tuple(s.get_shape()), s.get_dtype())
                for name, s in slices.items()
            }
    except Exception as err:  # safetensors raises its own error kinds
        raise ValueError(
            f"{path} is corrupt ({type(err).__name__}: {str(err)[:160]})"
        ) from None


def check_weights(planned: SparseAutoencoder, header: dict, what: str, source: str):
    """Refuse, in one line naming the field and both values, a header whose tensors are not the ones the
    planned SAE (built from `source`, on the meta device) would load: a missing or extra name, another
    shape, or a dtype that is not floating point."""
    expected = planned.state_dict()
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{what} holds tensors {sorted(header)}, but {source} describes "
            f"{list(expected)} (missing {missing}, unexpected {extra})"
        )
    arch = sae_config(planned)["arch"]
    for name, tensor in expected.items():
        shape, dtype = header[name]
        if dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{what}: {name} has dtype {dtype} in sae.safetensors; an SAE's weights "
                f"are floating point ({', '.join(FLOAT_DTYPES)})"
            )
        if shape == tuple(tensor.shape):
            continue
        labels = ARCHS[arch].dimensions[name]
        if len(shape) != len(labels):
            raise ValueError(
                f"{what}: {name} has shape {shape} in sae.safetensors, but {source} "
                f"makes it {tuple(tensor.shape)}"
            )
        dim = next(i for i in range(len(shape)) if shape[i] != tensor.shape[i])
        raise ValueError(
            f"{what} does not match its weights: {source} gives "
            f"{dimension_text(labels[dim], sae_config(planned), tensor.shape[dim])}, "
            f"sae.safetensors has {shape[dim]} ({name} has shape {shape}, the config "
            f"makes it {tuple(tensor.shape)})"
        )


def dimension_text(label: str, config: dict, value: int) -> str:
    """'dict_size = 64', or with the config's values filled in, 'h*(m+n) = 8*(2+4) = 48'."""
    filled = re.sub(r"[a-z_]+", lambda match: str(config[match.group()]), label)
    if filled == str(value):
        return f"{label} = {value}"
    return f"{label} = {filled} = {value}"


def load(directory: str, device="cpu") -> SparseAutoencoder:
    """The exact inverse of save, in the dtype the weights were saved in (a float64 SAE stays float64), on
    `device`. A missing or corrupt checkpoint raises ValueError naming what is wrong. config.json is checked
    against the tensors' names, shapes and dtypes in the safetensors header before anything is allocated,
    so a config that lies about its sizes costs no memory. Nothing in a checkpoint can run code:
    safetensors and JSON."""
    from safetensors.torch import load_file

    for name in ("config.json", "sae.safetensors"):
        if not Path(directory, name).is_file():
            raise ValueError(f"{directory} is not a checkpoint: {name} is missing")
    weights = Path(directory, "sae.safetensors")

    # The config and the header first, with no memory behind either.
    try:
        config = json.loads(Path(directory, "config.json").read_text())
        planned = planned_sae(lambda: build_sae(config))
        header = weights_header(weights)
    except (
        Exception
    ) as err:  # json, the constructors and safetensors each raise their own kind
        raise ValueError(
            f"checkpoint {directory} is corrupt ({type(err).__name__}: {str(err)[:160]})"
        ) from None
    check_weights(planned, header, f"checkpoint {directory}", "config.json")

    # Only then the SAE itself, and its weights.
    try:
        sae = build_sae(config)
        tensors = load_file(weights)
        # load_state_dict copies into the existing float32 tensors: cast them first.
        sae.to(tensors["W_dec"].dtype).load_state_dict(tensors)
    except Exception as err:
        raise ValueError(
            f"checkpoint {directory} is corrupt ({type(err).__name__}: {str(err)[:160]})"
        ) from None
    return sae.to(device)


def folded_copy(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    if scale == 1.0:
        return sae
    twin = copy.deepcopy(sae)
    fold_input_scale_(twin, scale)
    return twin


class LatentStats:
    """Per latent, over the tokens counted: importance E[a^2] (mean squared activation) and firing frequency,
    as running sums in float64. Counted during training, and over held-out data by latent_stats."""

    def __init__(self, F: int, device):
        self.tokens = 0
        self.sq_sum = torch.zeros(F, dtype=wide_dtype(device), device=device)
        self.fire_count = torch.zeros(F, dtype=wide_dtype(device), device=device)

    # (B, k), (B, k)
    def update(self, values: torch.Tensor, indices: torch.Tensor, sync: Sync = None):
        """Count a batch; with `sync` (data parallel), every process's part of it."""
        sq = torch.zeros_like(self.sq_sum).index_add_(
            0, indices.flatten(), values.flatten().to(self.sq_sum.dtype) ** 2
        )
        fired = torch.zeros_like(self.fire_count).index_add_(
            0, indices.flatten(), (values.flatten() > 0).to(self.fire_count.dtype)
        )
        tokens = values.shape[0]
        if sync is not None:
            tokens, sq, fired = (
                int(sync(values.new_tensor(float(tokens)))),
                sync(sq),
                sync(fired),
            )
        self.tokens += tokens
        self.sq_sum += sq
        self.fire_count += fired

    @property
    def importance(self) -> torch.Tensor:  # (F,) E[a^2]
        return (self.sq_sum / max(self.tokens, 1)).float().cpu()

    @property
    def frequency(
        self,
    ) -> torch.Tensor:  # (F,) share of tokens on which each latent fired
        return (self.fire_count / max(self.tokens, 1)).float().cpu()


def lr_factor_at(progress: float, reached: float, warmup: float, floor: float) -> float:
    """Part 1's lr_factor with time for steps (--match time). `progress` is the share of the budget used before
    the step and `reached` the share used once it is done: linear warmup over the first `warmup` of the budget,
    then the cosine decay to `floor`. Where every step costs budget / steps, it gives lr_factor's values."""
    if progress < warmup:
        return min(1.0, reached / warmup)
    decay = min(1.0, (progress - warmup) / (1 - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * decay))


class TimeSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Paper A.1's schedule over a budget of seconds instead of steps (--match time), so that warmup and decay
    span the whole budget whatever the steps cost. After each step, advance(seconds used, that step's seconds)
    sets the next step's rate; the next step is expected to cost what the last one did, and the first one
    budget / cfg.steps (TopK's mean step, when the budget is TopK's seconds for cfg.steps steps)."""

    def __init__(self, optimizer, cfg: TrainConfig, budget: float):
        if not budget > 0:  # NaN fails this too
            raise ValueError(f"a budget of seconds must be > 0, got {budget}")
        self.budget = budget
        self.warmup = cfg.warmup
        self.floor = cfg.min_lr / cfg.lr
        self.seconds = 0.0
        self.last_step = budget / cfg.steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        factor = lr_factor_at(
            self.seconds / self.budget,
            (self.seconds + self.last_step) / self.budget,
            self.warmup,
            self.floor,
        )
        return [lr * factor for lr in self.base_lrs]

    def advance(self, seconds: float, last_step: float):
        self.seconds = seconds
        self.last_step = last_step
        self.step()


@dataclass
class RunState(TrainState):
    """What run_training carries from step to step (TrainState), and what a checkpoint saves to resume exactly:
    AdamW, the schedule (paper A.1), the dead-latent counts, each latent's statistics, the step, the losses so far
    and the steps' wall time. With a `budget` of seconds (--match time) the run ends once its steps have used it,
    and the schedule runs on their seconds; without one it ends after cfg.steps steps."""

    latents: Optional[LatentStats] = None
    seconds: float = 0.0
    step_seconds: float = 0.0  # the last step's
    budget: Optional[float] = None
    # Where the run comes from (checkpoint_provenance), for every checkpoint's config.json. It is not part
    # of the resume state: a resumed run rebuilds it from its settings.
    provenance: Optional[dict] = None

    @classmethod
    def fresh(
        cls, sae: SparseAutoencoder, cfg: TrainConfig, budget: Optional[float] = None
    ) -> RunState:
        optimizer, device = make_optimizer(sae, cfg.lr), sae.W_dec.device
        since = torch.zeros(sae.F, dtype=torch.long, device=device)
        if budget is None:
            schedule = make_schedule(optimizer, cfg)
        else:
            schedule = TimeSchedule(optimizer, cfg, budget)
        latents = LatentStats(sae.F, device)
        return cls(optimizer, schedule, since, latents=latents, budget=budget)

    def advance(self):
        """Count one finished step: the step count, the seconds used and the schedule. The step's seconds
        are step_seconds, which RunHooks.end_step sets just before: a RunState is trained by run_training."""
        self.step += 1
        self.seconds += self.step_seconds
        if isinstance(self.schedule, TimeSchedule):
            self.schedule.advance(self.seconds, self.step_seconds)
        else:
            self.schedule.step()

    def finished(self, cfg: TrainConfig) -> bool:
        """cfg.steps steps done; with a budget, the first step at which the seconds reach it is the last."""
        if self.budget is None:
            return self.step >= cfg.steps
        return self.step > 0 and self.seconds >= self.budget

    def goal(self, cfg: TrainConfig) -> str:
        """What the run trains for, as the messages say it."""
        if self.budget is None:
            return str(cfg.steps)
        return f"a {self.budget:.1f} s budget ({self.seconds:.1f} s used)"

    def progress_bar(self, sae: SparseAutoencoder, cfg: TrainConfig, progress: bool):
        """In steps, or in the budget's seconds when there is one."""
        if self.budget is None:
            return super().progress_bar(sae, cfg, progress)
        return tqdm(
            desc=type(sae).__name__,
            total=self.budget,
            initial=self.seconds,
            disable=not progress,
            leave=False,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s of steps "
            "[{elapsed}<{remaining}{postfix}]",
        )

    def update_bar(self, bar):
        """One step more; in seconds, up to the budget (the last step passes it)."""
        if self.budget is None:
            bar.update(1)
        else:
            bar.update(min(self.seconds, self.budget) - bar.n)


# The resume state holds tensors, numbers, strings and plain containers only, so that torch.load reads it with
# weights_only=True: a run directory from someone else can never run code here (PyTorch >= 2.6's default).
RUN_STATE_FORMAT = 2


def rng_states() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_states(rng: dict):
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_run_state(
    directory: str, sae: SparseAutoencoder, state: RunState, batches, scale: float
):
    """A checkpoint that resumes exactly: the SAE for raw inputs (sae.safetensors, as `load` reads it), and
    train_state.pt with the weights at the training scale, AdamW, the schedule, the dead-latent counts, the
    latent statistics, the data cursor, the RNG states and the normalisation scale. train_state.pt is written
    first: sae.safetensors is never newer than the state that resumes it."""
    latents = state.latents
    blob = {
        "format": RUN_STATE_FORMAT,
        "sae": sae.state_dict(),
        "step": state.step,
        "losses": list(state.losses),
        "seconds": state.seconds,
        "optimizer": state.optimizer.state_dict(),
        "schedule": state.schedule.state_dict(),
        "since": state.tokens_since_fired,
        "scale": scale,
        "latents": {
            "tokens": latents.tokens,
            "sq_sum": latents.sq_sum,
            "fire_count": latents.fire_count,
        },
        "batches": batches.state_dict() if hasattr(batches, "state_dict") else None,
        "rng": rng_states(),
    }
    write_atomic(
        Path(directory, "train_state.pt"), lambda f: f.write(torch_bytes(blob))
    )
    about = None
    if state.provenance is not None:
        about = {
            **state.provenance,
            "steps": state.step,
            "tokens_trained": latents.tokens,
        }
    save(folded_copy(sae, scale), directory, about)


def load_run_state(
    directory: str,
    sae: SparseAutoencoder,
    cfg: TrainConfig,
    batches,
    budget: Optional[float] = None,
) -> tuple[RunState, float]:
    """Restore what save_run_state wrote into `sae`, a fresh RunState (with the run's `budget` of seconds, if it
    had one) and `batches`; returns (state, scale). Loads with weights_only=True: a file that needs anything
    else is refused, and nothing in it runs."""
    path = Path(directory, "train_state.pt")
    try:  # on the CPU: the RNG states must stay there; weights and AdamW's state are copied to their device
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"refusing to resume from {path}: it holds Python objects that only a full unpickle "
            f"could load, and unpickling can run code (it was written by an older kronsae.py, or "
            f"not by kronsae.py). Nothing in it ran. Train afresh with --overwrite; its weights "
            f"alone still load with kronsae.load('{directory}')"
        ) from None
    except Exception as err:
        raise ValueError(
            f"cannot resume from {directory} ({type(err).__name__}: {str(err)[:160]})"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != RUN_STATE_FORMAT:
        raise ValueError(
            f"cannot resume from {path}: not a resume state of this kronsae.py (format "
            f"{blob.get('format') if isinstance(blob, dict) else None!r}, expected {RUN_STATE_FORMAT})"
        )
    try:
        sae.load_state_dict(blob["sae"])
        state = RunState.fresh(sae, cfg, budget)
        state.step = blob["step"]
        state.losses = list(blob["losses"])
        state.seconds = blob["seconds"]
        state.optimizer.load_state_dict(blob["optimizer"])
        state.schedule.load_state_dict(blob["schedule"])
        state.tokens_since_fired.copy_(blob["since"])
        state.latents.tokens = blob["latents"]["tokens"]
        state.latents.sq_sum.copy_(blob["latents"]["sq_sum"])
        state.latents.fire_count.copy_(blob["latents"]["fire_count"])
        if blob["batches"] is not None:
            batches.load_state_dict(blob["batches"])
        set_rng_states(blob["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"cannot resume from {directory} ({type(err).__name__}: {str(err)[:160]})"
        ) from None
    return state, blob["scale"]


# The SAELens format the export follows: 6.0 moved a model's details into cfg.json's metadata, and files
# without sae_lens_version there are read as older ones.
SAELENS_FORMAT = "6.0.0"


def saelens_metadata(about: dict) -> dict:
    """SAELens 6's metadata (sae_lens SAEMetadata) from a checkpoint's provenance (saved_provenance)."""
    try:
        version = importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        version = SAELENS_FORMAT
    data = about.get("data", {})
    return {
        "sae_lens_version": version,
        "sae_lens_training_version": None,  # trained by kronsae.py, not by SAELens
        "model_name": about.get("model"),
        "model_class_name": "HookedTransformer",
        # TransformerLens's default processing centres the residual stream, which would no longer be the
        # hidden states the SAE was trained on; SAELens's own runs set the same.
        "model_from_pretrained_kwargs": {"center_writing_weights": False},
        "hook_name": about.get("hook_names", {}).get("saelens"),
        "hook_head_index": None,
        "context_size": about.get("context_size"),
        "prepend_bos": about.get("prepend_bos"),
        # Position 0, the attention sink, was never trained on (SAELens's own slice syntax).
        "seqpos_slice": [1, None] if about.get("position_0") == "dropped" else [None],
        "dataset_path": ",".join(data.get("files", [])) or data.get("path"),
        "exported_from": "kronsae.py",
        "provenance": about,
    }


def saelens_config(sae: SparseAutoencoder, about: dict) -> dict:
    """cfg.json: SAELens's topk architecture for a TopK SAE, and the kronsae architecture that
    register_saelens adds for a KronSAE. The weights are for raw activations (--normalize is folded into
    them), so normalize_activations is none."""
    form = arch_of(sae).saelens
    return {
        "architecture": form.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.F,
        **form.shape(sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": saelens_metadata(about),
    }


def saelens_weights(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """SAELens's names and layout, encoders as (d_in, rows). A TopK SAE's W_enc is (d_in, d_sae). A
    KronSAE has no such matrix: W_pre (d_in, h*(m+n)) holds its pre-latent rows [P_g; Q_g] head by head."""
    form = arch_of(sae).saelens
    weights = {
        form.encoder: sae.W_enc.T,
        form.bias: sae.b_enc,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
    }
    return {name: t.detach().float().contiguous() for name, t in weights.items()}


def saelens_sparsity(directory: str) -> Optional[torch.Tensor]:
    """(F,) log10 of each latent's firing frequency over training (train_state.pt's counts), with SAELens's
    own epsilon: log10(density + 1e-10). None for a checkpoint saved without its training state."""
    path = Path(directory, "train_state.pt")
    if not path.is_file():
        return None
    try:
        latents = torch.load(path, map_location="cpu", weights_only=True)["latents"]
    except Exception as err:
        raise ValueError(
            f"cannot read the latent frequencies in {path} ({type(err).__name__}: {str(err)[:160]})"
        ) from None
    density = latents["fire_count"].double() / max(latents["tokens"], 1)
    return torch.log10(density + 1e-10).float()


def export_saelens(directory: str, destination: str) -> Path:
    """Write the SAE saved in `directory` in SAELens 6's format: cfg.json (with the model, hook and data in
    its metadata), sae_weights.safetensors and sparsity.safetensors. SAELens encodes a TopK SAE as
    TopK(ReLU((x - b_dec) W_enc + b_enc)), which is our encoder; a KronSAE loads through
    register_saelens()."""
    from safetensors.torch import save as safetensors_bytes

    check_writable(destination, "to saelens", directory=True)
    sae = load(directory)
    about = saved_provenance(directory)
    cfg = saelens_config(sae, about)
    sparsity = saelens_sparsity(directory)

    files = {"sae_weights.safetensors": saelens_weights(sae)}
    if sparsity is not None:
        files["sparsity.safetensors"] = {"sparsity": sparsity}
    else:  # nor one left from an earlier export to the same place
        Path(destination, "sparsity.safetensors").unlink(missing_ok=True)
    for name, tensors in files.items():
        blob = safetensors_bytes(tensors)
        write_atomic(Path(destination, name), lambda f, blob=blob: f.write(blob))
    write_json(Path(destination, "cfg.json"), cfg)

    hook = cfg["metadata"]["hook_name"]
    print(
        f"wrote a SAELens {cfg['architecture']} SAE (d_in={sae.d_in}, d_sae={sae.F}, k={sae.k}) "
        f"to {destination}: model {cfg['metadata']['model_name']}, hook {hook}"
    )
    if sparsity is None:
        print(f"note: {directory} has no train_state.pt, so no sparsity.safetensors")
    if arch_of(sae).saelens.registered:
        print(
            "load it with: kronsae.register_saelens(); sae_lens.SAE.load_from_disk(...)"
        )
    return Path(destination)


class SAELensKronSAE:
    """The KronSAE as a SAELens SAE: the methods that register_saelens() mixes into a sae_lens.SAE
    subclass. Its encode gives SAELens's dense (..., d_sae) code, computed as NaiveKronSAE does (every
    latent, then TopK): SAELens's hooks see what they see of any SAE, and hook_sae_pre_latents sees
    the (..., h*(m+n)) pre-latents u, v before the kernel. Whatever needs a dense W_enc of shape
    (d_in, d_sae), which a KronSAE does not have, is refused with a message, never approximated."""

    def __init__(self, cfg, use_error_term: bool = False):
        from transformer_lens.hook_points import HookPoint

        super().__init__(cfg, use_error_term)
        self.hook_sae_pre_latents = HookPoint()
        self.setup()  # HookedRootModule's index of hooks, now with the new one

    def initialize_weights(self):
        cfg = self.cfg
        rows = cfg.h * (cfg.m + cfg.n)
        empty = partial(torch.zeros, dtype=self.dtype, device=self.device)
        self.W_pre = nn.Parameter(empty(cfg.d_in, rows))
        self.b_pre = nn.Parameter(empty(rows))
        self.W_dec = nn.Parameter(empty(cfg.d_sae, cfg.d_in))
        self.b_dec = nn.Parameter(empty(cfg.d_in))

    @property
    def W_enc(self):
        raise NotImplementedError(
            f"a KronSAE has no dense W_enc of shape (d_in, d_sae): its latents are mAND products of "
            f"pre-latents, W_pre {tuple(self.W_pre.shape)} (h*(m+n) rows, [P_g; Q_g] per head). "
            f"Use encode() for latent values and W_dec for latent directions"
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_sae): eqs. 2-4, then TopK (eq. 1), with SAELens's hooks."""
        cfg = self.cfg
        sae_in = self.process_sae_in(x)  # x - b_dec, hook_sae_input
        pre = self.hook_sae_pre_latents(sae_in @ self.W_pre + self.b_pre)  # eq. 2
        per_head = pre.unflatten(-1, (cfg.h, cfg.m + cfg.n))  # (..., h, m+n)
        u, v = per_head.split([cfg.m, cfg.n], dim=-1)  # (..., h, m), (..., h, n)
        z = KERNELS[cfg.kernel](u[..., :, None], v[..., None, :])  # (..., h, m, n)
        z = self.hook_sae_acts_pre(z.flatten(-3))  # (..., F), eq. 4's order
        top = z.topk(cfg.k, dim=-1)
        code = torch.zeros_like(z).scatter(-1, top.indices, top.values)
        return self.hook_sae_acts_post(code)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) -> (..., d_in), as SAELens's TopK SAE decodes."""
        out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        out = self.run_time_activation_norm_fn_out(out)
        return self.reshape_fn_out(out, self.d_head)

    @torch.no_grad()
    def fold_W_dec_norm(self):
        """Unit decoder rows (ours always are) leave nothing to fold. Other norms cannot be folded: a
        pre-latent feeds n (or m) latents, which would each need their own scale."""
        norms = self.W_dec.norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-5):
            raise NotImplementedError(
                "a KronSAE's decoder norms cannot be folded into its pre-latent encoder"
            )

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float):
        """An SAE for activations scaled by c, made one for raw activations (as SAELens folds it)."""
        self.W_pre.data *= scaling_factor
        self.W_dec.data /= scaling_factor
        self.b_dec.data /= scaling_factor
        self.cfg.normalize_activations = "none"

    def fold_activation_whitening(self, *args, **kwargs):
        raise NotImplementedError("whitening is not folded into a KronSAE's encoder")


def register_saelens() -> tuple[type, type]:
    """Register the kronsae architecture with SAELens 6 (sae_lens.register_sae_class), so that
    sae_lens.SAE.load_from_disk reads what `export --to saelens` wrote of a KronSAE. Returns the SAE
    class and its config class; calling it again returns the same two."""
    try:
        import sae_lens
        from sae_lens.registry import SAE_CLASS_REGISTRY
    except ImportError as err:
        raise ImportError(
            f"register_saelens needs sae-lens 6 (pip install sae-lens): {err}"
        ) from None
    if SAELENS_KRON in SAE_CLASS_REGISTRY:
        return SAE_CLASS_REGISTRY[SAELENS_KRON]

    @dataclass
    class KronSAELensConfig(sae_lens.SAEConfig):
        """A KronSAE's shape in SAELens's config: d_sae = h*m*n latents, k active."""

        h: int = 1
        m: int = 1
        n: int = 1
        k: int = 1
        kernel: str = "mand"

        @classmethod
        def architecture(cls) -> str:
            return SAELENS_KRON

        def __post_init__(self):
            super().__post_init__()
            if self.d_sae != self.h * self.m * self.n or self.kernel not in KERNELS:
                raise ValueError(
                    f"a KronSAE needs d_sae = h*m*n and a kernel of {', '.join(KERNELS)}, got "
                    f"d_sae={self.d_sae}, h={self.h}, m={self.m}, n={self.n}, kernel={self.kernel!r}"
                )

    class KronSAELens(SAELensKronSAE, sae_lens.SAE):
        """KronSAE (arXiv 2505.22255) in SAELens: see SAELensKronSAE."""

    sae_lens.register_sae_class(SAELENS_KRON, KronSAELens, KronSAELensConfig)
    return KronSAELens, KronSAELensConfig


class Interrupted(Exception):
    """A run stopped between two steps (Ctrl-C): the step finished, and its checkpoint, if any, is complete.
    `goal`: what the run trains for (RunState.goal)."""

    def __init__(self, step: int, goal: str, out: str):
        self.step = step
        self.goal = goal
        self.out = out
        super().__init__(f"interrupted after step {step} of {goal}")


class TrainingLog:
    """OUT/ARCH/log.jsonl: one JSON object every `every` steps (0 = about 100 lines a run) and at the
    last, each from the floats the step has read from the device already: the steps and tokens done, the
    loss with its terms, L0, the dead share, the step's learning rate and the training seconds so far.
    A resumed run first drops the lines of steps after its checkpoint, which the interrupted run may have
    written, so that every step appears once. Without a directory there is no log."""

    def __init__(self, directory: str, every: int, cfg: TrainConfig, first: int):
        self.path = Path(directory, "log.jsonl") if directory else None
        self.every = every or max(1, cfg.steps // 100)
        self.cfg = cfg
        if self.path is not None and first == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)
        elif self.path is not None:
            kept = [line for line in self.lines() if line["step"] <= first]
            text = "".join(json.dumps(line) + "\n" for line in kept)
            write_atomic(self.path, lambda f: f.write(text.encode()))

    def lines(self) -> list[dict]:
        return read_log(self.path) if self.path is not None else []

    def add(
        self,
        step: int,
        stats: StepStats,
        dead: float,
        tokens: int,
        seconds: float,
        lr: float,
        last: bool = False,
    ):
        """The line of the step that brought the run to `step` steps, if one is due (and
        of the last step); `lr` is the rate that step ran at."""
        if self.path is None or (step % self.every and not last):
            return
        line = {
            "step": step,
            "tokens": tokens,
            "loss": stats.loss,
            "fvu": stats.fvu,
            "aux": stats.aux,
            "l0": stats.active / stats.tokens,
            "dead_fraction": dead,
            "lr": lr,
            "seconds": seconds,
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(line), allow_nan=False) + "\n")


def read_log(path) -> list[dict]:
    """The lines of a training log (TrainingLog); none if there is no log."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def save_run_curves(out: str, archs: list[str]):
    """OUT/curves.png: the training logs of the run's SAEs (OUT/ARCH/log.jsonl), one line each."""
    logs = {arch: read_log(Path(out, arch, "log.jsonl")) for arch in archs}
    save_curves_figure(logs, Path(out, "curves.png"), f"training curves: {out}")


# The panels of the curves figure: the log's key, the axis label, and whether the axis is logarithmic.
CURVES = (
    ("loss", "training loss", True),
    ("fvu", "FVU (1 - EV), training batch", True),
    ("aux", "AuxK loss (before its weight)", False),
    ("l0", "L0 (active latents per token)", False),
    ("dead_fraction", "dead latents (share of F)", False),
    ("lr", "learning rate", False),
)


def save_curves_figure(logs: dict[str, list[dict]], path, title: str):
    """Each SAE's logged numbers (TrainingLog's lines, by SAE) against the tokens trained, one panel each."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (key, label, logarithmic) in zip(axes.flat, CURVES):
        for name, lines in logs.items():
            tokens = [line["tokens"] for line in lines]
            values = [line[key] for line in lines]
            ax.plot(tokens, values, label=name, marker="." if len(lines) < 30 else None)
        if logarithmic and all(
            v > 0 for lines in logs.values() for v in [x[key] for x in lines]
        ):
            ax.set_yscale("log")
        ax.set(xlabel="tokens trained", title=label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def run_training(
    sae: SparseAutoencoder,
    batches: Iterator[torch.Tensor],
    cfg: TrainConfig,
    scale: float = 1.0,
    out: str = "",
    save_every: int = 0,
    progress: bool = True,
    stop: Optional[Callable[[SparseAutoencoder, RunState], bool]] = None,
    state: Optional[RunState] = None,
    sync: Sync = None,
    matryoshka: tuple = (),
    precision: str = "fp32",
    budget: Optional[float] = None,
    clock: Callable[[], float] = time.perf_counter,
    rank: int = 0,
    log_every: int = 0,
) -> RunState:
    """Part 1's `train`, with what a real run needs around its steps (RunHooks):
    - `scale` (--normalize) multiplies the batches and is folded back at the end: checkpoints are for raw x;
    - checkpoints in `out` every save_every steps and at the end; `state` (load_run_state) resumes; a
      non-finite loss or a full disk leaves the last good checkpoint; out/log.jsonl (TrainingLog);
    - stop(sae, state) turning true after a step (Ctrl-C): a checkpoint, then Interrupted;
    - the steps' seconds on `clock` (a step's batch and update only); a `budget` of seconds (--match time)
      trains until the steps have used it, the learning rate following time (TimeSchedule);
    - Matryoshka training (section 14) for `matryoshka` prefix sizes; precision "bf16": bfloat16 autocast
      with float32 weights, gradients and AdamW state;
    - data parallel (`sync` sums over processes; this one is `rank`): variances, gradients and statistics
      are summed here and nowhere else, and every process counts rank 0's seconds.
    """
    state = state or RunState.fresh(sae, cfg, budget)
    scaled = batches if scale == 1.0 else (x * scale for x in batches)
    saving = Saving(out, save_every, stop, batches, scale)
    log = TrainingLog(out, log_every, cfg, state.step)
    hooks = RunHooks(
        sae, cfg, state, saving, log, sync, matryoshka, precision, clock, rank
    )
    try:
        train(sae, scaled, cfg, progress, state, hooks)
    except FloatingPointError as err:
        kept = out and Path(out, "sae.safetensors").exists()
        where = (
            f"last good checkpoint kept in {out}"
            if kept
            else "no checkpoint was written"
        )
        raise FloatingPointError(
            f"training stopped at step {state.step}: {err}; {where}"
        ) from None
    finally:
        hooks.remove()
    fold_input_scale_(sae, scale)
    return state


class Saving(NamedTuple):
    """Where and when run_training checkpoints, and what a checkpoint needs of the data."""

    out: str
    save_every: int
    stop: Optional[Callable]
    batches: Iterator[torch.Tensor]  # the data stream, whose cursor a checkpoint saves
    scale: float


class RunHooks(StepHooks):
    """Part 1's StepHooks for a real run (run_training): data parallel, bfloat16, the clock,
    the training log, checkpoints and Ctrl-C."""

    def __init__(
        self,
        sae,
        cfg: TrainConfig,
        state: RunState,
        saving: Saving,
        log: TrainingLog,
        sync: Sync,
        matryoshka: tuple,
        precision: str,
        clock: Callable[[], float],
        rank: int,
    ):
        self.cfg, self.saving, self.log = cfg, saving, log
        self.sync, self.rank = sync, rank
        self.bf16 = precision == "bf16"
        self.clock = clock
        self.device = sae.W_dec.device
        self.started = 0.0
        self.lr = state.optimizer.param_groups[0]["lr"]
        self.variance, self.loss_fn, self.grad_hooks = step_functions(
            sae, sync, matryoshka
        )

    def mean(self, x):
        """Over every process's slice of the first batch."""
        if self.sync is None:
            return x.mean(0)
        return self.sync(x.sum(0)) / self.sync(x.new_tensor(float(len(x))))

    def start_step(self, state):
        self.started = self.clock()
        self.lr = state.optimizer.param_groups[0]["lr"]  # the rate this step runs at
        # fresh gradients: weight_grad would add into kept ones without the hooks firing
        if self.sync is not None:
            state.optimizer.zero_grad(set_to_none=True)

    def precision(self):
        return autocast_if(self.bf16, self.device)

    def total(self, stats, fired):
        """Each process holds its share of the loss terms and firings: their sums are the batch's."""
        if self.sync is None:
            return stats, fired
        totals = self.sync(torch.stack(list(stats)).to(wide_dtype(fired.device)))
        return StepStats(*totals), self.sync(fired)

    def end_step(self, state):
        """The step's seconds, rank 0's on every process: from its batch to its read."""
        seconds = self.clock() - self.started
        state.step_seconds = rank0_value(seconds, self.sync, self.rank, self.device)

    def after_step(self, sae, state: RunState, stats, enc, dead_count):
        state.latents.update(enc.values.detach(), enc.indices, self.sync)
        done = state.finished(self.cfg)
        dead_share = dead_count / sae.F
        tokens = state.latents.tokens
        self.log.add(
            state.step, stats, dead_share, tokens, state.seconds, self.lr, done
        )
        checkpoint_or_stop(sae, state, done, self.cfg, self.saving, self.sync)

    def remove(self):
        for hook in self.grad_hooks:
            hook.remove()


def step_functions(sae, sync: Sync, matryoshka: tuple) -> tuple:
    """(variance, loss_fn, hooks) for run_training's steps: the batch's total variance, over every process's
    slice under data parallel; the reconstruction term, or Matryoshka's; and the hooks that sum each gradient
    over the processes as backward makes it (to remove at the end)."""
    variance = total_variance if sync is None else partial(synced_variance, sync=sync)
    loss_fn = reconstruction_loss
    if matryoshka:
        prefixes = matryoshka_prefixes(matryoshka, sae.F, sae.latents_per_head)
        loss_fn = partial(matryoshka_loss, prefixes=prefixes)
    hooks = []
    if sync is not None:
        hooks = [
            p.register_post_accumulate_grad_hook(partial(sum_grad_, sync=sync))
            for p in sae.parameters()
        ]
    return variance, loss_fn, hooks


def rank0_value(value: float, sync: Sync, rank: int, device) -> float:
    """Rank 0's `value` in every process (a sum to which the others add 0); `value` itself for one process."""
    if sync is None:
        return value
    mine = value if rank == 0 else 0.0
    return float(sync(torch.tensor(mine, dtype=wide_dtype(device), device=device)))


def autocast_if(enabled: bool, device: torch.device):
    """bfloat16 autocast when enabled, else no context at all (older torch refuses autocast on MPS)."""
    return (
        torch.autocast(device.type, torch.bfloat16)
        if enabled
        else contextlib.nullcontext()
    )


def sum_grad_(p: torch.Tensor, sync):
    p.grad.copy_(sync(p.grad))


def synced_variance(t: torch.Tensor, sync) -> torch.Tensor:
    """total_variance (section 4) of the whole batch, when each process holds a slice of it."""
    mean = sync(t.sum(0)) / sync(t.new_tensor(float(t.shape[0])))
    return sync((t - mean).pow(2).sum())


def checkpoint_or_stop(
    sae, state: RunState, done: bool, cfg: TrainConfig, saving: Saving, sync: Sync
):
    """After a step: a checkpoint when one is due (every save_every steps, and when `done`), and Interrupted
    when saving.stop(sae, state) asks for it before the end."""
    out = saving.out
    stopping = saving.stop is not None and not done and saving.stop(sae, state)
    if sync is not None:  # every process stops at the same step
        device = sae.W_dec.device
        flag = torch.tensor(float(stopping), dtype=wide_dtype(device), device=device)
        stopping = bool(sync(flag) > 0)
    due = saving.save_every and state.step % saving.save_every == 0
    if out and (stopping or done or due):
        try:
            save_run_state(out, sae, state, saving.batches, saving.scale)
        except WriteError as err:
            run = Path(out).parent
            raise WriteError(
                f"{err} at step {state.step}; the checkpoint before it in {out} is intact (if one "
                f"was written): free some space, then continue with: python kronsae.py --resume "
                f"{run}"
            ) from None
    if stopping:
        raise Interrupted(state.step, state.goal(cfg), out)


# ============================================================================= 12. The main job


@dataclass
class SAEConfig:
    """The SAEs' shape."""

    arch: str = opt("both", "which SAE to train: topk, kron or both")
    dict_size: int = opt(4096, "F, the number of latents (both SAEs)")
    h: int = opt(0, "KronSAE heads; 0 means dict_size // (m*n)", aliases=("--kron-h",))
    m: int = opt(
        2,
        "KronSAE composition base size per head (paper: start at 2)",
        aliases=("--kron-m",),
    )
    n: int = opt(
        8, "KronSAE composition extension size per head, m <= n", aliases=("--kron-n",)
    )
    k: int = opt(16, "active latents per token (TopK)")
    kernel: str = opt(
        "mand",
        "KronSAE composition kernel: mand (eq. 3), relu_product or product (section 5)",
    )
    matryoshka: tuple = opt(
        (),
        "Matryoshka prefix sizes, e.g. 256,512,1024 (F is always added); empty = plain loss",
        parse=comma_ints,
    )

    def __post_init__(self):
        if isinstance(self.matryoshka, str) or not all(
            isinstance(t, int) for t in self.matryoshka
        ):
            raise ValueError(
                f"matryoshka must be a sequence of integers, got {self.matryoshka!r}"
            )
        self.matryoshka = tuple(self.matryoshka)
        if self.arch not in (*ARCHS, "both"):
            names = ", ".join(ARCHS)
            raise ValueError(f"arch must be {names} or both, got {self.arch!r}")
        if self.h < 0:
            raise ValueError(f"h must be >= 0 (0 means derive it), got h={self.h}")
        group = self.m * self.n
        if self.h == 0 and group > 0 and self.dict_size % group:
            raise ValueError(
                f"dict_size must be a multiple of m*n to derive h: "
                f"F={self.dict_size}, m*n={group}"
            )

        # The SAE classes own the checks of their sizes and kernel: build each type
        # on the meta device (shapes only, no memory) to run them now.
        with torch.device("meta"):
            for arch in ARCHS.values():
                arch.build(self, 1)

    @property
    def heads(self) -> int:
        return self.h or self.dict_size // max(1, self.m * self.n)

    @property
    def archs(self) -> list[str]:
        return list(ARCHS) if self.arch == "both" else [self.arch]

    def build(self, arch: str, d_in: int) -> SparseAutoencoder:
        """A fresh SAE of type `arch` (its ARCHS entry) from these settings."""
        return ARCHS[arch].build(self, d_in)


MATCHES = ("tokens", "flops", "time")


@dataclass
class RunConfig:
    """The run itself: seed, device, outputs, resume."""

    seed: int = opt(0, "seed for data order, init and synthetic data")
    device: str = opt("auto", "auto, cpu, cuda or mps (auto: cuda, then mps, then cpu)")
    out: str = opt(
        "",
        "directory for checkpoints: OUT/topk, OUT/kron (safetensors + config.json, and the "
        "training log log.jsonl), OUT/run.json and the training curves OUT/curves.png",
    )
    json: str = opt(
        "", "write the final metrics of each SAE, and the settings, to this JSON file"
    )
    save_every: int = opt(
        0, "also checkpoint every this many steps (needs --out); 0 = only at the end"
    )
    log_every: int = opt(
        0,
        "with --out: write a line of OUT/ARCH/log.jsonl every this many steps (and at "
        "the last); 0 = auto, about 100 lines a run",
    )
    resume: str = opt(
        "",
        "continue the run saved in this --out directory, with its own settings, to its --steps",
    )
    overwrite: bool = opt(
        False,
        "replace a run already saved in --out (without it, such an --out is refused)",
    )
    precision: str = opt(
        "fp32",
        "fp32, or bf16: bfloat16 autocast for the encoder, decoder and losses, with float32 "
        "weights and AdamW state (sparsify's default on CUDA); faster only where bfloat16 "
        "matmuls are (GPUs; CPUs with AVX512-BF16 or AMX)",
    )
    match: str = opt(
        "tokens",
        "what the SAEs are compared at: tokens (every SAE trains --steps steps), flops (each "
        "gets the training FLOPs, eq. 7 per token, that TopK spends in --steps, as in the "
        "paper's section 4.1) or time (each trains until its steps have used the seconds TopK's "
        "--steps took in this run, its warmup and decay spread over those seconds; needs TopK in the run)",
    )

    def __post_init__(self):
        check_choice("device", self.device, DEVICES)
        check_choice("match", self.match, MATCHES)
        check_choice("precision", self.precision, PRECISIONS)
        check_seed(self.seed)
        if self.save_every < 0 or self.log_every < 0:
            raise ValueError(
                f"--save-every and --log-every must be >= 0, got {self.save_every} and "
                f"{self.log_every}"
            )
        if self.save_every and not (self.out or self.resume):
            raise ValueError("--save-every needs --out DIR to write its checkpoints to")
        if self.log_every and not (self.out or self.resume):
            raise ValueError(
                "--log-every needs --out DIR to write OUT/ARCH/log.jsonl to"
            )


# RunConfig's fields about checkpoints, which the commands that write none refuse
CHECKPOINT_FIELDS = ("out", "resume", "save_every", "overwrite", "log_every")


def holds_run(directory: str) -> bool:
    return Path(directory, "run.json").exists() or any(
        Path(directory, arch, name).exists()
        for arch in ARCHS
        for name in ("sae.safetensors", "train_state.pt")
    )


@dataclass
class Settings:
    """Everything a run is made of, one config per concern; the CLI composes it from the flags."""

    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):  # checks that need two configs
        if self.sae.matryoshka:
            for arch in self.sae.archs:
                matryoshka_prefixes(
                    list(self.sae.matryoshka),
                    self.sae.dict_size,
                    ARCHS[arch].latents_per_head(self.sae),
                )

    def check_environment(self, dist: Optional[Dist] = None):
        """Everything that needs the file system or the machine, before any data or model is built:
        inputs readable, outputs writable, --out not already holding a run, the device present."""
        if dist and dist.world > 1 and self.data.model:
            raise ValueError(
                "under torchrun every process would harvest the model: run `kronsae.py harvest` "
                "once, then torchrun on --data STORE"
            )
        self.data.check_inputs()
        check_device(self.run.device)
        for flag, path in (
            ("json", self.run.json),
            ("save-acts", self.data.save_acts),
            ("norm-figure", self.data.norm_figure),
        ):
            if path:
                check_writable(
                    path,
                    flag,
                    directory=flag == "save-acts" and not path.endswith(".pt"),
                )
        if self.data.save_acts and not self.data.save_acts.endswith(".pt"):
            check_store_out(self.data.save_acts, self.run.overwrite)
        if self.run.out:
            check_writable(self.run.out, "out", directory=True)
            if holds_run(self.run.out) and not (self.run.overwrite or self.run.resume):
                raise ValueError(
                    f"--out {self.run.out} already holds a run; pass --resume {self.run.out} to "
                    f"continue it, or --overwrite to replace it"
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Settings:
        return cls(
            SAEConfig(**d["sae"]),
            TrainConfig(**d["train"]),
            DataConfig(**d["data"]),
            RunConfig(**d["run"]),
        )


def resume_settings(directory: str) -> Settings:
    """The settings of the run saved in `directory` (its run.json), set up to continue it there."""
    path = Path(directory, "run.json")
    if not path.is_file():
        raise ValueError(
            f"--resume {directory}: no run to resume there ({path} is missing)"
        )
    try:
        s = Settings.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"--resume {directory}: {path} is not a run's settings ({err})"
        ) from None
    return dataclasses.replace(
        s,
        run=dataclasses.replace(
            s.run, out=str(directory), resume=str(directory), overwrite=False
        ),
    )


class TrainData(NamedTuple):
    """The training rows, as ShuffledBatches takes them: an (N, d) tensor, or a store's shards as Rows."""

    rows: object
    d: int
    tokens: int
    scale: float  # sqrt(d) / mean norm: the --normalize scale

    @classmethod
    def of(cls, x: torch.Tensor) -> TrainData:
        return cls(x, x.shape[1], x.shape[0], input_scale(x))


def file_or_synthetic_data(s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) rows from --data, or synthetic block-correlated data when no file is given."""
    n = s.train.steps * s.train.batch // 4 + s.data.eval_tokens
    data = load_data(s.data.data) if s.data.data else make_dataset(n, seed=s.run.seed)
    return split_data(data, s.data.eval_tokens, s.run.seed)


def prepared_data(
    s: Settings, device
) -> tuple[TrainData, torch.Tensor, Optional[dict], dict]:
    """(training data, held-out rows, what lm_cost needs or None, the data report for the JSON), with massive
    activations filtered out of every source alike. A store is memory-mapped, never loaded whole."""
    lm, source = None, s.data.data or "synthetic block-correlated"
    if s.data.model:
        train, held_out, lm = lm_data(s.data, s.run.seed, device)
        report, train = lm.pop("report"), TrainData.of(train)
        source = f"{s.data.model} hidden_states[{s.data.layer}]"
    elif s.data.data and Path(s.data.data).is_dir():
        store = ActivationStore(s.data.data)
        rows, held_out, report, scale = store.split(
            s.data.eval_tokens, s.run.seed, s.data.max_norm_ratio
        )
        train = TrainData(rows, store.d, sum(r.count for r in rows), scale)
        report["store"] = {k: v for k, v in store.manifest.items() if k != "shards"}
        print_filter_report(report)
    else:
        train, held_out = file_or_synthetic_data(s)
        train, held_out, report = filter_massive(
            train,
            held_out,
            s.data.max_norm_ratio,
            s.data.norm_figure,
            Path(s.data.data).name if s.data.data else "synthetic",
        )
        train = TrainData.of(train)
    report = {
        "source": source,
        **report,
        "input_scale": train.scale if s.data.normalize else None,
    }
    print(
        f"data: {train.tokens} training rows of width {train.d} ({source}), "
        f"{held_out.shape[0]} held out, device {device}"
    )
    return train, held_out, lm, report


def run_one(
    arch: str,
    train_data: TrainData,
    eval_data,
    s: Settings,
    device,
    *,
    progress=True,
    stop: Optional[Callable[[SparseAutoencoder, RunState], bool]] = None,
    dist: Dist = Dist(),
    budget: Optional[Budget] = None,
    provenance: Optional[dict] = None,
) -> tuple[SparseAutoencoder, dict, RunState]:
    """Build, train (or resume, with --resume) and evaluate one SAE for its `budget` (default: --steps steps; see
    matched_budget); returns it, its metrics and its record. Every checkpoint's config.json carries
    `provenance` (checkpoint_provenance). Data parallel: each process trains on its slice of every batch,
    and rank 0 alone writes checkpoints and the training log."""
    budget = budget or Budget(s.train.steps)
    s = dataclasses.replace(s, train=dataclasses.replace(s.train, steps=budget.steps))
    set_seed(s.run.seed)
    out = str(Path(s.run.out, arch)) if s.run.out else ""
    check_resumed_weights(s, arch, train_data.d, out)
    sae = s.sae.build(arch, train_data.d).to(device)
    if isinstance(train_data.rows, torch.Tensor):
        check_data(train_data.rows, sae.d_in)
    batches = ShuffledBatches(
        train_data.rows,
        s.train.batch,
        torch.Generator().manual_seed(s.run.seed),
        s.data.buffer_tokens,
        dist.rank,
        dist.world,
        pin=device.type == "cuda",
    )
    scale = train_data.scale if s.data.normalize else 1.0
    state, scale = starting_state(arch, sae, s, batches, budget, out, scale)
    if provenance is not None:
        state.provenance = provenance
    result = run_training(
        sae,
        batches,
        s.train,
        scale,
        out if dist.rank == 0 else "",
        s.run.save_every,
        progress and dist.rank == 0,
        stop,
        state,
        dist.sync,
        s.sae.matryoshka,
        s.run.precision,
        log_every=s.run.log_every,
        budget=budget.seconds,
        rank=dist.rank,
    )
    metrics = run_metrics(arch, sae, result, s, train_data, eval_data, device)
    return sae, metrics, result


def starting_state(arch, sae, s: Settings, batches, budget: Budget, out: str, scale):
    """(the RunState a run starts from, the input scale): the saved ones with --resume when
    OUT/ARCH holds a checkpoint, else a fresh state and `scale`."""
    if not (s.run.resume and Path(out, "train_state.pt").exists()):
        return RunState.fresh(sae, s.train, budget.seconds), scale
    state, scale = load_run_state(out, sae, s.train, batches, budget.seconds)
    print(f"{arch}: resuming at step {state.step} of {state.goal(s.train)} from {out}")
    return state, scale


def run_metrics(
    arch, sae, result: RunState, s: Settings, train_data, eval_data, device
):
    """The held-out metrics of a trained SAE, the same EV on training rows (a warning
    when the two disagree), and what the run was: shape, the steps and tokens it
    trained, their seconds (and the budget of seconds it was given, under --match time)."""
    metrics = evaluate(sae, eval_data)
    # Fixed training rows, as many as the held-out ones.
    sample = next(
        ShuffledBatches(
            train_data.rows,
            eval_data.shape[0],
            torch.Generator().manual_seed(s.run.seed),
            s.data.buffer_tokens,
        )
    )
    metrics["ev_train"] = evaluate(sae, sample)["ev"]
    if abs(metrics["ev_train"] - metrics["ev"]) > 0.05:
        print(
            f"warning: {arch}: EV on training rows ({metrics['ev_train']:.3f}) and held out ({metrics['ev']:.3f}) "
            f"differ by more than 0.05; look at the data before trusting either",
            file=sys.stderr,
        )
    steps = result.step
    tokens = steps * s.train.batch
    metrics.update(
        sae_config(sae),
        dict_size=sae.F,
        flops_per_token=sae.flops_per_token(),
        encoder_flops_per_token=sae.W_enc.shape[0] * sae.d_in,
        params=num_params(sae),
        ms_per_step=1000 * result.seconds / steps,
        train_seconds=result.seconds,
        final_train_loss=result.losses[-1],
        steps=steps,
        batch=s.train.batch,
        device=str(device),
        tokens=tokens,
        seconds=result.seconds,
        seconds_budget=result.budget,
        match=s.run.match,
        train_flops=tokens * sae.flops_per_token(),
    )
    return metrics


def check_resumed_weights(s: Settings, arch: str, d: int, out: str):
    """--resume: run.json's SAE against the weights saved in OUT/arch, before an SAE of the size it claims
    is allocated."""
    if not s.run.resume or not Path(out, "sae.safetensors").is_file():
        return
    planned = planned_sae(lambda: s.sae.build(arch, d))
    header = weights_header(Path(out, "sae.safetensors"))
    check_weights(planned, header, f"--resume {s.run.resume}: {out}", "run.json")


class Budget(NamedTuple):
    """What one SAE trains for: `steps` steps, or, when `seconds` is set (--match time), until its steps have
    used that many seconds; `steps` is then TopK's --steps, which sets AuxK's automatic dead-latent threshold
    (--dead-tokens 0) and the first step's expected share of the schedule."""

    steps: int
    seconds: Optional[float] = None


def matched_budget(
    s: Settings,
    arch: str,
    d_in: int,
    topk_seconds: Optional[float] = None,
    dist: Dist = Dist(),
) -> Budget:
    """What `arch` trains for under --match. tokens: --steps. flops: the training FLOPs TopK spends in --steps,
    counted by eq. 7 per token as the paper counts them (section 4.1), so a cheaper encoder sees more tokens.
    time: `topk_seconds`, the seconds TopK's --steps took in this run, on the clock (section 11's budget), so
    that each SAE trains as long as TopK did whatever its steps cost as it trains. A resumed run keeps what it
    was first given (OUT/arch/match.json), so that its schedule keeps its length; a record that holds steps
    alone (--match time before the clock) resumes as those steps."""
    if s.run.match == "tokens" or arch == BASELINE:
        return Budget(s.train.steps)
    record = Path(s.run.out, arch, "match.json") if s.run.out else None
    if s.run.resume and record and record.is_file():
        saved = json.loads(record.read_text())
        if "seconds" in saved:
            return Budget(saved["topk_steps"], saved["seconds"])
        return Budget(saved["steps"])
    if s.run.match == "flops":
        with torch.device("meta"):  # shapes only, no memory
            topk, sae = s.sae.build(BASELINE, d_in), s.sae.build(arch, d_in)
        steps = s.train.steps * topk.flops_per_token() / sae.flops_per_token()
        budget = Budget(max(1, round(steps)))
        saved = {"match": "flops", "steps": budget.steps}
    else:
        budget = Budget(s.train.steps, topk_seconds)
        saved = {"match": "time", "seconds": topk_seconds}
    if record and dist.rank == 0:
        write_json(record, saved | {"topk_steps": s.train.steps})
    return budget


def check_time_match(s: Settings):
    """--match time needs TopK's seconds: TopK in the same run, or a resumed run that recorded the budget."""
    if s.run.match != "time" or BASELINE in s.sae.archs:
        return
    for arch in s.sae.archs:
        record = Path(s.run.out, arch, "match.json")
        if not (s.run.resume and record.is_file()):
            raise ValueError(
                f"--match time gives each SAE the seconds TopK's --steps take in the same run, and "
                f"--arch {s.sae.arch} trains no TopK: use --arch both"
            )


def provenance(s: Settings, device, seconds: float, world_size: int = 1) -> dict:
    """How a result was made: every setting, the torch version, the device, the world size, the time."""
    return {
        **s.to_dict(),
        "torch": torch.__version__,
        "device": str(device),
        "world_size": world_size,
        "seconds": seconds,
        "command": " ".join(sys.argv),
    }


RUN_FILES = (
    "train_state.pt",
    "sae.safetensors",
    "config.json",
    "match.json",
    "metrics.json",
    "log.jsonl",
)


def checkpoint_provenance(s: Settings, report: dict) -> dict:
    """Where a run's checkpoints come from, for their config.json, as SAELens and sparsify keep it in
    theirs: the model and layer with the layer's SAELens and sparsify names (layer_hooks), the context
    length and BOS, the data, the normalisation and the dtype. `report` is prepared_data's: its "store"
    (the manifest) or "harvest" (a --model run's record of the same) says how the activations were made;
    a tensor file or synthetic data has neither, and names no model. save_run_state adds the steps and
    tokens trained."""
    h = report.get("store") or report.get("harvest") or {}
    model = s.data.model or h.get("model") or None
    layer = s.data.layer if s.data.model else h.get("layer")
    hooks = h.get("hooks")
    if hooks is None and layer is not None:
        hooks = layer_hooks(
            layer, None, None
        )  # a store from before stores kept the names
    texts = [t["path"] for t in h.get("text", [])] or list(s.data.text)
    if s.data.model:
        data = {"kind": "text", "files": texts}
    elif s.data.data and Path(s.data.data).is_dir():
        data = {
            "kind": "store",
            "path": str(Path(s.data.data).absolute()),
            "files": texts,
        }
    elif s.data.data:
        data = {"kind": "tensor file", "path": str(Path(s.data.data).absolute())}
    else:
        data = {"kind": "synthetic", "seed": s.run.seed}
    return {
        "model": model,
        "layer": layer,
        "hook_names": hooks or {"saelens": None, "sparsify": None},
        "context_size": s.data.ctx if s.data.model else h.get("ctx"),
        "prepend_bos": h["bos"] != "none" if "bos" in h else None,
        "position_0": h.get("position_0"),
        "data": data,
        "normalisation": {
            "normalize": s.data.normalize,
            "input_scale": report.get("input_scale"),
            "folded": "the weights are for raw activations: --normalize is folded in",
            "max_norm_ratio": s.data.max_norm_ratio,
        },
        "dtype": "float32",
        "precision": s.run.precision,
        "activation_dtype": h.get("dtype", "float32"),
    }


def compare(
    s: Settings, stop: Optional[Callable[[SparseAutoencoder, RunState], bool]] = None
) -> dict:
    """Train TopK and/or KronSAE on the same data and print them side by side. Ctrl-C (or stop(sae, state)
    turning true) ends the run after the current step with a checkpoint in --out (see Interrupted)."""
    dist, device = init_distributed(s.run.device)
    s.check_environment(dist)
    check_time_match(s)
    if dist.world > 1:
        torch.distributed.barrier()  # every rank has checked --out before rank 0 writes to it
    start = time.perf_counter()
    if s.run.out and not s.run.resume and dist.rank == 0:
        # --overwrite: nothing stale from the old run
        for arch, name in itertools.product(ARCHS, RUN_FILES):
            Path(s.run.out, arch, name).unlink(missing_ok=True)
        Path(s.run.out, "curves.png").unlink(missing_ok=True)
        write_json(Path(s.run.out, "run.json"), s.to_dict())
    set_seed(s.run.seed)
    train_data, eval_data, lm, data_report = prepared_data(s, device)
    about = checkpoint_provenance(s, data_report)
    sigint_stop, restore = finish_step_on_sigint()

    def stopping(*args):
        return sigint_stop(*args) or (stop is not None and stop(*args))

    results = {}
    topk_seconds = None  # the budget of --match time, once TopK has trained
    try:
        for arch in s.sae.archs:
            budget = matched_budget(s, arch, train_data.d, topk_seconds, dist)
            sae, results[arch], state = run_one(
                arch,
                train_data,
                eval_data,
                s,
                device,
                stop=stopping,
                dist=dist,
                budget=budget,
                provenance=about,
            )
            if arch == BASELINE:
                topk_seconds = state.seconds
            if lm and lm["splice"]:
                results[arch].update(lm_costs(sae, lm, s))
            # beside the checkpoint, for the commands that read it later
            if s.run.out and dist.rank == 0:
                write_json(Path(s.run.out, arch, "metrics.json"), results[arch])
    finally:
        restore()
    if s.run.out and dist.rank == 0:
        save_run_curves(s.run.out, s.sae.archs)

    print_comparison(results, s)
    if s.run.json and dist.rank == 0:
        seconds = time.perf_counter() - start
        config = provenance(s, device, seconds, dist.world)
        write_json(s.run.json, {**results, "data": data_report, "config": config})
    return results


def lm_costs(sae, lm: dict, s: Settings) -> dict:
    """The model's CE clean, with the SAE spliced in and zero-ablated."""
    return lm_cost(
        sae,
        lm["model"],
        lm["contexts"],
        lm["mask"],
        s.data.layer,
        s.data.model_batch,
        lm["max_norm"],
    )


def print_comparison(results: dict, s: Settings):
    print(results_table(list(results.values())))
    for arch, r in results.items():
        if "ce_clean" in r:
            recovered = r.get("loss_recovered_reason") or f"{r['loss_recovered']:.4f}"
            print(
                f"{arch}: CE clean {r['ce_clean']:.4f}, with the SAE spliced in "
                f"{r['ce_sae']:.4f}, zero-ablated {r['ce_zero']:.4f}; "
                f"loss recovered {recovered}"
            )
    if s.run.out:
        checkpoints = ", ".join(str(Path(s.run.out, a)) for a in s.sae.archs)
        print(f"checkpoints: {checkpoints}")
        print(
            f"training curves: {Path(s.run.out, 'curves.png')} (logs: OUT/ARCH/log.jsonl)"
        )


# ============================================================================= 13. The kernel ablation
# The paper's ablations, as one sweep. Kernels (section 5, table 1): the same KronSAE with mAND, ReLU(u)ReLU(v) or
# u v. Shapes (fig. 2, appendix A.8): TopK and KronSAEs of several (m, n) at one F and k. Budgets (figs. 1, 3, 9):
# TopK step counts, each SAE matched to them by --match (tokens, flops or time). Every cell runs over several
# seeds (init and batch order; the held-out split stays that of --seed).


# The settings ablate does not take, and why: the CLI refuses their flags (and leaves them out of
# --help); check_ablation refuses them in Settings given from Python.
ABLATE_REFUSES = {
    **dict.fromkeys(CHECKPOINT_FIELDS, "ablate writes no checkpoints"),
    "arch": "ablate trains KronSAEs only",
    "kernel": "ablate takes its kernels from --kernels",
}


def check_ablation(s: Settings, shapes: tuple = ()):
    if s.run.out or s.run.resume or s.run.save_every:
        raise ValueError(
            f"{ABLATE_REFUSES['out']}; drop --out, --resume and --save-every"
        )
    if s.sae.arch == BASELINE:
        raise ValueError(f"{ABLATE_REFUSES['arch']}; drop --arch {BASELINE}")
    if s.sae.kernel != "mand":
        raise ValueError(f"{ABLATE_REFUSES['kernel']}; drop --kernel")
    if s.run.match == "time" and shapes and BASELINE not in shapes:
        raise ValueError(
            f"--match time gives each KronSAE the seconds of the {BASELINE} cell of its budget "
            f"and seed: add {BASELINE} to --shapes"
        )
    for shape in shapes:
        if shape != BASELINE and s.sae.dict_size % (shape[0] * shape[1]):
            raise ValueError(
                f"--shapes {shape_text(shape)}: F={s.sae.dict_size} is not a multiple of m*n"
            )


def shape_names(text: str) -> tuple:
    """'topk,2x4,8x8' -> ('topk', (2, 4), (8, 8)): the baseline and KronSAE shapes."""
    parts = comma_parts(text)
    shapes = tuple(part if part == BASELINE else mn_shape(part) for part in parts)
    if not shapes or None in shapes:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated shapes such as topk,2x4,8x8, got {text!r}"
        )
    return shapes


def kernel_names(text: str) -> tuple:
    names = comma_parts(text)
    unknown = [t for t in names if t not in KERNELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated kernels from {', '.join(KERNELS)}, got {text!r}"
        )
    return tuple(names)


@dataclass
class AblationConfig:
    """What `ablate` sweeps: the SAEs, their kernels, the budgets and the seeds."""

    shapes: tuple = opt(
        (),
        "comma-separated SAEs: topk and KronSAE shapes MxN at --dict-size, e.g. "
        "topk,2x4,4x4,8x8; empty = --m x --n",
        parse=shape_names,
    )
    kernels: tuple = opt(tuple(KERNELS), "comma-separated kernels", parse=kernel_names)
    budgets: tuple = opt(
        (),
        "comma-separated TopK step counts, e.g. 250,500,1000; --match gives the other "
        "SAEs theirs; empty = --steps",
        parse=comma_ints,
    )
    seeds: int = opt(3, "seeds per cell, from --seed on")
    figure: str = opt(
        "",
        "PNG of EV against training FLOPs and against seconds, one line per shape "
        "('' = none)",
    )

    def __post_init__(self):
        check_seeds(self.seeds)
        if self.budgets and min(self.budgets) < 1:
            raise ValueError(
                f"--budgets must be positive step counts, got {self.budgets}"
            )


def shape_text(shape) -> str:
    """BASELINE, or a KronSAE shape (m, n) as 'MxN'."""
    return shape if shape == BASELINE else f"{shape[0]}x{shape[1]}"


def shape_label(shape, kernel: str, kernels: list[str]) -> str:
    if shape == BASELINE or len(kernels) == 1:
        return shape_text(shape)
    return f"{shape_text(shape)} {kernel}"


def ablation_cells(shapes: list, kernels: list[str]) -> list[tuple]:
    """(shape, kernel) of every cell: TopK once, each KronSAE shape with each kernel."""
    cells = []
    for shape in shapes:
        if shape == BASELINE:
            cells.append((shape, "-"))
        else:
            cells += [(shape, kernel) for kernel in kernels]
    return cells


def cell_settings(s: Settings, shape, kernel: str, budget: int, seed: int) -> tuple:
    """The architecture and the Settings of one run of the ablation."""
    if shape == BASELINE:
        sae = dataclasses.replace(s.sae, arch=BASELINE, h=0)
    else:
        m, n = shape
        sae = dataclasses.replace(s.sae, arch=KRON.name, m=m, n=n, h=0, kernel=kernel)
    one = dataclasses.replace(
        s,
        sae=sae,
        train=dataclasses.replace(s.train, steps=budget),
        run=dataclasses.replace(s.run, seed=seed),
    )
    return sae.arch, one


ABLATION_METRICS = (
    "steps",
    "tokens",
    "train_flops",
    "seconds",
    "ev",
    "ev_train",
    "l0",
    "dead_fraction",
)


def ablation_run(
    s, cell, budget, seed, kernels, data, device, stop, topk_seconds=None
) -> dict:
    """Train and evaluate one cell at one budget and seed: a row of the JSON. `topk_seconds`: what the TopK cell
    of this budget and seed used, each KronSAE's budget under --match time."""
    shape, kernel = cell
    arch, one = cell_settings(s, shape, kernel, budget, seed)
    print(
        f"{shape_label(shape, kernel, kernels)}, budget {budget} TopK steps, seed {seed}"
    )
    train_data, eval_data = data
    matched = matched_budget(one, arch, train_data.d, topk_seconds)
    _, metrics, _ = run_one(
        arch, train_data, eval_data, one, device, stop=stop, budget=matched
    )
    row = {"shape": shape_text(shape), "kernel": kernel, "budget": budget, "seed": seed}
    return row | {key: metrics[key] for key in ABLATION_METRICS}


def ablation_round(s, cells, budget, seed, kernels, data, device, stop) -> list[dict]:
    """Every cell at one budget and seed, TopK's first: under --match time its seconds are the others' budget."""
    rows = []
    topk_seconds = None
    for cell in cells:
        rows.append(
            ablation_run(
                s, cell, budget, seed, kernels, data, device, stop, topk_seconds
            )
        )
        if cell[0] == BASELINE:
            topk_seconds = rows[-1]["seconds"]
    return rows


def ablate(
    s: Settings,
    kernels: list[str],
    seeds: int,
    shapes: Optional[list] = None,
    budgets: Optional[list[int]] = None,
    figure: str = "",
) -> dict:
    """Train every shape (TopK, or KronSAE (m, n) with each kernel) at every budget (TopK steps; --match sets the
    others') over `seeds` seeds, and compare held-out EV, mean ± std per cell. Returns the JSON's content:
    every run, the cells, and `kernels` (the first KronSAE shape at the first budget, as the kernel ablation
    has always reported it)."""
    shapes = shapes or [(s.sae.m, s.sae.n)]
    budgets = budgets or [s.train.steps]
    check_ablation(s, shapes)
    if figure:
        check_writable(figure, "figure")
    s.check_environment()
    start = time.perf_counter()
    device = pick_device(s.run.device)
    set_seed(s.run.seed)
    train_data, eval_data, _, data_report = prepared_data(s, device)
    # TopK first: it sets the others' budgets.
    shapes = sorted(shapes, key=lambda shape: shape != BASELINE)
    seeds_run = range(s.run.seed, s.run.seed + seeds)
    sigint_stop, restore = finish_step_on_sigint()
    cells = ablation_cells(shapes, kernels)
    data = (train_data, eval_data)
    runs = []
    try:
        for budget, seed in itertools.product(budgets, seeds_run):
            runs += ablation_round(
                s, cells, budget, seed, kernels, data, device, sigint_stop
            )
    finally:
        restore()
    result = ablation_summary(runs, s, kernels, shapes, budgets)
    print_ablation(result, s, seeds)
    if figure:
        save_ablation_figure(result, figure, s)
    if s.run.json:
        config = provenance(s, device, time.perf_counter() - start) | {
            "kernels": kernels,
            "seeds": seeds,
            "shapes": [shape_text(shape) for shape in shapes],
            "budgets": budgets,
        }
        write_json(s.run.json, {**result, "data": data_report, "config": config})
    return result


def ablation_summary(
    runs: list[dict], s: Settings, kernels: list[str], shapes: list, budgets: list[int]
) -> dict:
    """The cells: for each shape, kernel and budget, mean ± std over seeds of EV, and the means of steps, tokens,
    training FLOPs and seconds. `kernels`: today's kernel-ablation keys for the first KronSAE shape."""
    cells = []
    keyed = {}
    for r in runs:
        keyed.setdefault((r["shape"], r["kernel"], r["budget"]), []).append(r)
    for (shape, kernel, budget), group in keyed.items():
        ev = mean_std([r["ev"] for r in group])
        cells.append(
            {
                "shape": shape,
                "kernel": kernel,
                "budget": budget,
                "ev_mean": ev["mean"],
                "ev_std": ev["std"],
                "evs": [r["ev"] for r in group],
                **{
                    key: mean_std([r[key] for r in group])["mean"]
                    for key in ("steps", "tokens", "train_flops", "seconds")
                },
            }
        )
    first = next((shape_text(sh) for sh in shapes if sh != BASELINE), None)
    legacy = {
        c["kernel"]: {"ev_mean": c["ev_mean"], "ev_std": c["ev_std"], "evs": c["evs"]}
        for c in cells
        if c["shape"] == first and c["budget"] == budgets[0]
    }
    return {"kernels": legacy, "cells": cells, "runs": runs, "match": s.run.match}


def print_ablation(result: dict, s: Settings, seeds: int):
    print(
        f"\nF={s.sae.dict_size}, k={s.sae.k}, --match {s.run.match}: held-out EV over {seeds} seed(s), mean ± std; "
        f"steps, tokens, training FLOPs (eq. 7 per token) and seconds are means over the seeds"
    )
    print(
        format_table(
            [
                "budget",
                "SAE",
                "kernel",
                "steps",
                "tokens",
                "train GFLOPs",
                "seconds",
                "EV mean ± std",
                "per seed",
            ],
            [
                [
                    c["budget"],
                    c["shape"],
                    c["kernel"],
                    f"{c['steps']:.0f}",
                    f"{c['tokens']:,.0f}",
                    f"{c['train_flops'] / 1e9:,.1f}",
                    f"{c['seconds']:.1f}",
                    f"{c['ev_mean']:.4f} ± {c['ev_std']:.4f}",
                    " ".join(f"{ev:.4f}" for ev in c["evs"]),
                ]
                for c in result["cells"]
            ],
        )
    )


def save_ablation_figure(result: dict, path: str, s: Settings):
    """EV against training FLOPs and against seconds, one line per shape (and kernel), error bars ± std."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lines = {}
    for c in result["cells"]:
        lines.setdefault(
            c["shape"] + ("" if c["kernel"] in ("-", "mand") else f" {c['kernel']}"), []
        ).append(c)
    for ax, key, label in (
        (axes[0], "train_flops", "training FLOPs (eq. 7 per token x tokens)"),
        (axes[1], "seconds", "training seconds"),
    ):
        for name, cells in lines.items():
            cells = sorted(cells, key=lambda c: c["budget"])
            ax.errorbar(
                [c[key] for c in cells],
                [c["ev_mean"] for c in cells],
                [c["ev_std"] for c in cells],
                marker="o",
                capsize=3,
                label=name,
                color="black" if name == BASELINE else None,
            )
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out EV")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"F={s.sae.dict_size}, k={s.sae.k}, budgets matched by {result['match']}"
    )
    fig.tight_layout()
    save_figure(fig, path)


# ============================================================================= 14. Progressive coding
# Peter and Soegaard 2025, "Empirical Evaluation of Progressive Coding for Sparse Autoencoders", arXiv 2505.00190,
# compare Matryoshka SAEs with plain SAEs pruned by latent importance.

# Matryoshka SAEs (Bussmann et al. 2025, arXiv 2503.17547): the reconstruction loss summed over nested prefixes of
# the dictionary, so that early latents learn to reconstruct alone. KronSAE + Matryoshka (paper A.1): the same
# loss, with prefixes of whole heads.


def matryoshka_prefixes(sizes, F: int, multiple: int = 1) -> list[int]:
    """Check nested prefix sizes: strictly increasing, in (0, F], multiples of `multiple` (m*n for KronSAE,
    so that no head straddles two groups). F is appended when missing."""
    sizes = list(sizes)
    if (
        not sizes
        or any(b <= a for a, b in zip(sizes, sizes[1:]))
        or sizes[0] <= 0
        or sizes[-1] > F
    ):
        raise ValueError(
            f"Matryoshka prefixes must be strictly increasing sizes in (0, F={F}], got {sizes}"
        )
    bad = [g for g in sizes if g % multiple]
    if bad:
        raise ValueError(
            f"KronSAE Matryoshka prefixes must be multiples of m*n={multiple} so that no head "
            f"straddles two groups, got {bad}"
        )
    return sizes if sizes[-1] == F else sizes + [F]


def matryoshka_loss(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    enc: Encoding,
    variance: Optional[torch.Tensor] = None,
    prefixes=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, x_hat) as reconstruction_loss (section 4) returns them: the sum over prefixes M (checked by
    matryoshka_prefixes) of normalized_mse(x, x_hat of latents < M), and the whole x_hat."""
    # One sparse decode for all prefixes: bag (g, b) sums token b's latents in group g = [M_g-1, M_g);
    # a cumulative sum over groups gives every prefix. One decoder gradient instead of one per prefix.
    ends = torch.as_tensor(prefixes, device=x.device)
    G, (B, k) = len(ends), enc.indices.shape
    group = torch.bucketize(enc.indices, ends, right=True)  # (B, k)
    in_group = group == torch.arange(G, device=x.device)[:, None, None]  # (G, B, k)
    parts = sae.sparse_decode(
        (enc.values * in_group).view(G * B, k), enc.indices.repeat(G, 1)
    )
    x_hats = parts.view(G, B, -1).cumsum(0) + sae.b_dec  # (G, B, d)
    return sum(normalized_mse(x, x_hat, variance) for x_hat in x_hats), x_hats[-1]


@torch.no_grad()
def latent_stats(
    sae: SparseAutoencoder, data: torch.Tensor, batch: int = 4096
) -> tuple[torch.Tensor, ...]:
    """Per latent, over `data`: importance E[a^2] and firing frequency, (F,) each: LatentStats over held-out data."""
    stats = LatentStats(sae.F, sae.W_dec.device)
    for x in data.split(batch):
        stats.update(*sae.encode(x.to(sae.W_dec.device)))
    return stats.importance, stats.frequency


def fit_power_law(importance: torch.Tensor) -> tuple[float, float]:
    """Least squares in log-log of importance against rank: importance ~ C * rank^-alpha.
    Returns (alpha, R^2), over the latents with non-zero importance."""
    y = importance[importance > 0].double().sort(descending=True).values.log()
    if y.numel() < 3:
        raise ValueError(
            f"need at least 3 latents with non-zero importance to fit, got {y.numel()}"
        )
    x = torch.arange(1, y.numel() + 1, dtype=torch.float64).log()
    slope, intercept = torch.linalg.lstsq(
        torch.stack([x, torch.ones_like(x)], 1), y[:, None]
    ).solution.flatten()
    residual = y - (slope * x + intercept)
    return float(-slope), float(1 - residual.pow(2).sum() / (y - y.mean()).pow(2).sum())


def rank_latents(sae: SparseAutoencoder, score: torch.Tensor) -> torch.Tensor:
    """Latent order, best first, by `score` (F,), in whole groups (KronSAE: heads) ranked by their summed score."""
    heads = score.view(-1, sae.latents_per_head).sum(-1).argsort(descending=True)
    return (
        heads[:, None] * sae.latents_per_head + torch.arange(sae.latents_per_head)
    ).flatten()


def prune(sae: SparseAutoencoder, keep: torch.Tensor) -> SparseAutoencoder:
    """A smaller SAE of the same class that keeps latents `keep` (in that order) and drops the rest.
    It selects its top k among the kept latents only. For KronSAE `keep` must be whole heads."""
    keep, size = torch.as_tensor(keep, dtype=torch.long).cpu(), sae.latents_per_head
    heads = keep.view(-1, size)[:, 0] // size if keep.numel() % size == 0 else None
    if heads is None or not torch.equal(
        keep, (heads[:, None] * size + torch.arange(size)).flatten()
    ):
        raise ValueError(
            f"pruning a KronSAE keeps whole heads: `keep` must list each kept head's "
            f"{size} latents in order, got {keep.numel()} latents"
        )
    rows = sae.W_enc.shape[0] * size // sae.F  # encoder rows per group: m+n, or 1
    enc_rows = (heads[:, None] * rows + torch.arange(rows)).flatten()
    shape = (
        {"h": heads.numel()}
        if arch_of(sae).prunes_heads
        else {"dict_size": keep.numel()}
    )
    small = build_sae({**sae_config(sae), "k": min(sae.k, keep.numel()), **shape})
    small, dev = (
        small.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype),
        sae.W_dec.device,
    )
    with torch.no_grad():
        small.W_enc.copy_(sae.W_enc[enc_rows.to(dev)])
        small.b_enc.copy_(sae.b_enc[enc_rows.to(dev)])
        small.W_dec.copy_(sae.W_dec[keep.to(dev)])
        small.b_dec.copy_(sae.b_dec)
    return small


@torch.no_grad()
def prefix_cut_fvu(
    sae: SparseAutoencoder, data: torch.Tensor, G: int, batch: int = 4096
) -> float:
    """FVU of prefix G as Matryoshka training scores it (reconstruction_loss): the top k over all F latents,
    of which only those among the first G decode. (prune instead re-picks the top k among the first G.)"""
    x_m, r_m = Moments(), Moments()
    for x in data.split(batch):
        x = x.to(sae.W_dec.device)
        values, indices = sae.encode(x)
        x_m.add(x)
        r_m.add(x - sae.decode(values * (indices < G), indices))
    return r_m.total_variance() / x_m.total_variance()


def progressive_curves(
    plain: SparseAutoencoder,
    matryoshka: SparseAutoencoder,
    eval_data: torch.Tensor,
    sizes: list[int],
) -> dict:
    """FVU on held-out data against the number of kept latents G: the Matryoshka SAE as trained (cut) and
    re-picking its top k among the first G, and the plain SAE pruned three ways (each re-picks its top k)."""
    importance, frequency = latent_stats(plain, eval_data)
    orders = {
        "matryoshka": (
            matryoshka,
            torch.arange(matryoshka.F),
        ),  # trained to be used in index order
        "pruned_importance": (plain, rank_latents(plain, importance)),
        "pruned_frequency": (plain, rank_latents(plain, frequency)),
        "unsorted_prefix": (plain, torch.arange(plain.F)),
    }
    curves = {
        "matryoshka_cut": [prefix_cut_fvu(matryoshka, eval_data, G) for G in sizes]
    }
    for name, (sae, order) in orders.items():
        curves[name] = [
            evaluate(prune(sae, order[:G]), eval_data)["fvu"] for G in sizes
        ]
    alpha, r2 = fit_power_law(importance)
    return {"G": sizes, "fvu": curves, "power_law_alpha": alpha, "power_law_r2": r2}


def paper_ordering(fvu: dict, matryoshka: str) -> bool:
    """The paper's ordering at every G < F: Matryoshka < pruned by E[a^2] < unsorted prefix."""
    return all(
        fvu[matryoshka][i] < fvu["pruned_importance"][i] < fvu["unsorted_prefix"][i]
        for i in range(len(fvu[matryoshka]) - 1)
    )


def save_progressive_figure(results: dict, path: str):
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(results), figsize=(6 * len(results), 4.2), squeeze=False
    )
    for ax, (arch, r) in zip(axes[0], results.items()):
        for name, fvu in r["fvu"].items():
            ax.errorbar(
                r["G"], fvu, yerr=r["fvu_std"][name], marker="o", capsize=3, label=name
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("kept latents G")
        ax.set_ylabel("held-out FVU")
        ax.set_title(
            f"{arch}: importance ~ rank^-{r['power_law_alpha']:.2f} (R^2 {r['power_law_r2']:.2f})"
        )
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def nested_settings(s: Settings) -> tuple[Settings, list[int]]:
    """s with Matryoshka prefixes G = F/16, F/8, F/4, F/2, F (validated by Settings), and those sizes."""
    if s.sae.matryoshka:
        raise ValueError(
            "progressive sets the Matryoshka prefixes itself (F/16 ... F); drop --matryoshka"
        )
    if s.run.out or s.run.resume or s.data.model:
        raise ValueError(
            "progressive trains on --data or synthetic data and writes no checkpoints; "
            "drop --out, --resume and --model"
        )
    if s.sae.dict_size % 16:
        raise ValueError(
            f"progressive needs F divisible by 16, got F={s.sae.dict_size}"
        )
    sizes = [s.sae.dict_size // 16 * i for i in (1, 2, 4, 8, 16)]
    return dataclasses.replace(
        s, sae=dataclasses.replace(s.sae, matryoshka=tuple(sizes))
    ), sizes


@dataclass
class ProgressiveConfig:
    """What `progressive` adds to the main job's settings."""

    figure: str = opt("progressive.png", "PNG for the curves ('' = none)")
    seeds: int = opt(1, "seeds per SAE, from --seed on; FVU is mean ± std")

    def __post_init__(self):
        check_seeds(self.seeds)


def progressive(s: Settings, figure: str = "progressive.png", seeds: int = 1) -> dict:
    """Train a plain and a Matryoshka SAE per arch and seed, then compare FVU at G = F/16 ... F (Peter and
    Soegaard), mean ± std over seeds (--seed, --seed + 1, ...; the held-out split stays that of --seed)."""
    nested, sizes = nested_settings(s)
    s.check_environment()
    if figure:
        check_writable(figure, "figure")
    start = time.perf_counter()
    device = pick_device(s.run.device)
    set_seed(s.run.seed)
    train_data, eval_data, _, data_report = prepared_data(s, device)

    results = {}
    seed_list = list(range(s.run.seed, s.run.seed + seeds))
    for arch in s.sae.archs:
        runs = []
        for seed in seed_list:
            run = dataclasses.replace(s.run, out="", save_every=0, seed=seed)
            pair = (
                dataclasses.replace(s, run=run),
                dataclasses.replace(nested, run=run),
            )
            runs.append(
                progressive_run(arch, pair, train_data, eval_data, sizes, device)
            )
        results[arch] = progressive_summary(runs, sizes, seed_list)
        print_progressive(arch, results[arch], len(eval_data), seeds)

    if figure:
        save_progressive_figure(results, figure)
        print(f"figure: {figure}")
    if s.run.json:
        config = provenance(s, device, time.perf_counter() - start) | {"seeds": seeds}
        write_json(s.run.json, {**results, "data": data_report, "config": config})
    return results


def progressive_run(arch, pair, train_data, eval_data, sizes, device) -> dict:
    """One seed: a plain SAE and a Matryoshka one (the Settings in `pair`), their
    FVU curves, and the power law fitted to the importance tracked in training."""
    plain_settings, nested_settings_ = pair
    plain, _, plain_run = run_one(arch, train_data, eval_data, plain_settings, device)
    mat, _, mat_run = run_one(arch, train_data, eval_data, nested_settings_, device)
    curves = progressive_curves(plain, mat, eval_data, sizes)
    alpha, r2 = fit_power_law(plain_run.latents.importance)
    return curves | dict(
        train_seconds_plain=plain_run.seconds,
        train_seconds_matryoshka=mat_run.seconds,
        train_power_law_alpha=alpha,
        train_power_law_r2=r2,
    )


def progressive_summary(runs: list[dict], sizes: list[int], seeds: list[int]) -> dict:
    """Mean ± std over seeds of every number, and of the FVU at each G."""
    summary = {
        key: mean_std([run[key] for run in runs])["mean"]
        for key in runs[0]
        if key not in ("G", "fvu")
    }
    at_G = {  # name -> per G, {mean, std}
        name: [
            mean_std([run["fvu"][name][i] for run in runs]) for i in range(len(sizes))
        ]
        for name in runs[0]["fvu"]
    }
    summary.update(
        G=sizes,
        seeds=seeds,
        fvu={name: [st["mean"] for st in stats] for name, stats in at_G.items()},
        fvu_std={name: [st["std"] for st in stats] for name, stats in at_G.items()},
        fvu_per_seed=[run["fvu"] for run in runs],
        ordering_holds={
            m: [paper_ordering(run["fvu"], m) for run in runs]
            for m in ("matryoshka_cut", "matryoshka")
        },
    )
    return summary


def print_progressive(arch: str, r: dict, rows: int, seeds: int):
    ratio = r["train_seconds_matryoshka"] / r["train_seconds_plain"]
    print(
        f"\n{arch}: FVU on {rows} held-out rows, mean ± std over {seeds} seed(s); "
        f"importance E[a^2] ~ rank^-{r['power_law_alpha']:.2f} "
        f"(R^2 {r['power_law_r2']:.3f}; tracked during training: "
        f"rank^-{r['train_power_law_alpha']:.2f}, R^2 {r['train_power_law_r2']:.3f}); "
        f"Matryoshka training took {ratio:.2f}x the plain SAE's time"
    )
    print(
        "matryoshka_cut: as trained (top k of all F, cut at G); "
        "the rest re-pick their top k among the G kept"
    )
    table = [
        [G, *(f"{r['fvu'][n][i]:.4f} ± {r['fvu_std'][n][i]:.4f}" for n in r["fvu"])]
        for i, G in enumerate(r["G"])
    ]
    print(format_table(["G", *r["fvu"]], table))
    for m, holds in r["ordering_holds"].items():
        print(
            f"paper's ordering ({m} < pruned by E[a^2] < unsorted) at every G < F: "
            f"{sum(holds)} of {seeds} seed(s)"
        )


# ============================================================================= 15. Inspecting features
# One streaming pass over a store, whole contexts at a time, gathers for every latent (and for KronSAE, every
# pre-latent: ReLU(u_i), ReLU(v_j) of every head) what people read a feature by (appendix D.1): how often it
# fires, its mean activation, the token ids it fires on (token entropy, eq. 10), and its top examples, each a
# window of WINDOW tokens either side with the activation of every token (multitoken ratio, eq. 11).

WINDOW = 15  # tokens either side of the firing token (appendix D.1: 31-token windows)
# activation histograms: fixed log-spaced bins, whatever the scale
HISTOGRAM_BINS = torch.logspace(-4, 4, 65)


# Units taken at a time by UnitStats and TokenMass, so that their temporaries stay near rows x UNIT_BLOCK floats
# per chunk, however many units there are (KronSAE at F = 65,536 has 32,768 pre-latents).
UNIT_BLOCK = 4096
TOP_TOKENS = 5  # the tokens with the most activation mass kept per unit


class TokenMass:
    """eq. 10's activation mass by token id, for U units, in O(U) memory. The rows arrive sorted by token id, so
    a token's mass m_t (U,) is whole once the next token starts, and only three things are kept per unit: the
    total M = sum_t m_t, sum_t m_t log m_t and the TOP_TOKENS heaviest tokens. The token entropy of
    p_t = m_t / M is then H = -sum_t p_t log p_t = log M - (sum_t m_t log m_t) / M."""

    def __init__(self, units: int):
        self.units = units
        self.mass = torch.zeros(units, dtype=torch.float64)
        self.m_log_m = torch.zeros(units, dtype=torch.float64)
        self.top_mass = torch.zeros(units, TOP_TOKENS, dtype=torch.float64)
        self.top_ids = torch.full((units, TOP_TOKENS), -1)
        # the token being summed (-1: none yet) and its mass so far
        self.token = -1
        self.current = torch.zeros(units, dtype=torch.float64)

    def add(self, acts: torch.Tensor, token_ids: torch.Tensor):
        """acts (B, U) >= 0 of rows whose token_ids (B,) ascend, from where the last call's rows ended."""
        ids, counts = token_ids.unique_consecutive(return_counts=True)  # (G,)
        group = torch.repeat_interleave(torch.arange(len(ids)), counts)  # (B,)
        for lo in range(0, self.units, UNIT_BLOCK):
            block = slice(lo, lo + UNIT_BLOCK)
            width = min(UNIT_BLOCK, self.units - lo)
            mass = torch.zeros(len(ids), width, dtype=torch.float64)
            mass.index_add_(0, group, acts[:, block].double())  # (G, u)
            if int(ids[0]) == self.token:
                mass[0] += self.current[block]
            elif self.token >= 0:
                self.close(self.current[None, block], torch.tensor([self.token]), block)
            # every token here is whole but the last, which the next rows may continue
            self.close(mass[:-1], ids[:-1], block)
            self.current[block] = mass[-1]
        self.token = int(ids[-1])

    def finish(self):
        if self.token >= 0:
            everything = slice(0, self.units)
            self.close(self.current[None], torch.tensor([self.token]), everything)
        self.token = -1

    def close(self, mass: torch.Tensor, ids: torch.Tensor, block: slice):
        """Count whole tokens: mass (G, u) of the units in `block`, ids (G,)."""
        self.mass[block] += mass.sum(0)
        self.m_log_m[block] += torch.xlogy(mass, mass).sum(0)  # 0 log 0 = 0
        masses = torch.cat([self.top_mass[block], mass.T], 1)  # (u, TOP + G)
        tokens = torch.cat(
            [self.top_ids[block], ids[None].expand(mass.shape[1], -1)], 1
        )
        best = masses.topk(TOP_TOKENS, dim=1)
        self.top_mass[block] = best.values
        self.top_ids[block] = tokens.gather(1, best.indices)

    def entropy(self) -> torch.Tensor:
        """(U,) eq. 10's token entropy, NaN for units with no mass."""
        H = self.mass.log() - self.m_log_m / self.mass
        return H.clamp_min(0)  # rounding can leave -1e-16 where one token holds all

    def top_tokens(self, unit: int, count: int) -> list[tuple[int, float]]:
        """The unit's `count` heaviest token ids (at most TOP_TOKENS), with their share of its mass."""
        share = self.top_mass[unit, :count] / self.mass[unit]
        return [
            (int(token), float(s))
            for token, m, s in zip(self.top_ids[unit], self.top_mass[unit], share)
            if m > 0
        ]


class UnitStats:
    """Streaming statistics of U units whose activations arrive as dense (B, U) chunks of whole contexts, in
    blocks of UNIT_BLOCK units. Memory: O(U * examples * WINDOW) for the examples, O(U * bins) for the
    histograms and O(U) for eq. 10 (TokenMass, fed by a second pass in token order), whatever the number of
    tokens read and however densely the units fire."""

    def __init__(self, units: int, examples: int):
        self.units, self.tokens = units, 0
        self.fired = torch.zeros(units, dtype=torch.long)
        self.total = torch.zeros(units, dtype=torch.float64)
        self.top = torch.zeros(units, examples)  # the top activations, descending
        self.row = torch.full((units, examples), -1)  # the store row of each (-1: none)
        self.span = torch.ones(units, examples)  # tokens in each example's window
        # activations around each
        self.windows = torch.zeros(units, examples, 2 * WINDOW + 1)
        self.histogram = torch.zeros(units, len(HISTOGRAM_BINS) + 1, dtype=torch.long)
        self.by_token = TokenMass(units)

    def add(self, acts: torch.Tensor, chunk: TextChunk):
        """acts (B, U) >= 0 on the chunk's rows; rows outside chunk.keep count for nothing but their windows."""
        self.tokens += int(chunk.keep.sum())
        for lo in range(0, self.units, UNIT_BLOCK):
            self.add_block(acts[:, lo : lo + UNIT_BLOCK], chunk, lo)

    def add_block(self, acts: torch.Tensor, chunk: TextChunk, lo: int):
        """add for the units lo, lo + 1, ... of acts (B, u)."""
        block = slice(lo, lo + acts.shape[1])
        kept = acts * chunk.keep[:, None]
        rows, units = kept.nonzero(as_tuple=True)  # the firings
        values = kept[rows, units]
        self.fired[block] += torch.bincount(units, minlength=acts.shape[1])
        # slices of the (U, ...) tensors are views: the block's rows are updated in place
        self.total[block].index_add_(0, units, values.double())
        bins = torch.bucketize(values, HISTOGRAM_BINS)
        self.histogram[block].view(-1).index_add_(
            0, units * self.histogram.shape[1] + bins, torch.ones_like(bins)
        )
        E = min(self.top.shape[1], kept.shape[0])
        best_values, best = kept.topk(E, dim=0)  # (E, u) each unit's best rows here
        # last row: slots without a store row
        padded = torch.cat([acts, acts.new_zeros(1, acts.shape[1])])
        windows = padded[
            chunk.neighbours[best], torch.arange(acts.shape[1])[None, :, None]
        ]  # (E, u, 2W+1)
        order = (
            torch.cat([self.top[block], best_values.T], 1)
            .topk(self.top.shape[1], dim=1)
            .indices
        )

        def merge(old, new):
            both = torch.cat([old, new], 1)
            return both.gather(
                1,
                order.view(*order.shape, *[1] * (both.dim() - 2)).expand(
                    -1, -1, *both.shape[2:]
                ),
            )

        self.top[block] = merge(self.top[block], best_values.T)
        rows_of_best = torch.where(best_values > 0, chunk.rows[best], -1)
        self.row[block] = merge(self.row[block], rows_of_best.T)
        self.span[block] = merge(self.span[block], chunk.span[best].T)
        self.windows[block] = merge(self.windows[block], windows.transpose(0, 1))

    def add_tokens(self, acts: torch.Tensor, token_ids: torch.Tensor):
        """The second pass, for eq. 10: acts (B, U) of counted rows in ascending token_ids (B,)."""
        self.by_token.add(acts, token_ids)

    def statistics(self) -> dict[str, torch.Tensor]:
        """Per unit (NaN where it never fired): frequency (share of tokens it fires on), mean_activation (over
        those tokens), token_entropy (eq. 10) and multitoken_ratio (eq. 11, over its collected examples)."""
        self.by_token.finish()
        never = self.fired == 0
        valid = self.row >= 0  # (U, E) examples actually collected
        active = ((self.windows > 0).sum(-1) / self.span * valid).sum(1) / valid.sum(1)
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return {
            "frequency": self.fired / max(1, self.tokens),
            "mean_activation": torch.where(
                never, nan, self.total / self.fired.clamp_min(1)
            ),
            "token_entropy": torch.where(never, nan, self.by_token.entropy()),
            "multitoken_ratio": torch.where(never, nan, active.double()),
        }

    def top_tokens(self, unit: int, count: int = TOP_TOKENS) -> list[tuple[int, float]]:
        """The unit's `count` token ids with the most activation mass, with their share of it."""
        return self.by_token.top_tokens(unit, count)


# whole contexts of a store, and what UnitStats needs to know of their rows
class TextChunk(NamedTuple):
    x: torch.Tensor  # (B, d) activations, rows that are not finite set to 0
    rows: torch.Tensor  # (B,) row ids in the store (shard by shard, in order)
    token_ids: torch.Tensor  # (B,) each row's token id
    neighbours: torch.Tensor  # (B, 2W+1) the chunk row at each window slot, B where no row is (edges, specials)
    span: torch.Tensor  # (B,) tokens of the context inside the row's window
    keep: torch.Tensor  # (B,) rows that count: within --tokens, finite and not massive
    finite: torch.Tensor  # (B,) rows whose values are finite
    non_finite: int  # rows within --tokens that are not finite
    context: torch.Tensor  # (B,) each row's context, counted over the store's shards
    position: torch.Tensor  # (B,) each row's position in its context


def text_chunks(
    store: ActivationStore, tokens: int, batch: int, threshold: float
) -> Iterator[TextChunk]:
    """The store's first `tokens` rows, whole contexts of one shard at a time, about `batch` rows a chunk."""
    read, base, contexts_before = 0, 0, 0
    for k, offsets in enumerate(store.offsets):
        ids, positions = store.text(k)
        T, c = ids.shape[1], 0
        while c < len(offsets) - 1 and read < tokens:
            end = max(
                c + 1,
                int(np.searchsorted(offsets, offsets[c] + batch, side="right")) - 1,
            )
            a, b = int(offsets[c]), int(offsets[end])
            context = torch.from_numpy(
                np.repeat(np.arange(end - c), np.diff(offsets[c : end + 1]))
            )
            pos = torch.from_numpy(positions[a:b]).long()
            # (contexts, padded positions) -> row
            where = torch.full((end - c, T + 2 * WINDOW), b - a)
            where[context, pos + WINDOW] = torch.arange(b - a)
            # padded positions of each window
            slots = pos[:, None] + torch.arange(2 * WINDOW + 1)
            x = store.rows(k, np.arange(a, b))
            # a damaged store's NaN or inf rows count for nothing, and are zeros to the SAE
            finite = finite_mask(x)
            x[~finite] = 0
            counted = torch.arange(b - a) < tokens - read
            keep = counted & finite & (x.norm(dim=-1) <= threshold)
            yield TextChunk(
                x,
                base + torch.arange(a, b),
                torch.from_numpy(ids[c:end]).long()[context, pos],
                where[context[:, None], slots],
                (pos + WINDOW).clamp(max=T - 1) - (pos - WINDOW).clamp(min=0) + 1,
                keep,
                finite,
                int((counted & ~finite).sum()),
                contexts_before + c + context,
                pos,
            )
            read, c = read + b - a, end
        base += int(offsets[-1])
        contexts_before += len(offsets) - 1


def store_rows(store: ActivationStore, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the whole store by their ids (as TextChunk.rows counts them), in the order given: (n, d)."""
    bases = np.cumsum([0] + [int(o[-1]) for o in store.offsets])
    rows = rows.numpy()
    shard = np.searchsorted(bases, rows, side="right") - 1  # (n,)
    out = torch.empty(len(rows), store.d)
    for k in np.unique(shard):
        at = np.flatnonzero(shard == k)
        out[torch.from_numpy(at)] = store.rows(k, rows[at] - bases[k])
    return out


class Correlation:
    """Pearson correlations between U units over the tokens streamed: sums and the (U, U) cross products."""

    def __init__(self, units: int):
        self.n, self.sum = 0, torch.zeros(units, dtype=torch.float64)
        self.cross = torch.zeros(units, units, dtype=torch.float64)

    def add(self, acts: torch.Tensor):  # (B, U)
        self.n += acts.shape[0]
        self.sum += acts.sum(0, dtype=torch.float64)
        self.cross += (acts.T @ acts).double()

    def matrix(self) -> torch.Tensor:
        mean = self.sum / self.n
        cov = self.cross / self.n - mean[:, None] * mean[None, :]
        std = cov.diagonal().clamp_min(0).sqrt()
        return cov / (std[:, None] * std[None, :])  # NaN for units that never fired


def head_correlations(r: torch.Tensor, group: int) -> tuple[float, float]:
    """The mean correlation of pairs of units in the same group of `group` consecutive units, and across."""
    g = torch.arange(len(r)) // group
    same, pair = g[:, None] == g[None, :], ~torch.eye(len(r), dtype=torch.bool)

    def mean(mask):
        values = r[mask & pair]
        return float(values[values.isfinite()].mean())

    return mean(same), mean(~same)


def pearson(
    a: torch.Tensor, b: torch.Tensor
) -> float:  # over the units where both are defined
    ok = a.isfinite() & b.isfinite()
    return float(torch.corrcoef(torch.stack([a[ok], b[ok]]))[0, 1])


def quartiles(values: torch.Tensor, seed: int = 0, resamples: int = 1000) -> dict:
    """Mean and quartiles of the finite values, and the bootstrap std of the mean (resampling the units)."""
    v = values[values.isfinite()].double()
    if not len(v):
        return {
            "mean": math.nan,
            "q25": math.nan,
            "median": math.nan,
            "q75": math.nan,
            "bootstrap_std": math.nan,
        }
    q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    draws = v[
        torch.randint(
            len(v), (resamples, len(v)), generator=torch.Generator().manual_seed(seed)
        )
    ].mean(1)
    return {
        "mean": float(v.mean()),
        "q25": q[0],
        "median": q[1],
        "q75": q[2],
        "bootstrap_std": float(draws.std()),
    }


def fig18(post: dict, pre: dict, sae: KroneckerSAE) -> dict:
    """Each post-latent statistic against its parents' (appendix E, fig. 18): the Pearson r over post-latents
    with the base u_i's value, the extension v_j's, their mean, their product and their mAND sqrt(ab)."""
    h, m, n = sae.h, sae.m, sae.n
    out = {}
    for stat in ("frequency", "token_entropy", "multitoken_ratio"):
        u, v = pre[stat].view(h, m + n).split([m, n], dim=1)
        a, b = (
            u[:, :, None].expand(h, m, n).flatten(),
            v[:, None, :].expand(h, m, n).flatten(),
        )
        y = post[stat]
        out[stat] = {
            "base": pearson(y, a),
            "extension": pearson(y, b),
            "mean": pearson(y, (a + b) / 2),
            "product": pearson(y, a * b),
            "mand": pearson(y, (a * b).clamp_min(0).sqrt()),
        }
    return out


def sampled_heads(sae: SparseAutoencoder, units: int = 512) -> torch.Tensor:
    """The latents of the first few heads, about `units` of them, for the correlations of section 5.2."""
    return torch.arange(
        min(sae.F, max(2, units // sae.latents_per_head) * sae.latents_per_head)
    )


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    name, extra = model_source(name)
    return from_pretrained(AutoTokenizer.from_pretrained, name, extra)


def open_inspection(directory: str, data: str, latents) -> tuple:
    """(the store, the SAE, the store's tokenizer), after the checks that need no pass over the data."""
    store = ActivationStore(data)
    store.text(0)  # a one-line error for old stores
    sae = load(directory).float()  # as the store's rows are read
    if sae.d_in != store.d:
        raise ValueError(
            f"the SAE in {directory} reads d={sae.d_in}, the store {data} holds d={store.d}"
        )
    for latent in latents or []:
        if not 0 <= latent < sae.F:
            raise ValueError(f"--latents: latent {latent} is outside 0..{sae.F - 1}")
    return store, sae, load_tokenizer(store.manifest["tokenizer"])


class ContextPass(NamedTuple):
    """What the pass over whole contexts gathers besides the UnitStats."""

    corr: Correlation  # the sampled heads' latents (section 5.2)
    corr_init: Correlation  # the same latents of the SAE at its init
    and_check: dict  # KronSAE: fires, both (fires with both parents), parents
    rows: torch.Tensor  # (N,) the store ids of the rows counted
    token_ids: torch.Tensor  # (N,) their token ids
    non_finite: int  # rows within --tokens that are not finite


def pre_latents(sae: KroneckerSAE, x: torch.Tensor) -> torch.Tensor:
    """(B, d) -> (B, h(m+n)): ReLU(u), ReLU(v) of every head (eq. 2)."""
    return torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc.T).relu()


def count_and_(counts: dict, sae: KroneckerSAE, pre: torch.Tensor, code: torch.Tensor):
    """The AND check's counts, for pre-latents (b, h(m+n)) and the code (b, F) of the same rows."""
    u, v = (t > 0 for t in sae.split(pre))  # (b, h, m), (b, h, n)
    on = code.view(-1, sae.h, sae.m, sae.n) > 0
    counts["fires"] += int(on.sum())
    counts["both"] += int((on & u[..., :, None] & v[..., None, :]).sum())
    counts["parents"] += int((u.sum(-1) * v.sum(-1)).sum())


def context_pass(
    sae, store, post, pre, tokens, batch, seed, progress, cache=None
) -> ContextPass:
    """The pass over whole contexts: every UnitStats statistic but eq. 10's, the correlations of section 5.2
    (and at init) and KronSAE's AND check."""
    torch.manual_seed(seed)
    init = build_sae(sae_config(sae))  # the same SAE at its init (A.1), b_dec set below
    heads = sampled_heads(sae)
    corr, corr_init = Correlation(len(heads)), Correlation(len(heads))
    counts = {"fires": 0, "both": 0, "parents": 0}
    rows, token_ids, non_finite = [], [], 0
    threshold = store.manifest["norms"].get("threshold") or math.inf
    with tqdm(
        total=min(tokens, store.manifest["tokens"]),
        unit="tok",
        unit_scale=True,
        desc="inspect, in context",
        disable=not progress,
    ) as bar:
        for chunk in text_chunks(store, tokens, batch, threshold):
            code = dense_code(sae, chunk.x) * chunk.finite[:, None]
            post.add(code, chunk)
            if cache is not None:
                cache.add("latents", code, chunk)
            corr.add(code[chunk.keep][:, heads])
            # as training starts: b_dec at the data mean
            if not init.b_dec.any() and chunk.keep.any():
                init.b_dec.copy_(chunk.x[chunk.keep].mean(0))
            corr_init.add(first_latents(init, chunk.x[chunk.keep], len(heads)))
            if pre is not None:
                pre_acts = pre_latents(sae, chunk.x) * chunk.finite[:, None]
                pre.add(pre_acts, chunk)
                if cache is not None:
                    cache.add("pre_latents", pre_acts, chunk)
                count_and_(counts, sae, pre_acts[chunk.keep], code[chunk.keep])
            rows.append(chunk.rows[chunk.keep])
            token_ids.append(chunk.token_ids[chunk.keep])
            non_finite += chunk.non_finite
            bar.update(int(chunk.keep.sum()))
    return ContextPass(
        corr, corr_init, counts, torch.cat(rows), torch.cat(token_ids), non_finite
    )


def token_pass(sae, store, post, pre, passed: ContextPass, batch, progress):
    """eq. 10's pass: the rows counted, again, sorted by token id, so that each unit's mass on a token is whole
    when the next token starts (TokenMass). Memory O(units), however many tokens and however dense the units;
    the price is encoding the rows a second time."""
    order = passed.token_ids.argsort(stable=True)
    with tqdm(
        total=len(order),
        unit="tok",
        unit_scale=True,
        desc="inspect, by token (eq. 10)",
        disable=not progress,
    ) as bar:
        for at in order.split(batch):
            x = store_rows(store, passed.rows[at])
            ids = passed.token_ids[at]
            post.add_tokens(dense_code(sae, x), ids)
            if pre is not None:
                pre.add_tokens(pre_latents(sae, x), ids)
            bar.update(len(at))


@torch.no_grad()
def inspect_sae(
    directory: str,
    data: str,
    tokens: int = 200_000,
    latents: Optional[list[int]] = None,
    sample: int = 32,
    examples: int = 10,
    batch: int = 2048,
    seed: int = 0,
    progress: bool = True,
    cache: Optional[DelphiCache] = None,
) -> Inspection:
    """Read the first `tokens` rows of the store `data` through the SAE in `directory`: the report (the JSON's
    content: per-latent statistics and examples, per-pre-latent ones for KronSAE, the summary) and the streams.
    Two passes: one over whole contexts, then one in token order for eq. 10. With `cache`, the same
    activations go into delphi's latent cache too (DelphiCache)."""
    store, sae, tokenizer = open_inspection(directory, data, latents)
    kron = arch_of(sae).head_view
    post = UnitStats(sae.F, examples)
    pre = UnitStats(sae.W_enc.shape[0], examples) if kron else None
    passed = context_pass(sae, store, post, pre, tokens, batch, seed, progress, cache)
    if passed.non_finite:
        print(
            f"non-finite rows: skipped {passed.non_finite:,} rows of {data} that hold NaN or inf; "
            f"they count for nothing and read as zeros in the examples' windows"
        )
    token_pass(sae, store, post, pre, passed, batch, progress)
    report = inspection_report(sae, post, pre, passed, tokenizer, store, seed)
    report["selected"] = (
        latents
        if latents
        else sorted(
            torch.randperm(sae.F, generator=torch.Generator().manual_seed(seed))[
                : min(sample, sae.F)
            ].tolist()
        )
    )
    return Inspection(report, post, pre, tokenizer)


def inspection_report(sae, post, pre, passed, tokenizer, store, seed) -> dict:
    """The JSON's content from the two passes: per-unit entries and the summary."""
    stats = post.statistics()
    report = {
        "tokens": post.tokens,
        "non_finite_rows": passed.non_finite,
        "config": sae_config(sae),
        "store": str(store.directory),
        "latents": unit_reports(post, stats, tokenizer, store, range(sae.F)),
        "summary": {},
    }
    group = "post" if pre is not None else "latents"
    report["summary"][group] = {
        name: quartiles(value, seed) for name, value in stats.items()
    }
    if pre is None:
        return report
    pre_stats = pre.statistics()
    report["pre_latents"] = unit_reports(
        pre, pre_stats, tokenizer, store, range(pre.units)
    )
    for entry in report["pre_latents"]:
        head, index = divmod(entry["id"], sae.m + sae.n)
        entry.update(
            head=head,
            side="base" if index < sae.m else "extension",
            index=index if index < sae.m else index - sae.m,
        )
    report["summary"]["pre"] = {
        name: quartiles(value, seed) for name, value in pre_stats.items()
    }
    within, across = head_correlations(passed.corr.matrix(), sae.latents_per_head)
    init_within, init_across = head_correlations(
        passed.corr_init.matrix(), sae.latents_per_head
    )
    counts = passed.and_check
    report["summary"].update(
        within_head_correlation=within,
        across_head_correlation=across,
        init_within_head_correlation=init_within,
        init_across_head_correlation=init_across,
        correlation_heads=len(sampled_heads(sae)) // sae.latents_per_head,
        fig18=fig18(stats, pre_stats, sae),
        and_check={
            "parents_when_fires": counts["both"] / max(1, counts["fires"]),
            "fires_when_parents": counts["both"] / max(1, counts["parents"]),
        },
    )
    return report


def dense_code(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """The SAE's code of x as a dense (B, F) tensor: zeros except each token's k active latents."""
    values, indices = sae.encode(x)
    return values.new_zeros(x.shape[0], sae.F).scatter_(1, indices, values)


def first_latents(sae: SparseAutoencoder, x: torch.Tensor, count: int) -> torch.Tensor:
    """dense_code(sae, x)[:, :count] without the (B, F) tensor: latents past `count` add 0 to one spare
    column, which is dropped."""
    values, indices = sae.encode(x)  # (B, k) each
    inside = indices < count
    columns = torch.where(inside, indices, count)
    out = values.new_zeros(x.shape[0], count + 1)
    return out.scatter_add_(1, columns, values * inside)[:, :count]  # (B, count)


def token_text(tokenizer, ids) -> dict[int, str]:
    """Each token id as the text it stands for (a leading space kept), decoded one token at a time."""
    ids = sorted(set(ids))
    return dict(zip(ids, tokenizer.batch_decode([[i] for i in ids])))


def unit_reports(
    stats: UnitStats, values: dict, tokenizer, store: ActivationStore, units
) -> list[dict]:
    """The JSON's per-unit entries, each with its examples as token strings and activations."""
    bases = np.concatenate([[0], np.cumsum([int(o[-1]) for o in store.offsets])])
    where = {}  # store row -> (tokens, position)
    for k in range(len(store.shards)):
        wanted = stats.row[
            (stats.row >= bases[k]) & (stats.row < bases[k + 1])
        ].unique() - int(bases[k])
        if len(wanted):
            ids, positions = store.text(k)
            context = (
                np.searchsorted(store.offsets[k], wanted.numpy(), side="right") - 1
            )
            for row, c in zip(wanted.tolist(), context):
                p = int(positions[row])
                lo = max(0, p - WINDOW)
                where[row + int(bases[k])] = (
                    ids[c, lo : p + WINDOW + 1].tolist(),
                    p - lo,
                )
    text = token_text(tokenizer, [t for window, _ in where.values() for t in window])
    out = []
    for u in units:
        entry = {
            "id": u,
            **{name: float(value[u]) for name, value in values.items()},
            "examples": [],
        }
        for e in range(stats.row.shape[1]):
            row = int(stats.row[u, e])
            if row < 0:
                break
            ids, position = where[row]
            acts = stats.windows[u, e, WINDOW - position : WINDOW - position + len(ids)]
            entry["examples"].append(
                {
                    "tokens": [text[t] for t in ids],
                    "position": position,
                    "activations": [float(f"{a:.4g}") for a in acts.tolist()],
                }
            )
        out.append(entry)
    return out


class Inspection(NamedTuple):
    report: dict  # what the JSON holds
    post: UnitStats  # the latents (KronSAE: post-latents)
    pre: Optional[UnitStats]  # KronSAE's pre-latents
    tokenizer: object


STAT_NAMES = ("frequency", "mean_activation", "token_entropy", "multitoken_ratio")


def summary_table(summary: dict) -> str:
    rows = [
        [
            group,
            name,
            *(
                f"{summary[group][name][q]:.4g}"
                for q in ("mean", "q25", "median", "q75")
            ),
            f"{summary[group][name]['bootstrap_std']:.2g}",
        ]
        for group in ("latents", "post", "pre")
        if group in summary
        for name in STAT_NAMES
    ]
    return format_table(
        ["units", "statistic", "mean", "q25", "median", "q75", "± (bootstrap)"], rows
    )


def fig18_table(fig: dict) -> str:
    parents = ("base", "extension", "mean", "product", "mand")
    return format_table(
        ["post-latent stat", *(f"r vs {p}" for p in parents)],
        [[stat, *(f"{fig[stat][p]:.3f}" for p in parents)] for stat in fig],
    )


def marked_example(example: dict, width: int = 8) -> str:
    """An example as one line: `width` tokens either side, the firing token in [[ ]] with its activation."""
    p, tokens = example["position"], example["tokens"]

    def show(t):
        return t.replace("\n", "\\n")

    left, right = (
        "".join(map(show, tokens[max(0, p - width) : p])),
        "".join(map(show, tokens[p + 1 : p + 1 + width])),
    )
    return f"{example['activations'][p]:8.3f}  {left}[[{show(tokens[p])}]]{right}"


def print_inspection(report: dict, latents: Optional[list[int]]):
    s = report["summary"]
    print(
        f"\n{report['tokens']:,} tokens of {report['store']}; statistics over the units that fired "
        f"(frequency over all); ± is the bootstrap std of the mean over units"
    )
    print(summary_table(s))
    if "within_head_correlation" in s:
        print(
            f"\nsection 5.2: mean Pearson r of post-latent activations over tokens, first {s['correlation_heads']} "
            f"heads: within a head {s['within_head_correlation']:.4f}, across heads "
            f"{s['across_head_correlation']:.4f}; at init {s['init_within_head_correlation']:.4f} / "
            f"{s['init_across_head_correlation']:.4f}"
        )
        print(
            "\nfig. 18: Pearson r over post-latents, each statistic against its parents'"
        )
        print(fig18_table(s["fig18"]))
        a = s["and_check"]
        print(
            f"\nAND check: both parents positive on {100 * a['parents_when_fires']:.2f}% of firings; the "
            f"post-latent is in the top k on {100 * a['fires_when_parents']:.3f}% of (token, latent) pairs "
            f"whose parents are both positive"
        )
    for latent in latents or []:
        entry = report["latents"][latent]
        print(
            f"\nlatent {latent}: frequency {entry['frequency']:.4g}, mean activation {entry['mean_activation']:.4g}, "
            f"token entropy {entry['token_entropy']:.3f}, multitoken ratio {entry['multitoken_ratio']:.3f}"
        )
        for example in entry["examples"][:5]:
            print("  " + marked_example(example))


# ---------------------------------------------------------------- the HTML report: one file, no network

HTML_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; }}
th.sort {{ cursor: pointer; background: #eef; }} .num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.card {{ border: 1px solid #bbb; border-radius: 6px; padding: .6em 1em; margin: 1em 0; }}
.ex {{ font: 12.5px/1.9 ui-monospace, monospace; white-space: pre-wrap; border-top: 1px dotted #ddd; }}
.ex span {{ border-radius: 2px; }} .ex .fire {{ outline: 2px solid #c40; }}
table.grid td {{ vertical-align: top; width: 7em; font-size: 12px; }}
table.grid th {{ font-size: 12px; font-weight: normal; background: #f4f4f4; }}
.index {{ max-height: 30em; overflow-y: scroll; display: inline-block; }}
small {{ color: #666; }}
</style></head><body>
<h1>{title}</h1>
{body}
<script>
function sortBy(th) {{  // sort the index table by this column, descending; click again for ascending
  const table = th.closest("table"), col = [...th.parentNode.children].indexOf(th), body = table.tBodies[0];
  const dir = th.dataset.dir = th.dataset.dir === "desc" ? "asc" : "desc";
  const value = r => {{ const v = parseFloat(r.children[col].textContent); return isNaN(v) ? -Infinity : v; }};
  [...body.rows].sort((a, b) => dir === "desc" ? value(b) - value(a) : value(a) - value(b))
    .forEach(r => body.appendChild(r));
}}
</script></body></html>
"""


def shade(activation: float, top: float) -> str:
    alpha = 0 if top <= 0 else min(1.0, activation / top)
    return f"background: rgba(255, 140, 0, {alpha:.2f})" if alpha > 0 else ""


def example_html(example: dict, top: float) -> str:
    spans = []
    for i, (token, a) in enumerate(zip(example["tokens"], example["activations"])):
        fire = ' class="fire"' if i == example["position"] else ""
        spans.append(
            f'<span{fire} style="{shade(a, top)}" title="{a:.3f}">'
            f"{html.escape(token.replace(chr(10), '↵'))}</span>"
        )
    return f'<div class="ex">{"".join(spans)}</div>'


def histogram_svg(counts: torch.Tensor) -> str:
    """A small bar chart of a unit's activations over HISTOGRAM_BINS (log scale), as inline SVG."""
    nonzero = counts.nonzero()
    if not len(nonzero):
        return ""
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    c = counts[lo:hi].double()
    bars = "".join(
        f'<rect x="{6 * i}" y="{40 - 40 * v:.1f}" width="5" height="{40 * v:.1f}" fill="#48c"/>'
        for i, v in enumerate((c / c.max()).tolist())
    )
    edges = torch.cat([torch.zeros(1), HISTOGRAM_BINS])
    low, high = (
        float(edges[lo]),
        float(HISTOGRAM_BINS[min(hi, len(HISTOGRAM_BINS) - 1)]),
    )
    return (
        f'<svg width="{6 * len(c)}" height="40" role="img"><title>activations from {low:.3g} to {high:.3g}, '
        f"log bins</title>{bars}</svg> <small>{low:.3g} … {high:.3g} (log)</small>"
    )


def stats_line(entry: dict) -> str:
    return (
        f"frequency {entry['frequency']:.4g} · mean activation {entry['mean_activation']:.4g} · "
        f"token entropy {entry['token_entropy']:.3f} · multitoken ratio {entry['multitoken_ratio']:.3f}"
    )


def card_html(entry: dict, stats: UnitStats, anchor: str, title: str) -> str:
    top = max([max(e["activations"]) for e in entry["examples"]] or [0])
    examples = (
        "".join(example_html(e, top) for e in entry["examples"])
        or "<p><small>never fired</small></p>"
    )
    return (
        f'<div class="card" id="{anchor}"><h3>{html.escape(title)}</h3><p>{stats_line(entry)}</p>'
        f"<p>{histogram_svg(stats.histogram[entry['id']])}</p>{examples}</div>"
    )


def top_tokens_text(stats: UnitStats, unit: int, text: dict, count: int = 3) -> str:
    return (
        " ".join(
            f"{html.escape(repr(text[t])[1:-1])}<small>({100 * share:.0f}%)</small>"
            for t, share in stats.top_tokens(unit, count)
        )
        or "<small>never fires</small>"
    )


def head_html(inspection: Inspection, head: int, text: dict) -> str:
    """Head `head`'s m x n grid of post-latents; each row headed by its base pre-latent u_i, each column by its
    extension v_j, with their top tokens, so that each post-latent reads as the AND of its row and column."""
    report, post, pre = inspection.report, inspection.post, inspection.pre
    c = report["config"]
    m, n = c["m"], c["n"]
    first = head * (m + n)
    frequency = post.fired.double() / max(1, post.tokens)
    peak = float(frequency[head * m * n : (head + 1) * m * n].max()) or 1.0
    header = "".join(
        f'<th><a href="#pre-{first + m + j}">v<sub>{j}</sub></a> '
        f"{top_tokens_text(pre, first + m + j, text)}</th>"
        for j in range(n)
    )
    rows = []
    for i in range(m):
        cells = []
        for j in range(n):
            latent = head * m * n + i * n + j
            cells.append(
                f'<td style="{shade(math.sqrt(float(frequency[latent]) / peak), 1)}">'
                f'<a href="#latent-{latent}">#{latent}</a> <small>{float(frequency[latent]):.2%}</small><br>'
                f"{top_tokens_text(post, latent, text, 2)}</td>"
            )
        rows.append(
            f'<tr><th><a href="#pre-{first + i}">u<sub>{i}</sub></a> {top_tokens_text(pre, first + i, text)}'
            f"</th>{''.join(cells)}</tr>"
        )
    return (
        f'<h3 id="head-{head}">Head {head}</h3><p><small>cell = post-latent mAND(u<sub>i</sub>, v<sub>j</sub>): '
        f"its id, frequency (shading) and top tokens by activation mass; headers: the parents' top tokens"
        f'</small></p><table class="grid"><tr><th></th>{header}</tr>{"".join(rows)}</table>'
    )


def inspection_html(inspection: Inspection, directory: str) -> str:
    """The one-file report: the summary, the first two heads (KronSAE), the index
    of every latent, and a card for each latent shown."""
    report = inspection.report
    kron = inspection.pre is not None
    config = report["config"]
    group = config["m"] * config["n"] if kron else 1
    heads = []
    if kron:
        heads = list(dict.fromkeys(u // group for u in report["selected"]))[:2]
    cards = set(report["selected"]) | {
        h * group + j for h in heads for j in range(group)
    }
    cards = sorted(cards)
    pre_cards = []
    if kron:
        width = config["m"] + config["n"]
        pre_cards = [h * width + j for h in heads for j in range(width)]

    parts = [
        f"<p>{html.escape(json.dumps(config))}<br>{report['tokens']:,} tokens of "
        f"{html.escape(report['store'])}</p>",
        "<h2>Summary</h2>",
        f"<pre>{html.escape(summary_table(report['summary']))}</pre>",
    ]
    if kron:
        text = token_text(
            inspection.tokenizer, card_tokens(inspection, cards, pre_cards)
        )
        parts.append(head_summary_html(report["summary"]))
        parts += [head_html(inspection, h, text) for h in heads]
    parts.append(latent_index_html(report, set(cards)))
    parts.append("<h2>Latents</h2>")
    parts += [latent_card_html(inspection, u, group) for u in cards]
    if kron:
        parts.append("<h2>Pre-latents of the heads shown</h2>")
        for u in pre_cards:
            entry = report["pre_latents"][u]
            title = f"pre-latent {u}: head {entry['head']}, {entry['side']} {entry['index']}"
            parts.append(card_html(entry, inspection.pre, f"pre-{u}", title))
    title = html.escape(f"What {directory} learned")
    return HTML_PAGE.format(title=title, body="\n".join(parts))


def card_tokens(inspection: Inspection, cards: list, pre_cards: list) -> list:
    """The token ids whose text the head views show."""
    post_tokens = [t for u in cards for t, _ in inspection.post.top_tokens(u)]
    pre_tokens = [t for u in pre_cards for t, _ in inspection.pre.top_tokens(u)]
    return post_tokens + pre_tokens


def head_summary_html(s: dict) -> str:
    a = s["and_check"]
    return (
        f"<p>Section 5.2: mean correlation of post-latents within a head "
        f"{s['within_head_correlation']:.4f}, across heads {s['across_head_correlation']:.4f} (at init: "
        f"{s['init_within_head_correlation']:.4f} / {s['init_across_head_correlation']:.4f}). AND check: "
        f"both parents positive on {100 * a['parents_when_fires']:.2f}% of firings.</p><p>Fig. 18, Pearson r over post-latents:"
        f"</p><pre>{html.escape(fig18_table(s['fig18']))}</pre><h2>Heads</h2>"
    )


def latent_index_html(report: dict, linked: set) -> str:
    """A sortable table of every latent's statistics, linked to its card if shown."""

    def index_row(e):
        name = str(e["id"])
        if e["id"] in linked:
            name = f'<a href="#latent-{e["id"]}">{e["id"]}</a>'
        numbers = "".join(f'<td class="num">{e[s]:.4g}</td>' for s in STAT_NAMES)
        return f"<tr><td>{name}</td>{numbers}</tr>"

    rows = "".join(index_row(e) for e in report["latents"])
    headers = "".join(
        f'<th class="sort" onclick="sortBy(this)">{n.replace("_", " ")}</th>'
        for n in STAT_NAMES
    )
    return (
        '<h2>All latents</h2><p><small>click a header to sort</small></p><div class="index"><table><thead>'
        f"<tr><th>latent</th>{headers}</tr></thead><tbody>{rows}</tbody></table></div>"
    )


def latent_card_html(inspection: Inspection, u: int, group: int) -> str:
    """Latent u's card; a KronSAE's says which head and (u, v) pair it is."""
    title = f"latent {u}"
    if inspection.pre is not None:
        n = inspection.report["config"]["n"]
        title += f" (head {u // group}, u{(u % group) // n} AND v{u % n})"
    entry = inspection.report["latents"][u]
    return card_html(entry, inspection.post, f"latent-{u}", title)


# delphi's own default: each module's latents in 5 files of consecutive latent ranges.
DELPHI_SPLITS = 5


class DelphiCache:
    """The latent cache of EleutherAI's delphi (autointerp: explanations, detection and fuzzing scores),
    written from inspect's stream in the layout delphi/latents/cache.py writes and loader.py reads: per
    module, <dir>/<module>/<start>_<end>.safetensors holding `locations` (N, 3: context, position,
    latent - start) and `activations` (N,) of every activation above 0 in latents start..end, with
    `tokens` (contexts, T), and <dir>/<module>/config.json naming the model and the context length.

    `modules` maps what is cached ("latents", or KronSAE's "pre_latents") to its module name, and
    `limits` to how many of the store's rows it covers: pre-latents fire on about half of every token,
    so a short prefix gives delphi plenty of examples."""

    def __init__(self, modules: dict[str, str], limits: dict[str, int]):
        self.modules = modules
        self.limits = limits
        self.widths = {}
        self.parts = {role: [] for role in modules}
        self.contexts = {role: 0 for role in modules}  # the contexts each one reaches

    def add(self, role: str, acts: torch.Tensor, chunk: TextChunk):
        """acts (B, U) >= 0 on the chunk's rows; the rows that count (chunk.keep) within the limit."""
        self.widths[role] = acts.shape[1]
        rows = torch.nonzero(chunk.keep & (chunk.rows < self.limits[role])).squeeze(1)
        if not len(rows):
            return
        found, units = torch.nonzero(acts[rows] > 0, as_tuple=True)
        where = rows[found]
        locations = torch.stack([chunk.context[where], chunk.position[where], units], 1)
        self.parts[role].append((locations.int(), acts[where, units].float()))
        self.contexts[role] = max(
            self.contexts[role], int(chunk.context[rows].max()) + 1
        )

    def save(
        self, directory: str, tokens_of: Callable[[int], np.ndarray], config: dict
    ):
        """Every module's files; tokens_of(n) gives the store's first n contexts' token ids (n, T)."""
        for role, module in self.modules.items():
            if role not in self.widths:
                continue
            folder = Path(directory, module)
            for stale in folder.glob("*.safetensors"):
                stale.unlink()  # an earlier cache of another width
            tokens = tokens_of(self.contexts[role]).astype(np.int64)
            parts = self.parts[role] or [(torch.zeros(0, 3).int(), torch.zeros(0))]
            locations = torch.cat([loc for loc, _ in parts])
            activations = torch.cat([act for _, act in parts])
            width = self.widths[role]
            self.save_splits(folder, locations, activations, tokens, width)
            write_json(
                folder / "config.json",
                {
                    **config,
                    "module": role,
                    "width": width,
                    "n_tokens": self.limits[role],
                },
            )

    @staticmethod
    def save_splits(folder: Path, locations, activations, tokens, width: int):
        """As delphi's LatentCache.save_splits: ranges from linspace(0, width), inclusive ends, latents
        counted from each range's start, uint16 where every index fits (else uint32)."""
        from safetensors.numpy import save as safetensors_bytes

        splits = min(DELPHI_SPLITS, width)
        bounds = torch.linspace(0, width, steps=splits + 1).long().tolist()
        for start, stop in zip(bounds[:-1], bounds[1:]):
            inside = (locations[:, 2] >= start) & (locations[:, 2] < stop)
            part = locations[inside].numpy().astype(np.int64)
            part[:, 2] -= start
            small = not len(part) or max(part[:, 0].max(), part[:, 2].max()) < 2**16
            blob = safetensors_bytes(
                {
                    "locations": part.astype(np.uint16 if small else np.uint32),
                    "activations": activations[inside].numpy(),
                    "tokens": tokens,
                }
            )
            path = folder / f"{start}_{stop - 1}.safetensors"
            write_atomic(path, lambda f, blob=blob: f.write(blob))


def store_contexts(store: ActivationStore, count: int) -> np.ndarray:
    """The token ids of the store's first `count` contexts, (count, T), over its shards."""
    ids = []
    total = 0
    for k in range(len(store.shards)):
        if total >= count:
            break
        ids.append(store.text(k)[0])
        total += len(ids[-1])
    return np.concatenate(ids)[:count]


def delphi_config(store: ActivationStore, directory: str, tokens: int) -> dict:
    """config.json of a delphi module: delphi's CacheConfig fields, and model_name, which delphi's loader
    reads its tokenizer from."""
    manifest = store.manifest
    T = store.text(0)[0].shape[1]
    texts = [t["path"] for t in manifest.get("text", [])]
    return {
        "dataset_repo": ",".join(texts) or str(store.directory),
        "dataset_split": "",
        "dataset_name": "",
        "dataset_column": "text",
        "batch_size": 1,
        "cache_ctx_len": T,
        "ctx_len": T,  # the key older delphi versions read
        "n_splits": DELPHI_SPLITS,
        "model_name": manifest.get("tokenizer") or manifest.get("model"),
        "written_by": "kronsae.py inspect --delphi",
        "checkpoint": str(Path(directory).absolute()),
        "store": str(store.directory.absolute()),
        "hook_names": manifest.get("hooks"),
        "tokens_read": tokens,
    }


@dataclass
class InspectConfig:
    """What `inspect` reads, keeps and writes (besides --data, --seed and --json)."""

    tokens: int = opt(200_000, "read at most this many of the store's tokens")
    latents: tuple = opt(
        (),
        "latents to show in full, e.g. 12,345 (instead of --sample)",
        parse=comma_ints,
    )
    sample: int = opt(32, "else show this many latents drawn by --seed")
    examples: int = opt(10, "top examples kept per latent")
    html: str = opt("", "write the report here (one self-contained HTML file)")
    delphi: str = opt(
        "",
        "write EleutherAI delphi's latent cache here, for its LLM explanations and "
        "detection and fuzzing scores: a module named after the checkpoint folder (e.g. "
        "kron), and for KronSAE its pre-latents as a second module (kron_pre)",
    )
    delphi_pre_tokens: int = opt(
        10_000,
        "with --delphi: cache KronSAE's pre-latents, which fire on about half of every "
        "token, over only this many of the tokens read",
    )
    batch: int = opt(2048, "rows per chunk of the streaming pass")

    def __post_init__(self):
        for name in ("tokens", "sample", "examples", "batch", "delphi_pre_tokens"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{flag_of(name)} must be positive, got {value}")


def inspect_job(directory: str, data: str, cfg: InspectConfig, run: RunConfig) -> dict:
    for path, flag in ((cfg.html, "html"), (run.json, "json")):
        if path:
            check_writable(path, flag)
    cache = None
    if cfg.delphi:
        check_writable(cfg.delphi, "delphi", directory=True)
        name = Path(directory).absolute().name
        cache = DelphiCache(
            {"latents": name, "pre_latents": f"{name}_pre"},
            {
                "latents": cfg.tokens,
                "pre_latents": min(cfg.tokens, cfg.delphi_pre_tokens),
            },
        )
    inspection = inspect_sae(
        directory,
        data,
        cfg.tokens,
        list(cfg.latents) or None,
        cfg.sample,
        cfg.examples,
        cfg.batch,
        run.seed,
        cache=cache,
    )
    if cache is not None:
        store = ActivationStore(data)
        config = delphi_config(store, directory, inspection.report["tokens"])
        cache.save(cfg.delphi, partial(store_contexts, store), config)
        written = [cache.modules[role] for role in cache.widths]
        print(f"wrote delphi's latent cache of {', '.join(written)} to {cfg.delphi}")
    if run.json:
        # tens of MB at F = 8192: no indentation
        write_json(run.json, inspection.report, indent=None)
    if cfg.html:
        page = inspection_html(inspection, directory)
        write_atomic(cfg.html, lambda f: f.write(page.encode()))
    print_inspection(inspection.report, list(cfg.latents))
    for path, what in ((run.json, "statistics"), (cfg.html, "report")):
        if path:
            print(f"wrote the {what} to {path}")
    return inspection.report


# ============================================================================= 16. First-letter absorption
# SAEBench's feature absorption (Karvonen et al. 2025, after Chanin et al. 2024; PAPER_NOTES section 8), the
# metric of the paper's fig. 4 and table 5. A linear probe reads a word's first letter from the residual
# stream; the SAE's "main" latents for that letter are found by k-sparse probing; a word is absorbed when the
# main latents fall short and other latents aligned with the probe carry its projection instead.

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# SAEBench's thresholds (sae_bench/evals/absorption: feature_absorption_calculator.py and main.py's config)
F1_JUMP = 0.03  # k-sparse probing: a latent joins the main ones while F1 rises by more than this
MIN_PROBE_F1 = (
    0.6  # a letter counts only if the ground-truth probe's test F1 exceeds this
)
MIN_LETTERS = 20  # SAEBench aborts with fewer letters above MIN_PROBE_F1
FULL_COS = 0.025  # full absorption: the top-projecting latent's cosine with the probe, at least
FRACTION_COS = (
    0.1  # absorption fraction: each absorbing latent's cosine with the probe, at least
)
SHARE = (
    0.4  # the absorbing latents must carry at least this share of the probe projection
)
MAX_ABSORBERS = 3  # absorption fraction: at most this many absorbing latents
ICL_EXAMPLES = 10  # in-context examples before each word


def alphabetic_words(tokenizer) -> list[str]:
    """The vocabulary's tokens that are one alphabetic word, with or without a leading space, as their text."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    words = tokenizer.batch_decode([[i] for i in ids])
    return sorted({w for w in words if re.fullmatch(r" ?[A-Za-z]+", w)})


def icl_prompt(word: str, examples: list[str]) -> tuple[str, int]:
    """SAEBench's prompt: `word: W` lines for the examples, then the word and its colon; returns the text and
    the character index where the word ends (the position to read is the token holding the word's last letter)."""
    lines = "".join(f"\n{e}: {e.strip()[0].upper()}" for e in examples)
    text = f"{lines}\n{word}:"
    return text, len(text) - 1


def word_position(tokenizer, text: str, end: int) -> tuple[list[int], int]:
    """Token ids of `text` (without special tokens) and the index of the token that holds character end - 1,
    found from the tokenizer's own offsets, never from a fixed offset. Slow tokenizers: tokenise the prefix."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for i, (a, b) in enumerate(encoded["offset_mapping"]):
            if a <= end - 1 < b:
                return encoded["input_ids"], i
        raise ValueError(f"no token of {text!r} covers character {end - 1}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, len(tokenizer(text[:end], add_special_tokens=False)["input_ids"]) - 1


# the residual stream at each word's position, computed once per model and layer
class ProbeData(NamedTuple):
    acts: torch.Tensor  # (N, d) float32
    letters: torch.Tensor  # (N,) 0..25
    train: torch.Tensor  # (N,) bool: the 80% the probes train on
    words: list[str]


def probe_data(
    model,
    tokenizer,
    layer: int,
    words: list[str],
    seed: int,
    batch: int = 32,
    progress: bool = True,
) -> ProbeData:
    """Each word's prompt through the model up to `layer` (right-padded batches: a causal LM's earlier
    positions never see the padding), read at the word's last token."""
    rng = random.Random(seed)
    before, _ = context_wrapping(tokenizer)
    prompts = []
    for word in words:
        examples = rng.sample([w for w in words if w != word], ICL_EXAMPLES)
        ids, position = word_position(tokenizer, *icl_prompt(word, examples))
        prompts.append((before + ids, len(before) + position))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    acts = []
    for start in tqdm(
        range(0, len(prompts), batch),
        desc=f"probe prompts, layer {layer}",
        disable=not progress,
    ):
        chunk = prompts[start : start + batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor(
            [ids + [pad] * (width - len(ids)) for ids, _ in chunk], device=device
        )
        h = residual_at(model, ids, layer)
        acts.append(
            h[torch.arange(len(chunk)), torch.tensor([p for _, p in chunk])]
            .float()
            .cpu()
        )
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed))
    train = torch.zeros(len(words), dtype=torch.bool)
    train[order[: int(0.8 * len(words))]] = True
    letters = torch.tensor([LETTERS.index(w.strip()[0].lower()) for w in words])
    return ProbeData(torch.cat(acts), letters, train, words)


# SAEBench's probe training: epochs, batch, and the fewest steps a small set still gets.
PROBE_EPOCHS, PROBE_BATCH, PROBE_MIN_STEPS = 50, 512, 1000


def fit_probes(
    x: torch.Tensor, y: torch.Tensor, classes: int, l1: float = 0.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic probes, as SAEBench trains them: Adam, lr 1e-2 decaying to 1e-5, each class's
    positives weighted by negatives/positives, an optional L1 penalty; 50 epochs, or more when a small set
    would give fewer than PROBE_MIN_STEPS steps. Returns W (classes, d) and b (classes,)."""
    g = torch.Generator().manual_seed(seed)
    batch = PROBE_BATCH
    epochs = max(PROBE_EPOCHS, math.ceil(PROBE_MIN_STEPS / math.ceil(len(y) / batch)))
    target = nnf.one_hot(y, classes).float()
    positives = target.sum(0)
    weight = (len(y) - positives) / positives.clamp_min(1)
    W = torch.zeros(classes, x.shape[1], requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([W, b], lr=1e-2)
    steps = epochs * math.ceil(len(y) / batch)
    # 1e-2 -> 1e-5
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 1e-3 ** (t / steps)
    )
    for _ in range(epochs):
        for rows in torch.randperm(len(y), generator=g).split(batch):
            logits = x[rows] @ W.T + b
            loss = nnf.binary_cross_entropy_with_logits(
                logits, target[rows], pos_weight=weight
            )
            if l1:
                loss = loss + l1 * W.abs().sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return W.detach(), b.detach()


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, steps: int = 30
) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced logistic regression on few features (k-sparse probing), as scikit-learn's default fit:
    the balanced log-loss plus 0.5 |w|^2 (the intercept unpenalised), minimised by Newton's method."""
    y = y.double()
    weight = torch.where(
        y > 0,
        len(y) / (2 * y.sum().clamp_min(1)),
        len(y) / (2 * (1 - y).sum().clamp_min(1)),
    )
    # the last column: intercept
    X = torch.cat([x.double(), torch.ones(len(y), 1, dtype=torch.float64)], 1)
    penalty = torch.ones(X.shape[1], dtype=torch.float64)
    penalty[-1] = 0
    theta = torch.zeros(X.shape[1], dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(X @ theta)
        grad = X.T @ (weight * (p - y)) + penalty * theta
        hessian = (X.T * (weight * p * (1 - p))) @ X + torch.diag(penalty + 1e-9)
        step = torch.linalg.solve(hessian, grad)
        theta -= step
        if step.abs().max() < 1e-8:
            break
    return theta[:-1].float(), theta[-1].float()


def f1_score(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    tp = float((predicted & actual).sum())
    return 2 * tp / max(1.0, float(predicted.sum() + actual.sum()))


def main_latents(
    codes: torch.Tensor, data: ProbeData, letter: int, ranking: torch.Tensor
) -> tuple[list, list]:
    """k-sparse probing: the letter's top latents by the L1 probe's weight; k grows from 1 while test F1 rises
    by more than F1_JUMP. Returns the main latents and the F1 at k = 1..10."""
    # (n, 10) each
    train, test = (
        codes[data.train][:, ranking],
        codes[~data.train][:, ranking],
    )
    y = data.letters == letter
    f1s = []
    for k in range(1, 11):
        w, b = fit_logistic(train[:, :k], y[data.train])
        f1s.append(f1_score(test[:, :k] @ w + b > 0, y[~data.train]))
    k = 1
    while k < 10 and f1s[k] - f1s[k - 1] > F1_JUMP:
        k += 1
    return ranking[:k].tolist(), f1s


def absorption_of(
    x: torch.Tensor,
    code: torch.Tensor,
    cos: torch.Tensor,
    probe: torch.Tensor,
    main: list[int],
) -> tuple[float, bool]:
    """One word: its absorption fraction and whether it is fully absorbed (SAEBench's
    FeatureAbsorptionCalculator). x (d,) the residual, code (F,) the SAE's latents, cos (F,) each decoder row's
    cosine with the unit probe direction `probe` (d,)."""
    total = float(x @ probe)  # the probe's projection of the residual
    if total <= 0:
        return 0.0, False
    projection = (code * cos).detach()  # each latent's share of it
    main_projection = float(projection[main].sum())
    others = torch.ones_like(cos, dtype=torch.bool)
    others[main] = False
    others &= (cos >= FRACTION_COS) & (projection > 0)
    absorbers = float(
        projection[others].topk(min(MAX_ABSORBERS, int(others.sum()))).values.sum()
    )
    if main_projection >= total or absorbers / total < SHARE:
        fraction = 0.0
    elif main_projection <= 0:
        fraction = 1.0
    else:
        absorbed = min(absorbers, total - main_projection)
        fraction = min(1.0, max(0.0, absorbed / (absorbed + main_projection)))
    top = int(projection.argmax())
    full = bool(
        (code[main] <= 1e-8).all()
        and cos[top] >= FULL_COS
        and total >= 0
        and projection[top] / total >= SHARE
    )
    return fraction, full


def letter_gate(data: ProbeData, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The ground-truth probe on the residual stream (scaled to mean norm sqrt(d) for the optimiser: the
    directions are unchanged) and each letter's test F1."""
    scale = input_scale(data.acts[data.train])
    W, b = fit_probes(
        data.acts[data.train] * scale, data.letters[data.train], len(LETTERS), seed=seed
    )
    scores = data.acts * scale @ W.T + b  # (N, 26)
    test = ~data.train
    f1 = {
        LETTERS[c]: f1_score(scores[test, c] > 0, data.letters[test] == c)
        for c in range(len(LETTERS))
        if (data.letters[test] == c).any()
    }
    return W, scores, f1


@torch.no_grad()
def sae_absorption(
    sae: SparseAutoencoder,
    data: ProbeData,
    probe: torch.Tensor,
    scores: torch.Tensor,
    letters: list[str],
    seed: int,
) -> dict:
    """SAEBench's three figures for one SAE, per letter and as mean and std over `letters`."""
    codes = torch.cat([dense_code(sae, x) for x in data.acts.split(1024)])  # (N, F)
    with torch.enable_grad():
        l1_W, _ = fit_probes(
            codes[data.train],
            data.letters[data.train],
            len(LETTERS),
            l1=0.01,
            seed=seed,
        )
    per_letter = {}
    for name in letters:
        c = LETTERS.index(name)
        main, f1s = main_latents(codes, data, c, l1_W[c].topk(10).indices)
        direction = nnf.normalize(probe[c], dim=0)
        cos = nnf.normalize(sae.W_dec, dim=-1) @ direction
        # probe positives
        words = (
            (~data.train & (data.letters == c) & (scores[:, c] > 0)).nonzero().flatten()
        )
        results = [
            absorption_of(data.acts[i], codes[i], cos, direction, main)
            for i in words.tolist()
        ]
        per_letter[name] = {
            "main_latents": main,
            "split_features": len(main),
            "k_sparse_f1": f1s,
            "words": len(results),
            "mean_absorption_fraction": sum(f for f, _ in results)
            / max(1, len(results)),
            "full_absorption": sum(full for _, full in results) / max(1, len(results)),
        }
    ev = evaluate(sae, data.acts)["ev"]
    return {
        **{
            key: mean_std([per_letter[n][key] for n in letters] or [math.nan])
            for key in ("mean_absorption_fraction", "full_absorption", "split_features")
        },
        "ev_prompts": ev,
        "letters": per_letter,
    }


def run_ev(directory: str) -> float:
    """The held-out EV the training run measured for this SAE (OUT/arch/metrics.json), NaN when there is none."""
    try:
        return float(json.loads(Path(directory, "metrics.json").read_text())["ev"])
    except (OSError, KeyError, ValueError, TypeError):
        return math.nan


def sae_name(directory: str) -> str:
    return "/".join(Path(directory).resolve().parts[-2:])


def cached_probe_data(
    model_name: str,
    layer: int,
    words: int,
    seed: int,
    cache: Path,
    device,
    batch: int,
    progress: bool = True,
) -> ProbeData:
    """ProbeData from the cache beside the run (numpy and JSON: nothing that runs code), or computed and cached."""
    key = hashlib.sha256(
        json.dumps([str(model_name), layer, words, seed, ICL_EXAMPLES]).encode()
    ).hexdigest()[:12]
    arrays, meta = cache / f"absorption_{key}.npz", cache / f"absorption_{key}.json"
    if arrays.is_file() and meta.is_file():
        with np.load(arrays, allow_pickle=False) as f:
            return ProbeData(
                torch.from_numpy(f["acts"]),
                torch.from_numpy(f["letters"]),
                torch.from_numpy(f["train"]),
                json.loads(meta.read_text())["words"],
            )
    model, tokenizer, _ = load_lm(model_name, device, layer)
    vocabulary = alphabetic_words(tokenizer)
    if len(vocabulary) <= ICL_EXAMPLES:
        raise ValueError(
            f"{model_name}'s vocabulary has {len(vocabulary)} alphabetic words; the prompts need more "
            f"than {ICL_EXAMPLES}"
        )
    chosen = random.Random(seed).sample(vocabulary, min(words, len(vocabulary)))
    data = probe_data(model, tokenizer, layer, chosen, seed, batch, progress)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        acts=data.acts.numpy(),
        letters=data.letters.numpy(),
        train=data.train.numpy(),
    )
    write_atomic(arrays, lambda f: f.write(buffer.getvalue()))
    write_json(
        meta,
        {
            "model": str(model_name),
            "layer": layer,
            "seed": seed,
            "words": data.words,
            "vocabulary_words": len(vocabulary),
        },
    )
    return data


def absorption(
    directories: list[str],
    model_name: str,
    layer: int,
    words: int = 4000,
    seed: int = 0,
    device="cpu",
    batch: int = 32,
    progress: bool = True,
) -> dict:
    """Absorption of each SAE in `directories`, all trained on `model_name`'s hidden_states[layer]. The SAEs,
    the layer, the widths and that the model is a causal LM are checked against its config before any weights
    or prompts load."""
    from transformers import AutoConfig

    # The prompts' activations are float32.
    saes = [load(d).float() for d in directories]
    name, extra = model_source(model_name)
    config = from_pretrained(AutoConfig.from_pretrained, name, extra)
    check_layer(config, layer)
    if not is_causal_lm(config, extra):
        raise ValueError(
            f"{model_name} is not a causal LM; the first-letter prompts need one"
        )
    width = getattr(config, "hidden_size", None)
    for d, sae in zip(directories, saes):
        if width and sae.d_in != width:
            raise ValueError(
                f"the SAE in {d} reads d={sae.d_in}, but {model_name} has width {width}"
            )
    data = cached_probe_data(
        model_name,
        layer,
        words,
        seed,
        Path(directories[0]).resolve().parent,
        device,
        batch,
        progress,
    )
    data, bad = finite_probe_data(data)
    result = measure_absorption(
        {sae_name(d): (sae, run_ev(d)) for d, sae in zip(directories, saes)}, data, seed
    )
    result["gate"]["non_finite_dropped"] = bad
    return result


def finite_probe_data(data: ProbeData) -> tuple[ProbeData, int]:
    """The words whose activations are finite, and how many were not (a model that overflows, or a damaged
    cache): they are dropped and counted, never fed to the probes."""
    ok = finite_mask(data.acts)
    bad = int((~ok).sum())
    if not bad:
        return data, 0
    check_some_finite(int(ok.sum()), bad, "words' activations")
    print(
        f"non-finite rows: dropped {bad:,} of {len(ok):,} words whose activations hold NaN or inf"
    )
    words = [data.words[i] for i in ok.nonzero().flatten().tolist()]
    return ProbeData(data.acts[ok], data.letters[ok], data.train[ok], words), bad


def measure_absorption(saes: dict, data: ProbeData, seed: int = 0) -> dict:
    """The gate, then each SAE's figures: saes maps a name to (SAE, its held-out EV)."""
    probe, scores, f1 = letter_gate(data, seed)
    passed = sorted(name for name, value in f1.items() if value > MIN_PROBE_F1)
    result = {
        "gate": {
            "letters": passed,
            "probe_f1": f1,
            "passed": len(passed) >= MIN_LETTERS,
            "words": len(data.words),
            "test_words": int((~data.train).sum()),
        },
        "saes": {},
    }
    for name, (sae, ev) in saes.items():
        result["saes"][name] = {
            **sae_absorption(sae, data, probe, scores, passed, seed),
            "ev": ev,
        }
    return result


def absorption_table(result: dict) -> str:
    def cell(v):
        return f"{v['mean']:.3f} ± {v['std']:.3f}"

    return format_table(
        [
            "SAE",
            "absorption fraction",
            "full absorption",
            "split features",
            "EV",
            "EV (prompts)",
        ],
        [
            [
                name,
                cell(r["mean_absorption_fraction"]),
                cell(r["full_absorption"]),
                cell(r["split_features"]),
                f"{r['ev']:.4f}",
                f"{r['ev_prompts']:.4f}",
            ]
            for name, r in result["saes"].items()
        ],
    )


def save_absorption_figure(result: dict, path: str):
    plt = pyplot()
    names = list(result["saes"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in zip(
        axes,
        ("mean_absorption_fraction", "full_absorption"),
        ("mean absorption fraction", "full-absorption rate"),
    ):
        values = [result["saes"][n][key] for n in names]
        ax.bar(
            range(len(names)),
            [v["mean"] for v in values],
            yerr=[v["std"] for v in values],
            capsize=3,
            color=["#888" if BASELINE in n else "#2a7" for n in names],
        )
        ax.set_xticks(
            range(len(names)),
            [f"{n}\nEV {result['saes'][n]['ev']:.3f}" for n in names],
            fontsize=7,
        )
        ax.set_title(
            title + ("" if result["gate"]["passed"] else " (below the gate)"),
            fontsize=9,
        )
    fig.suptitle(
        f"first-letter absorption, {len(result['gate']['letters'])} letters (mean ± std over letters)",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


@dataclass
class AbsorptionConfig:
    """What `absorption` measures on (besides the model, --layer, --seed and --json)."""

    words: int = opt(
        4000,
        "alphabetic vocabulary words to use, drawn by --seed (80% train, 20% test)",
    )
    model_batch: int = opt(32, "prompts per forward pass")
    figure: str = opt("", "save a bar chart of the SAEs' absorption here (PNG)")

    def __post_init__(self):
        for name in ("words", "model_batch"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{flag_of(name)} must be positive, got {value}")
        if self.words < 50:
            raise ValueError(
                f"--words {self.words} is too few for 26 letters' probes; use at least 50"
            )


def absorption_job(
    directories: list[str],
    model: str,
    layer: int,
    cfg: AbsorptionConfig,
    run: RunConfig,
) -> dict:
    for path, flag in ((run.json, "json"), (cfg.figure, "figure")):
        if path:
            check_writable(path, flag)
    check_device(run.device)
    result = absorption(
        directories,
        model,
        layer,
        cfg.words,
        run.seed,
        pick_device(run.device),
        cfg.model_batch,
    )
    gate = result["gate"]
    if not gate["passed"]:
        print(
            f"below the gate: only {len(gate['letters'])} letters have a probe F1 above {MIN_PROBE_F1} (SAEBench "
            f"needs {MIN_LETTERS}); the figures below are reported anyway, marked as below the gate"
        )
    print(
        f"{gate['test_words']} test words of {gate['words']}; {len(gate['letters'])} letters pass the gate; "
        f"mean ± std over letters"
    )
    print(absorption_table(result))
    if run.json:
        write_json(run.json, result)
    if cfg.figure:
        save_absorption_figure(result, cfg.figure)
    return result


# ============================================================================= 17. Benchmark


def shared_opt(config_cls, name: str, help: str = ""):
    """A field that is another config's flag too: its default, and its help unless this one
    means something more particular. The flag's checks (check_choice, check_seed) are shared."""
    f = config_cls.__dataclass_fields__[name]
    return opt(f.default, help or f.metadata["help"])


@dataclass
class BenchConfig:
    batch: int = opt(1024, "B, tokens per step")
    d_in: int = opt(512, "d, input width")
    k: int = opt(32, "active latents per token")
    dict_sizes: tuple = opt(
        (16384, 65536), "comma-separated dictionary sizes F", parse=comma_ints
    )
    shapes: tuple = opt(
        ((2, 8), (4, 4), (8, 8), (32, 32)),
        "comma-separated KronSAE (m, n) shapes, as MxN",
        parse=kron_shapes,
    )
    flat_width: int = opt(
        4096, "encoder width h*(m+n) for the flat-in-F series (0 = skip)"
    )
    repeats: int = opt(5, "timed repeats per step; the median is reported")
    naive: bool = opt(
        True, "also time the naive KronSAE (1) or not (0)", parse=zero_one
    )
    dead: float = opt(
        0.05,
        "share of latents marked dead for the 'aux' column: fwd+bwd with AuxK on; 0 = skip",
    )
    precision: str = opt(
        "fp32",
        "fp32, or bf16: every row's fwd+bwd under bfloat16 autocast (ours as --precision bf16 "
        "trains; sparsify's as it ships on CUDA, and on this device): peers at the same precision",
    )
    sparsify_bf16: bool = opt(
        False,
        "sparsify's column on CUDA: 0 = in float32 like ours, 1 = as it ships (bfloat16 "
        "autocast in its forward)",
        parse=zero_one,
    )
    profile: bool = opt(
        False,
        "1 = instead of the table, split one whole training step (AuxK on --dead) of TopK and "
        "KronSAE at the first of --shapes into its phases, with torch.profiler",
        parse=zero_one,
    )
    device: str = shared_opt(RunConfig, "device")
    seed: int = shared_opt(RunConfig, "seed", "seed of the inputs and the SAEs' init")
    json: str = shared_opt(RunConfig, "json", "write the table to this JSON file")

    def __post_init__(self):
        check_positive(batch=self.batch, d_in=self.d_in, k=self.k, repeats=self.repeats)
        if not self.dict_sizes or not self.shapes:
            raise ValueError("--dict-sizes and --shapes must each name at least one")
        if min(self.dict_sizes) < 1:
            raise ValueError(f"--dict-sizes must be positive, got {self.dict_sizes}")
        if not 0 <= self.dead < 1:
            raise ValueError(f"--dead must be in [0, 1), got {self.dead}")
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("device", self.device, DEVICES)
        check_seed(self.seed)
        if self.flat_width < 0 or self.flat_width % 64:
            raise ValueError(
                f"flat_width must be 0 or a multiple of 64 (h >= 1 at 32x32), got {self.flat_width}"
            )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def peak_bytes(fn, device) -> int:
    """Peak memory that fn allocates beyond what is alive when it starts.

    CUDA: the caching allocator's own peak. CPU: replayed from the profiler's allocation records, each
    op's net allocation counted when the op ends (an estimate that can miss temporaries freed inside an op).
    """
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.end):
        live += (
            event.cpu_memory_usage
            if event.name == "[memory]"
            else event.self_cpu_memory_usage
        )
        peak = max(peak, live)
    return peak


def time_step(
    x: torch.Tensor,
    bcfg: BenchConfig,
    model: nn.Module,
    fwd_bwd,
    fwd_bwd_aux,
    opt_step,
    encoder_rows: int,
    once: bool = False,
) -> dict:
    """The timing columns of one SAE: fwd+bwd, with AuxK, the optimiser step, peak memory, and a plain matmul
    of the encoder's shape. once: one run without warm-up (the naive model takes seconds per step). --precision
    bf16: the fwd+bwd under bfloat16 autocast, and the GEMM in bfloat16."""
    device, bf16 = x.device, bcfg.precision == "bf16"
    fwd_bwd, fwd_bwd_aux = (
        at_precision(fwd_bwd, bcfg, device),
        at_precision(fwd_bwd_aux, bcfg, device),
    )
    fwd_bwd_ms = median_ms(
        fwd_bwd, device, 1 if once else bcfg.repeats, warmup=not once
    )
    aux_ms = (
        median_ms(fwd_bwd_aux, device, bcfg.repeats) if bcfg.dead and not once else None
    )
    opt_ms = median_ms(opt_step, device, 1 if once else bcfg.repeats)
    # measure from a clean start, so the step's own gradients count
    model.zero_grad(set_to_none=True)
    peak = peak_bytes(fwd_bwd, device)
    W = torch.randn(
        encoder_rows,
        x.shape[1],
        device=device,
        dtype=torch.bfloat16 if bf16 else torch.float32,
    )
    x_gemm = x.to(W.dtype)
    # the roof: the encoder matmul alone
    gemm_ms = median_ms(lambda: x_gemm @ W.T, device, bcfg.repeats)
    return {
        "encoder_rows": encoder_rows,
        "fwd_bwd_ms": fwd_bwd_ms,
        "aux_ms": aux_ms,
        "opt_ms": opt_ms,
        "peak_mb": peak / 2**20,
        "gemm_ms": gemm_ms,
        "gemm_gflops": 2 * x.shape[0] * encoder_rows * x.shape[1] / gemm_ms / 1e6,
        "step_over_gemm": fwd_bwd_ms / gemm_ms,
    }


OPT_STEP_READS_AND_WRITES = 15  # of F x d floats: projection 5 (bmm reads g, W; addcmul g, W, g), AdamW 7, renorm 3


def step_split(sae: SparseAutoencoder, x: torch.Tensor, bcfg: BenchConfig) -> dict:
    """The flat-in-F columns. fwd+bwd at B and at B/2 tokens split a step into its per-token part, 2 (T(B) - T(B/2)),
    and its once-per-step part, 2 T(B/2) - T(B) (zeroing and adding into the kept (F, d) gradients). The optimiser
    step's (F, d) work (opt_ms) is set against a plain copy that moves as many bytes (copy_ms): one copy of F x d
    floats (2 F d moved, far beyond any cache), scaled to the step's OPT_STEP_READS_AND_WRITES."""
    full, half = (
        median_ms(
            at_precision(partial(fwd_bwd, sae, batch), bcfg, x.device),
            x.device,
            bcfg.repeats,
        )
        for batch in (x, x[: len(x) // 2])
    )
    source, target = torch.ones_like(sae.W_dec), torch.empty_like(sae.W_dec)
    copy_ms = (
        median_ms(lambda: target.copy_(source), x.device, bcfg.repeats)
        * OPT_STEP_READS_AND_WRITES
        / 2
    )
    return {
        "per_token_ms": 2 * (full - half),
        "per_step_ms": 2 * half - full,
        "copy_ms": copy_ms,
    }


def at_precision(fn, bcfg: BenchConfig, device):
    """fn, run under bfloat16 autocast with --precision bf16."""

    def run():
        with autocast_if(bcfg.precision == "bf16", device):
            return fn()

    return run


def fwd_bwd(sae: SparseAutoencoder, x: torch.Tensor):
    """The reconstruction loss's forward and backward, the gradients kept allocated as train_step keeps them."""
    sae.zero_grad(set_to_none=False)
    normalized_mse(x, sae(x)).backward()


def dead_mask(F: int, share: float, device) -> torch.Tensor:
    dead = torch.zeros(F, dtype=torch.bool, device=device)
    dead[torch.randperm(F, device=device)[: int(share * F)]] = True
    return dead


def bench_one(sae: SparseAutoencoder, x: torch.Tensor, bcfg: BenchConfig) -> dict:
    """Time fwd+bwd of the reconstruction loss, and separately the optimiser step with its constraint steps.
    The naive model gets one timed run and no warm-up: it takes seconds per step, and the targets
    against it are 5x."""
    optimizer = make_optimizer(sae, lr=1e-4)
    dead = dead_mask(sae.F, bcfg.dead, x.device)

    def fwd_bwd_aux():  # the whole training loss once latents have died: reconstruction and AuxK (1/32)
        sae.zero_grad(set_to_none=False)  # as train_step: gradients stay allocated
        enc = sae.encode_with_aux(x, dead)
        recon, x_hat = reconstruction_loss(sae, x, enc)
        (recon + auxk_loss(sae, (x - x_hat).detach(), enc) / 32).backward()

    def opt_step():
        sae.remove_parallel_grad_()
        optimizer.step()
        sae.normalize_decoder_()

    naive = type(sae) is NaiveKronSAE  # the listing, timed beside the fast KronSAE
    if naive:
        name = "naive_" + KRON.bench_name(sae)
    else:
        name = arch_of(sae).bench_name(sae)
    row = {
        "name": name,
        "dict_size": sae.F,
        "h": getattr(sae, "h", None),
        "flops_per_token": sae.flops_per_token(),
    }
    row |= time_step(
        x,
        bcfg,
        sae,
        partial(fwd_bwd, sae, x),
        fwd_bwd_aux,
        opt_step,
        sae.W_enc.shape[0],
        once=naive,
    )
    return row | {
        "gflops": 2 * x.shape[0] * row["flops_per_token"] / row["fwd_bwd_ms"] / 1e6
    }


@functools.cache
def has_sparsify() -> bool:
    """Whether EleutherAI's sparsify imports here (its column is optional; a broken install just skips it)."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig  # noqa: F401
    except Exception:
        return False
    return True


def bench_sparsify(F: int, x: torch.Tensor, bcfg: BenchConfig) -> dict:
    """EleutherAI's sparsify TopK SAE (pip install eai-sparsify), timed like ours: the same loss, AuxK on the same
    share of dead latents, the same fused AdamW, and its own decoder constraint steps. Its forward carries a
    bfloat16 autocast for CUDA; unless --sparsify-bf16 1 or --precision bf16, that decorator is unwrapped, so both
    run in float32. With --precision bf16 both run under bfloat16 autocast on any device (time_step)."""
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(
        x.shape[1], SparseCoderConfig(num_latents=F, k=bcfg.k), device=x.device
    )
    if not (bcfg.sparsify_bf16 or bcfg.precision == "bf16"):
        coder.forward = partial(
            getattr(SparseCoder.forward, "__wrapped__", SparseCoder.forward), coder
        )
    optimizer = make_optimizer(coder, lr=1e-4)
    dead = dead_mask(F, bcfg.dead, x.device)

    def fwd_bwd():
        coder.zero_grad(set_to_none=False)  # as train_step: gradients stay allocated
        coder(x).fvu.backward()

    def fwd_bwd_aux():
        coder.zero_grad(set_to_none=False)  # as train_step: gradients stay allocated
        out = coder(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()

    def opt_step():
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        coder.set_decoder_norm_to_unit_norm()

    row = {
        "name": "sparsify_topk",
        "dict_size": F,
        "h": None,
        "flops_per_token": x.shape[1] * F + bcfg.k * x.shape[1],
    }
    row |= time_step(x, bcfg, coder, fwd_bwd, fwd_bwd_aux, opt_step, F)
    return row | {
        "gflops": 2 * x.shape[0] * row["flops_per_token"] / row["fwd_bwd_ms"] / 1e6
    }


def bench_models(bcfg: BenchConfig):
    """(section, class, kwargs) for each model to time: per F, TopK, sparsify's TopK when installed, KronSAE
    per shape, naive per shape; then flat-in-F. Models are built one at a time, so no model's memory outlives
    its own measurement."""
    d, k = bcfg.d_in, bcfg.k
    specs = []
    for F in bcfg.dict_sizes:
        specs.append((f"F={F}", TopKSAE, dict(d_in=d, dict_size=F, k=k)))
        if has_sparsify():  # the optional column: EleutherAI's TopK, when installed
            specs.append((f"F={F}", "sparsify", dict(F=F)))
        for cls in (KronSAE, NaiveKronSAE) if bcfg.naive else (KronSAE,):
            specs += [
                (f"F={F}", cls, dict(d_in=d, h=F // (m * n), m=m, n=n, k=k))
                for m, n in bcfg.shapes
                if F % (m * n) == 0
            ]
    if bcfg.flat_width:
        for mn in (8, 16, 32):  # h*(m+n) fixed, F = h*m*n grows with m = n
            specs.append(
                (
                    f"flat h(m+n)={bcfg.flat_width}",
                    KronSAE,
                    dict(d_in=d, h=bcfg.flat_width // (2 * mn), m=mn, n=mn, k=k),
                )
            )
    return specs


# The phases of a training step. Methods of the SAE are wrapped in profiler ranges with these labels; a few
# operators and autograd nodes are phases by themselves. Every operator's own time goes to the nearest phase
# above it, so the phases add up to the profiled time, and the real train_step is what runs.
PROFILE_LABELS = {
    "select": "selection",
    "scores_of": "AuxK: dead latents' scores",
    "encode_with_aux": "encoder: gathers, activation, AuxK top-k",
    "sparse_decode": "decoder",
    "remove_parallel_grad_": "decoder gradient projection",
    "normalize_decoder_": "decoder renorm",
}
PROFILE_OPS = {
    "aten::addmm": "encoder GEMM",
    "GatherLinearBackward": "backward: encoder (GatherLinear)",
    "SparseDecodeBackward": "backward: decoder (SparseDecode)",
    "Optimizer.step#AdamW.step": "AdamW",
}
BACKWARD_NODE = "autograd::engine::evaluate_function: "


def labelled(method, label: str):
    def run(*args, **kwargs):
        with torch.profiler.record_function(label):
            return method(*args, **kwargs)

    return run


def phase_of(event) -> str:
    """The phase an operator's own time belongs to: its nearest enclosing phase."""
    while event is not None:
        name = event.name.removeprefix(BACKWARD_NODE)
        if name in PROFILE_OPS:
            return PROFILE_OPS[name]
        if name in PROFILE_LABELS.values():
            return name
        if event.cpu_parent is None and event.name.startswith(BACKWARD_NODE):
            return "backward: activation and losses"
        event = event.cpu_parent
    return "losses, clipping, bookkeeping"


def profile_step(
    sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor, steps: int = 3
) -> dict:
    """ms per phase of a whole train_step (AuxK on the `dead` latents, clipping, AdamW, decoder renorm), from
    torch.profiler over `steps` steps: the operators' own CPU time, or on CUDA their kernels' time. Also
    'step (unprofiled)', the median wall time of a step without the profiler."""
    from torch.profiler import ProfilerActivity, profile

    device = x.device
    cfg, optimizer = (
        TrainConfig(steps=steps + 1, batch=len(x)),
        make_optimizer(sae, lr=1e-4),
    )
    step = partial(train_step, sae, optimizer, x, dead, cfg)
    wall = median_ms(step, device, steps)
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    for name, label in PROFILE_LABELS.items():
        # instance attributes shadow the methods
        setattr(sae, name, labelled(getattr(sae, name), label))
    try:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync(device)
    finally:
        for name in PROFILE_LABELS:
            delattr(sae, name)
    times = dict.fromkeys([*PROFILE_OPS.values(), *PROFILE_LABELS.values()], 0.0)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CPU:
            own = (
                event.self_device_time_total
                if device.type == "cuda"
                else event.self_cpu_time_total
            )
            phase = phase_of(event)
            times[phase] = times.get(phase, 0.0) + own / 1000 / steps
    return times | {"step (unprofiled)": wall}


def bench_profile(bcfg: BenchConfig, x: torch.Tensor) -> dict:
    """profile_step of TopK and KronSAE (first of --shapes) at every F; prints one table per F."""
    (m, n), out = bcfg.shapes[0], {}
    for F in bcfg.dict_sizes:
        models = [TopKSAE(bcfg.d_in, F, bcfg.k)]
        if F % (m * n) == 0:
            models.append(KronSAE(bcfg.d_in, F // (m * n), m, n, bcfg.k))
        dead = dead_mask(F, bcfg.dead, x.device)
        times = {
            arch_of(sae).bench_name(sae): profile_step(sae.to(x.device), x, dead)
            for sae in models
        }
        unit = "GPU kernel ms" if x.device.type == "cuda" else "CPU ms"
        print(
            f"\nF={F}: one training step, {bcfg.dead:.0%} of latents dead "
            f"({unit} per step; share of the phases' sum)"
        )
        totals = [
            sum(v for p, v in t.items() if p != "step (unprofiled)")
            for t in times.values()
        ]
        print(
            format_table(
                ["phase", *times],
                [
                    [
                        phase,
                        *(
                            f"{t[phase]:.1f} "
                            + (
                                f"{t[phase] / total:6.1%}"
                                if phase != "step (unprofiled)"
                                else " " * 6
                            )
                            for t, total in zip(times.values(), totals)
                        ),
                    ]
                    for phase in next(iter(times.values()))
                ],
            )
        )
        out[F] = times
    return out


def bench_ratios(rows: list[dict]) -> list[str]:
    """The ratios a reader compares, from the rows above: each SAE and the peer's
    TopK against our TopK, the naive twins against the fast ones, and how the
    flat-in-F series grows. Measurements only: no targets."""
    out = []
    sections = sorted({r["dict_size"] for r in rows if r["section"].startswith("F=")})
    for F in sections:
        at = {r["name"]: r for r in rows if r["section"] == f"F={F}"}
        out += ratios_at(F, at)
    flat = [r for r in rows if r["section"].startswith("flat")]
    if len(flat) > 1:
        out += flat_ratios(flat)
    return out


def ratios_at(F: int, at: dict) -> list[str]:
    """At one F: our TopK's time over each other SAE's, beside their FLOP ratio."""
    out = []
    top = at.get(BASELINE)
    for name, r in at.items():
        if top is None or name == BASELINE or name.startswith("naive_"):
            continue
        speedup = top["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        flops = top["flops_per_token"] / r["flops_per_token"]
        line = f"F={F}: topk's time / {name}'s = {speedup:.2f} (FLOPs {flops:.2f})"
        if top.get("aux_ms") and r.get("aux_ms"):
            line += f"; with AuxK {top['aux_ms'] / r['aux_ms']:.2f}"
        out.append(line)

    for name, r in at.items():
        fast = at.get(name.removeprefix("naive_"))
        if name.startswith("naive_") and fast is not None:
            speedup = r["fwd_bwd_ms"] / fast["fwd_bwd_ms"]
            memory = 100 * fast["peak_mb"] / max(r["peak_mb"], 1e-9)
            out.append(
                f"F={F}: {name}'s time / {fast['name']}'s = {speedup:.1f}; "
                f"{fast['name']} takes {memory:.0f}% of its peak memory"
            )
    return out


def flat_ratios(flat: list[dict]) -> list[str]:
    """The flat-in-F series: F grows at a fixed encoder width h(m+n)."""
    first = flat[0]
    last = flat[-1]
    ratio = last["fwd_bwd_ms"] / first["fwd_bwd_ms"]
    out = [
        f"flat in F: F {first['dict_size']} -> {last['dict_size']} at fixed h(m+n) "
        f"costs {ratio:.2f}x the fwd+bwd time"
    ]
    if all("per_token_ms" in r for r in flat):
        per_token = last["per_token_ms"] / first["per_token_ms"]
        out.append(f"flat in F: its per-token part costs {per_token:.2f}x")
        for r in flat:
            copies = r["opt_ms"] / r["copy_ms"]
            out.append(
                f"flat in F, once per step at F={r['dict_size']}: fwd+bwd "
                f"{r['per_step_ms']:.1f} ms, optimiser step {r['opt_ms']:.1f} ms = "
                f"{copies:.2f}x a copy of its bytes"
            )
    return out


def bench(bcfg: BenchConfig) -> list[dict]:
    check_device(bcfg.device)
    if bcfg.json:
        check_writable(bcfg.json, "json")
    device = pick_device(bcfg.device)
    set_seed(bcfg.seed)
    x = torch.randn(bcfg.batch, bcfg.d_in, device=device)
    threads = torch.get_num_threads()
    shape = f"B={bcfg.batch} d={bcfg.d_in} k={bcfg.k} on {device}, {threads} threads"
    config = dataclasses.asdict(bcfg) | {"device": str(device)}

    if bcfg.profile:
        print(f"bench --profile: {shape}")
        profiles = bench_profile(bcfg, x)
        if bcfg.json:
            write_json(bcfg.json, {"config": config, "profile": profiles})
        return profiles

    precision = "bfloat16 autocast" if bcfg.precision == "bf16" else "float32"
    print(
        f"bench: {shape}; median of {bcfg.repeats} (ms); peak = memory the fwd+bwd "
        f"allocates; aux = fwd+bwd with AuxK on {bcfg.dead:.0%} dead latents; {precision}"
    )
    rows = [
        bench_row(section, cls, kwargs, x, bcfg)
        for section, cls, kwargs in tqdm(bench_models(bcfg), desc="bench", leave=False)
    ]
    print(bench_table(rows))
    print("\n".join(bench_ratios(rows)))
    if bcfg.json:
        config["torch"] = torch.__version__
        write_json(bcfg.json, {"config": config, "rows": rows})
    return rows


def bench_row(section: str, cls, kwargs: dict, x: torch.Tensor, bcfg) -> dict:
    """One row: our SAE of class `cls`, or sparsify's TopK when cls is "sparsify"."""
    if cls == "sparsify":
        return {"section": section, **bench_sparsify(kwargs["F"], x, bcfg)}
    sae = cls(**kwargs).to(x.device)
    row = {"section": section, **bench_one(sae, x, bcfg)}
    if section.startswith("flat"):
        row |= step_split(sae, x, bcfg)
    return row


BENCH_COLUMNS = {  # header -> how a row shows it
    "section": lambda r: r["section"],
    "SAE": lambda r: r["name"],
    "F": lambda r: r["dict_size"],
    "enc rows": lambda r: r["encoder_rows"],
    "FLOPs/tok": lambda r: f"{r['flops_per_token']:,}",
    "fwd+bwd": lambda r: f"{r['fwd_bwd_ms']:.1f}",
    "aux": lambda r: f"{r['aux_ms'] or float('nan'):.1f}",
    "opt": lambda r: f"{r['opt_ms']:.1f}",
    "peak MB": lambda r: f"{r['peak_mb']:.1f}",
    "GFLOP/s": lambda r: f"{r['gflops']:.1f}",
    "GEMM GF/s": lambda r: f"{r['gemm_gflops']:.1f}",
    "step/GEMM": lambda r: f"{r['step_over_gemm']:.2f}",
}


def bench_table(rows: list[dict]) -> str:
    cells = [[show(r) for show in BENCH_COLUMNS.values()] for r in rows]
    return format_table(list(BENCH_COLUMNS), cells)


# ============================================================================= 18. CLI


def tune_cpu_allocator():
    """Keep freed memory mapped (Linux, glibc). By default glibc gives large freed blocks back to the OS,
    so every step pays page faults to map fresh memory for its (B, E) activations and gradients; on a
    2-core CPU that was a third of a KronSAE step. Called by the CLI only, never at import."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    libc.mallopt(M_TRIM_THRESHOLD, 2**30)
    libc.mallopt(M_TOP_PAD, 2**28)
    # every block from the reusable heap, even the (F, d) decoder gradient
    libc.mallopt(M_MMAP_MAX, 0)


def steady_cpu_allocator():
    """Give every block over 128 KB its own mapping, returned to the OS when freed (Linux, glibc). By default
    glibc raises that threshold as blocks are freed, so a long streaming pass whose temporaries come in many
    sizes fragments the heap: inspect's peak RSS grew with the tokens read (0.8 GB after 2k tokens, 3.7 GB
    after 200k, for 12k units). Called by the CLI for inspect only, never at import."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `kronsae.py: error: ...`, with exit status 2 and no usage dump.
    Flags are never abbreviated: `ablate --kernel` must not quietly mean --kernels."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments"):
            message += f" ({self.prog} does not take them; see {self.prog} --help)"
        self.exit(2, f"{self.prog.split()[0]}: error: {message}\n")


def flag_text(value, parse=None) -> str:
    """A default as a user would type it: 16384,65536 for a tuple, 2x8,4x4 for shapes."""
    if parse is zero_one:
        return str(int(value))
    if isinstance(value, tuple):
        parts = [
            "x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value
        ]
        return ",".join(parts) or "none"
    return str(value)


def flag_keywords(f: dataclasses.Field, override: dict) -> dict:
    """argparse's keywords for a config field's flag. A field's `parse` reads its one string;
    else a bool is a --flag/--no-flag switch, a tuple takes several values, and the rest take
    the default's type. `override` is what the flag means to one command: its own help,
    default or required."""
    parse = f.metadata.get("parse")
    if parse:
        kind = {"type": parse}
    elif isinstance(f.default, bool):
        kind = {"action": argparse.BooleanOptionalAction}
    elif isinstance(f.default, tuple):
        kind = {"nargs": "+"}
    else:
        kind = {"type": type(f.default)}

    help = override.get("help", f.metadata["help"])
    if override.get("required"):
        return {"dest": f.name, "required": True, "help": help, **kind}
    default = override.get("default", f.default)
    help = f"{help} (default: {flag_text(default, parse)})".replace("%", "%%")
    return {"dest": f.name, "default": default, "help": help, **kind}


def flag_names(f: dataclasses.Field) -> list[str]:
    # aliases: torchrun's own parser takes --m and --n for its options
    return [flag_of(f.name), *f.metadata.get("aliases", ())]


def add_config_args(
    parser: argparse.ArgumentParser,
    config_cls,
    title: str,
    only: Optional[tuple] = None,
    drop: tuple = (),
    overrides: Optional[dict] = None,
):
    """One flag per dataclass field (or per field in `only`, less those in `drop`), in an
    argument group of its own. Every command takes its shared flags (device, seed, json,
    the model, layer and data) from the config that owns them, so each is written once;
    `overrides` maps a field to what it means for this command (flag_keywords)."""
    overrides = overrides or {}
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(config_cls):
        if (only and f.name not in only) or f.name in drop:
            continue
        keywords = flag_keywords(f, overrides.get(f.name, {}))
        group.add_argument(*flag_names(f), **keywords)


def config_of(config_cls, args: dict):
    """config_cls built from the parsed flags that are its fields, taken out of `args`."""
    names = [f.name for f in dataclasses.fields(config_cls) if f.name in args]
    return config_cls(**{name: args.pop(name) for name in names})


def build_configs(
    parser: argparse.ArgumentParser, args: dict, make: Callable, check=None
):
    """make(args) builds the configs; a ValueError from their validation (or from `check`) is a usage error."""
    try:
        configs = make(args)
        if check:
            check(configs)
    except ValueError as err:
        parser.error(str(err))
    return configs


SETTINGS_PARTS = {
    "sae": (SAEConfig, "the SAEs' shape"),
    "train": (TrainConfig, "training (optimiser, schedule, AuxK)"),
    "data": (DataConfig, "data"),
    "run": (RunConfig, "the run (seed, device, outputs)"),
}

# Flags that only say how --model is harvested: without --model they would do nothing, so they are refused
MODEL_ONLY = (
    "layer",
    "text",
    "ctx",
    "model_batch",
    "max_tokens",
    "keep_first",
    "dtype",
    "save_acts",
)
NOT_GIVEN = object()


def given_args(parser: argparse.ArgumentParser, argv) -> tuple[dict, set]:
    """(every flag's value, the flags given on the command line): argparse fills a default only where the
    namespace has no value yet, so a namespace of NOT_GIVEN tells the two apart."""
    dests = [a.dest for a in parser._actions if a.default is not argparse.SUPPRESS]
    args = vars(
        parser.parse_args(argv, argparse.Namespace(**{d: NOT_GIVEN for d in dests}))
    )
    given = {d for d in dests if args[d] is not NOT_GIVEN}
    return {d: args[d] if d in given else parser.get_default(d) for d in args}, given


def parse_settings(
    parser: argparse.ArgumentParser, argv, check=None, refuse: Optional[dict] = None
) -> tuple[Settings, dict]:
    """Parse argv into Settings, one argument group per config; returns it with the command's own flags.
    `refuse` maps the fields this command does not take to the reason, which is the error if one is given
    (they keep their defaults, and --help leaves them out). A harvest flag without --model is an error too."""
    refuse = refuse or {}
    for cls, title in SETTINGS_PARTS.values():
        add_config_args(parser, cls, title, drop=tuple(refuse))
        for f in dataclasses.fields(cls):
            if f.name in refuse:
                parser.add_argument(
                    *flag_names(f),
                    dest=f.name,
                    nargs="?",
                    help=argparse.SUPPRESS,
                )
    args, given = given_args(parser, argv)
    for name in sorted(given & set(refuse)):
        parser.error(f"{refuse[name]}; drop {flag_of(name)}")
    idle = [
        flag_of(name) for name in MODEL_ONLY if name in given and not args.get("model")
    ]
    if idle:
        parser.error(
            f"{', '.join(idle)} only appl{'y' if len(idle) > 1 else 'ies'} to harvesting --model; "
            f"drop {'them' if len(idle) > 1 else 'it'}, or add --model"
        )

    def make(args):
        parts = {
            name: cls(
                **{
                    f.name: args.pop(f.name)
                    for f in dataclasses.fields(cls)
                    if f.name not in refuse
                }
            )
            for name, (cls, _) in SETTINGS_PARTS.items()
        }
        return Settings(**parts)

    return build_configs(parser, args, make, check), args


def run_cli(job, *args):
    """Run a job. A user error, a diverged run or Ctrl-C ends with one clear line on stderr, never a
    traceback: exit status 1 for an error, 130 for Ctrl-C."""

    def fail(message: str, status: int = 1):
        print(f"kronsae.py: {message}", file=sys.stderr)
        sys.exit(status)

    try:
        return job(*args)
    except Interrupted as stop:  # stop.out is OUT/arch; the run to resume is OUT
        if int(os.environ.get("RANK", "0")):
            sys.exit(130)  # under torchrun, rank 0 says where the checkpoint is
        launcher = (
            "torchrun ... kronsae.py"
            if int(os.environ.get("WORLD_SIZE", "1")) > 1
            else "python kronsae.py"
        )
        fail(
            f"{stop}; "
            + (
                f"checkpoint in {stop.out}; continue with: {launcher} --resume {Path(stop.out).parent}"
                if stop.out
                else "nothing was saved (no --out)"
            ),
            130,
        )
    except HarvestInterrupted as stop:
        fail(str(stop), 130)
    except KeyboardInterrupt:
        fail("interrupted before training started; nothing was saved", 130)
    except FloatingPointError as err:
        fail(str(err))
    except (ValueError, OSError) as err:
        fail(f"error: {err}")


def bench_main(argv):
    parser = Parser(
        prog="kronsae.py bench",
        description=(
            "Time one training step (forward + backward, and the optimiser step separately) of the TopK SAE, "
            "KronSAE at several (m, n) and the naive KronSAE, at the same B, d, k and F (and sparsify's TopK, when "
            "installed). Prints ms, peak memory, eq. 7 FLOPs per token and GFLOP/s against a plain matmul of the "
            "encoder's shape, then the ratios between them. --profile 1 splits a training step into phases."
        ),
    )
    add_config_args(parser, BenchConfig, "benchmark")
    bcfg = build_configs(
        parser, vars(parser.parse_args(argv)), lambda args: BenchConfig(**args)
    )
    return run_cli(bench, bcfg)


PROGRESSIVE_REFUSES = {
    **dict.fromkeys(CHECKPOINT_FIELDS, "progressive writes no checkpoints"),
    **dict.fromkeys(
        ("model", *MODEL_ONLY), "progressive trains on --data or synthetic data"
    ),
    "matryoshka": "progressive sets the Matryoshka prefixes itself (F/16 ... F)",
}


def settings_with(parser, argv, config_cls, title: str, check, refuse: dict):
    """The main job's Settings and a command's own config_cls, both from argv."""
    add_config_args(parser, config_cls, title)
    s, extra = parse_settings(parser, argv, check, refuse)
    return s, build_configs(parser, extra, partial(config_of, config_cls))


def progressive_main(argv):
    parser = Parser(
        prog="kronsae.py progressive",
        description=(
            "Progressive coding (Peter and Soegaard 2025): FVU against the number of kept latents G = F/16 ... F "
            "for a Matryoshka SAE, a plain SAE pruned by E[a^2], pruned by firing frequency, and an unsorted "
            "prefix; for TopK and KronSAE. Same options as the main job, plus --figure and --seeds."
        ),
    )
    s, cfg = settings_with(
        parser,
        argv,
        ProgressiveConfig,
        "progressive coding",
        nested_settings,
        PROGRESSIVE_REFUSES,
    )
    return run_cli(progressive, s, cfg.figure, cfg.seeds)


def ablate_main(argv):
    parser = Parser(
        prog="kronsae.py ablate",
        description=(
            "The paper's ablations as one sweep: every SAE of --shapes (TopK and KronSAE shapes; each KronSAE with "
            "each of --kernels: mand is eq. 3, relu_product ReLU(u)ReLU(v), product u v) at every TopK step count of "
            "--budgets, with the others' steps set by --match (tokens, flops or time), over --seeds seeds, on the "
            "same data; prints held-out EV as mean ± std per cell. Data options are those of the main job (--data, "
            "--model, ...). With the defaults it is the kernel ablation of section 5."
        ),
    )
    s, cfg = settings_with(
        parser, argv, AblationConfig, "the sweep", check_ablation, ABLATE_REFUSES
    )
    return run_cli(
        lambda: ablate(
            s,
            list(cfg.kernels),
            cfg.seeds,
            list(cfg.shapes) or None,
            list(cfg.budgets) or None,
            cfg.figure,
        )["kernels"]
    )


# harvest's flags: the model, how it is harvested (harvest writes a store, so not --save-acts) and the
# norm filter its manifest records
HARVEST_FIELDS = (
    "model",
    *(name for name in MODEL_ONLY if name != "save_acts"),
    "max_norm_ratio",
)


def check_store_out(out: str, overwrite: bool):
    """Before any work: refuse an --out that holds a store, finished or not, unless overwrite (StoreWriter
    then clears it when it starts writing)."""
    if not store_files(out) or overwrite:
        return
    if Path(out, "manifest.json").exists():
        state = "a finished activation store"
    elif Path(out, PROGRESS).exists() and read_progress(out)["args"]:
        state = (
            "an unfinished activation store (its harvest stopped); continue it with the "
            "same arguments and --resume,"
        )
    else:
        state = "an unfinished (interrupted) activation store"
    raise ValueError(
        f"--out {out} holds {state}; pass --overwrite to replace it, or choose another --out"
    )


def check_resumable(out: str, args: dict) -> bool:
    """Before any work, for harvest --resume: whether --out holds a store in progress to continue (False: there
    is nothing there, so the harvest starts afresh). A finished store, one from before stores kept their
    progress, or one made from other arguments is refused in one line that names the difference."""
    if Path(out, "manifest.json").exists():
        raise ValueError(
            f"--resume: --out {out} holds a finished activation store; there is nothing to resume "
            f"(train on it with --data {out})"
        )
    if not Path(out, PROGRESS).exists():
        if store_files(out):
            raise ValueError(
                f"--resume: the unfinished store in {out} has no {PROGRESS} (it was written before "
                f"harvests could resume), so it cannot be continued; pass --overwrite to harvest it again"
            )
        print(f"note: nothing to resume in {out}; starting the harvest")
        return False
    saved = read_progress(out)["args"]
    for name, value in args.items():
        if comparable(name, saved.get(name)) != comparable(name, value):
            flag = flag_of(name)
            raise ValueError(
                f"--resume: {flag} differs: the store in {out} was harvested with {flag} "
                f"{shown(name, saved.get(name))}, this run gives {shown(name, value)}; resume with "
                f"the same arguments, or pass --overwrite to start again"
            )
    return True


def comparable(name: str, value):
    """A harvest argument as --resume compares it: text files by their content, not by the path given."""
    return [t["sha256"] for t in value] if name == "text" and value else value


def shown(name: str, value) -> str:
    if name == "text" and value:
        return " ".join(f"{t['path']} (sha256 {t['sha256'][:12]})" for t in value)
    return str(value)


def harvest_main(argv):
    parser = Parser(
        prog="kronsae.py harvest",
        description=(
            "Harvest once, train many: write hidden_states[layer] of a transformers model on text files to an "
            "activation store, a directory of .npy shards and a manifest.json (see the README for the format). "
            "Contexts start with BOS when the tokenizer has one; position 0 and special tokens are dropped; the "
            "text is read only as far as --max-tokens needs. A harvest stopped at any point (Ctrl-C, a lost "
            "machine, a full disk) continues after its last whole shard with the same arguments and --resume. "
            "Train on it with: kronsae.py --data STORE."
        ),
    )
    add_config_args(parser, DataConfig, "harvest", HARVEST_FIELDS)
    add_config_args(
        parser,
        RunConfig,
        "the store",
        only=("out", "device", "overwrite"),
        overrides={
            "out": {"required": True, "help": "the store directory to write"},
            "overwrite": {"help": "replace a store already in --out"},
        },
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished harvest in --out after its last whole shard; every other "
        "argument must be the one it started with (with nothing in --out, start it)",
    )
    parser.add_argument(
        "--shard-mb",
        type=float,
        default=64.0,
        help="start a new shard after this many MB of float32 activations; a shard is what an "
        "interrupted harvest can lose (default: 64)",
    )
    args = vars(parser.parse_args(argv))
    out, device = args.pop("out"), args.pop("device")
    flags = {name: args.pop(name) for name in ("overwrite", "resume", "shard_mb")}
    cfg, made_from, carry_on = build_configs(
        parser, args, lambda args: plan_harvest(args, out, device, **flags)
    )
    return run_cli(
        harvest_store, cfg, out, pick_device(device), True, made_from, carry_on
    )


def plan_harvest(
    args: dict, out: str, device: str, overwrite: bool, resume: bool, shard_mb: float
) -> tuple[DataConfig, dict, bool]:
    """Before any model loads: the harvest's DataConfig, what its store is made from (harvest_args), and
    whether it continues the unfinished store in --out. A ValueError here is a usage error."""
    check_choice("device", device, DEVICES)
    if not args["model"]:
        raise ValueError("harvest needs --model, --layer and --text")
    if resume and overwrite:
        raise ValueError("give --resume or --overwrite, not both")
    if not shard_mb > 0:
        raise ValueError(f"--shard-mb must be positive, got {shard_mb}")
    cfg = DataConfig(**args)
    cfg.check_inputs()
    check_device(device)
    check_writable(out, "out", directory=True)
    made_from = harvest_args(cfg, shard_mb)
    if resume:
        return cfg, made_from, check_resumable(out, made_from)
    check_store_out(out, overwrite)
    return cfg, made_from, False


def export_main(argv):
    parser = Parser(
        prog="kronsae.py export",
        description=(
            "Write a trained SAE in another library's on-disk format. saelens: SAELens 6's cfg.json (with the "
            "model, hook name, context and data in its metadata), sae_weights.safetensors and sparsity.safetensors "
            "(log10 latent densities over training). A TopK SAE is SAELens's topk architecture and loads with "
            "sae_lens.SAE.load_from_disk; a KronSAE is architecture kronsae, which loads after "
            "kronsae.register_saelens()."
        ),
    )
    parser.add_argument(
        "directory",
        help="a checkpoint: a directory holding config.json and sae.safetensors, "
        "e.g. OUT/topk of a training run",
    )
    parser.add_argument(
        "--to", choices=["saelens"], required=True, help="the format to write"
    )
    parser.add_argument("destination", help="the directory to write the export to")
    args = parser.parse_args(argv)
    return run_cli(export_saelens, args.directory, args.destination)


def inspect_main(argv):
    parser = Parser(
        prog="kronsae.py inspect",
        description=(
            "Look at what an SAE learned: one streaming pass over an activation store collects, for every latent "
            "(and for KronSAE every pre-latent), its frequency, mean activation, token entropy (eq. 10), multitoken "
            "ratio (eq. 11) and top examples in context, plus the paper's section 5.2 and fig. 18 statistics. Prints "
            "a summary; writes a self-contained HTML report, a JSON of every statistic, and delphi's latent cache "
            "(--delphi) for LLM-scored interpretability."
        ),
    )
    parser.add_argument(
        "directory",
        help="a trained SAE: a checkpoint directory such as OUT/kron of a training run",
    )
    data_help = (
        "the activation store it was trained on (harvested with this version, which "
        "keeps the token ids)"
    )
    add_config_args(
        parser,
        DataConfig,
        "data",
        only=("data",),
        overrides={"data": {"required": True, "help": data_help}},
    )
    add_config_args(parser, InspectConfig, "inspection")
    add_config_args(
        parser,
        RunConfig,
        "the run",
        only=("seed", "json"),
        overrides={
            "seed": {"help": "seed of --sample, the bootstrap and the init baseline"},
            "json": {"help": "write every statistic and example here"},
        },
    )
    args, given = given_args(parser, argv)
    if {"latents", "sample"} <= given:
        parser.error("argument --sample: not allowed with argument --latents")
    directory, data = args.pop("directory"), args.pop("data")
    cfg, run = build_configs(
        parser,
        args,
        lambda args: (config_of(InspectConfig, args), config_of(RunConfig, args)),
    )
    return run_cli(inspect_job, directory, data, cfg, run)


def absorption_main(argv):
    parser = Parser(
        prog="kronsae.py absorption",
        description=(
            "First-letter feature absorption (SAEBench; the paper's fig. 4 and table 5) of SAEs trained on one model's "
            "layer: a probe reads each word's first letter from the residual stream, k-sparse probing finds each "
            "letter's main latents, and a word is absorbed when they fall short and other latents carry the probe's "
            "projection. The prompts' activations are cached beside the first run, so the next SAE costs only its "
            "own encoding."
        ),
    )
    parser.add_argument(
        "directories",
        nargs="+",
        help="trained SAEs: checkpoint directories such as RUN/topk RUN/kron",
    )
    layer_help = (
        "the layer they were trained on: hidden_states[layer], the input of block "
        "`layer` (SAELens's blocks.L.hook_resid_pre)"
    )
    add_config_args(
        parser,
        DataConfig,
        "the model",
        only=("model", "layer"),
        overrides={
            "model": {
                "required": True,
                "help": "the model they were trained on (hub name, directory or .gguf)",
            },
            "layer": {"required": True, "help": layer_help},
        },
    )
    add_config_args(parser, AbsorptionConfig, "absorption")
    add_config_args(
        parser,
        RunConfig,
        "the run",
        only=("seed", "json", "device"),
        overrides={
            "seed": {"help": "seed of the words, their split and the probes"},
            "json": {"help": "write every figure, per letter too, here"},
        },
    )
    args = vars(parser.parse_args(argv))
    directories, model, layer = (
        args.pop(name) for name in ("directories", "model", "layer")
    )
    cfg, run = build_configs(
        parser,
        args,
        lambda args: (config_of(AbsorptionConfig, args), config_of(RunConfig, args)),
    )
    return run_cli(absorption_job, directories, model, layer, cfg, run)


COMMANDS = {
    "harvest": harvest_main,
    "inspect": inspect_main,
    "absorption": absorption_main,
    "bench": bench_main,
    "progressive": progressive_main,
    "ablate": ablate_main,
    "export": export_main,
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # Harvesting is bound by the model, not by page faults, and inspect by memory: both keep it small.
    if argv[:1] == ["inspect"]:
        steady_cpu_allocator()
    elif argv[:1] != ["harvest"]:
        tune_cpu_allocator()
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    parser = Parser(
        prog="kronsae.py",
        description="KronSAE vs TopK SAE. With no arguments, trains both on block-correlated synthetic data "
        "and prints EV, L0, dead %, encoder FLOPs, parameters and ms per step side by side. "
        f"Other commands: {', '.join(COMMANDS)} (each has its own --help).",
    )
    s, _ = parse_settings(parser, argv)
    if s.run.resume:
        others = [
            a.split("=")[0]
            for a in argv
            if a.startswith("--") and a.split("=")[0] != "--resume"
        ]
        if others:
            parser.error(
                f"--resume takes every setting from the saved run; drop {', '.join(others)}"
            )
        s = build_configs(parser, {}, lambda _: resume_settings(s.run.resume))
    return run_cli(compare, s)


if __name__ == "__main__":
    main()
