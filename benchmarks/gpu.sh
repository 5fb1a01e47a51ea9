#!/usr/bin/env bash
# benchmarks/gpu.sh: the GPU rows of docs/results.md (section "GPU"), measured in one prepared run.
#
# What it measures, on one CUDA GPU, with random weights (nothing is downloaded):
#   1. head against HF's: benchmarks/head_vs_hf.py --device cuda --dtype bf16 (bf16 autocast, fp32 weights)
#   2. whole-model training throughput, 512 px, bf16, against the model with transformers' UperNetHead:
#      benchmarks/train_throughput.py --device cuda --hf-head, DINOv3 ViT-B/16 and ViT-L/16 (batch 2)
#   3. the large-backbone table: benchmarks/model_memory.py --large --device cuda (the step's
#      torch.cuda.max_memory_allocated): ViT-L/16 at 1024 px, ViT-g/14 at 518 px, DINOv3-7B (LoRA) at 512 px;
#      the random bfloat16 weights files are written first (7B: 13.4 GB in $WEIGHTS_DIR, kept for a rerun)
#   4. a short demo training run: upernet-vit train demo -o train.amp=bf16 -o train.device=cuda
#
# How long: at most 8 minutes on one H100/H200. Every step runs under `timeout` with its own budget;
# time a step leaves unused goes to the next, and the budgets add up to 465 s from the script's start, so
# one slow step cannot eat the others'. A step that fails or times out gets a row saying so; the script
# goes on. GPU_SH_DEADLINE_S=300 shrinks every budget in proportion (when little GPU time is left).
#
# How to run (from anywhere; it works in the repository root):
#   bash benchmarks/gpu.sh [--setup] [--dry-run] [OUT_DIR]
#   PYTHON=python3 bash benchmarks/gpu.sh /tmp/gpu     # the interpreter (default .venv/bin/python, else python3)
# OUT_DIR (default benchmarks/out-gpu-<date>) gets gpu_results.md (Markdown sections ready to paste into
# docs/results.md, each with the GPU's name, torch version, date and the exact command of each step) and
# logs/ (each step's raw output).
#   --setup    first `pip install --no-build-isolation -e ".[dev]"` into $PYTHON (no network needed when
#              the dependencies are there; falls back to --no-deps). torch must already be installed:
#              pip cannot fetch it on a machine without internet. Not counted in the 8 minutes. Without
#              --setup nothing needs installing: the steps run with PYTHONPATH=<repo>.
#   --dry-run  run nothing: gpu_results.md with every row "not yet measured" and the commands that fill it.
# Needs torch, timm, peft, safetensors, pyyaml; transformers for the HF comparisons (without it those rows
# say so and the throughput runs our model alone).
#
# Without a GPU (torch.cuda.is_available() false, or DEVICE=cpu) it runs a CPU smoke run instead: the same
# steps at tiny sizes (a ViT-S at 64 px, one demo epoch of 4 iterations), a few minutes on 2 cores. It only
# shows that the script runs end to end; its figures are labelled as such and are not for docs/results.md.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SETUP=0 DRY=0 OUT=""
for arg in "$@"; do
    case $arg in
        --setup) SETUP=1 ;;
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) OUT=$arg ;;
    esac
done
OUT=${OUT:-$REPO/benchmarks/out-gpu-$(date +%Y-%m-%d)}
mkdir -p "$OUT/logs" && OUT=$(cd "$OUT" && pwd) || exit 1
cd "$REPO" || exit 1

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WEIGHTS_DIR=${WEIGHTS_DIR:-/tmp/upernet-vit-benchmark-weights}
RESULTS=$OUT/gpu_results.md

if [ "$SETUP" = 1 ] && [ "$DRY" = 0 ]; then
    echo "== setup: pip install -e .[dev] into $PYTHON"
    "$PYTHON" -m pip install --no-build-isolation -e ".[dev]" >"$OUT/logs/setup.log" 2>&1 \
        || { echo "   .[dev] did not install (see logs/setup.log); installing the package alone (--no-deps)";
             "$PYTHON" -m pip install --no-build-isolation --no-deps -e . >>"$OUT/logs/setup.log" 2>&1; } \
        || { echo "gpu.sh: pip install failed, see $OUT/logs/setup.log" >&2; exit 1; }
