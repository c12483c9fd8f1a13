#!/bin/bash
# Device run: build the Cython extension, install the carried wheels, register the NVIDIA ICD,
# run the OpenCL tests on the GPU, then the benchmark. Everything lands in $OUT.
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1 AZFILTER_CACHE_DIR=/tmp/azcache
INC=$(python3 -c "import sysconfig;print(sysconfig.get_paths()['include'])")
SUF=$(python3 -c "import sysconfig;print(sysconfig.get_config_var('EXT_SUFFIX'))")
( python3 -m cython -3 --cplus kernels/_engine.pyx -o /tmp/_engine.cpp \
  && g++ -O3 -fopenmp -shared -fPIC -std=c++17 -I"$INC" /tmp/_engine.cpp -o "azfilter/_engine$SUF" \
  && python3 -m cython -3 kernels/_chunks.pyx -o /tmp/_chunks.c \
  && gcc -O3 -shared -fPIC -I"$INC" /tmp/_chunks.c -o "azfilter/_chunks$SUF" ) \
  > "$OUT/build.log" 2>&1 &
BUILD=$!
source bench/gpu/setup.sh
# hdf5plugin is not on the device: a stand-in module (the tests' HDF5 files use gzip only)
python3 -c "import hdf5plugin" 2>/dev/null || echo "# stand-in" > /tmp/site/hdf5plugin.py
wait $BUILD; echo "extension build: $?"; tail -3 "$OUT/build.log"
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current,clocks.sm,clocks.mem --format=csv
python3 -c "import azfilter._engine as e; print('compiled engine', e.__file__)"
python3 -c "import pyFAI, pyopencl; print('pyFAI', pyFAI.version, 'pyopencl', pyopencl.VERSION)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine_opencl.py 2>&1 | tail -15 | tee "$OUT/tests.log"
timeout 400 python3 bench/bench_opencl.py --pyfai --upload-study --stream 1000 \
  --json "$OUT/bench.json" --markdown "$OUT/bench.md" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^  \["
