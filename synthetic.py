"""Block-correlated synthetic data, and the KronSAE paper's toy experiment (section 5.1, appendix B).

The generator (importable, used by `python kronsae.py`):
    S = L L^T                       a block-structured correlation matrix over F_true features
    x_sparse = L TopK(ReLU(z))      z ~ N(0, I), so active features co-occur as S says

Run `python synthetic.py --help` for the experiment.
"""
from __future__ import annotations

import torch


# ----------------------------------------------------------------------------- data generator

def block_covariance(F_true: int = 256, n_blocks: int = 8, n_off: int = 4, rho_in: tuple = (0.3, 0.8),
                     rho_off: float = 0.25, seed: int = 0) -> torch.Tensor:
    """A block-structured correlation matrix S, shape (F_true, F_true), unit diagonal, positive definite.

    n_blocks diagonal blocks of different (random) sizes, each with its own within-block correlation drawn
    from rho_in, plus n_off off-diagonal blocks linking random pairs of blocks with correlation +-rho_off.
    """
    if not 1 <= n_blocks <= F_true:
        raise ValueError(f"need 1 <= n_blocks <= F_true, got n_blocks={n_blocks}, F_true={F_true}")
    g = torch.Generator().manual_seed(seed)
    # different block sizes: cut [0, F_true) at n_blocks-1 distinct random points
    cuts = torch.randperm(F_true - 1, generator=g)[: n_blocks - 1].sort().values + 1
    edges = [0, *cuts.tolist(), F_true]
    blocks = [(a, b) for a, b in zip(edges[:-1], edges[1:])]
    S = torch.zeros(F_true, F_true, dtype=torch.float64)
    for a, b in blocks:
        S[a:b, a:b] = rho_in[0] + (rho_in[1] - rho_in[0]) * torch.rand((), generator=g, dtype=torch.float64)
    for _ in range(n_off):
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


def sample_sparse(S: torch.Tensor, n: int, k_true: int, generator: torch.Generator) -> torch.Tensor:
    """x_sparse = L TopK(ReLU(z)) with S = L L^T (appendix B). Returns (n, F_true)."""
    L = torch.linalg.cholesky(S.double()).float()                        # (F_true, F_true)
    z = torch.randn(n, S.shape[0], generator=generator).relu()           # (n, F_true)
    top = z.topk(k_true, dim=-1)
    codes = torch.zeros_like(z).scatter_(-1, top.indices, top.values)    # k_true active per row
    return codes @ L.T                                                   # (n, F_true)


def make_dataset(n: int, d: int = 128, F_true: int = 1024, k_true: int = 16, seed: int = 0,
                 n_blocks: int = 32, n_off: int = 16) -> torch.Tensor:
    """Block-correlated SAE training data, shape (n, d): x = x_sparse D with D random unit rows (F_true, d).

    The true features are the rows of L^T D; their sparse codes co-occur by blocks, which is the
    structure KronSAE's heads are meant to capture. Deterministic given the seed.
    """
    S = block_covariance(F_true, n_blocks=n_blocks, n_off=n_off, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    D = torch.nn.functional.normalize(torch.randn(F_true, d, generator=g), dim=-1)   # (F_true, d)
    return sample_sparse(S, n, k_true, g) @ D                                        # (n, d)