fi

START=$(date +%s)  # the 8 minutes count from here (--setup excluded)

# ---------------------------------------------------------------- the machine
if [ "$DRY" = 1 ]; then
    DEVICE=cuda
else
    if [ -z "${DEVICE:-}" ]; then
        DEVICE=$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")') \
            || { echo "gpu.sh: $PYTHON cannot import torch" >&2; exit 1; }
    fi
fi
if [ "$DRY" = 1 ]; then
    MACHINE="not yet measured" TORCH="" HAVE_HF=1
else
    # one interpreter start: the device's name (timing.device_name), torch's version, whether transformers is there
    { read -r MACHINE; read -r TORCH; read -r HAVE_HF; } < <("$PYTHON" - "$DEVICE" <<'EOF'
import importlib.util, sys
import torch
sys.path.insert(0, "benchmarks")
from timing import device_name
d = torch.device(sys.argv[1])
extra = f", CUDA {torch.version.cuda}, {torch.cuda.get_device_properties(d).total_memory / 2**30:.0f} GiB" if d.type == "cuda" else ""
print(device_name(d) + extra)
print(torch.__version__)
print(int(importlib.util.find_spec("transformers") is not None))
EOF
)
fi
DATE=$(date +%Y-%m-%d)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null | head -1)" ]; then COMMIT="$COMMIT with local changes"; fi

# ---------------------------------------------------------------- what runs, per device
# Each step: a name, a budget (s) and its command. Budgets add up to DEADLINE_S.
if [ "$DEVICE" = cpu ]; then
    SMOKE=1 DEADLINE_S=${GPU_SH_DEADLINE_S:-900} LABEL=" [CPU smoke run: not figures to publish]"
    LARGE_ROWS=(smoke)
    HEAD_ARGS=(--device cpu --dtype bf16 --settings T --repeats 2)
    THR_CONFIGS=("ViT-S/16 (DINOv3) cut to 4 blocks, decoder width 64, 64 px, batch 2 [smoke run]|configs/dinov3_large.yaml -o model.backbone_size=small -o model.backbone_kwargs={depth:4} -o model.decoder.hidden_size=64 -o data.patch_size=[64,64]")
    THR_ARGS=(--device cpu --amp bf16 --iterations 7)
    DEMO_ARGS=(-o train.amp=bf16 -o train.device=cpu -o train.num_epochs=1 -o train.num_iterations_per_epoch=4
               -o train.num_val_iterations_per_epoch=1 -o data.demo_cases=10)
    B_HEAD=150 B_THR=(150) B_WEIGHTS=(60) B_LARGE=(300) B_DEMO=180
else
    SMOKE=0 DEADLINE_S=${GPU_SH_DEADLINE_S:-465} LABEL=""
    LARGE_ROWS=(vit_l vit_g dinov3_7b)
    HEAD_ARGS=(--device "$DEVICE" --dtype bf16 --repeats 20)
    THR_CONFIGS=("ViT-B/16 (DINOv3), 512 px, batch 2|configs/dinov3_large.yaml -o model.backbone_size=base"
                 "ViT-L/16 (DINOv3), 512 px, batch 2|configs/dinov3_large.yaml")
    THR_ARGS=(--device "$DEVICE" --amp bf16 --iterations 25)
    DEMO_ARGS=(-o train.amp=bf16 -o train.device="$DEVICE" -o train.num_epochs=6)
    # B_WEIGHTS: writing a row's weights file, when $WEIGHTS_DIR lacks it (the 7B's: 13.4 GB of random bf16)
    B_HEAD=25 B_THR=(30 50) B_WEIGHTS=(10 20 75) B_LARGE=(50 50 105) B_DEMO=50
fi
[ "$HAVE_HF" = 1 ] && THR_ARGS+=(--hf-head)

