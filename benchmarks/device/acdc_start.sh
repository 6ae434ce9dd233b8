#!/bin/bash
# Start the acdc variants as daemons (they outlive this call), watch them until BUDGET_S, pack interim results.
# Usage: bash .devrun/start.sh N RAMPUP TRAIN_MINUTES BUDGET_S
set -u
T0=$(date +%s); N=$1; R=$2; MM=$3; BUDGET=$4
el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
mkdir -p ../shared && (xz -dc -T4 .devdata/acdc.tar.xz | tar xf - -C ../shared) || exit 4
find ../shared/data/acdc -name '*.nii' -print0 | xargs -0 -P16 -n10 gzip -1
echo "setup done at $(el) s"
RUNS=runs/gpu$N; mkdir -p $RUNS/logs; echo $PWD > /tmp/repo_dir
for v in icl-7 icl-3 sup-7 sup-3 sup-70; do
  setsid nohup env PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 \
    python3 benchmarks/accuracy.py --train $v --device cuda --threads 2 --max-minutes $MM --runs-dir $RUNS \
    --set iterations=$N rampup_iterations=$R > $RUNS/logs/$v.log 2>&1 < /dev/null &
done
bash benchmarks/device/watch.sh $RUNS $BUDGET $T0
