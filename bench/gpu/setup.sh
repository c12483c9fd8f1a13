# Sourced by run_on_device.sh on a GPU machine without network: install the carried wheels
# (bench/gpu/wheels/, see bench/README.md) and register the NVIDIA OpenCL driver next to PoCL.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site bench/gpu/wheels/*.whl >/dev/null 2>&1 || echo "pip failed"
export PYTHONPATH=/tmp/site
mkdir -p /tmp/icd; echo /usr/local/nvidia/lib64/libnvidia-opencl.so.1 > /tmp/icd/nvidia.icd; cp /etc/OpenCL/vendors/pocl.icd /tmp/icd/ 2>/dev/null
export OCL_ICD_VENDORS=/tmp/icd
export PYTHONUNBUFFERED=1
