"""Unified-GRPO tests (CPU, ~2 min): `python -m pytest -q test_grpo.py`.

The GRPO objective against an independent per-token computation (advantages, clipping on both
sides, k3 KL, the 1/T_i average), the first inner step's ratio, equal-reward groups, the three
reconstruction rewards (the CLIP one on a tiny random CLIP built and saved here), and an end-to-end
tiny run: run folder, frozen parts, --resume equal to uninterrupted, --params all, --report, bad flags.
"""
import json
import math
import os

import numpy as np
import pytest
import torch

import model as M
import rewards as R
import world
import unified_grpo as U


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    m = M.MoT(M.config_for(2, len(world.VOCAB)))
    torch.nn.init.normal_(m.llm2vae.weight, std=0.5)    # the zero-init head would draw one image for every caption
    M.save_weights(str(d / "ck"), m, M.PaletteAE(w=16), dict(step=0))
    return str(d / "ck")


# ----------------------------------------------------------------------------- the objective

def reference_loss(lp, lo, lr, lens, A, eps, beta):
    """Eq. 1-2 token by token in plain Python floats."""
    J = 0.0
    for i, T in enumerate(lens):
        s = 0.0
        for t in range(T):
            r = math.exp(lp[i][t] - lo[i][t])
            surr = min(r * A[i], min(max(r, 1 - eps), 1 + eps) * A[i])
            kl = math.exp(lr[i][t] - lp[i][t]) - (lr[i][t] - lp[i][t]) - 1
            s += surr - beta * kl
        J += s / T
    return -J / len(lens)


def test_loss_equals_independent_per_token_computation():
    """One hand-built group of G = 4, lengths 3, 1, 2, 4 (padding beyond), ratios on both sides of
    the clip range with positive and negative advantages, a KL term with a large beta."""
    lens = [3, 1, 2, 4]
    L = 5
    log_r = [[0.5, -0.5, 0.0], [0.1], [-0.4, 0.3], [0.25, -0.25, 0.05, -0.05]]   # log ratio per token
    lo = [[-1.0, -2.0, -0.5], [-3.0], [-1.5, -0.7], [-0.2, -1.1, -2.2, -0.9]]
    lr = [[-1.2, -1.0, -0.5], [-2.0], [-1.0, -1.0], [-0.3, -1.0, -2.0, -1.0]]
    lp = [[o + d for o, d in zip(oo, dd)] for oo, dd in zip(lo, log_r)]
    rewards = np.array([[0.9, 0.1, 0.5, 0.3]])
    A = U.group_advantages(rewards)[0]
    m = rewards[0].mean(); s = rewards[0].std()
    assert torch.allclose(A, torch.tensor((rewards[0] - m) / s, dtype=torch.float32), atol=1e-6)
    assert A[0] > 0 and A[1] < 0          # row 0: r = e^0.5 > 1 + eps clipped (A > 0); row 1: A < 0

    def pad(x):
        t = torch.zeros(4, L, dtype=torch.float64)
        for i, row in enumerate(x):
            t[i, :len(row)] = torch.tensor(row, dtype=torch.float64)
        return t
    mask = pad([[1.0] * n for n in lens])
    for eps, beta in [(0.2, 0.0), (0.2, 0.5), (0.05, 1e-6)]:
        logp = pad(lp).requires_grad_(True)
        loss, st = U.grpo_loss(logp, pad(lo), pad(lr), mask, A.double(), eps, beta)
        want = reference_loss(lp, lo, lr, lens, A.tolist(), eps, beta)
        assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
        # clip fraction: tokens whose ratio left [1 - eps, 1 + eps]
        flat = [x for row in log_r for x in row]
        assert st["clip_frac"] == pytest.approx(np.mean([not (1 - eps <= math.exp(x) <= 1 + eps) for x in flat]))
        loss.backward()
        g = logp.grad
        if beta == 0.0:
            # the clipped term is the min -- no policy gradient -- exactly where r > 1 + eps with A > 0
            # or r < 1 - eps with A < 0 (both sides occur in this group); elsewhere r A carries it
            for i, row in enumerate(log_r):
                for t, x in enumerate(row):
                    r = math.exp(x)
                    clipped = (A[i] > 0 and r > 1 + eps) or (A[i] < 0 and r < 1 - eps)
                    assert (g[i, t] == 0) == clipped, (i, t)
            assert any((A[i] > 0 and math.exp(x) > 1 + eps) for i, row in enumerate(log_r) for x in row)
            assert any((A[i] < 0 and math.exp(x) < 1 - eps) for i, row in enumerate(log_r) for x in row)
        assert torch.isfinite(g).all()


