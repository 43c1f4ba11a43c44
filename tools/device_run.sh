#!/bin/bash
# The one command for a GPU machine lent for minutes (no Ray there, nothing to download):
#   1. raymeta's missing packages from the wheels that tools/device_prepare.sh gathered;
#   2. tools/gpu_check.py, once (its report stays in device-state/, which the next loan carries);
#   3. cells of a sweep (default: CIFAR-10 (JPEG q75), sweeps/cifar10-jpeg-cnn8.yaml, 40%, seed 0)
#      with tools/device_cells.py to a deadline, continuing cells that an earlier loan left off.
# $OUT gets device-state.tar.gz (rows, logs, reports), its checkpoints and the two reports.
# Settings (environment): DEVICE_SECONDS (whole run, default 540), DEVICE (cuda), GPU_CHECK_ARGS,
# SWEEP, CELLS (device_cells.py's --only and --parallel arguments).
set -uf  # no globbing: CELLS holds YAML lists
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT" device-state
budget=${DEVICE_SECONDS:-540}
device=${DEVICE:-cuda}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the checkout: raymeta is not installed there
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $(find .whl -name '*.whl') || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
python3 -c "import torch, raymeta.config; print('torch', torch.__version__, '| cuda:', torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1
[ -d data/cifar10-jpeg/train ] || [ ! -f data/cifar10-jpeg.tar.gz ] ||
  { mkdir -p data/cifar10-jpeg && tar -xzf data/cifar10-jpeg.tar.gz -C data/cifar10-jpeg; }
if [ ! -s device-state/gpu-check.md ]; then
  timeout $((budget * 4 / 9)) python3 tools/gpu_check.py --device "$device" --section-timeout 40 \
    ${GPU_CHECK_ARGS:-} --out device-state/gpu-check.md > /dev/null
  echo "gpu_check: exit $? after $SECONDS s"
fi
python3 tools/device_cells.py "${SWEEP:-sweeps/cifar10-jpeg-cnn8.yaml}" --state device-state \
  --deadline $((budget - SECONDS - 40)) \
  ${CELLS:---only seed=0 --only noise.rate=0.4 --only method.name=[ce,mwnet,metalabelnet] --parallel 3} \
  | tee device-state/cells.md
tar -czf "$OUT/device-state.tar.gz" --exclude=checkpoints device-state
cp device-state/cells.md "$OUT/"; [ -f device-state/gpu-check.md ] && cp device-state/gpu-check.md "$OUT/"
# the checkpoints of unfinished cells, one file each (at most 16 MiB a file and 8 files come back)
for folder in $(find device-state/checkpoints -mindepth 1 -maxdepth 1 -type d); do
  id=$(basename "$folder")
  [ -z "$(find device-state/store/trials -name "$id.parquet" 2>/dev/null)" ] &&
    tar -czf "$OUT/checkpoint-$id.tar.gz" -C device-state checkpoints/"$id"
done
ls -la "$OUT"
