#!/usr/bin/env bash
# Every CUDA check and benchmark of peftcore, sized for a lent GPU's 15 minutes in two calls:
#
#     bash benchmarks/gpu_run.sh call1        # env, pytest -m gpu, parity (t5-base), NF4, training step
#     bash benchmarks/gpu_run.sh call2        # paged AdamW, end to end, inference
#     bash benchmarks/gpu_run.sh STAGE ...    # single stages (names below)
#     bash benchmarks/gpu_run.sh --dry-run call1 call2   # here, on the CPU, on tiny shapes, in a copy
#
# Stages: env, tests, parity, nf4, train_step, paged, end_to_end, inference, sharded, and the optional memory
# (one fresh process per method and library: about 45 s a pair on an H200; the training step already
# reports each step's peak), report, train_step_compiled and end_to_end_compiled. Each runs under its
# own time limit, set from the H200 run of 2026-12-04: call1's limits add up to 505 s, call2's to
# 230 s, so with a machine's start (about 60-90 s) both fit a session's 15 minutes when the second call
# follows the first at once (a machine stays warm 30 s). Each stage writes its log; after each stage the logs and
# benchmarks/results/*.json are packed into $OUT/gpu_results.tar.gz, so a run cut short still
# returns what it finished. Packages the machine lacks travel in .gpu/ (not in git): small wheels
# in .gpu/wheels and bitsandbytes unpacked, with only its CUDA 13.0 library, in .gpu/site; see
# benchmarks/README.md. --dry-run runs every stage's command on the CPU with tiny arguments in a
# copy of the tree (nothing here is written), to check arguments and packing before device time.
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
    copy=$(mktemp -d /tmp/peftcore-dry.XXXXXX)
    tar -c --exclude=./.venv --exclude=./.git --exclude=./.gpu . | tar -x -C "$copy"
    cd "$copy" || exit 1
    OUT=$copy/out
fi
OUT=${OUT:-/tmp/peftcore-gpu-out}
LOGS=/tmp/peftcore-gpu-logs
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
if [ -d .gpu/wheels ]; then
    if [ ! -e /tmp/site/.installed ]; then
        $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
        cp -r .gpu/site/. /tmp/site/ && touch /tmp/site/.installed
    fi
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

pack() { tar -czf "$OUT/gpu_results.tar.gz" -C "$LOGS" . -C "$PWD" benchmarks/results 2>/dev/null; }

stage() { # name, time limit in seconds, command...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    grep -v "Warning\|warn(" "$LOGS/$name.log" | tail -n "${TAIL:-25}"
    pack
}

run_env() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
    exec $PYTHON -c "import torch, triton, transformers, peft, bitsandbytes, lightning, jsonargparse, rouge_score;
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda');
print('triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'bitsandbytes', bitsandbytes.__version__, 'lightning', lightning.__version__)"
}

# The arguments of each stage: the GPU's, or tiny ones for the CPU dry run.
if [ $DRY = 1 ]; then
    DEV="--device cpu"
    TESTS="--collect-only"
    PARITY="--shape t5-tiny --batch 2 16 4 --cases IA3 DoRA QDoRA"
    NF4="--repeats 2"
    STEP="--shapes t5-tiny --batch 2 --src 32 --tgt 8 --repeats 1 --warmup 0"
    MEMORY=(--shape t5-tiny --batch 2 32 8 --methods ia3)
    E2E="--shape t5-tiny --examples 16 --rounds 1"
    INFERENCE="--shape t5-tiny --repeats 1"
else
    DEV="--device cuda"
    TESTS=""
    PARITY="--shape t5-base"
    NF4="--repeats 50 --sweep"
    STEP="--shapes t5-base --repeats 10"
    MEMORY=(--shape t5-base --methods "lora r=16 q,v" ia3 "qlora r=16 q,v")
    # the second epoch is timed: the first holds each side's one-time start (18 s of 24 on the H200)
    E2E="--shape t5-base --examples 240 --epochs 2 --rounds 2"
    INFERENCE="--shape t5-base --repeats 5"
fi

STAGES=${*:-call1 call2}
STAGES=${STAGES//call1/env tests parity nf4 train_step}
STAGES=${STAGES//call2/paged end_to_end inference}
for s in $STAGES; do
    case $s in
        env) stage env 30 bash -c "PYTHON=$PYTHON; $(declare -f run_env); run_env" ;;
        # the fit test (three t5-base runs) last, so that a cut leaves the others' results
        tests) stage tests 300 $PYTHON -m pytest -m gpu -p no:cacheprovider -rA --durations=15 $TESTS \
            tests/peftcore/test_nf4.py tests/peftcore/test_paged.py tests/peftcore/test_qlora.py \
            tests/experiments/test_module.py ;;
        # FSDP1 and FSDP2 on one GPU through the CLI (issue 20's CUDA half)
        sharded) stage sharded 150 $PYTHON -m pytest -m gpu -p no:cacheprovider -rA --durations=5 $TESTS \
            tests/experiments/test_sharded_cli.py ;;
        parity) stage parity 90 $PYTHON -m benchmarks.bench_parity $DEV $PARITY ;;
        nf4) stage nf4 45 $PYTHON -m benchmarks.bench_nf4 $DEV $NF4 ;;
        train_step) stage train_step 140 $PYTHON -m benchmarks.bench_train_step $DEV $STEP ;;
        train_step_compiled) stage train_step_compiled 240 $PYTHON -m benchmarks.bench_train_step $DEV \
            $STEP --methods "lora r=16 q,v" ia3 --compile --name bench_train_step_compiled ;;
        paged) if [ $DRY = 1 ]; then stage paged 40 $PYTHON -m benchmarks.bench_paged --help; else
            stage paged 40 $PYTHON -m benchmarks.bench_paged --repeats 30; fi ;;
        memory) stage memory 190 $PYTHON -m benchmarks.bench_memory $DEV "${MEMORY[@]}" ;;
        end_to_end) stage end_to_end 110 $PYTHON -m benchmarks.bench_end_to_end $DEV $E2E ;;
        inference) stage inference 80 $PYTHON -m benchmarks.bench_inference $DEV $INFERENCE ;;
        end_to_end_compiled) stage end_to_end_compiled 400 $PYTHON -m benchmarks.bench_end_to_end $DEV \
            $E2E --compile ;;
        report) stage report 30 $PYTHON -m benchmarks.report ;;
        *) echo "unknown stage $s" ;;
    esac
done
[ $DRY = 1 ] && echo "dry run in $copy; packed: $(tar -tzf "$OUT/gpu_results.tar.gz" | wc -l) files"
exit 0
