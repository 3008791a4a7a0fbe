"""The KronSAE paper's toy experiment (section 5.1, appendix B), on block-correlated synthetic data.

The generator lives in kronsae.py (section 8, Data), which trains on it by default; this file reuses it:
    S = L L^T                       a block-structured correlation matrix over F_true features
    x_sparse = L TopK(ReLU(z))      z ~ N(0, I), so active features co-occur as S says

Run `python synthetic.py --help` for the experiment.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

import kronsae as K
from kronsae import block_covariance, sample_sparse

# ----------------------------------------------------------------------------- the toy experiment (section 5.1)


def rv_coefficient(S: torch.Tensor, C: torch.Tensor) -> float:
    """RV(S, C) = tr(S C) / sqrt(tr(S^2) tr(C^2)) for symmetric S, C: 1 when equal up to scale."""
    S, C = S.double(), C.double()
    return float(
        torch.trace(S @ C) / torch.sqrt(torch.trace(S @ S) * torch.trace(C @ C))
    )


def match_atoms(
    X: torch.Tensor, Y: torch.Tensor, seed: int = 0, inits: int = 1
) -> torch.Tensor:
    """Order the rows of Y (F, d) to match the rows of X (F, d): the permutation P that maximises
    trace(P^T A P B), A = X X^T, B = Y Y^T, by FAQ (Vogelstein et al. 2015). Returns idx, with Y[idx] ~ X.

    FAQ is a local method. The first start is scipy's default (the barycenter, deterministic); with inits > 1,
    the others start from random doubly stochastic matrices, and the best objective wins."""
    import numpy as np
    from scipy.optimize import quadratic_assignment

    A, B = (X @ X.T).double().numpy(), (Y @ Y.T).double().numpy()
    rng = np.random.default_rng(seed)
    results = [
        quadratic_assignment(
            A,
            B,
            method="faq",
            options={
                "maximize": True,
                "rng": rng,
                "P0": "barycenter" if i == 0 else "randomized",
            },
        )
        for i in range(inits)
    ]
    return torch.as_tensor(max(results, key=lambda r: r.fun).col_ind)


class ToyAE(torch.nn.Module):
    """Elhage et al. 2022 (eq. 5): x_hat = ReLU(W^T W x + b), W of shape (d, F_true)."""

    def __init__(self, F_true: int, d: int):
        super().__init__()
        self.W = torch.nn.Parameter(
            torch.nn.init.xavier_normal_(torch.empty(d, F_true))
        )
        self.b = torch.nn.Parameter(torch.zeros(F_true))

    def hidden(self, x):  # (N, F_true) -> (N, d)
        return x @ self.W.T

    def forward(self, x):
        return torch.relu(self.hidden(x) @ self.W + self.b)


def train_toy_ae(
    x: torch.Tensor,
    d: int,
    steps: int,
    batch: int = 1024,
    lr: float = 3e-3,
    seed: int = 0,
) -> ToyAE:
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
SETUPS = [
    dict(n_blocks=b, n_off=o, seed=s)
    for s, (b, o) in enumerate(
        [(8, 4), (4, 2), (16, 8), (6, 6), (12, 4), (8, 0), (10, 10), (5, 3)]
    )
]

KRON_SHAPES = [
    (2, 4, 32),
    (4, 2, 32),
    (4, 8, 8),
    (8, 2, 16),
]  # (h, m, n), all with F = 256

PAPER_RV = {
    "ae": "0.59 ± 0.17",
    "topk": "0.12 ± 0.02",
    "kron_h2_m4_n32": "0.22 ± 0.07",
    "kron_h4_m2_n32": "0.30 ± 0.12",
    "kron_h4_m8_n8": "0.23 ± 0.08",
    "kron_h8_m2_n16": "0.17 ± 0.04",
}


@dataclass
class ToyConfig:
    F_true: int = 256  # ground-truth features
    d: int = 64  # toy AE hidden width = SAE input width
    k_true: int = 8  # active features per sample, TopK(ReLU(z)): the sparsity
    rho_in: tuple = (0.3, 0.8)  # range of the within-block correlations
    rho_off: float = 0.25  # correlation of the off-diagonal blocks, with a random sign
    block_sizes: tuple = ()  # the diagonal blocks' sizes for every set-up; () = each set-up's random cut
    gram: str = "cosine"  # "cosine": unit-normalised AE feature embeddings; "raw": the AE's W as learned
    k: int = 8  # SAE sparsity
    samples: int = 65536  # x_sparse rows
    ae_steps: int = 2000
    sae_steps: int = 1000
    sae_lr: float = 8e-4  # kronsae.TrainConfig's default
    aux_coef: float = 1 / 32  # AuxK, as in kronsae.TrainConfig; 0 turns it off
    topk_init: str = (
        "tied"  # "tied": W_enc = W_dec^T (Gao et al.); "random": an independent W_enc
    )
    faq_inits: int = 1  # FAQ starts per matching: the barycenter, then random ones; the best objective wins
    batch: int = 1024
    setups: int = 8
    seeds: int = (
        3  # repeats of every set-up: new samples, AE, SAE inits (S stays the set-up's)
    )
    models: tuple = ()  # SAEs to train, by name; () = all five
    workers: int = 2  # processes, one thread each; the results do not depend on it

    def __post_init__(self):
        K.check_positive(
            k_true=self.k_true,
            k=self.k,
            samples=self.samples,
            ae_steps=self.ae_steps,
            sae_steps=self.sae_steps,
            batch=self.batch,
            seeds=self.seeds,
            faq_inits=self.faq_inits,
            workers=self.workers,
        )
        if not 1 <= self.setups <= len(SETUPS):
            raise ValueError(
                f"--setups must be between 1 and {len(SETUPS)}, got {self.setups}"
            )
        if self.k_true > self.F_true or self.k > self.F_true:
            raise ValueError(
                f"k_true and k must be <= F_true={self.F_true}, got {self.k_true} and {self.k}"
            )
        if self.gram not in ("cosine", "raw") or self.topk_init not in (
            "tied",
            "random",
        ):
            raise ValueError(
                f"--gram is cosine or raw, --topk-init tied or random; got {self.gram!r}, "
                f"{self.topk_init!r}"
            )
        unknown = (
            set(self.models) - set(model_specs(self.F_true, self.k)) - {"random_atoms"}
        )
        if unknown:
            raise ValueError(
                f"unknown models {sorted(unknown)}; choose from topk, "
                + ", ".join(f"kron_h{h}_m{m}_n{n}" for h, m, n in KRON_SHAPES)
                + " and random_atoms"
            )
        if self.sae_lr <= 0 or self.aux_coef < 0:
            raise ValueError(
                f"need --sae-lr > 0 and --aux-coef >= 0, got {self.sae_lr}, {self.aux_coef}"
            )
        # checks
        block_covariance(
            self.F_true,
            rho_in=self.rho_in,
            rho_off=self.rho_off,
            sizes=self.block_sizes,
        )


def model_specs(F: int, k: int, models: tuple = ()) -> dict:
    """{name: (arch, SAEConfig)} for the TopK SAE and the four KronSAE shapes named in `models` (all five when
    empty). `random_atoms`, only when named, is the baseline of an SAE that learned nothing: F random unit rows."""
    shape = K.SAEConfig(dict_size=F, k=k)
    specs = {"topk": ("topk", shape)} | {
        f"kron_h{h}_m{m}_n{n}": ("kron", dataclasses.replace(shape, h=h, m=m, n=n))
        for h, m, n in KRON_SHAPES
    }
    if "random_atoms" in models:
        specs["random_atoms"] = ("random", None)
    return {name: spec for name, spec in specs.items() if not models or name in models}


def atom_health(sae: K.SparseAutoencoder, acts: torch.Tensor) -> dict:
    """Dead atoms (never among the top k on the data) and duplicated ones (decoder cosine > 0.9 with another),
    both of which pull a matched Gram towards the identity or towards noise."""
    with torch.no_grad():
        fired = torch.bincount(sae.encode(acts)[1].flatten(), minlength=sae.F) > 0
        cos = sae.W_dec @ sae.W_dec.T - 2 * torch.eye(sae.F)
    return {"dead": int((~fired).sum()), "duplicated": int((cos.amax(-1) > 0.9).sum())}


def run_setup(
    setup: dict, tc: ToyConfig, seed: int = 0, progress: bool = False
) -> tuple[dict, dict, dict]:
    """One covariance set-up and one seed: data, toy AE, SAEs, matching, RV.
    Returns (rv per model, Gram matrices, atom health per SAE)."""
    # the same result in any worker, and two workers on two cores
    torch.set_num_threads(1)
    S = block_covariance(
        tc.F_true,
        n_blocks=setup["n_blocks"],
        n_off=setup["n_off"],
        rho_in=tc.rho_in,
        rho_off=tc.rho_off,
        seed=setup["seed"],
        sizes=tc.block_sizes,
    )
    run = setup["seed"] + 1000 * seed  # seed 0: the original runs
    g = torch.Generator().manual_seed(1000 + run)
    x_sparse = sample_sparse(S, tc.samples, tc.k_true, g)  # (N, F_true)
    ae = train_toy_ae(x_sparse, tc.d, tc.ae_steps, tc.batch, seed=run)
    with torch.no_grad():
        X = ae.W.T.detach()  # (F_true, d) AE features
        # the paper's AE RV (0.59) matches cosine similarities, not raw dot products
        if tc.gram == "cosine":
            X = torch.nn.functional.normalize(X, dim=-1)
        acts = ae.hidden(x_sparse)  # (N, d) SAE data
    grams, health = {"truth": S, "ae": X @ X.T}, {}
    train_cfg = K.TrainConfig(
        steps=tc.sae_steps, batch=tc.batch, lr=tc.sae_lr, aux_coef=tc.aux_coef
    )
    for name, (arch, c) in model_specs(tc.F_true, tc.k, tc.models).items():
        # the baseline: atoms that know nothing of S, as spread as random vectors in d dims
        if arch == "random":
            Y = torch.randn(
                tc.F_true, tc.d, generator=torch.Generator().manual_seed(run)
            )
            Y = torch.nn.functional.normalize(Y, dim=-1)
        else:
            K.set_seed(run)
            sae = c.build(arch, tc.d)
            if arch == "topk" and tc.topk_init == "random":
                sae.W_enc.data = torch.nn.functional.normalize(
                    torch.randn_like(sae.W_enc), dim=-1
                )
            batches = K.shuffled_batches(
                acts, tc.batch, torch.Generator().manual_seed(run)
            )
            K.train(sae, batches, train_cfg, progress=progress)
            health[name] = atom_health(sae, acts)
            Y = sae.W_dec.detach()
        Y = Y[match_atoms(X, Y, seed=run, inits=tc.faq_inits)]  # row i ~ feature i
        grams[name] = Y @ Y.T
    rv = {name: rv_coefficient(S, C) for name, C in grams.items() if name != "truth"}
    return rv, grams, health


def save_figure(grams: dict, rv: dict, path: str):
    """Like the paper's figure 5: ground truth, AE, TopK and the best KronSAE, RV in the titles."""
    plt = K.pyplot()
    krons = [name for name in rv if name.startswith("kron")]
    shown = [
        name
        for name in ("topk", max(krons, key=rv.get) if krons else None)
        if name in rv
    ]
    panels = [("truth", "ground-truth S"), ("ae", f"AE, RV={rv['ae']:.3f}")] + [
        (name, f"{'TopK SAE' if name == 'topk' else name}, RV={rv[name]:.3f}")
        for name in shown
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2))
    for ax, (name, title) in zip(axes, panels):
        C = grams[name].double()
        C = C / C.diagonal().abs().clamp_min(1e-12).sqrt().outer(
            C.diagonal().abs().clamp_min(1e-12).sqrt()
        )
        ax.imshow(C.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "Feature correlations recovered after matching (KronSAE paper, section 5.1)"
    )
    fig.tight_layout()
    K.save_figure(fig, path)
    plt.close(fig)


