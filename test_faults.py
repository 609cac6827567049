"""Runs that lose nothing under faults: one test per rule, each with the fault made for real
(a subprocess SIGKILLed at a chosen point, a folder or file as a user would leave it).

  1 a checkpoint pair changes whole: a kill between its two renames loads the new pair, before them the old
  2 evaluate.py never writes into a method run's folder
  3 --overwrite removes the old run first: killed early, nothing of it is resumed or reported as the new one
  4 irg.py --overwrite reports its own stage-1 eval
  5 --resume and --reuse refuse another number of processes
  6 what cannot train is refused early (a range end that trains nothing, a rejection that keeps nothing)
  7 flags the chosen variant does not read are refused, not recorded as if used
  8 training prompts hold no eval prompt, and each prompt's text asks for what its include does
  9 sizes are checked at load: prompt length, training rows, a checkpoint config against its weights' header
 10 paths and empty inputs fail before the expensive part; a refused --reuse writes nothing
 11 a prompt file saved with a UTF-8 byte-order mark loads
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import model as M
import world
import runs
import rwr

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    f = tmp_path_factory.mktemp("p") / "p.jsonl"
    f.write_text("".join(json.dumps(s) + "\n" for s in world.candidates(1, np.random.default_rng(0))[:3]))
    return str(f)


def rwr_args(ckpt, prompts, out, *more):
    return ["--ckpt", ckpt, "--prompts", prompts, "--out", str(out), "--n_prompts", "3", "--N", "2", "--train_steps", "2",
            "--batch", "4", "--eval_n", "1", "--eval_k", "1", "--sample_steps", "2", "--max_think", "6",
            "--ckpt_every", "1"] + list(more)


@pytest.fixture(scope="module")
def finished(tiny_ckpt, prompts, tmp_path_factory):
    """A finished tiny rwr.py run (tests that change it work on a copy)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    rwr.main(rwr_args(tiny_ckpt, prompts, out))
    return out


def python(code, *argv, timeout=180):
    """`code` in a fresh interpreter of this repository (a process a test may kill or starve)."""
    env = dict(os.environ, PYTHONPATH=HERE, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *argv], env=env, cwd=HERE, capture_output=True, text=True,
                          timeout=timeout)


def no_model(*_, **__):
    raise AssertionError("model work started before the inputs were checked")


def train_steps(d):
    return [json.loads(l)["step"] for l in open(os.path.join(d, "metrics.jsonl")) if '"phase": "train"' in l]


# ----------------------------------------------------------------------------- 1. checkpoints change whole

KILLED_IN_SAVE = """
import os, signal, sys, torch
import model as M, world
path, when = sys.argv[1], sys.argv[2]
real = os.replace
def replace(src, dst):
    if when == "before" and src.endswith(".safetensors.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)          # both new files written, neither renamed
    real(src, dst)
    if when == "between" and src.endswith(".safetensors.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)          # the new weights in place, the old .json beside them
os.replace = replace
torch.manual_seed(1)
M.save_weights(path, M.MoT(M.config_for(2, len(world.VOCAB))), M.PaletteAE(w=16), dict(step=1))
"""


def test_checkpoint_killed_in_its_save_loads_a_whole_pair(tmp_path):
    path = str(tmp_path / "ck")
    mot = lambda seed: (torch.manual_seed(seed), M.MoT(M.config_for(2, len(world.VOCAB))))[1]  # noqa: E731
    M.save_weights(path, mot(0), M.PaletteAE(w=16), dict(step=0))
    same = lambda m, ref: all(torch.equal(v, ref[k].to(torch.bfloat16).float()) for k, v in m.state_dict().items())  # noqa: E731
    r = python(KILLED_IN_SAVE, path, "before")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    m, _, meta = M.load_weights(path)                        # the old pair survives until the new one is whole
    assert meta["step"] == 0 and same(m, mot(0).state_dict())
    r = python(KILLED_IN_SAVE, path, "between")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    m, _, meta = M.load_weights(path)                        # the new pair, its .json renamed into place
    assert meta["step"] == 1 and same(m, mot(1).state_dict())
    assert not os.path.exists(path + ".json.tmp") and M.load_weights(path)[2]["step"] == 1


