"""Runs that neither lose work nor lie: one test per rule.

  1 non-finite numbers stop a run at once and never reach a checkpoint
  2 nothing on disk is overwritten unasked (run folders, the mined prompt file)
  3 --reuse refuses rollouts made with other settings
  4 every flag is range-checked, typed and spelled out before any model work
  5 checkpoint loading names the file and the fix for every failure
  6 bad inputs fail before the expensive phases
  7 a killed run resumed with --resume ends where an uninterrupted one ends
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import model as M
import world

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def ckpt(tiny_ckpt):            # conftest.py's tiny random checkpoint
    return tiny_ckpt


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    f = tmp_path_factory.mktemp("p") / "p.jsonl"
    specs = world.candidates(1, np.random.default_rng(0))[:3]
    f.write_text("".join(json.dumps(s) + "\n" for s in specs))
    return str(f)


def rwr_args(ckpt, prompts, out, *more):
    return ["--ckpt", ckpt, "--prompts", prompts, "--out", str(out), "--n_prompts", "3", "--N", "2", "--train_steps", "4",
            "--batch", "4", "--eval_n", "1", "--eval_k", "1", "--sample_steps", "2", "--max_think", "6",
            "--ckpt_every", "2"] + list(more)


def weights(path):
    return M.load_weights(path)[0].state_dict()


# ----------------------------------------------------------------------------- 1. finiteness

def test_nan_reward_stops_before_training_and_writes_no_checkpoint(ckpt, prompts, tmp_path, monkeypatch):
    import rwr
    import rewards as R
    monkeypatch.setattr(R, "oracle_soft", lambda specs, images: np.full(len(specs), np.nan, np.float32))
    with pytest.raises(FloatingPointError, match=r"rewards: r is not finite \(6 of 6"):
        rwr.main(rwr_args(ckpt, prompts, tmp_path / "run"))
    assert not (tmp_path / "run" / "ckpt.safetensors").exists()
    assert not list((tmp_path / "run").glob("state.*"))


def test_nan_loss_names_the_step_and_writes_no_checkpoint(ckpt, prompts, tmp_path, monkeypatch):
    import srum
    real = srum.velocity_loss
    calls = []

    def nan_at_3(*args, **kw):
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(srum, "velocity_loss", nan_at_3)
    args = ["--ckpt", ckpt, "--prompts", prompts, "--out", str(tmp_path / "s"), "--n_prompts", "3", "--N", "2",
            "--train_steps", "4", "--batch", "4", "--eval_n", "1", "--eval_k", "1", "--sample_steps", "2",
            "--max_think", "6", "--ckpt_every", "2", "--judge", "oracle"]
    with pytest.raises(FloatingPointError, match=r"step 3: loss is not finite"):
        srum.main(args)
    st = torch.load(tmp_path / "s" / "state.rank0.pt", weights_only=False)
    assert st["step"] == 2 and all(torch.isfinite(v).all() for v in st["model"].values())
    assert not (tmp_path / "s" / "ckpt.safetensors").exists()


def test_beta_that_overflows_exp_is_refused_and_save_refuses_nan(tmp_path):
    import rwr
    with pytest.raises(ValueError, match=r"--beta 89.0: must be 0..80"):
        rwr.main(["--beta", "89"])
    m = M.MoT(M.config_for(2, 60))
    with torch.no_grad():
        m.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="umm.lm_head.weight"):
        M.save_weights(str(tmp_path / "bad"), m, M.PaletteAE(w=16), {})
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(FloatingPointError, match=r"step 7: grad_norm is not finite \(1 of 1"):
        common.finite("step 7", loss=torch.tensor(1.0), grad_norm=torch.tensor(float("inf")))


# ----------------------------------------------------------------------------- 2. nothing overwritten unasked

def test_method_run_folder_is_not_overwritten_unasked(ckpt, prompts, tmp_path):
    import rwr
    out = tmp_path / "run"
    rwr.main(rwr_args(ckpt, prompts, out, "--train_steps", "2"))
    ro = (out / "rollouts.rank0.pt").read_bytes()
    n_lines = len((out / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(FileExistsError, match=r"already holds a run.*--resume.*--overwrite"):
        rwr.main(rwr_args(ckpt, prompts, out, "--train_steps", "2", "--beta", "1"))
    assert (out / "rollouts.rank0.pt").read_bytes() == ro
    assert len((out / "metrics.jsonl").read_text().splitlines()) == n_lines
    # --overwrite starts again: a fresh log, not one appended to the old
    rwr.main(rwr_args(ckpt, prompts, out, "--train_steps", "2", "--overwrite"))
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("phase") == "before" for r in recs) == 1


def test_pretrain_refuses_a_folder_holding_a_run(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"step 300")
    r = subprocess.run([sys.executable, os.path.join(HERE, "pretrain.py"), "--out", str(tmp_path), "--steps", "20"],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
    assert r.returncode != 0 and "already holds a run (state.pt)" in r.stderr
    assert (tmp_path / "state.pt").read_bytes() == b"step 300"


def test_mining_refuses_to_replace_or_empty_the_prompt_file(ckpt, prompts, tmp_path):
    import rwr
    f = tmp_path / "mined.jsonl"
    f.write_text(open(prompts).read())
    quick = ["--ckpt", ckpt, "--prompts", str(f), "--candidates", "1", "--K", "2", "--sample_steps", "2", "--max_think", "4"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        rwr.main(["--mine"] + quick)
    with pytest.raises(RuntimeError, match=r"mined 0 of 12.*left as it was"):   # keep nothing: [1, 1] is empty here
        rwr.main(["--mine", "--overwrite", "--keep_lo", "1", "--keep_hi", "1"] + quick)
    assert f.read_text() == open(prompts).read()


# ----------------------------------------------------------------------------- 3. --reuse mixes nothing

@pytest.mark.parametrize("flag,value", [("--eval_n", "2"), ("--cfg", "4.0"), ("--temperature", "0.7"),
                                        ("--sample_steps", "3"), ("--max_think", "5")])
def test_reuse_refuses_other_settings(ckpt, prompts, tmp_path_factory, flag, value):
    import rwr
    base = tmp_path_factory.getbasetemp() / "reuse_src"
    if not (base / "summary.json").exists():
        rwr.main(rwr_args(ckpt, prompts, base, "--train_steps", "1", "--overwrite"))
    out = tmp_path_factory.mktemp("reuse")
    with pytest.raises(ValueError, match=rf"it was made with {flag} .*this run has {flag} "):
        rwr.main(rwr_args(ckpt, prompts, out / "x", "--reuse", str(base), flag, value))
    assert not (out / "x" / "before").exists()


# ----------------------------------------------------------------------------- 4. flags checked first

@pytest.mark.parametrize("script,flags,msg", [
    ("rwr", ["--train_steps", "-5"], "--train_steps -5: must be >= 1"),
    ("rwr", ["--sample_steps", "0"], "--sample_steps 0: must be >= 1"),
    ("rwr", ["--beta", "-1"], "--beta -1.0: must be 0..80"),
    ("rwr", ["--reject_at", "2"], "--reject_at 2.0: must be 0..1"),
    ("rwr", ["--n_prompts", "-1"], "--n_prompts -1: must be >= 0"),
    ("rwr", ["--N", "0"], "--N 0: must be >= 1"),
    ("rwr", ["--batch", "0"], "--batch 0: must be >= 1"),
    ("rwr", ["--dtype", "fp16"], "--dtype 'fp16': use one of"),
    ("rwr", ["--weight_on", "both"], "--weight_on 'both': use one of"),
    ("srum", ["--lambda_c", "-1"], "--lambda_c -1.0: must be >= 0"),
    ("srum", ["--lambda", "1"], "unrecognized arguments: --lambda 1"),          # no prefix abbreviations
    ("srum", ["--binary", "maybe"], "expected 1/0/true/false/yes/no, got 'maybe'"),
    ("pretrain", ["--steps", "0"], "--steps 0: must be >= 1"),
    ("pretrain", ["--dtype", "fp16"], "--dtype 'fp16': use one of"),
    ("pretrain", ["--mix", "vqa=0.3,foo=1"], "unknown task 'foo'"),
    ("evaluate", ["--sample_steps", "0"], "--sample_steps 0: must be >= 1"),
])
def test_bad_flags_fail_before_any_model_work(script, flags, msg, tmp_path):
    mod = __import__(script)
    t0 = time.time()
    # the checkpoint does not exist: a check that ran after loading would raise FileNotFoundError instead
    with pytest.raises(ValueError) as e:
        mod.main(flags + ["--out", str(tmp_path / "o")] + (["--ckpt", str(tmp_path / "none")] if script != "pretrain" else []))
    assert msg in str(e.value) and time.time() - t0 < 5
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 5. checkpoints

def test_checkpoint_failures_name_the_file_and_the_fix(ckpt, tmp_path):
    import shutil
    def copy(name):
        for ext in (".safetensors", ".json"):
            shutil.copy(ckpt + ext, tmp_path / (name + ext))
        return str(tmp_path / name)
    p = copy("corrupt")                                     # flipped bytes inside a tensor
    raw = bytearray(open(p + ".safetensors", "rb").read())
    raw[-100:-90] = b"\xff" * 10
    open(p + ".safetensors", "wb").write(raw)
    with pytest.raises(ValueError, match=r"corrupt\.safetensors: corrupted \(its sha256.*restore"):
        M.load_weights(p)
    p = copy("trunc")                                       # truncated file (sha check off: an old checkpoint)
    open(p + ".safetensors", "wb").write(open(p + ".safetensors", "rb").read()[:1000])
    meta = json.load(open(p + ".json")); meta.pop("sha256"); json.dump(meta, open(p + ".json", "w"))
    with pytest.raises(ValueError, match=r"trunc\.safetensors: unreadable.*truncated"):
        M.load_weights(p)
    p = copy("badjson")
    open(p + ".json", "w").write('{"config": ')
    with pytest.raises(ValueError, match=r"badjson\.json: broken JSON"):
        M.load_weights(p)
    p = copy("mismatch")                                    # a config that does not fit the weights
    meta = json.load(open(p + ".json")); meta["config"]["n_layer"] = 3; meta.pop("sha256")
    json.dump(meta, open(p + ".json", "w"))
    with pytest.raises(ValueError) as e:
        M.load_weights(p)
    assert "do not fit the config" in str(e.value) and "missing (e.g. und.2." in str(e.value) and len(str(e.value)) < 400
    from safetensors.torch import load_file, save_file       # nan weights (a diverged run) without a checksum
    p = copy("nan")
    sd = load_file(p + ".safetensors"); sd["umm.lm_head.weight"][0, 0] = float("nan"); save_file(sd, p + ".safetensors")
    meta = json.load(open(p + ".json")); meta.pop("sha256"); json.dump(meta, open(p + ".json", "w"))
    with pytest.raises(ValueError, match=r"nan\.safetensors: 1 tensors hold nan/inf \(first: umm\.lm_head\.weight"):
        M.load_weights(p)
    os.makedirs(tmp_path / "runx"); copy("runx/ckpt")      # a run folder instead of its checkpoint
    with pytest.raises(FileNotFoundError, match=r"runx is a folder .*pass --ckpt .*runx/ckpt"):
        M.load_weights(str(tmp_path / "runx"))
    M.load_weights("data/base")                             # the shipped one carries its checksum and loads


# ----------------------------------------------------------------------------- 6. early failures

def test_bad_inputs_fail_before_the_before_eval(ckpt, tmp_path):
    import rwr
    import srum
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for mod in (rwr, srum):
        with pytest.raises(ValueError, match=r"empty\.jsonl: the prompt file holds no prompts"):
            mod.main(["--ckpt", ckpt, "--prompts", str(empty), "--out", str(tmp_path / mod.__name__)])
        assert not (tmp_path / mod.__name__).exists()
    with pytest.raises(FileNotFoundError, match="--reward vqa_qwen needs --qwen DIR"):
        rwr.main(["--ckpt", ckpt, "--reward", "vqa_qwen", "--out", str(tmp_path / "q")])
    assert not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- 7. kill and resume

def test_killed_method_run_resumes_to_the_same_weights(ckpt, prompts, tmp_path, monkeypatch):
    import rwr
    import runs
    full, cut = tmp_path / "full", tmp_path / "cut"
    rwr.main(rwr_args(ckpt, prompts, full))
    real = common.finite                    # common.update checks every step with it

    def killed_at_step_3(where, **kw):      # dies after step 3's backward: step 3 is lost, step 2 is saved
        if where == "step 3":
            raise KeyboardInterrupt
        return real(where, **kw)
    monkeypatch.setattr(common, "finite", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        rwr.main(rwr_args(ckpt, prompts, cut))
    assert not (cut / "summary.json").exists()
    runs.report(str(tmp_path), rwr.label)                                    # lists it, does not skip it silently
    assert "unfinished runs (no summary.json; `--resume` finishes them): cut" in (tmp_path / "report.md").read_text()
    monkeypatch.setattr(common, "finite", real)
    with pytest.raises(ValueError, match="was started with --beta 5.0"):   # a resume continues the same run
        rwr.main(rwr_args(ckpt, prompts, cut, "--resume", "--beta", "1"))
    real_finish = runs.finish
    monkeypatch.setattr(runs, "finish", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):                                   # killed again, in the after-eval
        rwr.main(rwr_args(ckpt, prompts, cut, "--resume"))
    monkeypatch.setattr(runs, "finish", real_finish)
    rwr.main(rwr_args(ckpt, prompts, cut, "--resume"))
    a, b = weights(str(full / "ckpt")), weights(str(cut / "ckpt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (json.load(open(d / "summary.json")) for d in (full, cut))
    assert sa["before"] == sb["before"] and sa["after"] == sb["after"]
    recs = [json.loads(l) for l in (cut / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r.get("phase") == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 4                   # no step logged twice
    assert [r.get("phase") for r in recs].count("rollouts") == 1


def test_pretrain_checkpoints_on_sigterm_and_resume_keeps_its_schedule(tmp_path):
    env = dict(os.environ, PYTHONPATH=HERE, OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run([sys.executable, os.path.join(HERE, "pretrain.py"), *a], env=env, cwd=HERE,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run("--stage", "ae", "--out", str(tmp_path / "ae"), "--ae_steps", "2", "--ae_batch", "4", "--workers", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "umm"
    args = ["--stage", "umm", "--ae", str(tmp_path / "ae" / "ckpt"), "--out", str(out), "--depth", "2", "--batch", "4",
            "--workers", "0", "--dtype", "fp32", "--log_every", "1", "--warmup", "1", "--steps", "100000",
            "--ckpt_every", "100000"]
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "pretrain.py"), *args], env=env, cwd=HERE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:                       # wait for a few steps, then a scheduler's kill
        if line.startswith("step 3/"):
            p.send_signal(signal.SIGTERM)
            break
    rest = p.stdout.read()
    assert p.wait(timeout=120) == 0 and "SIGTERM" in rest, rest[-2000:]
    st = torch.load(out / "state.pt", weights_only=False)
    assert 3 <= st["step"] < 100000 and json.load(open(out / "ckpt.json"))["step"] == st["step"]
    r = run(*args[:-4], "--steps", "50", "--resume")
    assert r.returncode != 0 and "the run's schedule is --steps 100000" in r.stderr
    r = run(*args, "--resume", "--stop_after", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(l) for l in open(out / "metrics.jsonl") if '"loss"' in l]
    assert [x["step"] for x in recs] == list(range(1, st["step"] + 3))     # each step once
    # `--out RUN --resume` alone continues it: the run's own flags (depth, AE, batch, ...) come back
    r = run("--out", str(out), "--resume", "--stop_after", "1", "--workers", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(out / "ckpt.json"))["step"] == st["step"] + 3
    r = run("--out", str(out), "--resume", "--seed", "5")                  # another data stream: not this run
    assert r.returncode != 0 and "launched with --seed 0" in r.stderr, r.stderr[-2000:]


def test_own_pool_feeds_the_judge_tasks_with_the_verifiers_answers(tiny_ckpt, tmp_path):
    """pretrain.py --own_n: the starting model draws its own think-mode images once
    (OUT/own.npz, kept for --resume), and a vqa / judge / region sample that reads one gets the
    answer the exact verifier gives on that image, not the answer for the render it replaced."""
    import pretrain as P
    env = dict(os.environ, PYTHONPATH=HERE, OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    args = [sys.executable, os.path.join(HERE, "pretrain.py"), "--init_from", tiny_ckpt, "--out", str(out),
            "--own_n", "6", "--own_batch", "3", "--own_frac", "1", "--batch", "4", "--steps", "2", "--workers", "0",
            "--dtype", "fp32", "--warmup", "1", "--mix", "vqa=1,judge=1,region=1,t2i=0,think=0,caption=0,reflect=0,fact=0"]
    r = subprocess.run(args, env=env, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "own pool: 6 think-mode images" in r.stdout
    f = np.load(out / "own.npz")
    specs = json.loads(str(f["specs"]))
    assert f["images"].shape == (6, world.W, world.W, 3) and len(specs) == 6
    banned = world.eval_prompts()
    assert not any(s["prompt"] in banned for s in specs)                 # training prompts only
    # --overwrite with another --own_n draws a new pool (never the old run's)
    r = subprocess.run([*args[:7], "4", *args[8:], "--overwrite"], env=env, cwd=HERE, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "own pool: 4 think-mode images" in r.stdout, r.stderr[-2000:]
    assert np.load(out / "own.npz")["images"].shape[0] == 4
    # a negative in the pool: the vqa answer follows the verifier on the pool's image
    rng = np.random.default_rng(0)
    spec = specs[0]
    neg = world.negative(spec, rng, holdout="any")[0]
    own = dict(specs=[spec], images=np.stack([neg]), frac=1.0)
    segs = P.make_sample("vqa", np.random.default_rng(1), banned, own)
    img = [s[1] for s in segs if s[0] == "img_clean"][0]
    assert np.array_equal(img, neg)
    answer = world.decode(segs[-1][1][:-1])
    assert answer == ("yes" if world.verify(spec, neg)["correct"] else "no") == "no"
    g, _ = world.judge_scores(spec, neg)
    segs = P.make_sample("judge", np.random.default_rng(1), banned, own)
    assert world.parse_score(world.decode(segs[-1][1][:-1])) == float(world.format_score(g))
    # own_frac 0: the stream is the plain one, sample for sample
    for task in ("vqa", "judge", "region"):
        a = P.make_sample(task, np.random.default_rng(5), banned, dict(own, frac=0.0))
        b = P.make_sample(task, np.random.default_rng(5), banned, None)
        assert len(a) == len(b) and all(x[0] == y[0] and np.array_equal(np.asarray(x[1]), np.asarray(y[1]))
                                        for x, y in zip(a, b))


def test_own_reflect_shows_the_models_own_image_with_the_verifiers_reflection(tiny_ckpt, tmp_path):
    """pretrain.py --own_reflect: a reflect sample's image1 is one of the model's own images,
    its think2 the verifier's reflection on that image, its prompt and image2 that image's spec; at 0 the
    stream is the plain one, sample for sample; without a pool the flag is refused before any work."""
    import pretrain as P
    banned = world.eval_prompts()
    rng = np.random.default_rng(3)
    spec = P.train_spec(rng, banned, ("two_object",))
    neg = world.negative(spec, rng, holdout="train")[0]
    own = dict(specs=[spec], images=np.stack([neg]), frac=0.0, reflect=1.0)
    segs = P.make_sample("reflect", np.random.default_rng(4), banned, own)
    kinds = [s[0] for s in segs]
    assert kinds == ["text", "text", "img_context", "text", "text", "img_noise"]
    assert np.array_equal(segs[2][1], neg)                                  # image1: the pool's image
    assert world.decode(segs[0][1][1:-1]) == spec["prompt"]                 # <bos> P <think>: the pool image's prompt
    think2 = world.decode(segs[4][1][:-2])                                  # ... </think> <vs>
    problem = world.verify(spec, neg)["problem"]
    assert problem != "the image is correct" and think2.startswith(problem + " . " + world.REDRAW)
    assert world.verify(spec, segs[5][1])["correct"]                         # image2: a right render of that spec
    plan2 = think2.split(world.REDRAW)[1]
    assert world.caption_score(plan2, world.detect(segs[5][1])) == 1.0                # the redraw plan is image2's
    # own_reflect 0 (and a pool that only feeds the judge): the plain stream, sample for sample
    for seed in range(20):
        a = P.make_sample("reflect", np.random.default_rng([9, seed]), banned, dict(own, reflect=0.0, frac=1.0))
        b = P.make_sample("reflect", np.random.default_rng([9, seed]), banned, None)
        assert len(a) == len(b) and all(x[0] == y[0] and np.array_equal(np.asarray(x[1]), np.asarray(y[1]))
                                        for x, y in zip(a, b))
    r = subprocess.run([sys.executable, os.path.join(HERE, "pretrain.py"), "--init_from", tiny_ckpt, "--out",
                        str(tmp_path / "run"), "--own_reflect", "0.5", "--steps", "1", "--workers", "0"],
                       env=dict(os.environ, PYTHONPATH=HERE), cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--own_reflect 0.5" in r.stderr and "--own_n" in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "run").exists()                                  # refused before the run folder


def test_und_transfer_reaches_understanding_only():
    """pretrain --und_transfer: vqa / judge / region ask about knowledge nouns and counts 5-6; the
    generation tasks never draw them, with or without the flag; without it the stream is unchanged."""
    import pretrain as P
    banned = world.eval_prompts()
    words = set(world.ALIASES) | {"five", "six"}
    seen = {}
    for i in range(300):
        for task in ("t2i", "think", "reflect", "vqa", "judge", "region"):
            for flag in (False, True):
                segs = P.make_sample(task, np.random.default_rng([7, i]), banned, None, flag)
                text = " ".join(world.decode(s[1]) for s in segs if s[0] == "text")
                seen[task, flag] = seen.get((task, flag), False) or bool(words & set(text.split()))
            if task in ("t2i", "think", "reflect"):   # the flag does not touch generation's samples
                a = P.make_sample(task, np.random.default_rng([7, i]), banned, None, False)
                b = P.make_sample(task, np.random.default_rng([7, i]), banned, None, True)
                assert all(x[0] == y[0] and np.array_equal(np.asarray(x[1]), np.asarray(y[1])) for x, y in zip(a, b))
    assert not any(v for (task, flag), v in seen.items() if not flag or task in ("t2i", "think", "reflect")), seen
    assert all(seen[t, True] for t in ("vqa", "judge", "region")), seen



def test_edit_and_redraw_samples_are_what_they_claim_and_leave_the_default_stream_alone():
    """pretrain.py's edit task: a kept pair's image2 is image1 to the pixel (think2 "the image is correct");
    an edited pair differs only inside the box of the one object its think2 names (with that box's cell);
    either way think2's plan is the detailed caption (each object's centre).
    The redraw task reads a caption in Unified-GRPO's context. With the new tasks at weight 0 and
    --caption_detail 0, the default stream is the one the shipped base trained on, batch for batch."""
    import pretrain as P
    banned = world.eval_prompts()
    kinds = {"kept": 0, "edited": 0}
    for i in range(60):
        segs = P.make_sample("edit", np.random.default_rng([9, i]), banned)
        img1, img2 = segs[2][1], segs[5][1]
        t2 = world.decode(segs[4][1])
        plan = world.parse_caption(t2.split(world.REDRAW)[1].split(" </think>")[0])
        assert plan and all(o["centre"] is not None for o in plan), t2     # the plan is the detailed caption
        if t2.startswith(world.PROBLEMS["ok"]):
            kinds["kept"] += 1
            assert np.array_equal(img1, img2)
            continue
        kinds["edited"] += 1
        cell = t2.split(" at the ")[1].split(" . ")[0]
        key = lambda o: (o["shape"], o["color"], tuple(o["box"]))                 # noqa: E731
        o1, o2 = world.detect(img1), world.detect(img2)
        changed = [o for o in o2 if key(o) not in map(key, o1)] + [o for o in o1 if key(o) not in map(key, o2)]
        assert 1 <= len({tuple(o["box"]) for o in changed}) <= 2, (t2, changed)   # one object (two: swapped colours)
        inside = np.zeros(img1.shape[:2], bool)
        for o in changed:                                      # detect's boxes are core boxes: 2 px of margin
            x0, y0, x1, y1 = o["box"]
            inside[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = True
        assert not ((img1 != img2).any(-1) & ~inside).any()   # and nothing else moves
        assert cell in [world.GRID[world._cell(o["box"])[0]][world._cell(o["box"])[1]] for o in changed], (t2, changed)
    assert kinds["kept"] > 5 and kinds["edited"] > 20, kinds
    segs = P.make_sample("redraw", np.random.default_rng(3), banned)
    assert world.decode(segs[0][1]).startswith("<bos> <think> a") and world.decode(segs[0][1]).endswith("</think> <|vision_start|>")
    old = {k: v for k, v in P.MIX.items() if k not in ("edit", "redraw")}
    for step in range(3):
        a = P.make_batch(0, step, 0, 32, banned, 0.1, 1.0, 32, 160, P.MIX)
        b = P.make_batch(0, step, 0, 32, banned, 0.1, 1.0, 32, 160, old)
        assert a["tasks"] == b["tasks"] and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_an_edit_shows_the_models_own_drawings_right_and_wrong_with_the_verifiers_verdict():
    """pretrain.py's edit task with --own_reflect: one of the model's own right drawings is kept (image2 =
    image1, think2 "the image is correct"); a wrong one gets the verifier's problem and a right render of
    its prompt as image2, so the own images an edit shows are right as often as the pool is (IRG's critic
    is not taught that the model's drawings are right)."""
    import pretrain as P
    banned = world.eval_prompts()
    rng = np.random.default_rng(5)
    spec = P.train_spec(rng, banned, ("two_object",))
    right, _ = world.render(spec, rng, holdout="train")
    wrong = world.negative(spec, rng, holdout="train")[0]
    for img, ok in ((right, True), (wrong, False)):
        own = dict(specs=[spec], images=np.stack([img]), frac=0.0, reflect=1.0)
        segs = P.make_sample("edit", np.random.default_rng(6), banned, own)
        assert np.array_equal(segs[2][1], img)                                 # image1: the pool's image
        think2 = world.decode(segs[4][1][:-2])
        problem = world.verify(spec, img)["problem"]
        assert think2.startswith(problem + " . " + world.REDRAW), think2       # the verifier's verdict, no cell
        assert (problem == world.PROBLEMS["ok"]) == ok
        assert np.array_equal(segs[5][1], img) == ok                          # kept, or a redraw ...
        assert world.verify(spec, segs[5][1])["correct"]                        # ... that is right
        plan = world.parse_caption(think2.split(world.REDRAW)[1])
        assert plan and all(o["centre"] is not None for o in plan)             # the detailed plan either way


def test_srum_rounds_draw_fresh_candidates_and_a_killed_run_resumes_to_the_same_weights(ckpt, tmp_path, monkeypatch):
    """--rounds 2: the second half of the steps trains on candidates the policy draws after the first
    half, judged by the frozen copy of the base; killed in round 2, --resume reads round 2's saved
    candidates and ends with the uninterrupted run's weights."""
    import srum
    args = ["--ckpt", ckpt, "--prompts", "random", "--n_prompts", "3", "--N", "2", "--train_steps", "4", "--rounds", "2",
            "--batch", "4", "--eval_n", "1", "--eval_k", "1", "--sample_steps", "2", "--max_think", "6", "--ckpt_every", "1",
            "--eval_modes", "think", "--lr", "1e-3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    srum.main(args + ["--out", str(full)])
    s = json.load(open(full / "summary.json"))
    assert [r["round"] for r in s["rounds"]] == [0, 1]
    c0, c1 = (torch.load(full / f, weights_only=False) for f in ("candidates.rank0.pt", "candidates_r1.rank0.pt"))
    assert len(c1["ro"]["image"]) == 6 and not np.array_equal(np.stack(c0["ro"]["image"]), np.stack(c1["ro"]["image"]))
    real = common.finite

    def killed_at_step_4(where, **kw):
        if where == "step 4":
            raise KeyboardInterrupt
        return real(where, **kw)
    monkeypatch.setattr(common, "finite", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        srum.main(args + ["--out", str(cut)])
    monkeypatch.setattr(common, "finite", real)
    assert (cut / "candidates_r1.rank0.pt").exists()
    srum.main(args + ["--out", str(cut), "--resume"])
    a, b = weights(str(full / "ckpt")), weights(str(cut / "ckpt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
