#!/usr/bin/env bash
# The GPU figures of docs/performance.md: ViT-B/16 PMSN train step (official views, batch 128)
# in bf16 with and without remat, then XLA's memory analysis of remat for B/16 and L/16.
#   bash benchmarks/gpu_b16.sh [OUTDIR]     (one H100/H200; jax[cuda], flax, optax installed)
# 989400 GFLOP/s is the H100/H200 SXM dense bf16 datasheet peak; the script also prints the
# bf16 matmul rate it measures.
set -uo pipefail
out=${1:-/tmp/pmsn_gpu_bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
  'optax', optax.__version__, jax.devices())"
run() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 "$@" >"$out/$name.log" 2>&1
  echo "== $name rc=$?"; grep -E "^(backend|img_per_s|\||model=)" "$out/$name.log" \
    || tail -5 "$out/$name.log"
}
B=benchmarks/train_step.py C=benchmarks/configs/vit_b16_bf16.py
# jax 0.11.2's GPU backend gives no cost analysis of a lowering: this is the CPU backend's
# count for the same config (unrolled lowering, batch 128, docs/performance.md).
G=--gflops_per_img=317.83
run b16_bf16 150 $B --config=$C --peak_gflops=989400 --steps=10 $G
run b16_bf16_remat 150 $B --config=$C:remat --peak_gflops=989400 --steps=10 $G
run b16_f32 120 $B --config=$C:f32 --peak_gflops=989400 --steps=5 $G
[ -n "${SKIP_MEMORY:-}" ] || run remat_memory 200 benchmarks/remat_memory.py \
  --models=B/16,L/16 --batch_size=128 --compute_dtype=bfloat16