# weights files model_memory.py --large looks for (its naming: <backbone>_<size>_random_bf16.safetensors)
weights_file() {
    case $1 in
        vit_l) echo "$WEIGHTS_DIR/dinov3_large_random_bf16.safetensors" ;;
        vit_g) echo "$WEIGHTS_DIR/dinov2_giant_random_bf16.safetensors" ;;
        dinov3_7b) echo "$WEIGHTS_DIR/dinov3_7b_random_bf16.safetensors" ;;
        smoke) echo "$WEIGHTS_DIR/dinov3_small_random_bf16.safetensors" ;;
    esac
}
row_label() {  # as model_memory.py's LARGE_ROWS and SMOKE_ROWS name them
    case $1 in
        vit_l) echo "ViT-L/16 (DINOv3), 1024 px, batch 2" ;;
        vit_g) echo "ViT-g/14 (DINOv2), 518 px, batch 2" ;;
        dinov3_7b) echo "DINOv3-7B/16, 512 px, batch 1" ;;
        smoke) echo "ViT-S/16 (DINOv3), 64 px, batch 1 [smoke run]" ;;
    esac
}
weights_args() {
    case $1 in
        vit_l) echo "--backbone dinov3 --size large" ;;
        vit_g) echo "--backbone dinov2 --size giant" ;;
        dinov3_7b) echo "--backbone dinov3 --size 7b" ;;
        smoke) echo "--backbone dinov3 --size small" ;;
    esac
}

# the nominal budgets still to come (what later steps are owed); the rest of the deadline is the current step's
PENDING=$(( B_HEAD + B_DEMO ))
for b in "${B_THR[@]}"; do PENDING=$(( PENDING + b )); done
for i in "${!LARGE_ROWS[@]}"; do
    PENDING=$(( PENDING + B_LARGE[i] ))
    [ -f "$(weights_file "${LARGE_ROWS[i]}")" ] || PENDING=$(( PENDING + B_WEIGHTS[i] ))
done
# budgets over DEADLINE_S (GPU_SH_DEADLINE_S) shrink in proportion: NUM/DEN
if [ "$PENDING" -gt "$DEADLINE_S" ]; then NUM=$DEADLINE_S DEN=$PENDING; else NUM=1 DEN=1; fi
DEADLINE=$(( START + DEADLINE_S ))  # the probe above comes out of the first step's time

# ---------------------------------------------------------------- running a step
STEPS=""  # the step table at the end of gpu_results.md
quote() {  # the command as one line to paste: words with other characters than these in single quotes
    local out="" a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./=:,+@-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
    done
    printf '%s' "${out% }"
}

# run_step NAME BUDGET CMD...: CMD under timeout, output to logs/NAME.log. Sets STEP_STATUS (ok, failed (exit
# N), timed out after N s, not yet measured), STEP_S, STEP_CMD, STEP_LOG.
run_step() {
    local name=$1 budget=$2; shift 2
    PENDING=$(( PENDING - budget ))
    local limit=$(( DEADLINE - $(date +%s) - PENDING * NUM / DEN ))
    [ "$limit" -lt 5 ] && limit=5
    STEP_CMD=$(quote "$@") STEP_LOG="logs/$name.log" STEP_S=0
    if [ "$DRY" = 1 ]; then
        STEP_STATUS="not yet measured"
        return
    fi
    echo "== $name (limit ${limit} s): $STEP_CMD"
    local t0 rc
    t0=$(date +%s)
    { echo "\$ $STEP_CMD"; echo; } >"$OUT/$STEP_LOG"
    timeout -k 10 "$limit" "$@" >>"$OUT/$STEP_LOG" 2>&1
    rc=$?
    STEP_S=$(( $(date +%s) - t0 ))
    case $rc in
        0) STEP_STATUS="ok" ;;
        124|137) STEP_STATUS="timed out after ${limit} s" ;;
        *) STEP_STATUS="failed (exit $rc)" ;;
    esac
    echo "   $STEP_STATUS, ${STEP_S} s"
    STEPS+="| $name | $STEP_STATUS | $STEP_S | $limit | [$STEP_LOG]($STEP_LOG) |"$'\n'
}

