#!/usr/bin/env bash
# Every CUDA check and benchmark of peftcore in one command, for a lent GPU machine:
#
#     bash benchmarks/gpu_run.sh [stage ...]     (default: all stages, in this order)
#
# Stages: env, tests (pytest -m gpu), parity, nf4, train_step, train_step_compiled, paged, memory, inference,
# end_to_end, end_to_end_compiled, report. Each runs under its own
# time limit and writes its log; after each stage the logs and benchmarks/results/*.json are packed
# into $OUT/gpu_results.tar.gz, so a run cut short still returns what it finished.
# Packages the machine lacks travel as wheels in .gpu/wheels (and .gpu/site, unpacked), which are
# not in git: see benchmarks/README.md.
set -u
OUT=${OUT:-/tmp/peftcore-gpu-out}
LOGS=/tmp/peftcore-gpu-logs
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
if [ -d .gpu/wheels ]; then
    if [ ! -e /tmp/site/.installed ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
        cp -r .gpu/site/. /tmp/site/ && touch /tmp/site/.installed
    fi
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

pack() { tar -czf "$OUT/gpu_results.tar.gz" -C "$LOGS" . -C "$PWD" benchmarks/results 2>/dev/null; }

stage() {  # name, time limit in seconds, command...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    grep -v "Warning\|warn(" "$LOGS/$name.log" | tail -n "${TAIL:-30}"
    pack
}

run_env() {
    nvidia-smi
    exec python3 -c "import torch, triton, transformers, peft, bitsandbytes, lightning, jsonargparse, rouge_score;
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0));
print('triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'bitsandbytes', bitsandbytes.__version__, 'lightning', lightning.__version__)"
}

STAGES=${*:-env tests parity nf4 train_step paged memory inference end_to_end report}
for s in $STAGES; do
    case $s in
        env) stage env 60 bash -c "$(declare -f run_env); run_env" ;;
        tests) stage tests 260 python3 -m pytest -m gpu -p no:cacheprovider -rA --durations=15 \
                   tests/peftcore/test_nf4.py tests/peftcore/test_paged.py tests/peftcore/test_qlora.py \
                   tests/experiments/test_module.py ;;
        parity) stage parity 150 python3 -m benchmarks.bench_parity --device cuda --shape t5-base ;;
        nf4) stage nf4 120 python3 -m benchmarks.bench_nf4 --device cuda --repeats 50 --sweep ;;
        train_step) stage train_step 200 python3 -m benchmarks.bench_train_step --device cuda --repeats 20 ;;
        train_step_compiled) stage train_step_compiled 240 python3 -m benchmarks.bench_train_step --device cuda \
                   --repeats 20 --shapes t5-base --methods "lora r=16 q,v" ia3 --compile --name bench_train_step_compiled ;;
        paged) stage paged 90 python3 -m benchmarks.bench_paged --repeats 30 ;;
        memory) stage memory 200 python3 -m benchmarks.bench_memory --device cuda --shape t5-base ;;
        inference) stage inference 120 python3 -m benchmarks.bench_inference --device cuda --shape t5-base --repeats 10 ;;
        report) stage report 30 python3 -m benchmarks.report ;;
        end_to_end) stage end_to_end 200 python3 -m benchmarks.bench_end_to_end --device cuda --examples 480 --rounds 2 ;;
        end_to_end_compiled) stage end_to_end_compiled 400 python3 -m benchmarks.bench_end_to_end --device cuda \
                   --examples 480 --epochs 2 --rounds 2 --compile ;;
        *) echo "unknown stage $s" ;;
    esac
done