# ----------------------------------------------------------------------------- 2. evaluate.py and run folders

def test_evaluate_never_writes_into_a_method_run_folder(tiny_ckpt, finished, tmp_path):
    import evaluate
    out = tmp_path / "runs" / "s0"
    shutil.copytree(finished, out)
    summary = (out / "summary.json").read_bytes()
    quick = ["--ckpt", tiny_ckpt, "--n", "1", "--k", "1", "--sample_steps", "2", "--max_think", "4", "--modes", "think"]
    with pytest.raises(FileExistsError, match=r"already holds a run \(config\.json.*pass another --out"):
        evaluate.main(quick + ["--out", str(out)])
    assert (out / "summary.json").read_bytes() == summary
    evaluate.main(quick + ["--out", str(out / "eval")])      # a folder of its own beside the run's files
    rows = runs.report(str(tmp_path / "runs"), rwr.label)    # the run's own summary is what --report reads
    assert rows["base"][0]["overall"] == json.loads(summary)["before"]


# ----------------------------------------------------------------------------- 3-4. --overwrite replaces the whole run

KILLED_AFTER_OPEN = """
import os, signal, sys
import runs, rwr
real = runs.open_run
def open_then_die(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)              # killed right after the folder is claimed
runs.open_run = open_then_die
rwr.main(sys.argv[1:])
"""