def summarize(runs: list[dict], key: str = "rv") -> dict:
    """Per model: mean ± std over every (set-up, seed) run, and the std over seeds of the set-up mean (the
    error bar of the headline number)."""
    out = {}
    for name in runs[0][key]:
        stats = K.mean_std([r[key][name] for r in runs])
        by_seed = {}
        for r in runs:
            by_seed.setdefault(r["seed"], []).append(r[key][name])
        stats["seed_std"] = K.mean_std([sum(v) / len(v) for v in by_seed.values()])[
            "std"
        ]
        out[name] = stats
    return out


def run_jobs(fn, jobs: list[tuple], workers: int, progress: bool = True) -> list:
    """fn(*job) for every job, in `workers` processes (spawned: a fresh interpreter, safe with torch's
    threads), results in job order."""
    if workers <= 1:
        return [fn(*job) for job in tqdm(jobs, disable=not progress, desc="runs")]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in tqdm(futures, disable=not progress, desc="runs")]


def experiment(
    tc: ToyConfig, figure: str = "", json_path: str = "", progress: bool = True
) -> dict:
    start = time.perf_counter()
    jobs = [
        (setup, tc, seed) for seed in range(tc.seeds) for setup in SETUPS[: tc.setups]
    ]
    runs = []
    for (setup, _, seed), (rv, grams, health) in zip(
        jobs, run_jobs(run_setup, jobs, tc.workers, progress)
    ):
        runs.append({"setup": setup, "seed": seed, "rv": rv, "health": health})
        if progress:
            print(
                f"set-up {setup}, seed {seed}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in rv.items())
            )
        if figure and seed == 0 and setup is SETUPS[0]:
            save_figure(grams, rv, figure)
    summary = summarize(runs)
    seconds = time.perf_counter() - start
    print(
        f"\nRV(S, C), {tc.gram} Gram of the AE, over {tc.setups} set-ups x {tc.seeds} seeds ({seconds:.0f} s); "
        f"± std over all runs, and the std of the set-up mean over seeds"
    )
    table = []
    for name, st in summary.items():
        health = [r["health"][name] for r in runs] if name in runs[0]["health"] else []
        dead = f"{sum(h['dead'] for h in health) / len(health):.1f}" if health else ""
        dup = (
            f"{sum(h['duplicated'] for h in health) / len(health):.1f}"
            if health
            else ""
        )
        table.append(
            [
                name,
                f"{st['mean']:.3f} ± {st['std']:.3f}",
                f"± {st['seed_std']:.3f}",
                PAPER_RV.get(name, ""),
                dead,
                dup,
            ]
        )
    print(
        K.format_table(
            ["model", "this run", "over seeds", "paper (table 7)", "dead", "dup"], table
        )
    )
    ratio = (
        summary["kron_h2_m4_n32"]["mean"] / summary["topk"]["mean"]
        if {"kron_h2_m4_n32", "topk"} <= summary.keys()
        else None
    )
    if ratio is not None:
        print(f"kron_h2_m4_n32 / topk = {ratio:.2f} (paper: about 1.8)")
    result = {
        "rv": summary,
        "runs": runs,
        "ratio_kron_h2_m4_n32_over_topk": ratio,
        "config": dataclasses.asdict(tc),
        "seconds": seconds,
    }
    if json_path:
        K.write_json(json_path, result)
    if figure:
        print(f"figure: {figure}")
    return result


