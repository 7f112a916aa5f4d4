#!/usr/bin/env bash
# Every GPU figure of README's Performance section, in order, each part's log under $OUT (default outputs/gpu).
# Needs a CUDA machine with reslab's packages (torchvision too, for the comparison and nvJPEG) and
# Fashion-MNIST where reslab finds it ($RESLAB_DATA, /usr/share/datasets/fashion-mnist, ...).
#   bash benchmarks/gpu_all.sh                      # the default parts: about 30 minutes on one H100
#   bash benchmarks/gpu_all.sh tests throughput     # some parts
# Parts: tests throughput overhead single share numerics ablation feed, and degradation (hours: the paper's
# full schedule, 12 nets)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
COMPILE=${COMPILE:-reduce-overhead}   # train.compile for the multi-trial parts (the fastest setting of `single`)
status=0

source benchmarks/part.sh   # part NAME COMMAND...

for p in ${@:-tests throughput overhead single share numerics ablation feed}; do
  case $p in
    tests) part tests python -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_arches.py \
        -k "not console_script" ;;   # (the console script exists only where README's setup ran pip install -e .)
    throughput) part throughput python benchmarks/torchvision_throughput.py ;;
    overhead)
      part overhead_resnet20 python benchmarks/overhead.py --device cuda --depth 0 --steps 300 --repeats 5
      part overhead_resnet50 python benchmarks/overhead.py --device cuda --spec specs/resnet50.yaml --depth 0 \
        --steps 30 --repeats 3 ;;
    single) part single python benchmarks/small_nets.py single to93 ;;
    share) part share python benchmarks/small_nets.py share --set train.compile=$COMPILE ;;
    numerics) part numerics python benchmarks/small_nets.py ablation --file specs/ablations/gpu_numerics.yaml ;;
    ablation) part ablation python benchmarks/small_nets.py ablation --file specs/ablations/shortcuts_gpu.yaml \
        --set train.compile=$COMPILE ;;
    feed) part feed python benchmarks/imagefolder_feed.py ;;
    degradation) part degradation python benchmarks/small_nets.py ablation \
        --file specs/ablations/degradation_gpu.yaml --set train.compile=$COMPILE ;;
    *) echo "unknown part '$p'"; status=2 ;;
  esac
done
exit $status
