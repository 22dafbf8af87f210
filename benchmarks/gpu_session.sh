#!/usr/bin/env bash
# One prepared run on a lent GPU machine (one H100 or H200, 16 cores), in the repository root, writing to
# $OUT (default benchmarks/results/session): the GPU step (gpu_check), the wall clock and time to accuracy
# (wall_clock, time_to_accuracy), the Ray pipeline on the 16 CPU cores (stages x threads = 16) and with stages
# sharing the GPU (bench_pipeline), then the depth study (depth_study) until the deadline. Each part has its own time limit, so a slow one costs only
# itself; everything is logged to $OUT/session.log.
#
# The machine has PyTorch but not Ray: the run carries `.whl/` (omegaconf, jsonschema and its needs, as
# cp312 wheels), `.raypkg/ray.zip` (Ray's cp312 wheel unpacked without ray/jars, ray/dashboard/client,
# ray/rllib and ray/serve, zipped with LZMA) and `.data/fashion.npz.xz` (the Fashion-MNIST dev split,
# LZMA-compressed to fit the 64 MiB a call carries). Made once on the development machine, e.g.:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl omegaconf jsonschema jsonschema-specifications referencing rpds-py
#   pip download ... -d /tmp ray==2.60.0, unzip it, delete ray/jars ray/dashboard/client ray/rllib ray/serve, and
#   zip the rest into .raypkg/ray.zip with zipfile.ZIP_LZMA; lzma-compress the dev npz into .data/fashion.npz.xz.
# Then, with the device tool: run `OUT=$OUT bash benchmarks/gpu_session.sh`, carrying .whl, .raypkg and .data.
# PARTS picks the parts (default: tests check local wall cpu16 gpu study; also groups, mps, startup, seeds and conv), e.g. PARTS="tests check gpu" (about 6
# minutes, within one call's 10) and then PARTS=cpu16 (about 5) if the device time allows.
set -u
OUT=${OUT:-benchmarks/results/session}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-570}  # seconds from now at which time to accuracy and the depth studies are stopped
PARTS=" ${PARTS:-tests check local wall cpu16 gpu study} "
part() { [[ $PARTS == *" $1 "* ]]; }
START=$SECONDS
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/session.log") 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
python3 - <<'EOF' || exit 1
import lzma, os, zipfile
zipfile.ZipFile(".raypkg/ray.zip").extractall("/tmp/site")
for binary in ("ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet"):
    os.chmod(f"/tmp/site/{binary}", 0o755)
with open(".data/fashion-mnist-dev.npz", "wb") as f:
    f.write(lzma.decompress(open(".data/fashion.npz.xz", "rb").read()))
EOF
export PYTHONPATH=/tmp/site:$PWD
DATA=.data/fashion-mnist-dev.npz
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
lscpu | grep -E "^(Model name|Socket|Core|Thread|CPU\(s\))"  # cores against hyperthreads, for the CPU figures
echo "# setup done at $((SECONDS - START)) s"

# The tests that need CUDA (skipped on the development machine): CUDA graphs against eager steps, with and
# without a learning-rate schedule and with the leave-one-out fit, the pinned transport, the loop's factors
# computed on the GPU without a host read, the in-process loop that never waits for the device, and the Ray
# pipeline with its stages sharing the GPU against the in-process trainer on it. pytest is assumed there; if
# not, this fails alone.
if part tests; then
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_batched_step.py tests/test_pipeline_units.py \
        tests/test_trainer.py -k "cuda or pinned or gpu" 2>&1 | tail -5
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_ray_pipeline_gpu.py 2>&1 | tail -5
    echo "# CUDA tests done at $((SECONDS - START)) s"
fi

if part check; then
    # Its time to accuracy is part `wall`'s time_to_accuracy.py, which also times the Ray pipeline and compiled
    # backprop from the command: not measured twice.
    timeout 150 python3 -m benchmarks.gpu_check --data $DATA --steps-only --json "$OUT/gpu_check.json"
    echo "# gpu_check done at $((SECONDS - START)) s"
fi