# ----------------------------------------------------------------------------- feature absorption (KronSAE fig. 4)
# Chanin et al. 2024, "A is for Absorption" (arXiv 2409.14507): a parent feature (e.g. "starts with S") and
# children that imply it ("short", "snake"). An SAE absorbs when the latent that tracks the parent stays silent
# on a child's inputs and the child's latent carries the parent's direction instead. Here the hierarchy is
# planted, so the parent and child directions are known exactly and need no probe.

# SAEBench's full-absorption test (Karvonen et al. 2025, evals/absorption, after Chanin et al.): the absorbing
# latent's decoder must have cosine >= 0.025 with the parent direction, and its projection onto that direction
# (activation x cosine) must be >= 40% of the input's own projection.
ABSORBER_MIN_COSINE = 0.025
ABSORBER_MIN_SHARE = 0.4


@dataclass
class AbsorptionConfig:
    parents: int = 32  # parent features
    children: int = 4  # children per parent; a child fires only with its parent
    others: int = (
        96  # independent features; with the above, F_true = 32 + 128 + 96 = 256
    )
    d: int = (
        64  # embedding width: 256 random unit directions in 64 dims, in superposition
    )
    p_parent: float = 0.08  # each parent fires with this probability
    p_child: float = 0.9  # given its parent, one of the children (uniformly) fires with this probability
    p_other: float = (
        0.03  # each independent feature's probability; about 7.5 active features in all
    )
    k: int = 8  # SAE sparsity, F = F_true = 256 so that the four KronSAE shapes of table 7 fit
    samples: int = 65536
    eval_samples: int = 16384
    sae_steps: int = 1000
    batch: int = 1024
    seeds: int = 3
    workers: int = 2

    def __post_init__(self):
        K.check_positive(
            parents=self.parents,
            children=self.children,
            d=self.d,
            k=self.k,
            samples=self.samples,
            eval_samples=self.eval_samples,
            sae_steps=self.sae_steps,
            batch=self.batch,
            seeds=self.seeds,
            workers=self.workers,
        )
        if self.F_true != 256:
            raise ValueError(
                f"the four KronSAE shapes need F_true = parents*(1+children)+others = 256, "
                f"got {self.F_true}"
            )
        if (
            not all(0 < p <= 1 for p in (self.p_parent, self.p_child))
            or not 0 <= self.p_other <= 1
        ):
            raise ValueError("probabilities must lie in (0, 1] (p_other in [0, 1])")

    @property
    def F_true(self) -> int:
        return self.parents * (1 + self.children) + self.others


