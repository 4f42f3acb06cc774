#!/usr/bin/env bash
# The runtime's GPU path on a GPU machine, at real size, side by side with llama.cpp's own multimodal
# pipeline (well under 10 minutes on one H100/H200), run from the repository root:
#
#   bash bench/gpu_runtime.sh OUTDIR SRC
#
# SRC holds what the machine lacks and cannot download: llama-cpp-python's source
# (llama_cpp_python-0.3.36.tar.xz, the sdist with llama.cpp's models/docs/other backends left out) and
# wheels (gguf, diskcache, transformers). Steps:
#   1. (background) llama-cpp-python built with CUDA for this GPU's architecture only and llama.cpp's
#      flash-attention kernels left out (GGML_CUDA_FA=OFF: the build takes minutes, not tens of minutes;
#      llama.cpp's "auto" then runs attention without FA on the GPU, for both pipelines alike)
#   2. (meanwhile) `llava-edge toy model --preset $PRESET` (default: llava-1.5-7b, all 32 layers, fp16)
#      exported: vision ONNX fp32 and the language model as an f16 GGUF
#   3. (after the build) the mmproj (fp16), int8 vision and, one at a time, each language-model variant
#      of $LLMS (default f16,q4_k_m) through the same CLI
#   4. after each variant: bench/side_by_side.py --device laptop-gpu: decode (llava-edge generate vs raw
#      llama_decode vs the GPU memory bandwidth bound) and time to first token (llava-edge vs
#      Llava15ChatHandler), every llama.cpp layer on the GPU in both
#   5. if time is left (and VISION is not set empty): vision encode (ONNX vs Hugging Face on the GPU vs
#      llama.cpp's CLIP on the GPU)
# ORT_WHEEL=FILE installs onnxruntime-gpu from FILE first (its CUDA provider then runs the vision graph). The wheel
# (255 MB) is over what one call carries (64 MiB), so it goes in parts over consecutive calls while the machine is
# warm (kept 30 s after a call): xz it (219 MB), `split -n 5` (44 MB parts), carry one part a call into
# /tmp/ortparts, and in the last call (its part plus SRC: under 64 MiB together) `cat /tmp/ortparts/* | xz -dc >
# /tmp/onnxruntime_gpu-....whl` (check its sha256) before this script.
# TESTS=EXPR also runs `pytest tests/test_runtime_profiles.py -k EXPR` after the build (the runtime's GPU tests);
# SECTIONS="" skips the language-model races (e.g. LAYERS=1 SECTIONS= TESTS=gpu for the vision race and tests).
# Steps after 2 are skipped or cut so that the script ends by $DEADLINE seconds (default 540).
# Everything goes to OUTDIR (gpu_runtime.log, build.log, side_by_side.{json,md}).
# A dry run on a CPU machine: PY=.venv/bin/python SKIP_BUILD=1 PRESET=tinyllava-1.1b LAYERS=1 DEVICE=cpu ...
set -u
OUTDIR=${1:?OUTDIR}
SRC=${2:-}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
ROOT=$(pwd)
exec > >(tee -a "$OUTDIR/gpu_runtime.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
PY=${PY:-python3}
PRESET=${PRESET:-llava-1.5-7b}
LAYERS=${LAYERS:-}
DEVICE=${DEVICE:-laptop-gpu}
LLMS=${LLMS:-f16,q4_k_m}
ROUNDS=${ROUNDS:-3}
SECTIONS=${SECTIONS-decode,ttft}  # set empty: no language-model races
CUDA_ARCH=${CUDA_ARCH:-90}
FLASH_ATTN=${FLASH_ATTN:-off}  # llama.cpp's auto without FA kernels (a CPU dry run: on)
W=${WORK:-/tmp/gpu_runtime}
DEADLINE=${DEADLINE:-540}  # seconds: later steps are skipped or cut so that the script ends by then
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
left() { echo $(( DEADLINE - $(date +%s) + T0 )); }  # seconds left before this script must end

stamp "0. machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
nproc; df -h /tmp | tail -1
rm -rf "$W" && mkdir -p "$W"
if [ -n "$SRC" ] && ls "$SRC"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$SRC"/*.whl \
    && export PYTHONPATH=/tmp/site
fi
if [ -n "${ORT_WHEEL:-}" ]; then  # onnxruntime-gpu, reassembled from parts carried in earlier calls (see below)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ORT_WHEEL" \
    && export PYTHONPATH=/tmp/site
fi
$PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())"
# llava_edge's subpackages live at the top of the repository (pyproject's package-dir): assemble the
# installed namespace under /tmp/le instead of a pip install
rm -rf /tmp/le && mkdir -p /tmp/le && cp -r "$ROOT/llava_edge" /tmp/le/
for sub in train export quantize runtimes; do ln -s "$ROOT/$sub" "/tmp/le/llava_edge/$sub"; done
export PYTHONPATH=/tmp/le${PYTHONPATH:+:$PYTHONPATH}

