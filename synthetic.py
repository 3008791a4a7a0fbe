"""The KronSAE paper's toy experiment (section 5.1, appendix B), on block-correlated synthetic data.

The generator lives in kronsae.py (section 5, Data), which trains on it by default; this file reuses it:
    S = L L^T                       a block-structured correlation matrix over F_true features
    x_sparse = L TopK(ReLU(z))      z ~ N(0, I), so active features co-occur as S says

Run `python synthetic.py --help` for the experiment.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import kronsae as K
from kronsae import block_covariance, sample_sparse


# ----------------------------------------------------------------------------- the toy experiment (section 5.1)

def rv_coefficient(S: torch.Tensor, C: torch.Tensor) -> float:
    """RV(S, C) = tr(S C) / sqrt(tr(S^2) tr(C^2)) for symmetric S, C: 1 when equal up to scale."""
    S, C = S.double(), C.double()
    return float(torch.trace(S @ C) / torch.sqrt(torch.trace(S @ S) * torch.trace(C @ C)))


def match_atoms(X: torch.Tensor, Y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Order the rows of Y (F, d) to match the rows of X (F, d): the permutation P that maximises
    trace(P^T A P B), A = X X^T, B = Y Y^T, by FAQ (Vogelstein et al. 2015). Returns idx, with Y[idx] ~ X."""
    import numpy as np
    from scipy.optimize import quadratic_assignment
    A, B = (X @ X.T).double().numpy(), (Y @ Y.T).double().numpy()
    result = quadratic_assignment(A, B, method="faq", options={"maximize": True, "rng": np.random.default_rng(seed)})
    return torch.as_tensor(result.col_ind)


class ToyAE(torch.nn.Module):
    """Elhage et al. 2022 (eq. 5): x_hat = ReLU(W^T W x + b), W of shape (d, F_true)."""

    def __init__(self, F_true: int, d: int):
        super().__init__()
        self.W = torch.nn.Parameter(torch.nn.init.xavier_normal_(torch.empty(d, F_true)))
        self.b = torch.nn.Parameter(torch.zeros(F_true))

    def hidden(self, x):  # (N, F_true) -> (N, d)
        return x @ self.W.T

    def forward(self, x):
        return torch.relu(self.hidden(x) @ self.W + self.b)