class Hierarchy(NamedTuple):
    """Feature f's direction is directions[f]; parents are 0..P-1, parent p's children are children[p]."""

    directions: torch.Tensor  # (F_true, d) unit rows
    children: torch.Tensor  # (P, C) feature ids

    @property
    def parents(self) -> int:
        return self.children.shape[0]


def planted_hierarchy(ac: AbsorptionConfig, seed: int) -> Hierarchy:
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(
        torch.randn(ac.F_true, ac.d, generator=g), dim=-1
    )
    children = ac.parents + torch.arange(ac.parents * ac.children).view(
        ac.parents, ac.children
    )
    return Hierarchy(directions, children)


def hierarchy_codes(ac: AbsorptionConfig, n: int, g: torch.Generator) -> torch.Tensor:
    """(n, F_true) non-negative codes: parents, at most one child per active parent, independent others;
    each active feature has magnitude U(0.5, 1.5)."""
    P, C = ac.parents, ac.children
    parent_on = torch.rand(n, P, generator=g) < ac.p_parent
    child_on = parent_on & (torch.rand(n, P, generator=g) < ac.p_child)
    which = torch.randint(0, C, (n, P), generator=g)
    children_on = torch.zeros(n, P, C, dtype=torch.bool).scatter_(
        2, which[..., None], child_on[..., None]
    )
    others_on = torch.rand(n, ac.others, generator=g) < ac.p_other
    on = torch.cat([parent_on, children_on.flatten(1), others_on], dim=1)
    return on * (0.5 + torch.rand(n, ac.F_true, generator=g))


