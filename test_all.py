"""nanoUMM test suite (CPU, minutes): `python -m pytest -q test_all.py test_world.py test_kernels.py`.

This file: the model (mask rule, MoT routing, KV cache, sampler), pre-training (DDP equals one
process, resume equals uninterrupted), evaluation, and bad inputs. World and kernel tests live
in test_world.py and test_kernels.py.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import model as M
from kernels.attention import allowed_mask

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny(seed=0, vocab=60):
    torch.manual_seed(seed)
    m = M.MoT(M.config_for(2, vocab))
    torch.nn.init.normal_(m.llm2vae.weight, std=0.1)   # zero-init head would hide bugs
    return m.eval()


def z(seed, n=16, C=32):
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the mask rule

def test_mask_matches_rule_on_packed_example():
    """Two samples packed in one row: text, clean image, text, noise image | text, noise image."""
    kinds = [0, 0, 0, 1, 1, 1, 0, 0, 2, 2, 2] + [0, 0, 2, 2]
    split = [0, 1, 2, 3, 3, 3, 4, 5, 6, 6, 6] + [7, 8, 9, 9]
    sample = [0] * 11 + [1] * 4
    L = len(kinds)
    meta = tuple(torch.tensor([x]) for x in (sample, split, kinds, list(range(L))))
    got = allowed_mask(meta, meta)[0]
    for q in range(L):
        for k in range(L):
            same = split[q] == split[k]
            want = (q >= k or (same and kinds[q] in (1, 2))) and not (kinds[k] == 2 and not same) \
                and sample[q] == sample[k]
            assert bool(got[q, k]) == want, (q, k)
    # spot checks in words: noise sees context and itself, nothing sees noise, clean is bidirectional
    assert got[8, 0] and got[8, 10] and got[10, 8] and not got[7, 8] and not got[11, 8]
    assert got[3, 5] and not got[2, 3] and not got[12, 3] and not got[13, 9]


def test_pack_labels_positions_and_kinds():
    samples = [[("text", [1, 10, 11], 0), ("text", [12, 5], 1.0), ("clean", z(0)), ("text", [6, 13], [0, 2.0]),
                ("noise", z(1), 0.3)]]
    b = M.pack(samples, M.PAD, 32)
    # labels: 11->12, 12->5 (weight 1), image has none, 6->13 (weight 2)
    assert b["labels"][0, :5].tolist() == [-100, -100, 12, 5, -100]
    assert b["labels"][0, 21].item() == 13 and b["lw"][0, 21].item() == 2.0
    # an image shares one rope position; the noise split does not advance it
    assert b["pos"][0, 5:21].unique().tolist() == [5] and b["pos"][0, 21].item() == 6
    assert b["pos"][0, 23:].unique().tolist() == [8]
    assert (b["kind"][0] == M.NOISE).sum() == 16 and b["t"][0, 23].item() == pytest.approx(0.3)


# ----------------------------------------------------------------------------- MoT routing

def test_gen_expert_does_not_change_text_outputs():
    m = tiny()
    samples = [[("text", [1, 10, 11, 12], 1.0), ("clean", z(0)), ("text", [6, 13, 14, 5], 1.0), ("noise", z(1), 0.5),
                ("text", [6, 20, 21], 1.0)]]
    b = M.pack(samples, M.PAD, 32)
    with torch.no_grad():
        h0 = m(b)
        for e in m.gen:
            for p in e.parameters():
                p.add_(torch.randn_like(p))
        for p in list(m.vae2llm.parameters()) + list(m.time_embedder.parameters()) + list(m.norm_gen.parameters()):
            p.add_(torch.randn_like(p))
        h1 = m(b)
    und = b["kind"][0] != M.NOISE
    assert torch.allclose(h0[0, und], h1[0, und], atol=1e-6)
    assert not torch.allclose(h0[0, ~und], h1[0, ~und], atol=1e-3)   # and the gen path did change


def test_clean_image_tokens_take_the_understanding_route():
    """The design's routing (BAGEL's und = text + the image read for understanding): a clean image
    enters through vae2llm_und and the und experts; the gen input projection, time embedder and gen
    experts touch only noise tokens. Moving vae2llm_und moves the clean tokens and the text after them."""
    m = tiny()
    b = M.pack([[("text", [1, 10, 11], 0), ("clean", z(0)), ("text", [6, 13, 14], 1.0)]], M.PAD, 32)
    clean = b["kind"][0] == M.CLEAN
    with torch.no_grad():
        h0 = m(b)
        for p in list(m.vae2llm.parameters()) + [p for e in m.gen for p in e.parameters()]:
            p.add_(torch.randn_like(p))
        assert torch.allclose(m(b), h0, atol=1e-6)                    # no noise token: gen path unused
        m.vae2llm_und.weight.add_(torch.randn_like(m.vae2llm_und.weight))
        h1 = m(b)
    assert not torch.allclose(h1[0, clean], h0[0, clean], atol=1e-3)
    assert torch.allclose(h1[0, :3], h0[0, :3], atol=1e-6)                # text before the image: causal
    assert not torch.allclose(h1[0, -3:], h0[0, -3:], atol=1e-3)           # text after it reads it


def test_reentered_image_enters_twice_its_vae_tokens_on_the_gen_expert_at_t0():
    """BAGEL's re-entry (model.reentry): an image going back into a generation context enters as VAE
    tokens (clean latents, t = 0, gen expert) and then as und tokens, each split one rope position,
    both visible to what follows; the velocity head reads only the noise tokens. The KV-cached path
    (reenter_image) equals one uncached forward, and pre-training's reflect / edit samples re-enter
    image1 this way (the same latents twice) while caption / VQA images enter as und tokens only."""
    m = tiny()
    ctx, after = [1, 10, 11, M.VS], [M.VE, 20, 21, 22]
    segs = [("text", ctx, 0), *M.reentry(z(3)), ("text", after, 0)]
    b = M.pack([segs + [("noise", z(4), 0.6)]], M.PAD, 32)
    kind, n = b["kind"][0], len(ctx)
    assert (kind[n:n + 16] == M.VAE).all() and (kind[n + 16:n + 32] == M.CLEAN).all()
    assert b["pos"][0, n:n + 16].unique().tolist() == [n] and b["pos"][0, n + 16:n + 32].unique().tolist() == [n + 1]
    assert b["pos"][0, n + 32].item() == n + 2 and (b["t"][0, n:n + 32] == 0).all()
    assert b["vae_idx"].tolist() == list(range(n, n + 16))
    with torch.no_grad():
        _, v = m(b, heads=True)
        assert v.shape == (16, 32)
        h0 = m(b)
        m.vae2llm.weight.add_(torch.randn_like(m.vae2llm.weight))           # the gen expert's input projection
        h1 = m(b)
    assert torch.allclose(h1[0, :n], h0[0, :n], atol=1e-6)                   # causal: text before is untouched
    assert not torch.allclose(h1[0, n:n + 16], h0[0, n:n + 16], atol=1e-3)   # the VAE tokens take it
    assert not torch.allclose(h1[0, n + 32:n + 36], h0[0, n + 32:n + 36], atol=1e-3)   # and the text after reads them
    full_b = M.pack([segs], M.PAD, 32)
    with torch.no_grad():
        full = m(full_b)[0]
        cache, _ = M.prefill(m, [ctx], "cpu")
        h_img = M.reenter_image(m, cache, z(3)[None])
        lg = M.append_text(m, cache, torch.tensor([after]))
    assert torch.allclose(h_img[0], full[n + 16:n + 32], atol=1e-5)
    assert torch.allclose(lg[0], m.logits(full[-1]).float(), atol=1e-5)
    assert cache.kv[0][0].shape[2] == n + 32 + len(after) and cache.pos.item() == n + 2 + len(after)
    import pretrain as P
    torch.manual_seed(1)
    ae = M.PaletteAE(w=16).eval().requires_grad_(False)
    for task, vae in (("edit", 16), ("reflect", 16), ("caption", 0), ("vqa", 0)):
        bb = P.to_device(P.make_batch(0, 0, 0, 4, set(), 0.0, 1.0, 32, None, {task: 1.0}), ae, "cpu")
        for r in range(4):
            k = bb["kind"][r]
            assert int((k == M.VAE).sum()) == vae and int((k == M.CLEAN).sum()) == 16
            if vae:
                assert torch.equal(bb["lat"][r][k == M.VAE], bb["lat"][r][k == M.CLEAN])


def test_a_base_trained_before_the_vae_tokens_reenters_images_as_it_learned(tmp_path):
    """Config.vae_reentry False (the bases v1-v5 were trained before the VAE tokens): reenter_image and
    IRGL's samples give image1 as und tokens only, cached equal to uncached; the flag survives a save and
    load, a .json with a non-boolean value is refused naming the key, and pre-training from such a base
    trains (and saves) with the VAE tokens."""
    import irg
    m = tiny()
    m.c.vae_reentry = False
    ctx, after = [1, 10, 11, M.VS], [M.VE, 20, 21, 22]
    segs = [("text", ctx, 0), *M.reentry(z(3), m.c.vae_reentry), ("text", after, 0)]
    with torch.no_grad():
        full = m(M.pack([segs], M.PAD, 32))[0]
        cache, _ = M.prefill(m, [ctx], "cpu")
        M.reenter_image(m, cache, z(3)[None])
        lg = M.append_text(m, cache, torch.tensor([after]))
    assert cache.kv[0][0].shape[2] == len(ctx) + 16 + len(after) and full.shape[0] == len(ctx) + 16 + len(after)
    assert torch.allclose(lg[0], m.logits(full[-1]).float(), atol=1e-5)
    rec = dict(spec=dict(prompt="a photo of a red circle"), t1=[20, M.END_THINK, M.VS], t1_loss=False, t2=[21, M.END_THINK, M.VS])
    a = dict(irg.defaults, cfg_drop=0.0)
    for vae, n in ((True, 16), (False, 0)):
        got, _ = irg.mode_sample("improving_full", rec, dict(img1=z(1)), np.random.default_rng(0), a, vae)
        assert sum(seg[0] == "vae" for seg in got) * 16 == n
    ck = str(tmp_path / "old")
    M.save_weights(ck, M.MoT(M.config_for(2, 204)), M.PaletteAE(w=16), dict(step=0))
    js = json.load(open(ck + ".json"))
    js["config"]["vae_reentry"] = False
    json.dump(js, open(ck + ".json", "w"))
    assert M.load_weights(ck)[0].c.vae_reentry is False
    run(["--init_from", ck, "--out", str(tmp_path / "more"), "--steps", "1", "--batch", "2", "--workers", "0"])
    assert json.load(open(tmp_path / "more" / "ckpt.json"))["config"]["vae_reentry"] is True
    js["config"]["vae_reentry"] = 1
    json.dump(js, open(ck + ".json", "w"))
    with pytest.raises(ValueError, match="vae_reentry 1 must be true or false"):
        M.load_weights(ck)


def test_image_reentered_into_kv_cache_equals_uncached_forward():
    """IRG and the judges re-enter a finished image as clean context (append_image): prefill text,
    append the image, append more text; hidden states and logits equal one uncached forward."""
    m = tiny()
    ctx, after = [1, 10, 11, M.VS], [M.VE, 20, 21, 22]
    full_b = M.pack([[("text", ctx, 0), ("clean", z(3)), ("text", after, 0)]], M.PAD, 32)
    with torch.no_grad():
        full = m(full_b)[0]
        cache, _ = M.prefill(m, [ctx], "cpu")
        h_img = M.append_image(m, cache, z(3)[None])
        lg = M.append_text(m, cache, torch.tensor([after]))
    n = len(ctx)
    assert torch.allclose(h_img[0], full[n:n + 16], atol=1e-5)
    assert torch.allclose(lg[0], m.logits(full[-1]).float(), atol=1e-5)
    assert cache.kv[0][0].shape[2] == n + 16 + len(after)


# ----------------------------------------------------------------------------- inference

def test_kv_cached_decoding_equals_full_recompute():
    m = tiny()
    seq = [1, 10, 11, 12, 13, 14, 15, 16]
    with torch.no_grad():
        full = m.logits(m(M.pack([[("text", seq, 0)]], M.PAD, 32)))[0]
        # two rows of different lengths (right padding) decoded one token at a time
        cache, lg = M.prefill(m, [seq[:3], seq[:5]], "cpu")
        assert torch.allclose(lg[0], full[2], atol=1e-5) and torch.allclose(lg[1], full[4], atol=1e-5)
        for j in range(3):
            lg = M.append_text(m, cache, torch.tensor([[seq[3 + j]], [seq[5 + j] if 5 + j < len(seq) else 0]]))
            assert torch.allclose(lg[0], full[3 + j], atol=1e-5)
            if 5 + j < len(seq):
                assert torch.allclose(lg[1], full[5 + j], atol=1e-5)


def test_cached_image_sampling_equals_uncached():
    m = tiny()
    ctx = [1, 10, 11, M.VS]
    g = torch.Generator().manual_seed(0)
    cache, _ = M.prefill(m, [ctx], "cpu")
    x = M.sample_image(m, cache, steps=4, generator=g, cfg=1.0)
    xx = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0))
    ts = M.shift_t(torch.linspace(1, 0, 5), 3.0)
    with torch.no_grad():
        for i in range(4):
            b = M.pack([[("text", ctx, 0), ("noise", xx[0], float(ts[i]))]], M.PAD, 32)
            v = m.velocity(m(b)[b["kind"] == M.NOISE])[None]
            xx = xx - v * (ts[i] - ts[i + 1])
    assert torch.allclose(x, xx, atol=1e-5)
    # and the noisy tokens never entered the cache
    assert cache.kv[0][0].shape[2] == len(ctx)


class PointField:
    """A stand-in model whose velocity is exact for a point data distribution at x_star:
    x_t = (1-t) x* + t eps  =>  v = eps - x* = (x_t - x*) / t."""

    def __init__(self, targets):
        self.c = M.config_for(2, 10)
        self.targets = targets          # cache id -> x*

    def __call__(self, b, cache):
        return b, self.targets[id(cache)]

    def velocity(self, h):
        (b, xs) = h
        return (b["lat"] - xs) / b["t"][..., None]


def test_sampler_sign_lands_on_the_point():
    xs = torch.randn(2, 16, 32)
    cache = M.Cache(2, 2, "cpu")
    f = PointField({id(cache): xs})
    x = M.sample_image(f, cache, steps=10, cfg=1.0)
    assert torch.allclose(x, xs, atol=1e-4)


def test_cfg_combines_fields():
    xc, xu = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    cond, unc = M.Cache(2, 1, "cpu"), M.Cache(2, 1, "cpu")
    f = PointField({id(cond): xc, id(unc): xu})
    x = M.sample_image(f, cond, unc, steps=10, cfg=3.0)
    assert torch.allclose(x, xu + 3.0 * (xc - xu), atol=1e-4)   # v_u + s (v_c - v_u)
    x = M.sample_image(f, cond, unc, steps=10, cfg=3.0, cfg_interval=(2.0, 3.0))  # interval excludes all t
    assert torch.allclose(x, xc, atol=1e-4)


def test_generate_think_and_forced_modes():
    m = tiny()
    g = torch.Generator().manual_seed(0)
    out = M.generate(m, [[10, 11], [12]], mode="think", max_think=5, generator=g, steps=2)
    assert out["z"].shape == (2, 16, 32) and out["switched"].shape == (2,)
    assert all(len(t) <= 5 for t in out["think"])
    out = M.generate(m, [[10, 11], [12]], mode="forced", generator=g, steps=2)
    assert out["z"].shape == (2, 16, 32)


def test_p_yes_is_a_probability_and_matches_full_forward():
    m = tiny()
    zz = torch.stack([z(0), z(1)])
    p = M.p_yes(m, zz, [[20, 21, 22], [20]], yes_id=30)
    assert p.shape == (2,) and ((p >= 0) & (p <= 1)).all()
    b = M.pack([[("text", [M.BOS, M.VS], 0), ("clean", z(1)), ("text", [M.VE, 20], 0)]], M.PAD, 32)
    with torch.no_grad():
        ref = torch.softmax(m.logits(m(b))[0, -1], -1)[30]
    assert p[1].item() == pytest.approx(ref.item(), abs=1e-6)


def test_weights_roundtrip_and_missing_checkpoint(tmp_path):
    m = tiny()
    ae = M.PaletteAE()
    M.save_weights(str(tmp_path / "ck"), m, ae, dict(step=3))
    m2, ae2, meta = M.load_weights(str(tmp_path / "ck"))
    assert meta["step"] == 3 and m2.c == m.c
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.allclose(v.to(torch.bfloat16).float(), v2)
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors.*--ckpt"):
        M.load_weights(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- pre-training

def run(args, nproc=1, timeout=300):
    # a stuck gloo collective raises after 60 s instead of hanging until the timeout
    env = dict(os.environ, PYTHONPATH=HERE, OMP_NUM_THREADS="1", NANOUMM_DIST_TIMEOUT_S="60")
    if nproc == 1:
        cmd = [sys.executable, os.path.join(HERE, "pretrain.py")]
    else:
        import socket
        with socket.socket() as s:                # a free port: parallel CI jobs must not collide
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={port}", os.path.join(HERE, "pretrain.py")]
    p = subprocess.Popen(cmd + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: torchrun forwards it to its workers (they run in sessions of their own,
        # so killing the launcher's group alone would leave a hung rank behind), then SIGKILL
        os.killpg(p.pid, 15)
        try:
            out, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            out, err = p.communicate()
        out, err = out or "", (err or "") + f"\n[test] timed out after {timeout} s"
    r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory):
    d = tmp_path_factory.mktemp("ae")
    run(["--stage", "ae", "--out", str(d), "--ae_steps", "2", "--ae_batch", "4"])
    return str(d / "ckpt")


UMM = ["--stage", "umm", "--depth", "2", "--batch", "4", "--workers", "0", "--dtype", "fp32", "--log_every", "1",
       "--warmup", "1", "--lr", "1e-3"]


def metrics(d):
    return [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl")) if '"step"' in l and '"loss"' in l]


def test_ddp_two_processes_match_one(tiny_ae, tmp_path):
    """Same global batch: the loss and the averaged gradients of 2 gloo processes equal 1 process."""
    one, two = tmp_path / "one", tmp_path / "two"
    run(UMM + ["--ae", tiny_ae, "--out", str(one), "--steps", "2", "--dump_grads", str(tmp_path / "g1.pt")])
    run(UMM + ["--ae", tiny_ae, "--out", str(two), "--steps", "2", "--dump_grads", str(tmp_path / "g2.pt")],
        nproc=2, timeout=150)
    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2]
    for r1, r2 in zip(m1, m2):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5, abs=1e-6)
    g1, g2 = torch.load(tmp_path / "g1.pt"), torch.load(tmp_path / "g2.pt")
    assert g1.keys() == g2.keys() and len(g1) > 10
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-6, rtol=1e-4), k


def test_resumed_run_matches_uninterrupted(tiny_ae, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(UMM + ["--ae", tiny_ae, "--out", str(a), "--steps", "4"])
    run(UMM + ["--ae", tiny_ae, "--out", str(b), "--steps", "4", "--stop_after", "2"])
    assert json.load(open(b / "ckpt.json"))["step"] == 2
    run(UMM + ["--ae", tiny_ae, "--out", str(b), "--steps", "4", "--resume"])
    sa, sb = torch.load(a / "state.pt", weights_only=False), torch.load(b / "state.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 4
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert [r["loss"] for r in metrics(a)] == [r["loss"] for r in metrics(b)]


# ----------------------------------------------------------------------------- bad input, end to end

# (tiny_ckpt: conftest.py)

def test_evaluate_runs_and_writes_grid(tiny_ckpt, tmp_path):
    import evaluate
    s = evaluate.main(["--ckpt", tiny_ckpt, "--n", "1", "--k", "1", "--sample_steps", "2", "--max_think", "4",
                       "--out", str(tmp_path)])
    assert (tmp_path / "grid_think.png").exists() and (tmp_path / "summary.json").exists()
    assert set(s["per_tag"]) == set(__import__("world").TAGS) and 0 <= s["und"] <= 1
    assert "overall" in s["table"]


@pytest.mark.parametrize("line,msg", [
    ('{"tag": "colors", "prompt": "a photo of a red circle", "include": [{"class": "circle", "count": 1}]', "bad JSON"),
    ('{"tag": "colors", "prompt": "a photo of a crimson circle", "include": [{"class": "circle", "count": 1}]}', "crimson"),
    ('{"tag": "colors", "include": [{"class": "circle", "count": 1}]}', "missing key 'prompt'"),
])
def test_bad_prompt_file_names_file_line_and_fix(tiny_ckpt, tmp_path, line, msg):
    import evaluate
    good = '{"tag": "colors", "prompt": "a photo of a red circle", "include": [{"class": "circle", "count": 1, "color": "red"}]}'
    f = tmp_path / "prompts.jsonl"
    f.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError) as e:
        evaluate.main(["--ckpt", tiny_ckpt, "--eval", str(f), "--out", str(tmp_path)])
    assert f"{f}:2" in str(e.value) and msg in str(e.value)


def test_missing_checkpoint_names_path_and_fix(tmp_path):
    import evaluate
    with pytest.raises(FileNotFoundError, match=r"nothere\.safetensors.*pretrain\.py"):
        evaluate.main(["--ckpt", str(tmp_path / "nothere")])


# ----------------------------------------------------------------------------- methods, end to end (tiny)

def test_rwr_mines_and_trains_end_to_end(tiny_ckpt, tmp_path):
    """Weakness mining writes a prompt file; RWR runs rollouts, rewards, regression, before/after."""
    import rwr
    prompts = str(tmp_path / "mmgw.jsonl")
    quick = ["--sample_steps", "2", "--max_think", "6"]
    rwr.main(["--mine", "--ckpt", tiny_ckpt, "--prompts", prompts, "--candidates", "1", "--K", "2",
              "--keep_lo", "0", "--keep_hi", "1"] + quick)
    import world
    mined = world.load_specs(prompts)
    assert len(mined) == 12 and all("base_success" in s for s in mined)
    out = tmp_path / "run"
    rwr.main(["--ckpt", tiny_ckpt, "--prompts", prompts, "--out", str(out), "--n_prompts", "3", "--N", "2",
              "--train_steps", "2", "--batch", "4", "--eval_n", "1", "--eval_k", "1", "--reward", "oracle_soft"] + quick)
    s = json.load(open(out / "summary.json"))
    assert 0 <= s["before"] <= 1 and 0 <= s["after"] <= 1 and sum(s["hist"]) == 6
    assert (out / "before" / "grid_think.png").exists() and (out / "after" / "grid_think.png").exists()
    m0, _, _ = M.load_weights(tiny_ckpt)
    m1, _, meta = M.load_weights(str(out / "ckpt"))
    assert meta["method"] == "rwr"
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(m0.state_dict().values(), m1.state_dict().values()))
    # a variant on the same rollouts (--reuse): same rewards and before-eval, its own weighting
    args = ["--ckpt", tiny_ckpt, "--prompts", prompts, "--n_prompts", "3", "--N", "2", "--train_steps", "2",
            "--batch", "4", "--eval_n", "1", "--eval_k", "1", "--reward", "oracle_soft"] + quick
    rwr.main(args + ["--out", str(tmp_path / "img"), "--reuse", str(out), "--weight_on", "image"])
    s2 = json.load(open(tmp_path / "img" / "summary.json"))
    assert s2["hist"] == s["hist"] and s2["before"] == s["before"]
    with pytest.raises(ValueError, match="--N 2.*--N 3"):
        rwr.main(args[:6] + ["--N", "3"] + args[8:] + ["--out", str(tmp_path / "x"), "--reuse", str(out)])
    # the control: randomly drawn prompts; then the report over the three runs
    # (with --cfg_drop 1 every image is also learnt unconditionally: the CFG-dropout rows get packed)
    rwr.main(["--ckpt", tiny_ckpt, "--prompts", "random"] + args[4:] + ["--out", str(tmp_path / "rand"), "--cfg_drop", "1"])
    assert json.load(open(tmp_path / "rand" / "config.json"))["prompts"] == "random"
    rows = rwr.main(["--report", str(tmp_path)])
    assert set(rows) == {"base", "RWR multimodal (oracle_soft, mmgw.jsonl)", "RWR image (oracle_soft, mmgw.jsonl)",
                         "RWR multimodal (oracle_soft, random)"}
    assert (tmp_path / "report.md").exists()


def test_srum_reward_map_rules():
    """Step 4 of srum.py: the upstream map (background 0.5, boxes max((s+1)/2), times (g+1)/2),
    the paper's Eq. 1 form, the ablations, and the area average onto the 4x4 token grid."""
    import srum
    a = dict(srum.defaults)
    tok, pix = srum.reward_map(1.0, [((0, 0, 16, 16), 1.0)], a)       # a box that is exactly token 0
    assert tok.shape == (16,) and abs(tok[0] - 1.0) < 1e-6 and np.allclose(tok[1:], 0.5)
    tok, _ = srum.reward_map(0.0, [((0, 0, 16, 16), 1.0), ((0, 0, 16, 16), -1.0)], a)   # overlap: max; alpha 0.5
    assert abs(tok[0] - 0.5) < 1e-6 and np.allclose(tok[1:], 0.25)
    tok, _ = srum.reward_map(1.0, [((16, 16, 24, 24), 1.0)], a)       # an 8x8 box covers 1/4 of token 5
    assert abs(tok[5] - (0.5 + 0.5 * 0.25)) < 1e-5 and np.allclose(np.delete(tok, 5), 0.5)
    tok, _ = srum.reward_map(0.0, [((0, 0, 16, 16), 1.0)], dict(a, no_global=True))
    assert abs(tok[0] - 1.0) < 1e-6 and np.allclose(tok[1:], 0.5)
    tok, _ = srum.reward_map(0.3, [((0, 0, 16, 16), -0.2)], dict(a, binary=True))    # g -> 1, s -> -1
    assert np.allclose(tok, 0.5)
    tok, _ = srum.reward_map(-0.5, [((0, 0, 16, 16), 1.0)], dict(a, reward_level="sample"))
    assert np.allclose(tok, 0.25)
    tok, _ = srum.reward_map(1.0, [((0, 0, 16, 16), -1.0), ((0, 0, 16, 16), 0.5)], dict(a, reward_map="paper"))
    assert abs(tok[0] + 1.0) < 1e-6 and np.allclose(tok[1:], 0.0)     # repulsion: the lowest, background 0


