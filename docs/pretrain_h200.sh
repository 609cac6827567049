# The H200 run that made the shipped base (data/base, v4), one device call: two continuations of v3
# trained side by side on one GPU, the same data stream (seed 11) except that arm A's reflect samples
# show the model's own drawings as image1 (--own_reflect 0.5), then the IRG eval of the start, A and B
# on the GPU (all 600 eval prompts, seeds 0-1). Arm A is data/base; its log is data/curves/v4_h200.jsonl.
# Another pair of arms from another start: INIT=data/base ARM_A="..." ARM_B="..." bash docs/pretrain_h200.sh
# (an arm's own --mix in ARM_A / ARM_B replaces MIX: the last flag wins). The detail-and-edit arm:
#   ARM_A="--own_reflect 0.5 --caption_detail 0.05 --mix t2i=0.05,think=0.10,caption=0.12,vqa=0.20,judge=0.08,region=0.04,reflect=0.08,fact=0.05,edit=0.14,redraw=0.14" \
#   ARM_B="--own_reflect 0.5" bash docs/pretrain_h200.sh    # both checkpoints come back in $OUT; the evals run as time allows (DEADLINE)
set -o pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
MIX=${MIX:-"t2i=0.06,think=0.12,caption=0.14,vqa=0.26,judge=0.10,region=0.04,reflect=0.20,fact=0.08"}
INIT=${INIT:-data/base}
P="--init_from $INIT --batch ${BATCH:-512} --lr 1e-4 --warmup 100 --cooldown 0.3 --ema 0.998 --dtype bf16 --own_n ${OWN_N:-16384} --own_batch 2048
   --own_frac 0.3 --und_transfer --mix $MIX --seed 11 --minutes ${MINUTES:-4.5} --max_minutes ${MAX_MINUTES:-5.5} --workers 7 --log_every 100
   --ckpt_every 100000 $EXTRA"
rm -rf runs/gA runs/gB runs/ev runs/ev_*.log
python3 pretrain.py $P ${ARM_A:---own_reflect 0.5} --out runs/gA > $OUT/A.log 2>&1 &
python3 pretrain.py $P ${ARM_B:---own_reflect 0} --out runs/gB > $OUT/B.log 2>&1 &
wait
for r in A B; do mkdir -p $OUT/$r; cp runs/g$r/ckpt.safetensors runs/g$r/ckpt.json $OUT/$r/; done
tar czf $OUT/metrics.tgz runs/gA/metrics.jsonl runs/gB/metrics.jsonl
tail -n 3 $OUT/A.log $OUT/B.log
E="--modes irg --und 0 --n ${EVAL_N:-50} --k 1 --batch 600 --irg_cfg_text2 2 --irg_cfg_img 1 --irg_best2 1"
ev() {   # ev NAME ARGS...: one evaluate.py run under the deadline, its headline numbers printed
  [ $SECONDS -gt ${DEADLINE:-480} ] && return        # leave time for the files to come back
  timeout 60 python3 evaluate.py "${@:2}" --out runs/ev/$1 > runs/ev_$1.log 2>&1 || echo "eval $1 failed: $(tail -n 2 runs/ev_$1.log)"
  for f in runs/ev/$1/*/summary.json runs/ev/$1/summary.json; do [ -f $f ] && python3 -c "import json; d=json.load(open('$f'))
print('$1 $f', {k: round(v, 3) for k, v in d.items() if isinstance(v, (int, float))})"; done
}
for c in $INIT runs/gA/ckpt runs/gB/ckpt; do ev irg_$(basename $(dirname $c))_s0 $E --ckpt $c --seed 0; done
for c in $INIT runs/gA/ckpt runs/gB/ckpt; do ev std_$(basename $(dirname $c)) --n ${EVAL_N:-50} --k 2 --auroc ${AUROC:-40} --batch 600 --ckpt $c; done
for c in $INIT runs/gA/ckpt runs/gB/ckpt; do ev irg_$(basename $(dirname $c))_s1 $E --ckpt $c --seed 1; done
for c in $INIT runs/gA/ckpt runs/gB/ckpt; do ev detail_$(basename $(dirname $c)) --modes "" --und 0 --detail 200 --edits 20 --ckpt $c; done
tar czf $OUT/evals.tgz runs/ev runs/ev_*.log 2>/dev/null
