#!/usr/bin/env bash
# Trains every GLUE task present in GLUE_DIR and writes the GLUE leaderboard submission folder
# (one TSV per task, named and spelled as the GLUE server expects) and a results table.
#
#   scripts/glue.sh --bin target/release/qlora-cls --model_dir DIR --glue_dir DIR --out DIR [-- FLAGS]
#
# GLUE_DIR holds GLUE's own folders (CoLA/, SST-2/, MRPC/, QQP/, STS-B/, MNLI/, QNLI/, RTE/,
# WNLI/, diagnostic/) or the HF `glue` layout (cola/, sst2/, ...). FLAGS go to every `train`.
set -euo pipefail

BIN="" MODEL_DIR="" GLUE_DIR="" OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN="$2"; shift 2 ;;
    --model_dir) MODEL_DIR="$2"; shift 2 ;;
    --glue_dir) GLUE_DIR="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "glue.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
for v in BIN MODEL_DIR GLUE_DIR OUT; do
  if [ -z "${!v}" ]; then echo "glue.sh: missing --$(echo "$v" | tr 'A-Z' 'a-z')" >&2; exit 2; fi
done
[ -d "$GLUE_DIR" ] || { echo "glue.sh: GLUE_DIR $GLUE_DIR is not a folder" >&2; exit 2; }

# task name, GLUE's folder, submission file(s) (test split:file ...), label spelling
# (id: the class id; name: the label name; value: the regression value, clipped to 0..5).
TASKS=(
  "cola CoLA test:CoLA.tsv id"
  "sst2 SST-2 test:SST-2.tsv id"
  "mrpc MRPC test:MRPC.tsv id"
  "qqp QQP test:QQP.tsv id"
  "stsb STS-B test:STS-B.tsv value"
  "mnli MNLI test_matched:MNLI-m.tsv,test_mismatched:MNLI-mm.tsv name"
  "qnli QNLI test:QNLI.tsv name"
  "rte RTE test:RTE.tsv name"
  "wnli WNLI test:WNLI.tsv id"
)

# predict CSV (index,prediction,prob_0..) -> GLUE TSV (index<TAB>prediction).
to_submission() { # csv spelling tsv
  awk -F, -v spelling="$2" 'NR == 1 { print "index\tprediction"; next }
    {
      if (spelling == "id") {
        best = 3; for (i = 4; i <= NF; i++) if ($i > $best) best = i; p = best - 3
      } else if (spelling == "value") {
        p = $2 + 0; if (p < 0) p = 0; if (p > 5) p = 5
      } else { p = $2 }
      print $1 "\t" p
    }' "$1" > "$3.tmp" && mv "$3.tmp" "$3"
}

mkdir -p "$OUT/submission" "$OUT/runs"
results="$OUT/results.md"
printf '| task | split | metrics |\n|---|---|---|\n' > "$results.tmp"
trained=0
for entry in "${TASKS[@]}"; do
  read -r name folder files spelling <<< "$entry"
  data=""
  for d in "$GLUE_DIR/$folder" "$GLUE_DIR/$name"; do
    if [ -d "$d" ]; then data="$d"; break; fi
  done
  [ -n "$data" ] || { echo "glue: no $folder/ or $name/ in $GLUE_DIR, skipping $name"; continue; }
  run="$OUT/runs/$name"
  echo "glue: training $name from $data"
  # MRPC keeps the configured prompt (the reference's experiment); the others start with
  # none, since the named prompts ask about sentence pairs (FLAGS may still set one).
  prompt=()
  [ "$name" = mrpc ] || prompt=(--prompt none)
  # Each task is scored on its own evaluation split(s): MNLI on matched and mismatched.
  "$BIN" train --task "$name" --model_dir "$MODEL_DIR" --data_dir "$data" \
    --results_path "$run" "${prompt[@]}" "$@"
  trained=$((trained + 1))
  # eval.csv (epoch,split,loss,metric...,step): one results row per split of the last evaluation.
  awk -F, -v task="$name" 'NR == 1 { for (i = 4; i <= NF; i++) key[i] = $i; next }
    { epoch[NR] = $1; line[NR] = $0; last = $1 }
    END {
      for (r = 2; r <= NR; r++) {
        if (epoch[r] != last) continue
        n = split(line[r], v, ","); cells = ""
        for (i = 4; i <= n; i++) if (key[i] != "step") cells = cells " " key[i] " " v[i]
        printf "| %s | %s |%s |\n", task, v[2], cells
      }
    }' "$run/eval.csv" >> "$results.tmp"
  IFS=, read -r -a parts <<< "$files"
  for part in "${parts[@]}"; do
    split="${part%%:*}"; file="${part#*:}"
    "$BIN" predict --adapter "$run/best_adapter" --model_dir "$MODEL_DIR" --data_dir "$data" \
      --split "$split" --out "$run/pred-$split.csv"
    to_submission "$run/pred-$split.csv" "$spelling" "$OUT/submission/$file"
  done
  if [ "$name" = mnli ] && [ -f "$GLUE_DIR/diagnostic/diagnostic.tsv" ]; then
    "$BIN" predict --adapter "$run/best_adapter" --model_dir "$MODEL_DIR" \
      --input "$GLUE_DIR/diagnostic/diagnostic.tsv" --out "$run/pred-ax.csv"
    to_submission "$run/pred-ax.csv" name "$OUT/submission/AX.tsv"
  fi
done
mv "$results.tmp" "$results"
[ "$trained" -gt 0 ] || { echo "glue: no GLUE task found in $GLUE_DIR" >&2; exit 1; }
echo "glue: $trained task(s); submission in $OUT/submission, results in $results"