def test_srum_end_to_end_reuse_ablations_and_report(tiny_ckpt, tmp_path):
    """Candidates, self-judgment, reward maps, the weighted regression, before/after; the ablations
    on the same candidates; the oracle judge re-judges them; the report; bad switches."""
    import srum
    args = ["--ckpt", tiny_ckpt, "--prompts", "random", "--n_prompts", "3", "--N", "2", "--train_steps", "2",
            "--batch", "4", "--eval_n", "1", "--eval_k", "1", "--sample_steps", "2", "--max_think", "6"]
    out = tmp_path / "full"
    srum.main(args + ["--out", str(out), "--cfg_drop", "0.5"])
    s = json.load(open(out / "summary.json"))
    assert 0 <= s["before"] <= 1 and 0 <= s["after"] <= 1 and sum(s["hist"]) == 6
    assert (out / "reward_maps.png").exists() and (out / "after" / "grid_think.png").exists()
    m0, _, _ = M.load_weights(tiny_ckpt)
    m1, _, meta = M.load_weights(str(out / "ckpt"))
    assert meta["method"] == "srum"
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(m0.state_dict().values(), m1.state_dict().values()))
    srum.main(args + ["--out", str(tmp_path / "sft"), "--reuse", str(out), "--baseline", "sft"])
    s2 = json.load(open(tmp_path / "sft" / "summary.json"))
    assert s2["before"] == s["before"] and s2["hist"] == s["hist"] and s2["token_reward_mean"] == 1.0
    srum.main(args + ["--out", str(tmp_path / "oracle"), "--reuse", str(out), "--judge", "oracle"])
    s3 = json.load(open(tmp_path / "oracle" / "summary.json"))
    assert s3["judge"]["g_vs_ideal"] in (None, 1.0) or abs(s3["judge"]["g_vs_ideal"] - 1) < 1e-6
    assert 0 <= s["forced_before"] <= 1 and set(s["per_tag_forced"]) == set(s["per_tag"])   # the paper's second row
    # --context prompt: the velocity is trained on <bos> prompt <vs> (or the CFG-dropped context), never a plan
    packed, pack = [], M.pack
    def spy(samples, *a, **k):
        packed.extend(samples)
        return pack(samples, *a, **k)
    M.pack = spy
    try:
        srum.main(args + ["--out", str(tmp_path / "ctx"), "--reuse", str(out), "--context", "prompt", "--eval_modes", "think"])
    finally:
        M.pack = pack
    texts = [seg[1] for smp in packed if smp[-1][0] == "noise" for seg in smp if seg[0] == "text"]
    assert texts and all(M.THINK not in t and t[0] == M.BOS and t[-1] == M.VS for t in texts)
    rows = srum.main(["--report", str(tmp_path)])
    assert set(rows) == {"base", "SRUM (judge self, context plan, map code, lambda_c 0.5)", "SFT (random, context plan)",
                         "SRUM (judge oracle, context plan, map code, lambda_c 0.5)",
                         "SRUM (judge self, context prompt, map code, lambda_c 0.5)"}
    assert "forced switch: overall per seed" in open(tmp_path / "report.md").read()
    with pytest.raises(ValueError, match="--reward_map 'eq1': use one of"):
        srum.main(args + ["--out", str(tmp_path / "bad"), "--reward_map", "eq1"])
    with pytest.raises(ValueError, match="--N 2.*--N 3"):
        srum.main(args[:6] + ["--N", "3"] + args[8:] + ["--out", str(tmp_path / "x"), "--reuse", str(out)])


