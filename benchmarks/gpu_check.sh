#!/usr/bin/env bash
# The GPU checks, as one call of the device tool (a lent H100/H200 has 15 minutes in all).
#
# Prepare here first (no device time), in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl open_clip_torch==3.3.0 ftfy wcwidth inf-cl        # ~2.4 MB; the image has the rest
# Then: device run, carry [".whl"], timeout_s 600, command "bash benchmarks/gpu_check.sh".
# Budget: the parts' limits below sum to 570 s, plus ~30 s of installs, within 600 (the
# per-call maximum: a part that needs more must come out of another's limit).
# Everything lands in $OUT (JSON + tables + logs); commit them under benchmarks/results/<gpu>/.
#
# Order: correctness before speed (the GPU tests), then the loss and k-means benchmarks, each
# under its own timeout so one slow part cannot take the others' results with it.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3

if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
fi
# The C++ matcher is built too (mode_fast imports it); the image has cmake and pybind11.
$PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"

status=0
run() {  # run NAME SECONDS CMD...: log to $OUT/NAME.log, keep going on failure
    local name=$1 secs=$2; shift 2
    echo "== $name (limit ${secs}s)"
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -5 "$OUT/$name.log"
    [ $rc -eq 0 ] || { echo "!! $name exited $rc"; status=1; }
}

# 1. correctness on the GPU: the kernels against the torch backends and references. The
#    contrastive CUDA test covers every path a GPU run takes: the square kernel (one process,
#    plain all-gather), the rectangular rows kernel (local_loss's two directions, InfoNCE at
#    an offset), two ring steps merging the running LSE, and SigLIP's negatives-only block,
#    in fp32/fp16/bf16; test_dispatch checks auto picks Triton for each on this device.
#    The multi-rank settings themselves need 2+ GPUs (nccl); here they run on gloo/CPU in
#    tests/test_loss_distributed_triton.py, through the same kernels interpreted.
#    (tests/test_kernels_compile.py is left to CI: a static check, no GPU needed, minutes of
#    compiling on a fresh cache.)
run tests 140 $PY -m pytest -q -x -p no:cacheprovider tests/test_contrastive_loss_triton.py tests/test_kmeans_assign.py \
    tests/test_contrastive_loss.py tests/test_dispatch.py
# 2. speed: the loss vs open_clip and Inf-CL, the rectangular kernels (a rank's share of 8)
#    vs open_clip's arithmetic; k-means assign vs torch (and faiss where importable)
run loss 150 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_contrastive_loss.py -k "not triton_variant" \
    --benchmark-json "$OUT/contrastive_loss.json"
# 3. every Triton variant of the loss at B = 32k, D = 768 (bf16, fp32): autotuned with the
#    atomic and the column-owned backward, deterministic=True, and each pinned (forward
#    config, backward config, backward mode), each checked against the torch backend first
run loss_variants 100 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_contrastive_loss.py -k triton_variant \
    --benchmark-json "$OUT/contrastive_variants.json"
run kmeans 80 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_kmeans_assign.py -k "not gpu_variant" \
    --benchmark-json "$OUT/kmeans_assign.json"
# 4. every k-means config, the autotuned pick and deterministic=True (its own script)
run kmeans_variants 50 bash benchmarks/gpu_kmeans_variants.sh "$PY"
cp benchmarks/results/*/kmeans_variants.* "$OUT"/ 2>/dev/null  # it writes under the repo; bring it back

# 5. SemDeDup's within-cluster step: the compiled Triton kernel against the torch path in
#    fp32/fp16/bf16 (every launch config, exact copies), then timed against the public code's
#    dense n x n method and the torch path (n = 16k and 64k, D = 768)
run semdedup 50 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_semdedup_kernel.py benchmarks/bench_semdedup.py \
    --benchmark-json "$OUT/semdedup.json"

for j in "$OUT"/*.json; do
    [ -f "$j" ] && $PY benchmarks/report.py "$j" --out "${j%.json}.md" > /dev/null
done
cat "$OUT"/*.md 2>/dev/null | grep -E "^(###|\| )" | cut -c1-160
exit $status
