#!/bin/bash
# Run here before a GPU machine's loan: gathers what its one command (tools/device_run.sh) needs
# and the machine lacks. It has PyTorch, torchvision, pyarrow, PyYAML, click, NumPy, Pillow,
# scikit-learn, matplotlib and TensorBoard (Python 3.12), no Ray, polars or pydantic, and cannot
# reach a registry. device_cells.py and gpu_check.py run without Ray and polars; raymeta's config
# needs pydantic, so its wheels travel (with typing-extensions), at the versions installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl data device-state
for pkg in pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
  version=$("$python" -c "from importlib.metadata import version; print(version('$pkg'))")
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg==$version"
done
[ -d data/mnist ] || cp -r ../shared/data/mnist data/mnist
[ -f data/cifar10-jpeg.tar.gz ] || cp ../shared/data/cifar10-jpeg.tar.gz data/
du -sch .whl data/mnist data/cifar10-jpeg.tar.gz device-state
echo 'then: run(command="bash tools/device_run.sh", timeout_s=570,'
echo '          carry=[".whl", "data/mnist", "data/cifar10-jpeg.tar.gz", "device-state"])'