def test_overwrite_killed_early_leaves_nothing_of_the_old_run(tiny_ckpt, prompts, finished, tmp_path):
    root = tmp_path / "runs"
    out = root / "s0"
    shutil.copytree(finished, out)
    r = python(KILLED_AFTER_OPEN, *rwr_args(tiny_ckpt, prompts, out, "--overwrite", "--beta", "1"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert json.load(open(out / "config.json"))["beta"] == 1.0
    left = [f for f in os.listdir(out) if f.startswith(("state.", "rollouts.", "summary.", "ckpt.")) or f in ("before", "after")]
    assert not left, left
    with pytest.raises(FileNotFoundError, match=r"unfinished: \['s0'\]"):
        runs.report(str(root), rwr.label)                   # not counted as a finished run of the new settings
    rwr.main(rwr_args(tiny_ckpt, prompts, out, "--resume", "--beta", "1"))
    assert train_steps(out) == [1, 2]                        # trained from its own start, not the old run's step 2
    rwr.main(rwr_args(tiny_ckpt, prompts, tmp_path / "fresh", "--beta", "1"))
    a, b = M.load_weights(str(out / "ckpt"))[0].state_dict(), M.load_weights(str(tmp_path / "fresh" / "ckpt"))[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)           # the same weights as an uninterrupted run


IRG_QUICK = ["--n_prompts", "1", "--N", "1", "--n_flaw", "1", "--n_init", "1", "--near", "2", "--batch", "4", "--eval_n", "1",
             "--eval_k", "1", "--sample_steps", "2", "--max_think", "4", "--ckpt_every", "1", "--stage1_steps", "1",
             "--stage2_steps", "1"]


def test_irg_overwrite_reports_its_own_stage1_eval(tiny_ckpt, tmp_path):
    import irg
    out = tmp_path / "irg"
    (out / "stage1_irg").mkdir(parents=True)                 # what a replaced run leaves: its config and stage-1 eval
    (out / "config.json").write_text(json.dumps(dict(seed=0)))
    old = dict(image1=0.987, image2=0.987, fix=0.5, critic_auroc=0.5, per_tag={t: [0.987, 0.987] for t in world.TAGS},
               **{"break": 0.5})
    (out / "stage1_irg" / "summary.json").write_text(json.dumps(old))
    irg.main(["--ckpt", tiny_ckpt, "--out", str(out), "--overwrite"] + IRG_QUICK)
    row = json.load(open(out / "summary.json"))["rows"]["IRGL stage 1"]
    assert row["image1"] != 0.987 and row["image1"] == json.load(open(out / "stage1_irg" / "summary.json"))["image1"]


# ----------------------------------------------------------------------------- 5. the number of processes

def test_resume_and_reuse_refuse_another_process_count(tiny_ckpt, prompts, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    cfg = json.load(open(out / "config.json"))
    assert cfg["world_size"] == 1                            # recorded when the run starts
    (out / "config.json").write_text(json.dumps(dict(cfg, world_size=2)))     # as a 2-process launch records it
    with pytest.raises(ValueError, match=r"--resume .*made by 2 processes, this call has 1.*nproc_per_node=2"):
        rwr.main(rwr_args(tiny_ckpt, prompts, out, "--resume"))
    with pytest.raises(ValueError, match=r"--reuse .*made by 2 processes, this call has 1"):
        rwr.main(rwr_args(tiny_ckpt, prompts, tmp_path / "v", "--reuse", str(out), "--weight_on", "image"))
    assert not (tmp_path / "v").exists()


# ----------------------------------------------------------------------------- 6. what cannot train

def test_what_cannot_train_is_refused_early(tiny_ckpt, prompts, tmp_path):
    import pretrain
    with pytest.raises(ValueError, match=r"--ema 1\.0: must be 0\.\.<1"):      # EMA 1 saves the starting weights
        pretrain.main(["--ema", "1", "--out", str(tmp_path / "p")])
    assert not (tmp_path / "p").exists()
    out = tmp_path / "rej"                                    # the random model's rewards are all below 1
    with pytest.raises(ValueError, match=r"--baseline rejection: no rollout has a reward at or above --reject_at 1\.0"
                                         r".*--reuse .*nothing would train"):
        rwr.main(rwr_args(tiny_ckpt, prompts, out, "--baseline", "rejection", "--reject_at", "1"))
    assert (out / "rollouts.rank0.pt").exists()             # kept for a --reuse with a lower --reject_at
    assert not list(out.glob("state.*")) and not (out / "ckpt.json").exists()


# ----------------------------------------------------------------------------- 7. flags a variant ignores

@pytest.mark.parametrize("script,flags,named", [
    ("rwr", ["--baseline", "sft", "--beta", "1"], "--baseline sft does not use --beta 1.0"),
    ("rwr", ["--baseline", "rejection", "--beta", "2"], "--baseline rejection does not use --beta 2.0"),
    ("rwr", ["--reject_at", "0.7"], "--baseline none does not use --reject_at 0.7"),
    ("rwr", ["--qwen", "/models/qwen"], "--reward oracle_soft does not use --qwen /models/qwen"),
    ("srum", ["--baseline", "sft", "--lambda_c", "0.2", "--reward_map", "paper"],
     "--baseline sft does not use --lambda_c 0.2, --reward_map paper"),
    ("srum", ["--reward_level", "sample", "--no_global"], "--reward_level sample does not use --no_global True"),
    ("srum", ["--judge", "oracle", "--judge_score", "mode"], "--judge oracle does not use --judge_score mode"),
    ("pretrain", ["--own_frac", "0.3"], "--own_n 0 does not use --own_frac 0.3"),
])
def test_flags_a_variant_ignores_are_refused(script, flags, named, tmp_path):
    mod = __import__(script)
    with pytest.raises(ValueError) as e:     # before anything loads: the checkpoint does not exist
        mod.main(flags + ["--out", str(tmp_path / "o")] + (["--ckpt", str(tmp_path / "none")] if script != "pretrain" else []))
    assert named in str(e.value) and "drop" in str(e.value), str(e.value)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 8. what a prompt file may hold

def test_training_prompts_hold_no_eval_prompt_and_each_text_agrees_with_its_include(tiny_ckpt, tmp_path, monkeypatch):
    import srum
    monkeypatch.setattr(M, "load_weights", no_model)
    banned = world.eval_prompts()
    leak = next(s for s in world.load_specs(os.path.join(HERE, "data", "eval.jsonl")) if s["prompt"] in banned)
    good = world.candidates(1, np.random.default_rng(0))[0]
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(leak) + "\n")
    for mod in (rwr, srum):
        with pytest.raises(ValueError, match=re.escape(f"{f}:2: {leak['prompt']!r} is an eval prompt") + ".*--prompts random"):
            mod.main(["--ckpt", tiny_ckpt, "--prompts", str(f), "--out", str(tmp_path / mod.__name__)])
        assert not (tmp_path / mod.__name__).exists()
    assert len(world.load_specs(os.path.join(HERE, "data", "eval.jsonl"))) == 600       # the eval file itself loads
    assert world.load_specs(os.path.join(HERE, "data", "mmgw.jsonl"), training=True)      # so do the mined prompts
    sq, ci = dict({"class": "square", "count": 1}), dict({"class": "circle", "count": 1})
    for spec, says in [
        (dict(tag="color_attr", prompt="a photo of a red square and a blue circle",
              include=[dict(sq, color="blue"), dict(ci, color="red")]), "1 red square; 1 blue circle, its include for 1 blue square"),
        (dict(tag="position", prompt="a photo of a circle left of a square", include=[ci, dict(sq, position=["left of", 0])]),
         "1 circle; 1 square; 1 circle left of 1 square, its include for 1 circle; 1 square; 1 square left of 1 circle"),
        (dict(tag="counting", prompt="a photo of three squares", include=[dict(sq, count=2)]), "3 square, its include for 2 square"),
        (dict(tag="colors", prompt="a photo of a red circle", include=[ci]), "1 red circle, its include for 1 circle"),
    ]:
        f.write_text(json.dumps(good) + "\n" + json.dumps(spec) + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{f}:2: the prompt {spec['prompt']!r} asks for {says}")):
            world.load_specs(str(f))
    rng = np.random.default_rng(1)                          # and every prompt the world writes agrees with its include
    for tag in world.TAGS:
        for _ in range(100):
            world._check_text(dict(world.sample_spec(tag, rng, holdout="any"), exclude=[]), tag)


# ----------------------------------------------------------------------------- 9. sizes checked at load

ABSURD = """
import json, resource, shutil, sys, time
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))     # a config that allocates fails here, not the machine
import model as M
src, d, out = sys.argv[1], sys.argv[2], []
for i, (where, key, value) in enumerate(json.loads(sys.argv[3])):
    p = f"{d}/c{i}"
    for ext in (".safetensors", ".json"):
        shutil.copy(src + ext, p + ext)
    meta = json.load(open(p + ".json"))
    meta[where][key] = value
    json.dump(meta, open(p + ".json", "w"))
    t0 = time.time()
    try:
        M.load_weights(p)
        out.append(["loaded", time.time() - t0])
    except Exception as e:
        out.append([f"{type(e).__name__}: {e}", time.time() - t0])
print(json.dumps(out))
"""


def test_input_sizes_are_checked_at_load(tiny_ckpt, prompts, tmp_path, monkeypatch):
    good = json.loads(open(prompts).readline())
    f = tmp_path / "long.jsonl"
    for text in ("a " * 500_000, " ".join(["a red square and"] * 25) + " a red square"):      # 1 MB; 101 words
        f.write_text(json.dumps(dict(good, prompt=text)) + "\n")
        t0 = time.time()
        with pytest.raises(ValueError, match=re.escape(f"{f}:1: the prompt is ") + r".*at most 64 tokens"):
            world.load_specs(str(f))
        assert time.time() - t0 < 3
    monkeypatch.setattr(M, "load_weights", no_model)          # a prompt the training rows cannot hold: before the model
    with pytest.raises(ValueError, match=r"--row_len 30: a training sample can take 3\d tokens .*raise --row_len"):
        rwr.main(rwr_args(tiny_ckpt, prompts, tmp_path / "r", "--row_len", "30"))
    assert not (tmp_path / "r").exists()
    cases = [("config", "n_layer", 5000), ("config", "d", 10 ** 6), ("config", "n_layer", 2.5), ("ae", "w", 10 ** 6),
             ("config", "n_img", 10 ** 6)]
    r = python(ABSURD, tiny_ckpt, str(tmp_path), json.dumps(cases))
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.splitlines()[-1])
    want = ["n_layer 5000 there, 2 in the weights (missing (e.g. und.2.q.weight))", "d 1000000 there, 64 in the weights",
            "n_layer 2.5 must be a positive whole number", "autoencoder weights do not fit", "n_img 1000000: this code draws 16"]
    for (msg, seconds), w in zip(got, want):
        assert msg.startswith("ValueError") and w in msg and seconds < 2, (msg, seconds)


# ----------------------------------------------------------------------------- 10. early failures

def test_paths_and_empty_inputs_fail_before_the_expensive_part(tiny_ckpt, prompts, finished, tmp_path, monkeypatch):
    import evaluate
    import irg
    import unified_grpo
    empty = tmp_path / "empty"
    empty.mkdir()
    real_load = M.load_weights
    monkeypatch.setattr(M, "load_weights", no_model)
    with pytest.raises(FileNotFoundError, match=r"--qwen .*empty: the Qwen2\.5-VL folder lacks config\.json"):
        rwr.main(rwr_args(tiny_ckpt, prompts, tmp_path / "o", "--reward", "vqa_qwen", "--qwen", str(empty)))
    with pytest.raises(FileNotFoundError, match=r"--clip_path .*empty: the CLIP folder lacks config\.json"):
        unified_grpo.main(["--ckpt", tiny_ckpt, "--out", str(tmp_path / "o"), "--reward", "clip", "--clip_path", str(empty)])
    bench = ["--ckpt", tiny_ckpt, "--out", str(tmp_path / "o"), "--unified", "2", "--modes", "", "--und", "0"]
    with pytest.raises(FileNotFoundError, match=r"none\.safetensors not found: pass --encoder"):
        evaluate.main(bench + ["--encoder", str(tmp_path / "none")])
    with pytest.raises(FileNotFoundError, match=r"--clip .*empty: the CLIP folder lacks config\.json"):
        evaluate.main(bench + ["--encoder", tiny_ckpt, "--clip", str(empty)])
    with pytest.raises(ValueError, match="--N 0 --n_flaw 0 --n_edit 0: no improving record"):
        irg.main(["--ckpt", tiny_ckpt, "--out", str(tmp_path / "o"), "--N", "0", "--n_flaw", "0", "--n_edit", "0"])
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(M, "load_weights", real_load)
    out = tmp_path / "variant"                               # a refused --reuse leaves nothing that refuses its retry
    with pytest.raises(ValueError, match="it was made with --eval_n 1, this run has --eval_n 2"):
        rwr.main(rwr_args(tiny_ckpt, prompts, out, "--reuse", str(finished), "--eval_n", "2"))
    assert not (out / "config.json").exists()
    rwr.main(rwr_args(tiny_ckpt, prompts, out, "--reuse", str(finished), "--weight_on", "image"))
    assert (out / "summary.json").exists()


# ----------------------------------------------------------------------------- 11. encodings

def test_prompt_file_with_a_byte_order_mark_loads(prompts, tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + open(prompts, "rb").read())       # as Windows Notepad saves UTF-8
    assert world.load_specs(str(f)) == world.load_specs(prompts)
    assert world.prompt_set(str(f), 0, 0) == world.prompt_set(prompts, 0, 0)