# The step against its floor and backprop at depth 5, and a batch's kernel factors (the labels' by the m x m solve
# and in closed form): what the first stage adds to its layers' work when it computes them (ray.factors_on).
if part local; then
    timeout 150 python3 benchmarks/bench_local.py --device cuda --depths 5 --sizes 256 512 1024 \
        --json "$OUT/bench_local_gpu.json"
    echo "# in-process step and factors done at $((SECONDS - START)) s"
fi

if part cpu16; then
    CUDA_VISIBLE_DEVICES= timeout 180 python3 benchmarks/bench_pipeline.py --device cpu --depth 14 --stages 2 4 8 16 \
        --threads-per-stage --in-process-threads 8 16 --steps 40 --json "$OUT/pipeline_cpu16.json" \
        --plot "$OUT/pipeline_cpu16.png"
    echo "# pipeline on 16 CPU cores done at $((SECONDS - START)) s"
    CUDA_VISIBLE_DEVICES= timeout 120 python3 benchmarks/thread_scaling.py --layers 1 2 16 --threads 1 2 8 16 \
        --json "$OUT/thread_scaling_cpu16.json"
    echo "# stage step vs threads done at $((SECONDS - START)) s"
fi

if part gpu; then
    timeout 270 python3 benchmarks/bench_pipeline.py --device cuda --depth 14 --stages ${GPU_STAGES:-2 4 8} --threads-per-stage \
        --in-process-threads 16 --steps 400 --factors-on coordinator first_stage --json "$OUT/pipeline_gpu.json" \
        --plot "$OUT/pipeline_gpu.png"
    echo "# pipeline on the GPU done at $((SECONDS - START)) s"
fi

# Factors of several batches in one batched call (train.factor_group; auto: 8 on a GPU) against one batch per call,
# side by side: the in-process trainer, and two stages sharing the GPU with the first computing every batch's.
if part groups; then
    for group in 1 auto; do
        timeout 150 python3 benchmarks/bench_pipeline.py --device cuda --depth 14 --stages 2 --threads-per-stage \
            --in-process-threads 16 --steps 400 --factors-on first_stage --factor-group $group \
            --json "$OUT/pipeline_gpu_factor_group_$group.json"
    done
    echo "# factors a group at a time done at $((SECONDS - START)) s"
fi

