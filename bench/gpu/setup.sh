# Sourced on a GPU machine without network (see bench/README.md): builds every Cython kernel
# (kernels/*.pyx, as kernels/meson.build does) in place with g++, installs the wheels carried
# in bench/gpu/wheels/ (+ the trimmed imagecodecs and hdf5plugin folders in
# bench/gpu/wheels/pydirs/), and registers NVIDIA's OpenCL driver next to PoCL.
# Use: cd REPO && source bench/gpu/setup.sh   (build log in ${OUT:-/tmp}/build.log)
export PYTHONUNBUFFERED=1 AZFILTER_CACHE_DIR=${AZFILTER_CACHE_DIR:-/tmp/azcache}
# Bytecode in a writable place: the machine's numpy cannot write its __pycache__ and the
# wheels are installed --no-compile, so every fresh process compiled ~0.4 s of sources
# (py-spy, H200 machine) where an installed package loads its .pyc; both tools gain.
# The machine also sets PYTHONDONTWRITEBYTECODE=1: with it, no .pyc was ever written to the
# prefix, which then hid the standard library's own .pyc files too, and every fresh process
# compiled every module it imported (2026-11-29: `import numpy, h5py, click` 0.62-0.71 s;
# py-spy: 84 % of the command's import time in SourceLoader.source_to_code). An installed
# package has its bytecode; so do both tools here, from their first run on.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pycache
_azf_build() {
    local inc suf pyx name
    inc=$(python3 -c "import sysconfig;print(sysconfig.get_paths()['include'])")
    suf=$(python3 -c "import sysconfig;print(sysconfig.get_config_var('EXT_SUFFIX'))")
    for pyx in kernels/*.pyx; do
        name=$(basename "$pyx" .pyx)
        ( python3 -m cython -3 --cplus -X boundscheck=False -X wraparound=False \
              -X cdivision=True -X initializedcheck=False "$pyx" -o "/tmp/$name.cpp" \
          && g++ -O3 -fopenmp -shared -fPIC -std=c++17 -I"$inc" -Ikernels "/tmp/$name.cpp" \
              -o "azfilter/$name$suf" ) || { echo "build of $pyx failed"; return 1; }
    done
}
_azf_build > "${OUT:-/tmp}/build.log" 2>&1 &
_AZF_BUILD=$!
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site bench/gpu/wheels/*.whl >/dev/null 2>&1 || echo "pip failed"
export PYTHONPATH=$PWD/bench/gpu/wheels/pydirs:/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
mkdir -p /tmp/icd; echo /usr/local/nvidia/lib64/libnvidia-opencl.so.1 > /tmp/icd/nvidia.icd
cp /etc/OpenCL/vendors/pocl.icd /tmp/icd/ 2>/dev/null
export OCL_ICD_VENDORS=/tmp/icd
wait $_AZF_BUILD && echo "extensions built: $(ls azfilter/*.so | xargs -n1 basename | tr '\n' ' ')" \
    || { echo "extension build failed:"; tail -20 "${OUT:-/tmp}/build.log"; }