def train_toy_ae(x: torch.Tensor, d: int, steps: int, batch: int = 1024, lr: float = 3e-3, seed: int = 0) -> ToyAE:
    torch.manual_seed(seed)
    ae = ToyAE(x.shape[1], d)
    optimizer = torch.optim.Adam(ae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        xb = x[torch.randint(0, x.shape[0], (batch,), generator=g)]
        loss = (ae(xb) - xb).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return ae


# Eight covariance set-ups, as in table 7: block counts and off-diagonal links vary.
SETUPS = [dict(n_blocks=b, n_off=o, seed=s) for s, (b, o) in enumerate(
    [(8, 4), (4, 2), (16, 8), (6, 6), (12, 4), (8, 0), (10, 10), (5, 3)])]

KRON_SHAPES = [(2, 4, 32), (4, 2, 32), (4, 8, 8), (8, 2, 16)]  # (h, m, n), all with F = 256

PAPER_RV = {"ae": "0.59 ± 0.17", "topk": "0.12 ± 0.02", "kron_h2_m4_n32": "0.22 ± 0.07",
            "kron_h4_m2_n32": "0.30 ± 0.12", "kron_h4_m8_n8": "0.23 ± 0.08", "kron_h8_m2_n16": "0.17 ± 0.04"}


@dataclass
class ToyConfig:
    F_true: int = 256      # ground-truth features
    d: int = 64            # toy AE hidden width = SAE input width
    k_true: int = 8        # active features per sample, TopK(ReLU(z))
    rho_in: tuple = (0.3, 0.8)  # range of the within-block correlations
    k: int = 8             # SAE sparsity
    samples: int = 65536   # x_sparse rows
    ae_steps: int = 2000
    sae_steps: int = 1000
    batch: int = 1024
    setups: int = 8


def run_setup(setup: dict, tc: ToyConfig, progress: bool = False) -> tuple[dict, dict]:
    """One covariance set-up: data, toy AE, SAEs, matching, RV. Returns (rv per model, Gram matrices)."""
    S = block_covariance(tc.F_true, n_blocks=setup["n_blocks"], n_off=setup["n_off"], rho_in=tc.rho_in,
                         seed=setup["seed"])
    g = torch.Generator().manual_seed(1000 + setup["seed"])
    x_sparse = sample_sparse(S, tc.samples, tc.k_true, g)                            # (N, F_true)
    ae = train_toy_ae(x_sparse, tc.d, tc.ae_steps, tc.batch, seed=setup["seed"])
    with torch.no_grad():
        X = ae.W.T.detach()                                                          # (F_true, d) AE features
        acts = ae.hidden(x_sparse)                                                   # (N, d) SAE data
    grams = {"truth": S, "ae": X @ X.T}
    shape = K.SAEConfig(dict_size=tc.F_true, k=tc.k)
    train_cfg = K.TrainConfig(steps=tc.sae_steps, batch=tc.batch)
    models = {"topk": ("topk", shape)} | {
        f"kron_h{h}_m{m}_n{n}": ("kron", dataclasses.replace(shape, h=h, m=m, n=n)) for h, m, n in KRON_SHAPES}
    for name, (arch, c) in models.items():
        K.set_seed(setup["seed"])
        sae = c.build(arch, tc.d)
        batches = K.shuffled_batches(acts, tc.batch, torch.Generator().manual_seed(setup["seed"]))
        K.train(sae, batches, train_cfg, progress=progress)
        Y = sae.W_dec.detach()
        Y = Y[match_atoms(X, Y, seed=setup["seed"])]                                 # row i ~ feature i
        grams[name] = Y @ Y.T
    rv = {name: rv_coefficient(S, C) for name, C in grams.items() if name != "truth"}
    return rv, grams


def save_figure(grams: dict, rv: dict, path: str):
    """Like the paper's figure 5: ground truth, AE, TopK and the best KronSAE, RV in the titles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    best = max((name for name in rv if name.startswith("kron")), key=rv.get)
    panels = [("truth", "ground-truth S"), ("ae", f"AE, RV={rv['ae']:.3f}"),
              ("topk", f"TopK SAE, RV={rv['topk']:.3f}"), (best, f"{best}, RV={rv[best]:.3f}")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    for ax, (name, title) in zip(axes, panels):
        C = grams[name].double()
        C = C / C.diagonal().abs().clamp_min(1e-12).sqrt().outer(C.diagonal().abs().clamp_min(1e-12).sqrt())
        ax.imshow(C.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Feature correlations recovered after matching (KronSAE paper, section 5.1)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarize(per_setup: list[dict]) -> dict:
    names = per_setup[0].keys()
    values = {name: torch.tensor([r[name] for r in per_setup], dtype=torch.float64) for name in names}
    return {name: {"mean": float(v.mean()), "std": float(v.std(unbiased=False))} for name, v in values.items()}


def experiment(tc: ToyConfig, figure: str = "", json_path: str = "", progress: bool = True) -> dict:
    per_setup, start = [], time.perf_counter()
    for i, setup in enumerate(SETUPS[: tc.setups]):
        rv, grams = run_setup(setup, tc, progress=False)
        per_setup.append(rv)
        if progress:
            print(f"set-up {i + 1}/{tc.setups} {setup}: " + ", ".join(f"{k} {v:.3f}" for k, v in rv.items()),
                  flush=True)
        if i == 0 and figure:
            save_figure(grams, rv, figure)
    summary = summarize(per_setup)
    print(f"\nRV(S, C) over {tc.setups} set-ups ({time.perf_counter() - start:.0f} s)")
    print(f"{'model':<18}{'this run':>18}{'paper (table 7)':>18}")
    for name, s in summary.items():
        print(f"{name:<18}{s['mean']:>11.3f} ± {s['std']:.3f}{PAPER_RV.get(name, ''):>18}")
    ratio = summary["kron_h2_m4_n32"]["mean"] / summary["topk"]["mean"]
    print(f"kron_h2_m4_n32 / topk = {ratio:.2f} (paper: about 1.8; target >= 1.5)")
    result = {"rv": summary, "per_setup": per_setup, "ratio_kron_h2_m4_n32_over_topk": ratio,
              "config": dataclasses.asdict(tc)}
    if json_path:
        K.write_json(json_path, result)
    if figure:
        print(f"figure: {figure}")
    return result


def main(argv=None):
    parser = K.Parser(prog="synthetic.py", description=(
        "The KronSAE paper's toy model of correlated features (section 5.1): a toy AE on block-correlated "
        "sparse data, then a TopK SAE and four KronSAEs on its hidden states; decoder atoms are matched to "
        "the AE's features by quadratic assignment (FAQ) and scored by RV against the true covariance."))
    parser.add_argument("--quick", action="store_true", help="2 set-ups, short training: a smoke run for tests")
    parser.add_argument("--setups", type=int, default=8, help="covariance set-ups to average over (max 8)")
    parser.add_argument("--sae-steps", type=int, default=ToyConfig.sae_steps, help="optimiser steps per SAE")
    parser.add_argument("--ae-steps", type=int, default=ToyConfig.ae_steps, help="optimiser steps for the toy AE")
    parser.add_argument("--k-true", type=int, default=ToyConfig.k_true, help="active features per sample")
    parser.add_argument("--rho-in", type=float, nargs=2, default=ToyConfig.rho_in, metavar=("LO", "HI"),
                        help="range of the within-block correlations of S")
    parser.add_argument("--figure", default="synthetic_rv.png", help="PNG path for the figure ('' = none)")
    parser.add_argument("--json", default="", help="write {'rv': {model: {'mean', 'std'}}, ...} to this file")
    args = parser.parse_args(argv)
    if not 1 <= args.setups <= len(SETUPS):
        parser.error(f"--setups must be between 1 and {len(SETUPS)}, got {args.setups}")
    if not (0 <= args.rho_in[0] <= args.rho_in[1] < 1 and 1 <= args.k_true <= ToyConfig.F_true):
        parser.error(f"need 0 <= LO <= HI < 1 and 1 <= k_true <= {ToyConfig.F_true}, "
                     f"got rho_in={args.rho_in}, k_true={args.k_true}")
    for flag, path in (("json", args.json), ("figure", args.figure)):
        if path:
            try:
                K.check_writable(path, flag)
            except ValueError as err:
                parser.error(str(err))
    tc = ToyConfig(setups=args.setups, sae_steps=args.sae_steps, ae_steps=args.ae_steps, k_true=args.k_true,
                   rho_in=tuple(args.rho_in))
    if args.quick:
        tc = dataclasses.replace(tc, setups=2, samples=8192, ae_steps=200, sae_steps=60, batch=512)
    torch.manual_seed(0)
    return experiment(tc, figure=args.figure, json_path=args.json)


if __name__ == "__main__":
    main()
