#!/bin/bash
# Watch the runs in RUNS until they end or BUDGET_S (from T0) is near; print progress; pack best/ + histories.
set -u
RUNS=$1; BUDGET=$2; T0=${3:-$(date +%s)}
el() { echo $(( $(date +%s) - T0 )); }
summary() { python3 - "$RUNS" <<'PY'
import json, glob, sys
for f in sorted(glob.glob(sys.argv[1] + '/*/history.jsonl')):
    h = [json.loads(l) for l in open(f)]
    best = max(h, key=lambda e: e['val']['mean'])
    print(f.split('/')[-2], 'it', h[-1]['iteration'], 'wall', h[-1]['wall_time_s'], 'best', round(best['val']['mean'], 4),
          'at', best['iteration'], 'curve', [round(e['val']['mean'], 3) for e in h])
PY
}
while [ $(el) -lt $(( BUDGET - 25 )) ] && pgrep -f "accuracy.py --train" > /dev/null; do
  sleep 20; [ $(( $(el) % 120 )) -lt 20 ] && { echo "--- $(el) s"; summary; }
done
echo "=== at $(el) s, still running: $(pgrep -fc 'accuracy.py --train')"; summary
for f in $RUNS/logs/*.log; do echo "== $f"; tail -c 300 $f | tr '\r' '\n' | tail -2; done
X="--exclude=state.safetensors --exclude=last"
tar cf $OUT/a.tar $X $RUNS/icl-7 $RUNS/logs; tar cf $OUT/b.tar $X $RUNS/icl-3 $RUNS/sup-7; tar cf $OUT/c.tar $X $RUNS/sup-3 $RUNS/sup-70
ls -la $OUT
