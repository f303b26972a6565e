# Sourced by the scripts in experiments/gpu/ with their arguments:
#   OUTDIR [--wheels DIR] [--data DIR] [--platform gpu|tpu|cpu] [--quick]
# Parses them (out, wheels, data, platform, quick), moves to the repository root,
# installs this checkout with the extras in $extras (set by the script) from its own
# pyproject.toml (offline from the wheels in --wheels DIR when given), and records
# where the outputs come from in OUTDIR/environment.json (commit, whole-tree dirty
# flag, CPU, package versions, date) and OUTDIR/devices.txt.
usage="usage: bash $0 OUTDIR [--wheels DIR] [--data DIR] [--platform gpu|tpu|cpu] [--quick]"
[ $# -ge 1 ] && [ "${1#--}" = "$1" ] || { echo "$usage" >&2; exit 2; }
out=$1; shift
wheels="" data="" platform=gpu quick=""
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) wheels=$(realpath "$2"); shift 2 ;;
    --data) data=$(realpath "$2"); shift 2 ;;
    --platform) platform=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
mkdir -p "$out" && out=$(realpath "$out")
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
if [ -n "$wheels" ]; then  # No internet: every package from the folder of wheels.
  python3 -m pip install -q --no-index --find-links "$wheels" --no-build-isolation \
    -e ".[$extras]" || { echo "could not install .[$extras] from $wheels" >&2; exit 1; }
else
  python3 -m pip install -q -e ".[$extras]" || { echo "could not install .[$extras]" >&2; exit 1; }
fi
export PYTHONUNBUFFERED=1  # A log cut off by a time limit keeps its last lines.
python3 -m experiments.harness.provenance --out "$out/environment.json"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  python3 -c "import jax; print(jax.__version__, jax.devices())"; } > "$out/devices.txt" 2>&1
