# Sourced by the run_gpu_*.sh scripts on a lent device: installs the Python packages the
# device image lacks from the wheels carried in .whl/ (if any) into /tmp/site, and makes
# Python output unbuffered so that a log cut off by the time limit keeps its last lines.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/grain-*.whl .whl/array_record-*.whl .whl/ml_collections-*.whl \
    .whl/portpicker-*.whl .whl/tensorboardx-*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
