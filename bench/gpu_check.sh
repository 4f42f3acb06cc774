#!/usr/bin/env bash
# The one GPU-machine check of training (well under 10 minutes on one H100/H200), run from the
# repository root:   bash bench/gpu_check.sh OUTDIR
#
#   0. nvidia-smi and versions; wheels from .whl/ (transformers/peft pins, DeepSpeed built
#      with DS_BUILD_OPS=0) installed into /tmp/site when present
#   1. toy stage 1, stage 2 full and --lora, merge-lora, through the CLI with the
#      llava-1.5-7b recipe (bf16, tf32, gradient checkpointing) on CUDA, a few steps
#   4. 7B-size stage-1 and stage-2 LoRA throughput (bench/train_throughput.py), run second
#      because it is the measurement that matters most
#   2. part 1 under `accelerate launch --num_processes 1 --config_file train/configs/fsdp.yaml`
#   3. ZeRO-2 stage 1; ZeRO-3 stage 2 --lora with --projector (load under ZeRO-3), adapter
#      save under ZeRO-3, merge-lora of it; ZeRO-3 full stage 2 — if deepspeed imports
#
# Each part runs under its own time limit and a failure does not stop the others; the
# summary at the end says which passed. Everything goes to OUTDIR/gpu_check.log;
# OUTDIR/throughput_7b.json holds the measurements.
set -u
OUTDIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
ROOT=$(pwd)
LOG=$OUTDIR/gpu_check.log
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export DS_ACCELERATOR=cuda PYTHONWARNINGS=ignore
PY=${PY:-python3}  # the device's python3 holds torch; override for a dry run elsewhere
# a dry run on a CPU machine: PY=.venv/bin/python SKIP_WHEELS=1 PARTS="part1 600" BENCH_ARGS="--preset toy ..."
BENCH_ARGS=${BENCH_ARGS:---preset llava-1.5-7b --runs s1,s2lora,s1:nockpt --steps 6 --warmup 2}
PARTS=${PARTS:-"part1 100;part4 150;part2 90;part3 130"}  # seen on an H200: 75, 58, 60, 97 s
export PY BENCH_ARGS
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