# the last line of a log that is not blank (a failure's message)
last_line() { grep -v '^[[:space:]]*$' "$OUT/$1" | tail -1 | tr '|' '/' | cut -c1-200; }
# the Markdown table lines a script printed (its header too with $2 = header)
table_rows() { grep '^|' "$OUT/$1" | { if [ "$2" = header ]; then cat; else grep -v '^|---' | tail -n +2; fi; }; }
# a script's "# ..." line (device, torch, threads), as text
script_header() { grep -m1 '^# ' "$OUT/$1" | sed 's/^# //'; }
add_status_note() {  # under a table, when the step did not end well
    case $STEP_STATUS in
        ok|"not yet measured") ;;
        *) add ""; add "**This step $STEP_STATUS** ([log]($STEP_LOG)): \`$(last_line "$STEP_LOG")\`" ;;
    esac
}
machine_line() {
    if [ "$DRY" = 1 ]; then
        echo "**Machine:** not yet measured (one CUDA GPU). **Date:** not yet measured."
    else
        echo "**Machine:** $MACHINE; torch $TORCH; commit $COMMIT. **Date:** $DATE.$LABEL"
    fi
}

# the run folder's metrics.csv as a Markdown table
demo_table() {
    "$PYTHON" - "$1" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print("| epoch | train loss | val Dice (fg mean) | EMA Dice | epoch time (s) |\n|---|---|---|---|---|")
for r in rows:
    print(f"| {r['epoch']} | {float(r['train_loss']):.3f} | {float(r['val_dice_mean']):.3f} | {float(r['ema_dice']):.3f} "
          f"| {float(r['epoch_time_s']):.1f} |")
EOF
}

# the sections, each in its own variable (they run in another order than the page shows them)
SEC_LARGE="" SEC_HEAD="" SEC_THR="" SEC_DEMO="" CUR=SEC_HEAD
add() { printf -v "$CUR" '%s%s\n' "${!CUR}" "$*"; }

# ---------------------------------------------------------------- 1. head against HF's, bf16
CUR=SEC_HEAD
add "### Head against HF's, bf16$LABEL"
add ""
if [ "$HAVE_HF" = 1 ]; then
    run_step head_vs_hf "$B_HEAD" "$PYTHON" benchmarks/head_vs_hf.py "${HEAD_ARGS[@]}"
    add "Our \`UperNetHead\` (as built, and after \`optimize()\` with the train and eval defaults' flags) against"
    add "transformers' \`UperNetHead\`, same weights and inputs, under bf16 autocast with float32 weights; median"
    add "time per call and the ratio to HF's; max |diff| of the outputs against HF's."
    add ""
    add "**Command:** \`$STEP_CMD\`. $(machine_line)"
    add ""
    if [ "$DRY" = 1 ]; then
        add "| setting | mode | figure |"; add "|---|---|---|"
        add "| ViT-S-like 256px, ViT-B-like 512px | eval, eval + fuse_bn, train | not yet measured: \`bash benchmarks/gpu.sh\` |"
    else
        hdr=$(script_header "$STEP_LOG"); [ -n "$hdr" ] && add "Printed: \`$hdr\`" && add ""
        add "$(table_rows "$STEP_LOG" header)"
        add_status_note
    fi
else
    add "Not run: transformers is not installed for \`$PYTHON\` (\`pip install transformers\`, or \`--setup\`)."
    STEPS+="| head_vs_hf | skipped: no transformers | 0 | 0 | |"$'\n'
fi
add ""

# ---------------------------------------------------------------- 2. whole-model training throughput
CUR=SEC_THR
add "### Whole-model training throughput, bf16, against the HF-head model$LABEL"
add ""
add "Images/s of the training step (forward, backward, AdamW step; batches prepared first, 5 warm-up"
add "iterations) on the recipe's patches, random weights. \`HF head\`: transformers' \`UperNetHead\` in place of"
add "ours (same backbone and pyramid); \`ours, batchnorm, no dropout\`: HF's head's math with our fast paths"
add "(\`optimize()\`, as \`upernet-vit train\` applies); \`ours, as configured\`: the recipe's decoder. Peak memory:"
add "\`torch.cuda.max_memory_allocated\` over the run."
if [ "$HAVE_HF" = 0 ]; then
    add ""
    add "transformers is not installed for \`$PYTHON\`: the HF-head rows are not run, only our model."