def test_first_inner_step_ratio_is_one_and_clipping_is_inactive():
    """The loop's first inner step: logp_old = logp.detach() from the same forward, so r_t = 1
    exactly and min(r A, clip(r) A) = r A: the clipped and the unclipped objectives (and their
    gradients) agree."""
    torch.manual_seed(0)
    m = M.MoT(M.config_for(2, len(world.VOCAB))).train()
    z = torch.randn(4, 16, 32)
    caps = [world.encode("a small red square at the top left") + [M.EOS], world.encode("a large blue circle at the center"),
            [M.EOS], world.encode("the number 7 in green at the right , a small red bar at the top") + [M.EOS]]
    b = U.caption_batch(z, caps)
    mask = (b["labels"] != -100).float()
    assert mask.sum(1).tolist() == [len(c) for c in caps]
    A = U.group_advantages(np.array([[0.2, 0.9, 0.4, 0.1]]))[0]
    with torch.no_grad():
        ref = M.text_logprobs(m, b) - 0.1 * mask
    grads = []
    for eps in (0.2, 1e9):                                 # 1e9: no clipping at all
        m.zero_grad()
        logp = M.text_logprobs(m, b)
        old = logp.detach()
        r_t = torch.exp(logp - old)
        assert torch.equal(r_t, torch.ones_like(r_t))
        loss, st = U.grpo_loss(logp, old, ref, mask, A, eps, 1e-2)
        assert st["ratio_min"] == st["ratio_max"] == 1.0 and st["clip_frac"] == 0.0
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    assert grads[0][0] == grads[1][0]
    assert all(torch.equal(g0, g1) for g0, g1 in zip(grads[0][1], grads[1][1]))


def test_detail_share_and_short_form_read_the_detailed_chunks():
    """evaluate.detail_share: the share of chunks with a centre; short_form drops the centres, so a detailed
    caption of a scene has the scene's short caption as its short form (the bench's caption_exact)."""
    import evaluate as E
    scene = [dict(shape="square", color="red", size="small", box=(4, 4, 12, 12)),
             dict(shape="circle", color="blue", size="large", box=(40, 40, 60, 60))]
    short, det = world.caption(scene), world.caption(scene, detail=True)
    assert E.detail_share(short) == 0.0 and E.detail_share(det) == 1.0 and E.detail_share("no caption here") == 0.0
    assert E.detail_share(short.rstrip(" .").split(" , ")[0] + " , " + det.rstrip(" .").split(" , ")[1] + " .") == 0.5
    assert det != short and E.short_form(det) == short and E.short_form(short) == short


def test_shuffled_rewards_keep_each_group_and_lose_the_pairing():
    """The control (--shuffle_rewards): every group keeps its own rewards (so its mean, spread and the
    share of groups with spread are the run's), in another order for some group."""
    r = np.arange(32, dtype=np.float32).reshape(8, 4)
    s = U.shuffle_within_groups(r, np.random.default_rng(0))
    assert np.array_equal(np.sort(s, 1), r) and not np.array_equal(s, r)
    assert np.array_equal(U.shuffle_within_groups(r, np.random.default_rng(0)), s)     # deterministic: resume


def test_equal_rewards_give_zero_advantage_and_no_nan():
    A = U.group_advantages(np.array([[0.7, 0.7, 0.7, 0.7], [0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]]))
    assert torch.isfinite(A).all()
    assert torch.equal(A[0], torch.zeros(4)) and torch.equal(A[1], torch.zeros(4))
    assert A[2].sum().abs() < 1e-6 and A[2].std(unbiased=False) == pytest.approx(1.0, abs=1e-5)
    logp = torch.randn(4, 6, requires_grad=True)
    loss, _ = U.grpo_loss(logp, logp.detach() + 0.3, logp.detach(), torch.ones(4, 6), A[0], 0.2, 0.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(4, 6))


# ----------------------------------------------------------------------------- rewards

def scene_images(seed, n):
    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng) for _ in range(n)]
    return scenes, np.stack([world.draw(s) for s in scenes])


