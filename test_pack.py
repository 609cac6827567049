"""Packed rows and the packed forward: `python -m pytest -q test_pack.py`.

A packed batch (rows of row_len holding many samples) must compute exactly what the same
samples compute one per row: the losses and every gradient; the new forward (sorted expert
blocks, rope once, mask once) must equal the forward before it on the shipped base; the
compiled step must equal the eager one.
"""
import os

import numpy as np
import pytest
import torch

import bench
import model as M
import pretrain as P
import world

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = dict(atol=1e-5, rtol=5e-4)            # fp32 (design section 5)


def tiny(seed=0):
    torch.manual_seed(seed)
    m = M.MoT(M.config_for(2, len(world.VOCAB)))
    torch.nn.init.normal_(m.llm2vae.weight, std=0.1)   # the zero-init head would hide the gen path
    return m


def tiny_ae():
    torch.manual_seed(1)
    return M.PaletteAE(w=16).eval().requires_grad_(False)


def batch(step, n, row_len, ae):
    """Real pre-training samples (every task of the mix), latents from an AE, on the CPU."""
    b = P.make_batch(0, step, 0, n, set(), 0.1, 1.0, 32, row_len)
    return P.to_device(b, ae, "cpu")


def loss_and_grads(m, b, fwd=None):
    """The pre-training loss and every gradient; fwd: what runs the forward (e.g. compiled m)."""
    m.zero_grad(set_to_none=True)
    loss = bench.step_loss(m if fwd is None else fwd, b)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


def test_packed_losses_and_every_gradient_equal_one_per_row():
    m, ae = tiny(), tiny_ae()
    for step in (0, 1):
        rows, packed = batch(step, 16, None, ae), batch(step, 16, 128, ae)
        assert packed["kind"].shape[1] == 128 and packed["kind"].shape[0] < rows["kind"].shape[0]
        # the per-token losses, sample by sample: CE summed per sample, velocities in the given order
        ce_r, v_r = M.token_losses(m, rows)
        ce_p, v_p = M.token_losses(m, packed)
        per_r = (ce_r * rows["lw"]).sum(1)
        per_p = torch.zeros(16).index_add(0, packed["sample"].clamp(min=0).flatten(), (ce_p * packed["lw"]).flatten())
        torch.testing.assert_close(per_p, per_r, **TOL)
        torch.testing.assert_close(v_p, v_r, **TOL)
        torch.testing.assert_close(packed["x0"], rows["x0"])          # targets in the same order
        torch.testing.assert_close(packed["eps"], rows["eps"])
        lr, gr = loss_and_grads(m, rows)
        lp, gp = loss_and_grads(m, packed)
        torch.testing.assert_close(lp, lr, **TOL)
        assert gr.keys() == gp.keys() and len(gr) == len(list(m.parameters()))   # every parameter
        for k in gr:
            torch.testing.assert_close(gp[k], gr[k], **TOL, msg=k)