fi
add ""
add "$(machine_line)"
add ""
for i in "${!THR_CONFIGS[@]}"; do
    title=${THR_CONFIGS[i]%%|*}
    read -r -a thr_config <<<"${THR_CONFIGS[i]#*|}"
    run_step "throughput_$i" "${B_THR[i]}" "$PYTHON" benchmarks/train_throughput.py "${thr_config[@]}" "${THR_ARGS[@]}"
    add "**$title.** **Command:** \`$STEP_CMD\`."
    add ""
    if [ "$DRY" = 1 ]; then
        add "| model | amp | images/s | vs HF head | peak memory (GiB) |"; add "|---|---|---|---|---|"
        add "| HF head, ours | bf16 | not yet measured: \`bash benchmarks/gpu.sh\` | | |"
    else
        add "$(table_rows "$STEP_LOG" header)"
        add_status_note
    fi
    add ""
done

# ---------------------------------------------------------------- 3. large backbones (shown first)
CUR=SEC_LARGE
add "### Large backbones on one GPU$LABEL"
add ""
add "As [Large backbones](#large-backbones) (weights files of random bfloat16 values, two training steps, the"
add "second measured), on the GPU: \`step peak\` is \`torch.cuda.max_memory_allocated\` over the second step"
add "(GiB); \`build peak\` is still the host process's (\`RssAnon\`); times in s. A set-up whose estimate is over"
add "85% of the GPU's memory is not run."
add ""
add "$(machine_line)"
add ""
LARGE_TABLE="" LARGE_CMDS="" LARGE_NOTES=""
for i in "${!LARGE_ROWS[@]}"; do
    row=${LARGE_ROWS[i]}
    weights=$(weights_file "$row")
    if [ ! -f "$weights" ]; then
        [ "$DRY" = 1 ] || mkdir -p "$WEIGHTS_DIR"
        # model_memory.py writes it atomically (a hidden temporary file, renamed when whole)
        # shellcheck disable=SC2046
        run_step "weights_$row" "${B_WEIGHTS[i]}" "$PYTHON" benchmarks/model_memory.py --write-weights "$weights" \
            $(weights_args "$row")
        # a write killed by its time limit leaves its temporary file: 13.4 GB for the 7B
        [ "$STEP_STATUS" = ok ] || [ "$DRY" = 1 ] || rm -f "$WEIGHTS_DIR/.$(basename "$weights").tmp-"*
        [ "$STEP_STATUS" = ok ] || [ "$DRY" = 1 ] || LARGE_NOTES+="- weights for \`$row\`: $STEP_STATUS ([log]($STEP_LOG))"$'\n'
        if [ "$DRY" = 1 ]; then took=""; else took="; $STEP_S s"; fi
        LARGE_CMDS+="- \`$STEP_CMD\` (the weights file$took)"$'\n'
    fi
    run_step "large_$row" "${B_LARGE[i]}" "$PYTHON" benchmarks/model_memory.py --large --device "$DEVICE" \
        --rows "$row" --weights-dir "$WEIGHTS_DIR" --keep-going
    LARGE_CMDS+="- \`$STEP_CMD\`"$'\n'
    if [ "$DRY" = 1 ]; then
        [ -z "$LARGE_TABLE" ] && LARGE_TABLE="| backbone, input | set-up | figure |"$'\n'"|---|---|---|"$'\n'
        LARGE_TABLE+="| $(row_label "$row") | LoRA + ckpt + bf16; the same, vitdet pyramid; fp32 default | not yet measured: \`bash benchmarks/gpu.sh\` |"$'\n'
        continue
    fi
    if [ -z "$LARGE_TABLE" ] && grep -q '^| backbone' "$OUT/$STEP_LOG"; then
        LARGE_TABLE="$(grep -m1 '^| backbone' "$OUT/$STEP_LOG")"$'\n'"$(grep -m1 '^|---' "$OUT/$STEP_LOG")"$'\n'
    fi
    rows=$(table_rows "$STEP_LOG" rows)
    [ -n "$rows" ] && LARGE_TABLE+="$rows"$'\n'
    [ "$STEP_STATUS" = ok ] || LARGE_TABLE+="| $(row_label "$row") | the set-ups not listed above | $STEP_STATUS: \`$(last_line "$STEP_LOG")\` | | | | |"$'\n'