def test_scene_f1_exact_match_rules():
    scenes, x = scene_images(0, 6)
    assert np.allclose(R.scene_f1(x, x), 1.0)
    blank = np.zeros_like(x[:1])
    assert R.scene_f1(blank, blank)[0] == 1.0 and R.scene_f1(x[:1], blank)[0] == 0.0
    s = max(scenes, key=len)
    if len(s) > 1:                                         # one object dropped: F1 = 2 (n-1) / (2n - 1)
        n = len(world.detect(world.draw(s)))
        r = R.scene_f1(world.draw(s)[None], world.draw(s[1:])[None])[0]
        assert r == pytest.approx(2 * (n - 1) / (2 * n - 1))
    with pytest.raises(AssertionError):
        R.scene_f1(x, x[:2])


def test_und_cosine_is_frozen_and_scores_identity_one(tiny_ckpt):
    m, ae, _ = M.load_weights(tiny_ckpt)
    f = R.UndCosine(m, ae, n_ref=16)
    _, x = scene_images(1, 4)
    _, y = scene_images(2, 4)
    r = f(x, y)
    assert r.shape == (4,) and np.all(np.abs(r) <= 1 + 1e-5) and np.allclose(f(x, x), 1.0, atol=1e-5)
    with torch.no_grad():
        for p in m.parameters():                           # training the policy never moves the reward
            p.add_(1.0)
    assert np.array_equal(f(x, y), r)