def test_auroc_matches_pairwise_count_and_self_judgment_runs(tiny_ckpt, tmp_path):
    """AUROC by ranks equals the pairwise definition (ties count 1/2); evaluate.py --auroc reports
    the self VQAScore's and the self-judge's separation of correct from wrong own generations."""
    import evaluate
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 40).astype(float), rng.random(40) < 0.4     # many ties
    pairs = [(a > b) + 0.5 * (a == b) for a, ya in zip(s, y) for b, yb in zip(s, y) if ya and not yb]
    assert evaluate.auroc(s, y) == pytest.approx(np.mean(pairs))
    assert evaluate.auroc(s, np.ones(40, bool)) is None and evaluate.auroc([1, 2], [False, True]) == 1.0
    out = evaluate.main(["--ckpt", tiny_ckpt, "--modes", "", "--und", "0", "--auroc", "1", "--sample_steps", "2",
                         "--max_think", "4", "--out", str(tmp_path)])["self_judgment"]
    assert out["n"] == 12 and 0 <= out["correct_rate"] <= 1
    for k in ("auroc_vqa", "auroc_judge"):
        assert out[k] is None or 0 <= out[k] <= 1
    assert "self_judgment" in json.load(open(tmp_path / "summary.json"))
    # --auroc_drawer: another checkpoint draws, this one judges (the drawer's images and labels, this judge's P(yes))
    other = str(tmp_path / "other")
    torch.manual_seed(7)
    M.save_weights(other, M.MoT(M.config_for(2, len(__import__("world").VOCAB))), M.PaletteAE(w=16), dict(step=0))
    args = ["--modes", "", "--und", "0", "--auroc", "1", "--sample_steps", "2", "--max_think", "4"]
    own = evaluate.main(["--ckpt", other, "--out", str(tmp_path / "o")] + args)["self_judgment"]
    cross = evaluate.main(["--ckpt", tiny_ckpt, "--auroc_drawer", other, "--out", str(tmp_path / "c")] + args)["self_judgment"]
    assert cross["correct_rate"] == own["correct_rate"] and cross["mean_p_yes"] != own["mean_p_yes"]
    with pytest.raises(ValueError, match="--auroc_drawer .* pass --auroc"):
        evaluate.main(["--ckpt", tiny_ckpt, "--auroc_drawer", other, "--modes", "", "--und", "0", "--out", str(tmp_path / "d")])
    with pytest.raises(FileNotFoundError, match="--auroc_drawer"):
        evaluate.main(["--ckpt", tiny_ckpt, "--auroc_drawer", str(tmp_path / "nope")] + args + ["--out", str(tmp_path / "e")])