done
add "**Commands:**"
add ""
add "$LARGE_CMDS"
add "${LARGE_TABLE%$'\n'}"
[ -n "$LARGE_NOTES" ] && add "" && add "${LARGE_NOTES%$'\n'}"
add ""

# ---------------------------------------------------------------- 4. demo training run
CUR=SEC_DEMO
add "### A short demo training run, bf16$LABEL"
add ""
DEMO_DIR=$OUT/demo_run
rm -rf "$DEMO_DIR"
run_step demo_train "$B_DEMO" "$PYTHON" -m upernet_vit train demo "${DEMO_ARGS[@]}" --output "$DEMO_DIR"
add "The recipe \`demo\` (a random-init ViT, patch 8, depth 4, width 96, on the built-in synthetic data), with"
add "\`train.amp: bf16\`. Per epoch: training loss, validation Dice (foreground mean), its EMA and the epoch's time,"
add "from the run folder's \`metrics.csv\`."
add ""
add "**Command:** \`$STEP_CMD\` (as \`upernet-vit train demo ...\`). $(machine_line)"
add ""
if [ "$DRY" = 1 ]; then
    add "| epoch | train loss | val Dice (fg mean) | EMA Dice | epoch time (s) |"; add "|---|---|---|---|---|"
    add "| - | not yet measured: \`bash benchmarks/gpu.sh\` | | | |"
elif [ -f "$DEMO_DIR/metrics.csv" ]; then
    add "$(demo_table "$DEMO_DIR/metrics.csv")"
    done_line=$(grep -m1 '^done:' "$OUT/$STEP_LOG")
    add ""
    add "Whole command: ${STEP_S} s (process start, data, model build, training, validation, checkpoints)."
    [ -n "$done_line" ] && add "It printed: \`$done_line\`."
    add_status_note
else
    add "No epoch finished."
    add_status_note
fi
add ""

# ---------------------------------------------------------------- gpu_results.md
TOTAL=$(( $(date +%s) - START ))
{
    echo "# GPU results, from benchmarks/gpu.sh"
    echo
    if [ "$DRY" = 1 ]; then
        echo "Dry run (\`--dry-run\`): nothing was measured. \`bash benchmarks/gpu.sh\` on a machine with one CUDA GPU"
        echo "fills every row (8 minutes at most)."
    elif [ "$SMOKE" = 1 ]; then
        echo "> **CPU smoke run.** No CUDA GPU was found (\`torch.cuda.is_available()\` is false), so every step ran on"
        echo "> the CPU at tiny sizes, only to show that the script runs end to end. These figures are not for"
        echo "> docs/results.md. Run \`bash benchmarks/gpu.sh\` on a machine with one CUDA GPU for the real rows."
    else
        echo "Ready to paste into docs/results.md, section GPU (each section names its machine, torch and date)."
    fi
    echo
    echo "**Machine:** $MACHINE${TORCH:+; torch $TORCH}. **Date:** $DATE. **Commit:** $COMMIT. **Python:** \`$PYTHON\`."
    [ "$DRY" = 1 ] || echo "**Wall time of the whole script:** $TOTAL s (deadline $DEADLINE_S s)."
    echo
    printf '%s' "$SEC_LARGE" "$SEC_HEAD" "$SEC_THR" "$SEC_DEMO"
    if [ "$DRY" = 0 ]; then
        echo "### Steps"
        echo
        echo "| step | status | wall time (s) | limit (s) | log |"
        echo "|---|---|---|---|---|"
        printf '%s' "$STEPS"
    fi
} >"$RESULTS"
echo "== wrote $RESULTS ($TOTAL s)"
