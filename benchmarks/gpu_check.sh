#!/usr/bin/env bash
# Packs on one GPU (issue 18), at most 8 minutes, each part's log under $OUT (default outputs/gpu_packs):
#   tests       tests/test_pack.py (its CUDA tests run here; CI has no GPU and skips them) and tests/test_gpu.py
#   throughput  benchmarks/packs.py: P = 1 2 4 8 16 ResNet-20 members vs solo trials, eager / compile /
#               compile reduce-overhead, bf16, all 55k Fashion-MNIST images, 2 epochs (the second one timed)
#   ablation    specs/ablations/shortcuts.yaml (A/B/C x 3 seeds, 2 epochs) with `cli.py ablate --pack auto` (the
#               memory probe sizes the packs) vs `--pack off`: wall times, test/error per arm (n, mean, std) and the
#               packs each report names
#   bash benchmarks/gpu_check.sh              # every part
#   bash benchmarks/gpu_check.sh throughput   # some parts
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_packs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONPATH=$PWD
status=0

source benchmarks/part.sh   # LIMIT=S part NAME COMMAND...

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for p in ${@:-tests throughput ablation}; do
  case $p in
    tests) LIMIT=120 part tests python -m pytest -q -p no:cacheprovider -rs tests/test_pack.py tests/test_gpu.py \
        -k "cuda or gpu" ;;
    throughput) LIMIT=240 part throughput python benchmarks/packs.py throughput --sizes 1 2 4 8 16 --epochs 2 \
        --solo-trials 1 --set data.train_subset=null ;;
    ablation) rm -rf "$OUT/packed" "$OUT/solo"
      LIMIT=50 part ablation_packed python cli.py ablate specs/ablations/shortcuts.yaml --pack auto --set train.epochs=2 \
        --output-dir "$OUT/packed"
      LIMIT=70 part ablation_solo python cli.py ablate specs/ablations/shortcuts.yaml --pack off --set train.epochs=2 \
        --output-dir "$OUT/solo" ;;
    *) echo "unknown part $p (tests throughput ablation)"; status=2 ;;
  esac
done
exit $status