def readme_commands():
    """Every python / torchrun command in README.md's code blocks, as (script, argv, the line)."""
    import shlex
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    out = []
    for block in text.split("```")[1::2]:
        for line in block.splitlines():
            if not line.startswith(("python ", "torchrun ")):
                continue
            words = shlex.split(line.split("#")[0])
            if words[:1] == ["torchrun"]:
                words = ["python"] + [w for w in words[1:] if not w.startswith("--nproc")]
            if words[:1] == ["python"] and words[1:2] != ["-m"] and len(words) > 1:
                out.append((words[1], words[2:], line))
    return out


def test_every_readme_command_parses():
    """The README's commands run as written: each names a script here and flags it accepts (parse_args:
    typed, range-checked, no abbreviations), so a renamed or removed flag fails here, not for a reader."""
    import importlib
    from common import parse_args
    cmds = readme_commands()
    assert len(cmds) >= 20 and {s for s, _, _ in cmds} >= {"rwr.py", "srum.py", "unified_grpo.py", "irg.py",
                                                             "evaluate.py", "pretrain.py"}
    for script, argv, line in cmds:
        assert os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), script)), line
        if script == "bench.py":
            continue
        mod = importlib.import_module(script[:-3])
        a = parse_args(mod.defaults, argv, mod.__doc__, getattr(mod, "choices", None), getattr(mod, "ranges", None))
        if script == "pretrain.py":
            mod.parse_mix(a["mix"])


def test_every_readme_code_name_exists():
    """The paper-to-code tables name functions (`module.name`), not line numbers: each one must exist."""
    import importlib
    import re
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    mods = ("world", "model", "pretrain", "rwr", "srum", "unified_grpo", "irg", "evaluate", "pictures", "rewards", "runs",
            "common", "kernels.loss", "kernels.attention")
    names = set(re.findall(r"`((?:%s)\.\w+)" % "|".join(re.escape(m) for m in mods), text)) - {m + ".py" for m in mods}
    assert len(names) >= 25, names
    for n in sorted(names):
        mod, attr = n.rsplit(".", 1)
        assert hasattr(importlib.import_module(mod), attr), n