def absorption_stats(
    sae: K.SparseAutoencoder, x: torch.Tensor, codes: torch.Tensor, h: Hierarchy
) -> dict:
    """Over (input, active parent) pairs: `rate`, the share where the parent is absorbed: its main latent (the
    decoder row closest to its direction) is silent, and the active latent with the largest projection onto
    the parent direction is the main latent of one of its active children, with cosine >= ABSORBER_MIN_COSINE
    and a projection >= ABSORBER_MIN_SHARE of the input's own. `parent_fires`, the share where the parent's
    main latent fires: an SAE that never learned the parent cannot absorb it either."""
    with torch.no_grad():
        # (F_true, F)
        cos = h.directions @ torch.nn.functional.normalize(sae.W_dec, dim=-1).T
        main = cos.argmax(-1)  # (F_true,) feature -> latent
        dense = K.dense_code(sae, x)  # (N, F)
        absorbed = total = fires = 0
        for p in range(h.parents):
            rows = codes[:, p] > 0
            total += int(rows.sum())
            fires += int((dense[rows, main[p]] > 1e-8).sum())
            proj = dense[rows] * cos[p]  # (n, F) onto parent p
            top_proj, top = proj.max(-1)
            kids = h.children[p]
            child_absorbs = (
                (top[:, None] == main[kids][None]) & (codes[rows][:, kids] > 0)
            ).any(-1)
            own = x[rows] @ h.directions[p]  # the input's projection
            silent = dense[rows, main[p]] <= 1e-8
            carries = (
                (cos[p, top] >= ABSORBER_MIN_COSINE)
                & (own > 0)
                & (top_proj >= ABSORBER_MIN_SHARE * own)
            )
            absorbed += int((silent & child_absorbs & carries).sum())
    return {"rate": absorbed / max(total, 1), "parent_fires": fires / max(total, 1)}