stamp "0. machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if [ -z "${SKIP_WHEELS:-}" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$ROOT"/.whl/*.whl && export PYTHONPATH=/tmp/site
fi
# llava_edge's subpackages live at the top of the repository (pyproject's package-dir):
# assemble the same namespace under /tmp/le instead of a pip install
rm -rf /tmp/le && mkdir -p /tmp/le && cp -r "$ROOT/llava_edge" /tmp/le/
for sub in train export quantize runtimes; do ln -s "$ROOT/$sub" "/tmp/le/llava_edge/$sub"; done
export PYTHONPATH=/tmp/le${PYTHONPATH:+:$PYTHONPATH}
W=/tmp/gpu_work
rm -rf $W && mkdir -p $W && cd $W || exit 1  # away from the repository root, whose llava_edge/ lacks train/
$PY - <<'EOF'
import importlib, torch
print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for m in ("transformers", "accelerate", "peft", "deepspeed", "llava_edge.train.loop"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "ok"))
    except Exception as e:
        print(m, "NOT AVAILABLE:", type(e).__name__, str(e)[:200])
EOF

LE="$PY -m llava_edge.cli"
LAUNCH="$PY -m accelerate.commands.launch --num_processes 1"
COMMON="--preset llava-1.5-7b --global-batch 8 --per-device-batch 4 --max-steps 3 --save-steps 1000"
S1="train stage1 --model base --data data/stage1_captions.json --image-folder data $COMMON"
S2="train stage2 --model base --data data/stage2_instruct.json --image-folder data $COMMON"
export LE LAUNCH COMMON S1 S2 ROOT OUTDIR

# check that a stage wrote finite losses and what it should have written
check() {  # check DIR FILE...
  local d=$1; shift
  $PY - "$d" "$@" <<'EOF' || return 1
import csv, math, sys, pathlib
d = pathlib.Path(sys.argv[1])
rows = list(csv.DictReader(open(d / "loss.csv"))) if (d / "loss.csv").is_file() else []
losses = [float(r["loss"]) for r in rows]
missing = [f for f in sys.argv[2:] if not (d / f).exists()]
ok = bool(losses) and all(math.isfinite(x) for x in losses) and not missing
print(f"CHECK {d}: losses {[round(x, 4) for x in losses]} missing {missing} -> {'OK' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
EOF
}
export -f check stamp
export T0

# step NAME 'COMMANDS': run, and record NAME PASS/FAIL in the summary; later steps go on either way
step() {
  local name=$1; shift
  stamp "step $name"
  if (set -e; eval "$1"); then echo "$name PASS" >> "$OUTDIR/summary.txt"
  else echo "$name FAIL" >> "$OUTDIR/summary.txt"; fi
}
export -f step

part1() {
  step toy_setup '$LE toy data --out data --n-stage1 64 --n-stage2 64 --n-eval 0; $LE toy model --out base'
  step plain_stage1 '$LE $S1 --output p1/s1; check p1/s1 mm_projector.safetensors model.safetensors'
  step plain_stage2_full '$LE $S2 --projector p1/s1/mm_projector.safetensors --output p1/s2; check p1/s2 model.safetensors'
  step plain_stage2_lora '$LE $S2 --projector p1/s1/mm_projector.safetensors --lora --output p1/s2lora
    check p1/s2lora adapter/adapter_config.json mm_projector.safetensors'
  step plain_merge_lora '$LE train merge-lora --base base --adapter p1/s2lora/adapter --output p1/merged; ls p1/merged'
}
part2() {
  local L="$LAUNCH --config_file $ROOT/train/configs/fsdp.yaml -m llava_edge.cli"
  export L
  step fsdp_stage1 '$L $S1 --output p2/s1; check p2/s1 mm_projector.safetensors model.safetensors'
  step fsdp_stage2_lora '$L $S2 --projector p1/s1/mm_projector.safetensors --lora --output p2/s2lora
    check p2/s2lora adapter/adapter_config.json mm_projector.safetensors'
  step fsdp_stage2_full '$L $S2 --projector p1/s1/mm_projector.safetensors --output p2/s2; check p2/s2 model.safetensors'
}
part3() {
  $PY -c "import deepspeed; print('deepspeed', deepspeed.__version__)" || { echo "deepspeed SKIP" >> "$OUTDIR/summary.txt"; return 0; }
  local Z2="$LAUNCH --config_file $ROOT/train/configs/zero2.yaml -m llava_edge.cli"
  local Z3="$LAUNCH --config_file $ROOT/train/configs/zero3.yaml -m llava_edge.cli"
  export Z2 Z3
  step zero2_stage1 '$Z2 $S1 --output p3/s1z2; check p3/s1z2 mm_projector.safetensors model.safetensors'
  step zero3_stage2_lora_projector '$Z3 $S2 --projector p1/s1/mm_projector.safetensors --lora --output p3/s2lora_z3
    check p3/s2lora_z3 adapter/adapter_config.json adapter/adapter_model.safetensors mm_projector.safetensors'
  step zero3_adapter_merge '$LE train merge-lora --base base --adapter p3/s2lora_z3/adapter --output p3/merged_z3
    $PY - <<"EOF2"
# the ZeRO-3 adapter holds whole (not partitioned-away, zero-size) trained LoRA weights
from safetensors.torch import load_file
a = load_file("p3/s2lora_z3/adapter/adapter_model.safetensors")
b = [v for k, v in a.items() if "lora_B" in k]
print("adapter tensors", len(a), "lora_B nonzero", sum(int(v.abs().sum() > 0) for v in b), "of", len(b))
assert b and all(v.numel() > 0 for v in a.values()) and any(v.abs().sum() > 0 for v in b)
EOF2'
  step zero3_stage2_full '$Z3 $S2 --projector p1/s1/mm_projector.safetensors --output p3/s2_z3; check p3/s2_z3 model.safetensors'
}
part4() {
  step bench_7b '$PY "$ROOT/bench/train_throughput.py" $BENCH_ARGS --out "$OUTDIR/throughput_7b.json"'
}
export -f part1 part2 part3 part4

: > "$OUTDIR/summary.txt"
IFS=';' read -ra SPECS <<< "$PARTS"
for spec in "${SPECS[@]}"; do
  set -- $spec
  stamp "$1 (limit $2 s)"
  timeout -k 5 "$2" bash -c "$1"
  case $? in 124|137) echo "$1 TIMEOUT (steps after the last one listed did not run)" >> "$OUTDIR/summary.txt" ;; esac
done
stamp "summary"
cat "$OUTDIR/summary.txt"
