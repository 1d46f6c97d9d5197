#!/usr/bin/env bash
# Run every benchmark and every evaluation protocol, then regenerate docs/RESULTS.md.
#
#   benchmarks/run_all.sh                      # full runs (minutes; evaluation embeddings
#                                              # are cached per model fingerprint)
#   benchmarks/run_all.sh --smoke              # everything tiny: checks that it all runs
#   benchmarks/run_all.sh --model lite --out results
#
# Writes results/<protocol>.{json,md}, results/plots/*.png and results/benchmarks/*.json.
# A full (non-smoke) run then calls scripts/make_results.py, which copies the JSON to
# docs/results/, the plots to docs/plots/ and rewrites the tables of docs/RESULTS.md.
# Needs MEDLENS_DATA (the sample datasets). Benchmarks that are not present are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
MEDLENS=${MEDLENS:-.venv/bin/medlens}
SMOKE=0
MODEL=lite
OUT=results
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) SMOKE=1; shift ;;
    --model) MODEL="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (use --smoke, --model NAME, --out DIR)" >&2; exit 2 ;;
  esac
done
: "${MEDLENS_DATA:?set MEDLENS_DATA to the sample datasets folder (../shared/data)}"
export MEDLENS_DATA
BENCH="$OUT/benchmarks"
mkdir -p "$BENCH"

run() { echo; echo "==> $*"; "$@"; }
bench() {  # bench SCRIPT ARGS...: run a benchmark script if it exists
  local script="benchmarks/$1"; shift
  if [[ -f "$script" ]]; then run "$PY" "$script" "$@"; else echo "(skipping $script: not present)"; fi
}

if [[ $SMOKE == 1 ]]; then
  bench throughput.py --smoke --model "$MODEL" --out "$BENCH/throughput.json"
  bench analyze_latency.py --smoke --model "$MODEL" --out "$BENCH/analyze_latency.json"
  bench vector_search.py --sizes 1000 --queries 20 --out "$BENCH/vector_search.json"
  bench api_load.py --clients 2 --requests 8 --bare 4 --model "$MODEL" --out "$BENCH/api_load.json"
  bench ingest.py --limit 16 --model "$MODEL" --out "$BENCH/ingest.json"
  bench ood_gate.py --model "$MODEL" --per-set 20 --forced 10 --json "$BENCH/ood_gate.json"
  bench flips.py --model "$MODEL" --limit 6 --json "$BENCH/flips.json"
  bench backbones.py --limit 16 --latency-runs 2 --bootstrap 20 --json "$BENCH/backbones.json"
  bench explain_latency.py --smoke --model "$MODEL" --out "$BENCH/explain_latency.json"
  bench explain_quality.py --model "$MODEL" --limit 4 --steps 4 --out "$OUT/explain_quality.md" \
    --json "$BENCH/explain_quality.json"
  run "$MEDLENS" eval all --model "$MODEL" --limit 20 --out "$OUT"
else
  bench throughput.py --model "$MODEL" --out "$BENCH/throughput.json"
  bench analyze_latency.py --model "$MODEL" --out "$BENCH/analyze_latency.json"
  bench vector_search.py --out "$BENCH/vector_search.json"
  bench api_load.py --model "$MODEL" --out "$BENCH/api_load.json"
  bench ingest.py --model "$MODEL" --out "$BENCH/ingest.json"
  bench ood_gate.py --model "$MODEL" --out docs/ood.md --json "$BENCH/ood_gate.json"
  bench bad_input_table.py --out docs/bad_inputs.md
  bench flips.py --model "$MODEL" --out docs/flips.md --json "$BENCH/flips.json"
  bench backbones.py --train-limit 1400 --out docs/backbones.md --json "$BENCH/backbones.json"
  bench explain_latency.py --model "$MODEL" --out "$BENCH/explain_latency.json"
  bench explain_quality.py --model "$MODEL"
  bench similar_reports.py
  run "$MEDLENS" eval all --model "$MODEL" --out "$OUT"
  run "$PY" scripts/make_results.py --results "$OUT"
fi
echo; echo "done: $OUT/"