def absorption_run(ac: AbsorptionConfig, seed: int, name: str) -> dict:
    """Train one SAE on one seed's planted hierarchy; its absorption rate and EV on held-out inputs."""
    torch.set_num_threads(1)
    h = planted_hierarchy(ac, seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    codes = hierarchy_codes(ac, ac.samples + ac.eval_samples, g)
    x = codes @ h.directions  # (N, d)
    arch, c = model_specs(ac.F_true, ac.k)[name]
    K.set_seed(seed)
    sae = c.build(arch, ac.d)
    K.train(
        sae,
        K.shuffled_batches(
            x[: ac.samples], ac.batch, torch.Generator().manual_seed(seed)
        ),
        K.TrainConfig(steps=ac.sae_steps, batch=ac.batch),
        progress=False,
    )
    held_out, held_codes = x[ac.samples :], codes[ac.samples :]
    return absorption_stats(sae, held_out, held_codes, h) | {
        "ev": K.evaluate(sae, held_out)["ev"]
    }


def save_absorption_figure(summary: dict, path: str):
    plt = K.pyplot()
    names = list(summary)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(
        range(len(names)),
        [100 * summary[n]["mean"] for n in names],
        yerr=[100 * summary[n]["std"] for n in names],
        capsize=4,
        color=["tab:gray" if n == "topk" else "tab:blue" for n in names],
    )
    ax.set_xticks(range(len(names)), [n.replace("kron_", "kron\n") for n in names])
    ax.set_ylabel("absorption rate (%)")
    ax.set_title("Parents absorbed by a child latent (mean ± std over seeds)")
    fig.tight_layout()
    K.save_figure(fig, path)
    plt.close(fig)


def absorption_experiment(
    ac: AbsorptionConfig, figure: str = "", json_path: str = "", progress: bool = True
) -> dict:
    start = time.perf_counter()
    names = list(model_specs(ac.F_true, ac.k))
    jobs = [(ac, seed, name) for seed in range(ac.seeds) for name in names]
    results = run_jobs(absorption_run, jobs, ac.workers, progress)
    rates = {
        name: [r["rate"] for (_, _, n), r in zip(jobs, results) if n == name]
        for name in names
    }
    mean = {
        key: {
            name: K.mean_std(
                [r[key] for (_, _, n), r in zip(jobs, results) if n == name]
            )["mean"]
            for name in names
        }
        for key in ("ev", "parent_fires")
    }
    summary = {
        name: K.mean_std(rates[name])
        | {
            "rates": rates[name],
            "ev": mean["ev"][name],
            "parent_fires": mean["parent_fires"][name],
        }
        for name in names
    }
    seconds = time.perf_counter() - start
    print(
        f"\nabsorption rate on held-out inputs, {ac.seeds} seeds ({seconds:.0f} s); F = {ac.F_true}, k = {ac.k}"
    )
    print(
        K.format_table(
            ["model", "absorption", "parent fires", "EV"],
            [
                [
                    name,
                    f"{100 * st['mean']:.1f}% ± {100 * st['std']:.1f}%",
                    f"{100 * st['parent_fires']:.1f}%",
                    f"{st['ev']:.3f}",
                ]
                for name, st in summary.items()
            ],
        )
    )
    result = {
        "absorption": summary,
        "config": dataclasses.asdict(ac),
        "seconds": seconds,
        "thresholds": {
            "min_cosine": ABSORBER_MIN_COSINE,
            "min_share": ABSORBER_MIN_SHARE,
        },
    }
    if json_path:
        K.write_json(json_path, result)
    if figure:
        save_absorption_figure(summary, figure)
        print(f"figure: {figure}")
    return result


# ----------------------------------------------------------------------------- the CLI


def parse_experiment(
    parser: K.Parser, argv, make, figure: str, json_layout: str, quick: dict
):
    """Add --quick, --figure and --json, parse, and build the config with make(args): a bad option is one
    line on stderr (kronsae's Parser). Returns (config, figure path, JSON path)."""
    parser.add_argument(
        "--quick", action="store_true", help=f"a smoke run for tests: {quick}"
    )
    parser.add_argument(
        "--figure",
        default=figure,
        help=f"PNG path for the figure ('' = none; default: {figure})",
    )
    parser.add_argument("--json", default="", help=f"write {json_layout} to this file")
    args = vars(parser.parse_args(argv))
    is_quick, figure, json_path = (
        args.pop("quick"),
        args.pop("figure"),
        args.pop("json"),
    )
    if is_quick:
        args.update(quick)

    def build(args):
        for flag, path in (("json", json_path), ("figure", figure)):
            if path:
                K.check_writable(path, flag)
        return make(args)

    return K.build_configs(parser, args, build), figure, json_path


def rv_main(argv) -> dict:
    tc = ToyConfig()
    parser = K.Parser(
        prog="synthetic.py",
        description=(
            "The KronSAE paper's toy model of correlated features (section 5.1): a toy AE on block-correlated "
            "sparse data, then a TopK SAE and four KronSAEs on its hidden states; decoder atoms are matched to "
            "the AE's features by quadratic assignment (FAQ) and scored by RV against the true covariance, over "
            "8 covariance set-ups x --seeds seeds. Other command: absorption (see synthetic.py absorption --help)."
        ),
    )
    add = parser.add_argument
    add(
        "--setups",
        type=int,
        default=tc.setups,
        help=f"covariance set-ups to average over, 1-8 (default: {tc.setups})",
    )
    add(
        "--seeds",
        type=int,
        default=tc.seeds,
        help=f"repeats of each set-up: samples, AE and SAE inits (default: {tc.seeds})",
    )
    add(
        "--gram",
        default=tc.gram,
        choices=["cosine", "raw"],
        help="the AE's feature Gram for its RV and the matching: cosine (unit-normalised embeddings, as the "
        "paper's AE RV implies) or raw (default: cosine)",
    )
    add(
        "--k-true",
        type=int,
        default=tc.k_true,
        help=f"generator: active features per sample (default: {tc.k_true})",
    )
    add(
        "--rho-in",
        type=float,
        nargs=2,
        default=tc.rho_in,
        metavar=("LO", "HI"),
        help=f"generator: range of the within-block correlations (default: {tc.rho_in[0]} {tc.rho_in[1]})",
    )
    add(
        "--rho-off",
        type=float,
        default=tc.rho_off,
        help=f"generator: off-diagonal block correlation (default: {tc.rho_off})",
    )
    add(
        "--block-sizes",
        type=K.comma_ints,
        default=tc.block_sizes,
        help="generator: comma-separated diagonal block sizes summing to 256, for every set-up "
        "(default: each set-up's own random sizes)",
    )
    add(
        "--samples",
        type=int,
        default=tc.samples,
        help=f"x_sparse rows (default: {tc.samples})",
    )
    add(
        "--ae-steps",
        type=int,
        default=tc.ae_steps,
        help=f"optimiser steps for the toy AE (default: {tc.ae_steps})",
    )
    add(
        "--sae-steps",
        type=int,
        default=tc.sae_steps,
        help=f"optimiser steps per SAE (default: {tc.sae_steps})",
    )
    add(
        "--sae-lr",
        type=float,
        default=tc.sae_lr,
        help=f"SAE learning rate (default: {tc.sae_lr})",
    )
    add(
        "--aux-coef",
        type=float,
        default=tc.aux_coef,
        help=f"AuxK coefficient, 0 = off (default: {tc.aux_coef})",
    )
    add(
        "--topk-init",
        default=tc.topk_init,
        choices=["tied", "random"],
        help="TopK encoder init: tied to the decoder (Gao et al.) or independent (default: tied)",
    )
    add(
        "--faq-inits",
        type=int,
        default=tc.faq_inits,
        help="FAQ starts per matching, the best objective wins (default: 1, scipy's barycenter start)",
    )
    add(
        "--models",
        type=K.comma_parts,
        default=tc.models,
        help="comma-separated SAEs to train (default: all five); random_atoms adds the untrained baseline",
    )
    add(
        "--workers",
        type=int,
        default=tc.workers,
        help=f"processes, one thread each (default: {tc.workers})",
    )
    tc, figure, json_path = parse_experiment(
        parser,
        argv,
        lambda a: ToyConfig(**a | {"rho_in": tuple(a["rho_in"])}),
        "synthetic_rv.png",
        "{'rv': {model: {'mean', 'std', 'seed_std'}}, 'runs': [...], ...}",
        quick=dict(
            setups=2, seeds=1, samples=8192, ae_steps=200, sae_steps=60, batch=512
        ),
    )
    # errors: one line
    return K.run_cli(partial(experiment, tc, figure=figure, json_path=json_path))


def absorption_main(argv) -> dict:
    ac = AbsorptionConfig()
    parser = K.Parser(
        prog="synthetic.py absorption",
        description=(
            "Feature absorption (Chanin et al. 2024; the KronSAE paper's fig. 4) on a planted hierarchy: parent "
            "features whose children fire only with them, embedded as random directions in a low-dimensional "
            "space. Trains the TopK SAE and the four KronSAE shapes at the same F and k, and reports the share of "
            "parent-active inputs where the parent's latent is silent and an active child's latent carries the "
            "parent direction (SAEBench's thresholds), mean ± std over seeds."
        ),
    )
    add = parser.add_argument
    add("--seeds", type=int, default=ac.seeds, help=f"seeds (default: {ac.seeds})")
    add(
        "--p-child",
        type=float,
        default=ac.p_child,
        help=f"P(a child fires | its parent fires) (default: {ac.p_child})",
    )
    add("--k", type=int, default=ac.k, help=f"SAE sparsity (default: {ac.k})")
    add(
        "--sae-steps",
        type=int,
        default=ac.sae_steps,
        help=f"optimiser steps per SAE (default: {ac.sae_steps})",
    )
    add(
        "--workers",
        type=int,
        default=ac.workers,
        help=f"processes, one thread each (default: {ac.workers})",
    )
    ac, figure, json_path = parse_experiment(
        parser,
        argv,
        lambda a: AbsorptionConfig(**a),
        "absorption.png",
        "{'absorption': {model: {'mean', 'std', 'rates', 'parent_fires', 'ev'}}, ...}",
        quick=dict(seeds=1, samples=8192, eval_samples=2048, sae_steps=60, batch=512),
    )
    return K.run_cli(
        partial(absorption_experiment, ac, figure=figure, json_path=json_path)
    )


COMMANDS = {"absorption": absorption_main}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return rv_main(argv)


if __name__ == "__main__":
    main()