# Stages sharing the GPU are separate processes, whose kernels the GPU time-slices; NVIDIA's Multi-Process
# Service (MPS) runs them in one shared context instead. The same stages without and with it, side by side.
if part mps; then
    MPS_CONTROL=$(command -v nvidia-cuda-mps-control || ls /usr/local/nvidia/bin/nvidia-cuda-mps-control 2>/dev/null)
    shared_gpu() {
        timeout 120 python3 benchmarks/bench_pipeline.py --device cuda --depth 14 --stages ${GPU_STAGES:-2 4 8} \
            --threads-per-stage --in-process-threads 16 --steps 400 --factors-on first_stage --json "$1"
    }
    shared_gpu "$OUT/pipeline_gpu_without_mps.json"
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
    if [[ -n $MPS_CONTROL ]] && timeout 10 $MPS_CONTROL -d \
        && timeout 30 python3 -c "import torch; torch.ones(1, device='cuda')"; then
        shared_gpu "$OUT/pipeline_gpu_mps.json"
    else
        echo "# no MPS here (control: ${MPS_CONTROL:-none}):"; cat $CUDA_MPS_LOG_DIRECTORY/* 2>/dev/null | tail -5
    fi
    [[ -n $MPS_CONTROL ]] && echo quit | timeout 10 $MPS_CONTROL
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "# stages sharing the GPU, without and with MPS, done at $((SECONDS - START)) s"
fi

# Where a job's seconds before its run go on this machine: the interpreter and each import, and CUDA's start.
if part startup; then
    python3 -X importtime -c "import hsic_ray.experiment" 2>&1 | sort -t'|' -k2 -n | tail -8
    python3 - <<'EOF_STARTUP'
import time
t = time.perf_counter(); import torch; imported = time.perf_counter() - t
t = time.perf_counter(); torch.ones(1, device="cuda"); torch.cuda.synchronize(); context = time.perf_counter() - t
t = time.perf_counter(); import ray; ray_imported = time.perf_counter() - t
print(f"import torch {imported:.2f} s, CUDA context {context:.2f} s, import ray {ray_imported:.2f} s")
EOF_STARTUP
    # A stage actor's torch import, with and without workers that import it as they start (docs/results.md,
    # "Start-up: imports"): on 16 cores their imports may run beside the driver's.
    # Whole output: on the H200 of 2026-12-04 these printed nothing within a minute (not yet understood). A job's
    # own cluster declares every core and Ray starts an idle worker per CPU as the driver connects, beside the
    # driver's torch import: the same with a cluster of 3 CPUs, and with no workers started ahead.
    for variant in "--cpus 16" "--cpus 16 --preload torch" "--cpus 3"; do
        timeout 90 python3 benchmarks/ray_start_cost.py $variant || echo "# ray_start_cost $variant: exit $?"
    done
    RAY_prestart_worker_first_driver=0 timeout 90 python3 benchmarks/ray_start_cost.py --cpus 16 \
        || echo "# ray_start_cost without prestarted workers: exit $?"
    echo "# start-up costs done at $((SECONDS - START)) s"
fi

# What a user waits for (issue 27): paper_mlp, 5 epochs, from the command to its exit, in process and on Ray,
# split into start-up, training, monitors, the end of the run and writing; then seconds to a test accuracy,
# HSIC against eager and compiled backprop.
if part wall; then
    timeout 240 python3 benchmarks/wall_clock.py --cases paper_mlp --dataset npz:$DATA --json "$OUT/wall_clock_gpu.json"
    echo "# wall clock done at $((SECONDS - START)) s"
    # One case at a time, so that a case cut off by the deadline leaves the one before it written.
    for case in paper_mlp deep_mlp50; do
        LEFT=$((DEADLINE - (SECONDS - START)))
        ((LEFT > 30)) && timeout $LEFT python3 benchmarks/time_to_accuracy.py --cases $case --dataset npz:$DATA \
            --device cuda --json "$OUT/time_to_accuracy_gpu_$case.json"
        echo "# time to accuracy, $case, done at $((SECONDS - START)) s"
    done
fi

# Time to accuracy for more seeds (part `wall` runs the config's own): HSIC in process against eager backprop.
# A readout on the target's line after some epoch makes one seed's verdict a coin toss (docs/results.md, "Time
# to accuracy against backprop, 2 cores").
if part seeds; then
    for case in paper_mlp deep_mlp50; do
        LEFT=$((DEADLINE - (SECONDS - START)))
        ((LEFT > 30)) && timeout $LEFT python3 benchmarks/time_to_accuracy.py --cases $case --dataset npz:$DATA \
            --device cuda --methods hsic-local backprop-eager --seeds ${SEEDS:-1 2} \
            --json "$OUT/time_to_accuracy_gpu_${case}_seeds.json"
    done
    echo "# time to accuracy for seeds ${SEEDS:-1 2} done at $((SECONDS - START)) s"
fi

# Issue 30's depth study of plain conv nets (not in the default parts; not yet run on a GPU): HSIC and backprop
# at depths 8, 20 and 56, with and without skip connections (model.skips: backprop's reference), orthogonal and
# identity weights (docs/results.md, "What the deep plain net loses at its start"), two seeds, 5 epochs. Each
# trial's stages take a quarter of the GPU.
if part conv; then
    LEFT=$((DEADLINE - (SECONDS - START)))
    timeout $LEFT python3 jobs/sweep_depth.py --preset deep_conv --dataset npz:$DATA --data-family fashion-mnist \
        --depths 8 20 56 --methods hsic backprop --grid model.skips=false,true --grid model.init=orthogonal,identity \
        --grid train.seed=1,2 --epochs 5 --stages-per-trial 1 --gpus-per-stage 0.25 --max-concurrent 4 \
        --output "$OUT/conv_depth"
    echo "# conv depth study stopped at $((SECONDS - START)) s"
fi

if part study; then
    LEFT=$((DEADLINE - (SECONDS - START)))
    timeout $LEFT python3 -m benchmarks.depth_study --data $DATA --workers 6 --deadline-s $((LEFT - 100)) \
        --out "$OUT/study.jsonl"
    echo "# depth study stopped at $((SECONDS - START)) s"
    tar czf "$OUT/study_plots.tar.gz" -C "$OUT" study && rm -r "$OUT/study"
fi