def test_pack_layout_order_and_error():
    zs = [torch.randn(16, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    samples = [[("text", [1, 10, 11, 7], 0), ("noise", zs[0], 0.3)],
               [("text", [1, 12], 1.0)],
               [("text", [1, 13, 14, 15, 16, 7], [0, 1, 1, 1, 2, 1]), ("clean", zs[1]), ("text", [8, 9], 1.0),
                ("noise", zs[2], 0.7)],
               [("text", [1, 7], 0), ("noise", zs[3], 0.5)]]
    rows, packed = M.pack(samples, M.PAD, 32), M.pack(samples, M.PAD, 32, row_len=48)
    assert packed["ids"].shape == (2, 48)        # 40+2 | 20+18: row-major noise order is 2, 0, 3
    # each sample keeps its own tokens, labels, weights and rope positions (from 0)
    for i in range(4):
        sel = packed["sample"] == i
        mine = rows["sample"][i] == 0
        for k in ("ids", "kind", "pos", "ipos", "labels", "lw", "t"):
            assert torch.equal(packed[k][sel], rows[k][i][mine]), (i, k)
        assert packed["pos"][sel][0] == 0
    assert (packed["sample"] >= 0).sum() == (rows["sample"] >= 0).sum()
    # gen_idx: the noise tokens in the order the segments were given (their latents say which)
    lat = packed["lat"].flatten(0, 1)[packed["gen_idx"]].view(3, 16, 32)
    assert torch.equal(lat, torch.stack([zs[0], zs[2], zs[3]]))
    # one per row: gen_idx is kind == NOISE, row-major, as before
    assert torch.equal(rows["gen_idx"], (rows["kind"].flatten() == M.NOISE).nonzero().squeeze(1))
    with pytest.raises(ValueError, match=r"sample 2 has 40 tokens.*row length 32.*--row_len.*at least 40"):
        M.pack(samples, M.PAD, 32, row_len=32)


def test_real_token_fraction_of_a_pretraining_batch():
    """The shipped config (batch 32) at the default --row_len: >= 0.9 of B x L is real."""
    real = total = 0
    for step in range(6):
        b = P.make_batch(0, step, 0, 32, set(), 0.1, 1.0, 32, P.defaults["row_len"])
        real += int((b["sample"] >= 0).sum())
        total += b["sample"].numel()
    assert real / total >= 0.9, real / total


def test_new_forward_equals_old_forward_on_shipped_base():
    """Same state_dict keys, and the same outputs as the one-sample-per-row forward (bench.old_forward)."""
    base = os.path.join(HERE, "data", "base")
    m, ae, _ = M.load_weights(base)
    from safetensors.torch import load_file
    keys = {k[4:] for k in load_file(base + ".safetensors") if k.startswith("umm.")}
    assert keys == set(m.state_dict())
    b = batch(3, 8, None, ae)
    with torch.no_grad():
        h_old, h_new = bench.old_forward(m, b), m(b)
        torch.testing.assert_close(h_new, h_old, **TOL)
        lo, vo = bench.old_forward(m, b, heads=True)
        ln, vn = m(b, heads=True)
        torch.testing.assert_close(ln, lo, **TOL)
        torch.testing.assert_close(vn, vo, **TOL)
        # packed: every real token's hidden state equals its one-per-row twin
        bp = batch(3, 8, 160, ae)
        hp = m(bp)
        for i in range(8):
            torch.testing.assert_close(hp[bp["sample"] == i], h_old[i][b["sample"][i] == 0], **TOL)


def test_compiled_step_equals_eager():
    m, ae = tiny(), tiny_ae()
    cm = torch.compile(m, dynamic=True)
    for step in (0, 1):                       # two batches: different rows and expert blocks
        b = batch(step, 8, 128, ae)
        le, ge = loss_and_grads(m, b)
        lc, gc = loss_and_grads(m, b, cm)
        torch.testing.assert_close(lc, le, **TOL)
        assert ge.keys() == gc.keys() and len(ge) == len(list(m.parameters()))
        for k in ge:
            torch.testing.assert_close(gc[k], ge[k], **TOL, msg=k)


def test_pretrain_one_per_row_still_runs(tmp_path):
    """--row_len 0 keeps the old layout (one sample per row) end to end."""
    b = P.make_batch(0, 0, 0, 4, set(), 0.1, 1.0, 32, None)
    assert b["ids"].shape[0] == 4 and (b["sample"] <= 0).all()
    assert np.isclose(float(b["t"].max()) <= 1.0, True)


def test_triton_path_equals_cpu_path():
    """The CUDA path (Triton attention on strided q/k/v views, plan per batch) computes what the
    CPU path (one dense mask per forward) does: here in Triton's interpreter (conftest sets it)."""
    import kernels
    if not kernels.HAS_TRITON or not (torch.cuda.is_available() or kernels.interpreting()):
        pytest.skip("needs Triton (CUDA or TRITON_INTERPRET=1)")
    m, ae = tiny(), tiny_ae()
    b = batch(0, 4, 96, ae)
    keep = kernels.USE_TRITON
    try:
        kernels.USE_TRITON = False
        le, ge = loss_and_grads(m, b)
        kernels.USE_TRITON = True
        lt, gt = loss_and_grads(m, b)
    finally:
        kernels.USE_TRITON = keep
    torch.testing.assert_close(lt, le, **TOL)
    for k in ge:
        torch.testing.assert_close(gt[k], ge[k], atol=1e-4, rtol=1e-3, msg=k)