@pytest.mark.parametrize("kind", ["vision", "full"])
def test_clip_reward_loads_a_tiny_random_local_clip(tmp_path, kind):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection
    vc = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=16)
    torch.manual_seed(0)
    if kind == "vision":
        CLIPVisionModelWithProjection(CLIPVisionConfig(**vc)).save_pretrained(tmp_path)
    else:
        cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                          vocab_size=99, projection_dim=16), vision_config=vc, projection_dim=16)
        CLIPModel(cfg).save_pretrained(tmp_path)
        json.dump(dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]), open(tmp_path / "preprocessor_config.json", "w"))
    f = R.CLIPCosine(str(tmp_path))
    assert f.size == 32 and (kind == "vision" or f.mean.flatten().tolist() == [0.5, 0.5, 0.5])
    _, x = scene_images(3, 5)
    _, y = scene_images(4, 5)
    r = f(x, y)
    assert r.shape == (5,) and r.dtype == np.float32 and np.all(np.abs(r) <= 1 + 1e-5) and not np.allclose(r, 1)
    assert np.allclose(f(x, x), 1.0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        R.CLIPCosine(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- end to end

# the offline tower's reward: on a random tiny model the exact scene F1 is 0 for every image (no update)
ARGS = ["--reward", "und", "--images", "2", "--G", "3", "--eval_n", "1", "--eval_k", "1", "--bench_n", "3", "--sample_steps", "2",
        "--max_caption", "8", "--ckpt_every", "1", "--lr", "1e-3", "--steps", "3"]


def train_records(d):
    return [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl")) if '"phase": "train"' in l]


def test_end_to_end_frozen_parts_resume_params_all_and_report(tiny_ckpt, tmp_path):
    root = tmp_path / "runs"
    a = root / "a"
    out = U.main(["--ckpt", tiny_ckpt, "--out", str(a)] + ARGS)
    for f in ("config.json", "metrics.jsonl", "summary.json", "summary.md", "curves.png", "rollouts_step1.png",
              "rollouts_step3.png", "ckpt.safetensors", "before/grid_unified.png", "after/grid_unified.png",
              "after_base_decoder/grid_unified.png", "after/grid_think.png"):
        assert (a / f).exists(), f
    recs = train_records(a)
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert r["first_ratio"] == [1.0, 1.0]               # the first inner step: r_t = 1 exactly
        for k in ("reward", "reward_std", "caption_len", "detail_share", "kl", "clip_frac", "scene_f1", "caption_f1"):
            assert np.isfinite(r[k]), k
    assert any(r["last_ratio"] != [1.0, 1.0] for r in recs)   # the second inner step moved the policy
    s = json.load(open(a / "summary.json"))
    for k in ("und", "scene_f1", "caption_f1", "caption_exact", "caption_len"):
        assert k in s["bench_before"] and k in s["bench_after"] and k in s["bench_after_base_decoder"]
    # frozen: the gen path and the AE of the trained checkpoint are the base's; the frozen copy
    # (decoder, pi_ref, reward tower) did not move; the understanding path did
    m0, ae0, _ = M.load_weights(tiny_ckpt)
    m1, ae1, meta = M.load_weights(str(a / "ckpt"))
    assert meta["method"] == "unified_grpo"
    sd0, sd1 = m0.state_dict(), m1.state_dict()
    gen_keys = [k for k in sd0 if k.startswith(("gen.", "norm_gen.", "vae2llm.", "time_embedder.", "llm2vae."))]
    assert gen_keys and all(torch.equal(sd0[k], sd1[k]) for k in gen_keys)
    assert any(not torch.equal(sd0[k], sd1[k]) for k in sd0 if k.startswith("und."))
    assert all(torch.equal(v, ae1.state_dict()[k]) for k, v in ae0.state_dict().items())
    assert all(torch.equal(v, out["base"].state_dict()[k]) for k, v in sd0.items())

    # a killed run, resumed, ends with the same weights and the same log as the uninterrupted one
    b = root / "b"
    U.main(["--ckpt", tiny_ckpt, "--out", str(b), "--stop_after", "2"] + ARGS)
    assert [r["step"] for r in train_records(b)] == [1, 2] and not (b / "summary.json").exists()
    with pytest.raises(ValueError, match="--lr"):          # a resume with another setting is refused
        U.main(["--ckpt", tiny_ckpt, "--out", str(b), "--resume"] + ARGS[:-4] + ["--lr", "1e-4", "--steps", "3"])
    U.main(["--ckpt", tiny_ckpt, "--out", str(b), "--resume"] + ARGS)
    sa = torch.load(a / "state.rank0.pt", weights_only=False)
    sb = torch.load(b / "state.rank0.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 3
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    ra, rb = train_records(a), train_records(b)
    assert [(r["reward"], r["loss"]) for r in ra] == [(r["reward"], r["loss"]) for r in rb]

    # both experts in the optimiser, the live policy as decoder: the gen expert still gets no gradient
    c = root / "c"
    U.main(["--ckpt", tiny_ckpt, "--out", str(c), "--params", "all", "--seed", "1"] + ARGS)
    m2, _, _ = M.load_weights(str(c / "ckpt"))
    assert all(torch.equal(sd0[k], m2.state_dict()[k]) for k in gen_keys)
    rows = U.main(["--report", str(root)])
    assert set(rows) == {"Unified-GRPO (reward und, params und)", "Unified-GRPO (reward und, params all)"}
    assert "scene_f1" in open(root / "report.md").read()


def test_bad_flags_fail_before_model_work(tiny_ckpt, tmp_path, monkeypatch):
    def no_model(*_, **__):
        raise AssertionError("model work started before the flags were checked")
    monkeypatch.setattr(M, "load_weights", no_model)
    with pytest.raises(ValueError, match="--params 'both': use one of"):
        U.main(["--ckpt", tiny_ckpt, "--out", str(tmp_path / "x"), "--params", "both"])
    with pytest.raises(ValueError, match="--G 1: must be >= 2"):
        U.main(["--ckpt", tiny_ckpt, "--out", str(tmp_path / "x"), "--G", "1"])
    with pytest.raises(FileNotFoundError, match="--reward clip needs --clip_path"):
        U.main(["--ckpt", tiny_ckpt, "--out", str(tmp_path / "x"), "--reward", "clip"])
    with pytest.raises(ValueError, match="unrecognized arguments: --beta_kl"):
        U.main(["--ckpt", tiny_ckpt, "--out", str(tmp_path / "x"), "--beta_kl", "0.1"])


def test_evaluate_unified_flag(tiny_ckpt, tmp_path):
    import evaluate
    s = evaluate.main(["--ckpt", tiny_ckpt, "--modes", "", "--und", "0", "--unified", "2", "--encoder", tiny_ckpt,
                       "--unified_steps", "2", "--out", str(tmp_path)])
    assert set(s["unified"]) >= {"und", "scene_f1", "caption_f1", "caption_exact", "caption_len"}
    assert (tmp_path / "grid_unified.png").exists()


def test_torchrun_two_processes(tiny_ckpt, tmp_path):
    """DDP on gloo: 2 processes split the images of a step (each keeps whole groups) and finish the run."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=here, OMP_NUM_THREADS="1", NANOUMM_DIST_TIMEOUT_S="120")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        os.path.join(here, "unified_grpo.py"), "--ckpt", tiny_ckpt, "--out", str(tmp_path / "ddp")]
                       + ARGS[:-2] + ["--steps", "2"], env=env, cwd=here, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in train_records(tmp_path / "ddp")] == [1, 2]
    assert (tmp_path / "ddp" / "summary.json").exists()