BUILD_PID=
if [ -z "${SKIP_BUILD:-}" ]; then
  stamp "1. building llama-cpp-python with CUDA (sm_$CUDA_ARCH) in the background"
  command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
  nvcc --version | tail -2
  tar xJf "$SRC"/llama_cpp_python-*.tar.xz -C "$W"
  (
    cd "$W"/llama_cpp_python-* && \
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH -DGGML_CUDA_FA=OFF -DGGML_NATIVE=ON" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    $PY -m pip install -v --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/lcp . \
      > "$OUTDIR/build.log" 2>&1
    echo "build exit $?" >> "$OUTDIR/build.log"
  ) &
  BUILD_PID=$!
fi

LE="$PY -m llava_edge.cli"
cd "$W" || exit 1
stamp "2. $PRESET ${LAYERS:+(--layers $LAYERS) }checkpoint and export"
$LE toy model --out m --preset "$PRESET" ${LAYERS:+--layers $LAYERS} --dtype float16 || exit 1
stamp "   vision ONNX"
$LE export --model m --out b --target onnx || exit 1
stamp "   language model f16 GGUF"
$LE export --model m --out b --target gguf --llm-outtype f16 || exit 1
du -sh m b/* | sort -h | tail -5

if [ -n "$BUILD_PID" ]; then
  stamp "   waiting for the llama-cpp-python build"
  while kill -0 "$BUILD_PID" 2>/dev/null; do
    if [ "$(left)" -lt 150 ]; then  # too late to measure anything: say how far the build got
      stamp "build unfinished: $(grep -o '\[[0-9]*/[0-9]*\]' "$OUTDIR/build.log" | tail -1) compile steps"
      exit 1
    fi
    sleep 5
  done
  wait "$BUILD_PID"
  stamp "   build finished: $(grep -o '\[[0-9]*/[0-9]*\]' "$OUTDIR/build.log" | tail -1) compile steps"
  tail -3 "$OUTDIR/build.log"
  grep -q "build exit 0" "$OUTDIR/build.log" || { stamp "build failed"; exit 1; }
  export PYTHONPATH=/tmp/lcp:$PYTHONPATH
  for f in $(find /tmp/lcp -name "libggml-cuda*.so*"); do echo "$f"; ldd "$f" | grep -E "cuda|cublas|not found"; done
fi
$PY -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'gpu offload', llama_cpp.llama_supports_gpu_offload())"
if [ -n "${TESTS:-}" ]; then  # the runtime's GPU tests (those without their packages or GPU skip, saying why)
  stamp "2b. pytest: the runtime's GPU paths"
  mkdir -p "$W/pytest" && (cd "$W/pytest" && timeout 200 $PY -m pytest -q -rs -p no:cacheprovider --rootdir "$ROOT" \
    -c "$ROOT/pyproject.toml" "$ROOT/tests/test_runtime_profiles.py" -k "$TESTS") 2>&1 | tail -15
fi
SBS="$PY $ROOT/bench/side_by_side.py --model m --bundle b --out $OUTDIR --device $DEVICE --flash-attn $FLASH_ATTN --rounds $ROUNDS"
stamp "3. mmproj f16 and int8 vision; then one language model at a time, each measured as soon as it exists"
$LE export --model m --out b --target mmproj --dtype fp16 --llm-outtype f16 || exit 1
$LE quantize b --vision int8 || echo "int8 vision failed"
VIS=fp32; [ -f b/vision.int8.onnx ] && VIS=int8,fp32
if $PY -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
  $LE export --model m --out b --target onnx --dtype fp16 || echo "fp16 vision failed"
  VIS=fp32; [ -f b/vision.fp16.onnx ] && VIS=fp16,fp32  # the laptop-gpu profile's choice on onnxruntime's CUDA provider
fi
[ -n "$SECTIONS" ] || LLMS=""  # SECTIONS="": no language-model races
for llm in ${LLMS//,/ }; do
  if [ "$llm" != f16 ]; then
    [ "$(left)" -gt 150 ] || { stamp "no time left for $llm"; break; }
    $LE quantize b --llm "$llm" || { echo "$llm failed"; continue; }
  fi
  stamp "4. side by side: $llm ($SECTIONS, device $DEVICE, vision $VIS), $(left) s left"
  timeout $(( $(left) > 60 ? $(left) - 20 : 40 )) $SBS --sections "$SECTIONS" --llm "$llm" --ttft-vision "$VIS" --mmproj f16
done
if [ -n "${VISION:-1}" ] && [ "$(left)" -gt 120 ]; then
  stamp "5. vision encode: ONNX (onnxruntime's providers here) vs Hugging Face vs llama.cpp's CLIP, $(left) s left"
  timeout $(( $(left) - 10 )) $SBS --sections vision
fi
$LE info b 2>/dev/null | tail -12
stamp "done"
