#!/usr/bin/env bash
# One-command device check, for a bare GPU host (driver, CUDA libraries in Python wheels, no
# Rust): every CUDA parity test, the op benchmark, a training step at scVI and Census size,
# `tessera train --device cuda` against the CPU step by step, NCCL, the Python package's
# training and scvi-tools on the same device and stores; one summary table last.
#
#   bench/gpu/build.sh              # here: stripped, xz-compressed binaries into bench/gpu/bin (~13 MB)
#   bench/gpu/wheels.sh             # here: scvi-tools' wheels into .whl (optional, ~12 MB)
#   bench/gpu/check.sh [BIN]        # there: BIN defaults to bench/gpu/bin
#
# Without a GPU it runs the same stages on the CPU at small sizes (CI does, through
# cli/tests/device.rs), so the script itself is tested where no GPU is. TESSERA_CUDA_LIBS
# defaults to the toolkit's and every `nvidia/*/lib` folder of the host's Python.
# TESSERA_CHECK_CELLS sets the training store's size (default 200,000 on a GPU);
# TESSERA_CHECK_SMALL=1 keeps the CPU's small sizes on a device (the emulated driver);
# TESSERA_CHECK_STAGE_S bounds each command (default 300 s) and TESSERA_CHECK_DEADLINE_S the
# whole check (default 450 s on a GPU: later stages then fail as out of time, and the table
# still prints); rows also go to summary.md as they finish. Exit status: 0 when every stage
# passed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(cd "${1:-$here/bin}" && pwd) || { echo "no binaries in ${1:-$here/bin}: run bench/gpu/build.sh"; exit 2; }
carried=$bin
started=$(date +%s)
# Logs and the table: TESSERA_CHECK_DIR, else $OUT/check (what a device runner brings back).
work=${TESSERA_CHECK_DIR:-${OUT:+$OUT/check}}
work=${work:-$(mktemp -d)}
# Stores and training outputs (gigabytes at GPU sizes) go elsewhere: only logs come back.
scratch=${TESSERA_CHECK_SCRATCH:-$(mktemp -d)}
mkdir -p "$work" "$scratch"
# build.sh carries the binaries xz-compressed (a quarter of their size): unpacked here.
if ls "$bin"/*.xz >/dev/null 2>&1; then
  mkdir -p "$scratch/bin"
  for f in "$bin"/*.xz; do
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$f" "$scratch/bin/$(basename "$f" .xz)" || { echo "cannot unpack $f"; exit 2; }
  done
  chmod +x "$scratch/bin"/*
  bin=$scratch/bin
fi
tessera=$bin/tessera
rows=()
failed=0
# Each row also goes to summary.md at once: a run cut off by its host still leaves its rows.
: >"$work/summary.md"
row() {
  rows+=("$(printf '| %-32s | %-7s | %s |' "$1" "$2" "$3")")
  printf '%s\n' "${rows[-1]}" >>"$work/summary.md"
  [ "$2" = FAIL ] && failed=1
  true
}
# Every command is bounded: a hung collective or kernel fails its row instead of the whole
# run, and none runs past the check's deadline (set once the device is known).
stage_s=${TESSERA_CHECK_STAGE_S:-300}
deadline=$((started + 3600))
limit() {
  local left=$((deadline - $(date +%s)))
  [ "$left" -gt "$stage_s" ] && left=$stage_s
  if [ "$left" -le 0 ]; then
    echo "Error: out of time (the check's deadline, TESSERA_CHECK_DEADLINE_S, has passed)" >&2
    return 124
  fi
  timeout -k 10 "$left" "$@"
  local rc=$?
  # The last line of a stage's log is its row's detail: say why it stopped.
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "Error: stopped after $left s (TESSERA_CHECK_STAGE_S or the check's deadline)" >&2
  fi
  return "$rc"
}

if [ -z "${TESSERA_CUDA_LIBS:-}" ]; then
  # The toolkit's folders, then NVIDIA's wheels in the host Python (nvidia/cu13/lib,
  # nvidia/nccl/lib, ...).
  wheels=$(python3 -c '
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
print(":".join(sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "lib"))})))' 2>/dev/null)
  TESSERA_CUDA_LIBS=$(for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && printf '%s:' "$d"; done)$wheels
  export TESSERA_CUDA_LIBS
fi
# The test binaries load the libraries themselves: the path tessera restarts itself with.
LD_LIBRARY_PATH=$("$tessera" devices --library-path)
export LD_LIBRARY_PATH
"$tessera" devices | tee "$work/devices.log"
# Small sizes on the CPU, and on a device when TESSERA_CHECK_SMALL is set (the emulated driver
# of kernels/emu: the GPU branches of this script run, at the CPU's sizes).
small=${TESSERA_CHECK_SMALL:-}
if grep -q '^cuda:0: ' "$work/devices.log"; then
  device=cuda
  row devices ok "$(grep '^cuda:0: ' "$work/devices.log" | cut -c9-)"
else
  device=cpu small=1
  row devices "cpu" "no GPU: every stage on the CPU at small sizes"
fi
if [ -n "$small" ]; then
  cells=${TESSERA_CHECK_CELLS:-3000} steps=5 census_steps=2 demo_epochs=1 census_cells=2500
  deadline=$((started + ${TESSERA_CHECK_DEADLINE_S:-3600}))
else
  cells=${TESSERA_CHECK_CELLS:-200000} steps=200 census_steps=50 demo_epochs=20 census_cells=100000
  # The issue's bound for the whole check on a GPU: 8 minutes.
  deadline=$((started + ${TESSERA_CHECK_DEADLINE_S:-450}))
fi

# 0. Every kernel source compiles with this host's NVRTC (no GPU needed).
if limit "$tessera" devices --compile >"$work/compile.log" 2>&1; then
  row "NVRTC compiles the kernels" ok "$(tail -1 "$work/compile.log")"
elif [ "$device" = cpu ] && grep -q 'libnvrtc not found' "$work/compile.log"; then
  row "NVRTC compiles the kernels" SKIPPED "no libnvrtc here (see TESSERA_CUDA_LIBS)"
else
  row "NVRTC compiles the kernels" FAIL "$(grep -m1 -i error "$work/compile.log")"
fi

# 1. Parity tests (kernels, whole models, NCCL): compiled here, run there.
for t in kernels_cuda_parity models_cuda_parity worker_nccl; do
  if [ ! -x "$bin/$t" ]; then row "$t" missing "not in $bin (bench/gpu/build.sh builds it)"; continue; fi
  if limit "$bin/$t" --test-threads=1 --nocapture >"$work/$t.log" 2>&1; then
    passed=$(grep -o '[0-9]* passed' "$work/$t.log" | tail -1)
    skipped=$(grep -c 'SKIPPED' "$work/$t.log")
    row "$t" ok "$passed, $skipped SKIPPED"
  else
    row "$t" FAIL "$(grep -m1 -E 'panicked|FAILED|error' "$work/$t.log") (log: $work/$t.log)"
  fi
done

# 2. Op benchmark.
if limit "$tessera" bench ops --device "$device" >"$work/ops.log" 2>&1; then
  row "bench ops --device $device" ok "$(grep -c . "$work/ops.log") lines (log: $work/ops.log)"
else
  row "bench ops --device $device" FAIL "$(tail -1 "$work/ops.log")"
fi

# 3. A training step at scVI size and at Census size (8,000 genes, 2 x 512 hidden, 50 latent,
# batch 1,024): cells/s against the GEMM floor, with the counts uploaded in the step, staged
# ahead on the copy stream, and gathered on the device from a matrix kept there.
logfile() { echo "$work/$(echo "$1" | tr ' ,' '__').log"; }
# How a train run's steps ran on a GPU: replayed from CUDA graphs from some step, or op by op
# after a failed capture (the reason), or never captured (a model or setting that stays eager).
graphs_in() {
  [ "$device" = cpu ] && return
  echo "; $(grep -m1 -oE 'replayed from CUDA graphs from step [0-9]+|op by op from now on: .*' "$1" | cut -c1-160 || echo 'no step replayed')"
}

step() { # name, args...
  local name=$1 log; shift
  log=$(logfile "$name")
  if limit "$tessera" bench step --device "$device" "$@" >"$log" 2>&1; then
    # On a GPU: how many of the steps' device buffers the driver allocated (kernels/src/cuda_cache.rs).
    local buffers replayed
    buffers=$(grep -m1 -o '[0-9]* reused, [0-9]* allocated' "$log" || true)
    # On a GPU: the step replayed from a CUDA graph.
    replayed=$(grep -m1 -o '[0-9]* replayed cells/s, [0-9.]*x the first rate' "$log" || true)
    row "$name" ok "$(grep -m1 'cells/s' "$log" | sed 's/^ *//'); $(grep -m1 -o '[0-9]* staged cells/s' "$log"), $(grep -m1 -o '[0-9]* resident cells/s' "$log"), $(grep -m1 -o 'queues a resident step.*' "$log")${replayed:+; $replayed}${buffers:+; buffers $buffers}"
  else
    row "$name" FAIL "$(tail -1 "$log")"
  fi
}
step "step scVI size" --steps "$steps"
# scANVI's classifier and an adversarial batch classifier: replayed on a GPU with the labels and
# batch codes on the device ("replayed cells/s" in the row), not op by op.
printf '[model]\nclassifier_weight = 50.0\nadversarial_batch_weight = 1.0\n' >"$work/heads.toml"
step "step scVI size, classifier + adversary" --steps "$steps" --config "$work/heads.toml"
printf '[model]\nn_layers = 2\nn_latent = 50\n' >"$work/census.toml"
step "step Census size" --genes 8000 --hidden 512 --batch 1024 --nnz 1500 --steps "$census_steps" --config "$work/census.toml"
if [ "$device" = cuda ]; then
  for precision in tf32 bf16; do
    step "step Census size, ${precision^^}" --genes 8000 --hidden 512 --batch 1024 --nnz 1500 --steps "$census_steps" --config "$work/census.toml" "--$precision"
  done
fi

# 4. `tessera train` on a simulated store: the device's first 50 steps against the CPU's; on a
# GPU also with every batch copied from the host (what keeping the training set there gains).
last_rate() { # a run's output folder: its last epoch's cells/s
  python3 -c "import csv; print(round(float(list(csv.DictReader(open('$1/history.csv')))[-1]['cells_per_second'])))" 2>/dev/null
}
rate_of() { # a run's output folder
  python3 -c "import csv; r=list(csv.DictReader(open('$1/history.csv'))); c=float(r[-1]['cells_per_second']); print(', '.join(f\"epoch {x['epoch']}: {float(x['cells_per_second']):.0f} cells/s\" for x in r) + f'; one epoch of 1M cells: {1e6 / c:.1f} s; last epoch: steps {float(r[-1][\"compute_seconds\"]):.1f} s, waiting for batches {float(r[-1][\"data_seconds\"]):.1f} s')" 2>/dev/null
}
store=$scratch/sim.zarr
rm -rf "$store" "$scratch/sim-cpu.zarr" "$scratch/train-"*
if limit "$tessera" simulate "$store" --cells "$cells" --genes 2000 >"$work/simulate.log" 2>&1; then
  cp -r "$store" "$scratch/sim-cpu.zarr"
  t0=$SECONDS
  # Whatever else is logged, the line saying where the training set lives.
  if TESSERA_LOG="${TESSERA_LOG:-info},tessera_worker::resident=info" limit "$tessera" train --data "$store" --out "$scratch/train-$device" --device "$device" --epochs 2 --step-log 50 >"$work/train-$device.log" 2>&1; then
    rate=$(rate_of "$scratch/train-$device")
    kept=$(grep -m1 -oE 'training set (kept on [a-z]+(:[0-9]+)?|streamed from the host)' "$work/train-$device.log")
    row "train --device $device ($cells cells)" ok "$((SECONDS - t0)) s; ${kept:-training set placement not logged}; $rate$(graphs_in "$work/train-$device.log")"
    tessera_scvi_size=$(last_rate "$scratch/train-$device")
    if limit "$tessera" train --data "$scratch/sim-cpu.zarr" --out "$scratch/train-cpu-ref" --device cpu --epochs 2 --step-log 50 >"$work/train-cpu-ref.log" 2>&1; then
      diff=$(python3 - "$scratch/train-$device/steps.csv" "$scratch/train-cpu-ref/steps.csv" <<'PY'
import csv, sys
a, b = (list(csv.DictReader(open(p))) for p in sys.argv[1:3])
worst = max(abs(float(x["loss"]) - float(y["loss"])) / max(abs(float(y["loss"])), 1e-12) for x, y in zip(a, b))
print(f"{len(a)} steps, max relative loss difference {worst:.2e}", "ok" if worst <= 1e-3 and len(a) == len(b) else "FAIL")
PY
)
      row "first 50 steps vs the CPU" "${diff##* }" "${diff% *}"
    else
      row "first 50 steps vs the CPU" FAIL "the CPU run failed: $(tail -1 "$work/train-cpu-ref.log")"
    fi
    if [ "$device" = cuda ]; then
      printf '[train]\nresident_data = "never"\n' >"$work/streamed.toml"
      if limit "$tessera" train --data "$store" --out "$scratch/train-streamed" --device cuda --epochs 2 --config "$work/streamed.toml" --overwrite >"$work/train-streamed.log" 2>&1; then
        row "train --device cuda, streamed" ok "$(rate_of "$scratch/train-streamed")$(graphs_in "$work/train-streamed.log")"
      else
        row "train --device cuda, streamed" FAIL "$(grep -m1 -A2 Error "$work/train-streamed.log" | tr '\n' ' ')"
      fi
    fi
  else
    row "train --device $device ($cells cells)" FAIL "$(grep -m1 -A2 Error "$work/train-$device.log" | tr '\n' ' ')"
  fi
else
  row "simulate $cells cells" FAIL "$(tail -1 "$work/simulate.log")"
fi

# 4b. The README's main job (the default MuData: RNA, protein, ATAC, modalities missing) and
# the Census-size model (8,000 genes, 2 x 512 hidden, 50 latent, batch 1,024) through train.
train_stage() { # name, args...
  local name=$1 log; shift
  log=$(logfile "$name")
  if limit "$tessera" train --device "$device" "$@" >"$log" 2>&1; then
    row "$name" ok "$(grep -m1 'cells/s over' "$log" | sed 's/^ *//'); $(grep -m1 -o 'final validation loss [0-9.]*' "$log")$(graphs_in "$log")"
  else
    row "$name" FAIL "$(grep -m1 -A2 Error "$log" | tr '\n' ' ' | cut -c1-160)"
  fi
}
rm -rf "$scratch/demo" "$scratch/census.zarr" "$scratch/census-out"
train_stage "train the default data" --out "$scratch/demo" --epochs "$demo_epochs"
printf '[model]\nn_hidden = 512\nn_layers = 2\nn_latent = 50\n[train]\nbatch_size = 1024\n' >"$work/census-train.toml"
if limit "$tessera" simulate "$scratch/census.zarr" --genes 8000 --cells "$census_cells" >"$work/simulate-census.log" 2>&1; then
  train_stage "train the Census-size model" --data "$scratch/census.zarr" --out "$scratch/census-out" --config "$work/census-train.toml" --epochs 2
  tessera_census_size=$(last_rate "$scratch/census-out")
else
  row "train the Census-size model" FAIL "$(tail -1 "$work/simulate-census.log")"
fi

# 5. Data-parallel: two workers against one process over the same two parts (the result
# depends on the parts, not on the workers). Two GPUs: NCCL; one: both workers on it, reducing
# over the TCP ring (NCCL refuses two ranks on one GPU); no GPU: CPU workers.
small_store=$scratch/small.zarr
gpus=$(grep -c '^cuda:[0-9]*: ' "$work/devices.log")
if [ "$device" = cuda ] && [ "$gpus" -ge 2 ]; then
  dp_device=cuda dp_env="" dp_name="2 GPUs, NCCL"
elif [ "$device" = cuda ]; then
  dp_device=cuda:0 dp_env="TESSERA_NCCL=0" dp_name="2 workers on 1 GPU, TCP ring"
else
  dp_device=cpu dp_env="" dp_name="2 CPU workers"
fi
rm -rf "$small_store" "$scratch/small-one.zarr" "$scratch/dp-"*
printf '[train]\nparts = 2\n' >"$work/parts2.toml"
if limit "$tessera" simulate "$small_store" --cells "$([ -n "$small" ] && [ "$device" = cuda ] && echo 4000 || echo 20000)" --genes 2000 >"$work/simulate-small.log" 2>&1 &&
  cp -r "$small_store" "$scratch/small-one.zarr" &&
  limit env $dp_env "$tessera" train --data "$small_store" --out "$scratch/dp-workers" --device "$dp_device" --workers 2 --epochs 2 --config "$work/parts2.toml" >"$work/dp-workers.log" 2>&1 &&
  limit "$tessera" train --data "$scratch/small-one.zarr" --out "$scratch/dp-one" --device "${dp_device%%:*}" --epochs 2 --config "$work/parts2.toml" >"$work/dp-one.log" 2>&1; then
  diff=$(python3 - "$scratch/dp-workers/history.csv" "$scratch/dp-one/history.csv" <<'PY'
import csv, sys
a, b = (list(csv.DictReader(open(p))) for p in sys.argv[1:3])
worst = max(abs(float(x["train_loss"]) - float(y["train_loss"])) / abs(float(y["train_loss"])) for x, y in zip(a, b))
rate = float(a[-1]["cells_per_second"])
print(f"epoch losses within {worst:.1e} of one process; {rate:.0f} cells/s", "ok" if worst <= 1e-4 and len(a) == len(b) == 2 else "FAIL")
PY
)
  row "train --workers 2 ($dp_name)" "${diff##* }" "${diff% *}"
else
  row "train --workers 2 ($dp_name)" FAIL "$(grep -h -m1 -A2 Error "$work"/simulate-small.log "$work"/dp-*.log 2>/dev/null | tr '\n' ' ')"
fi

# 6. NCCL all-reduce bandwidth.
if limit "$tessera" bench nccl >"$work/nccl.log" 2>&1; then
  if grep -q SKIPPED "$work/nccl.log"; then
    row "bench nccl" SKIPPED "$(grep -m1 SKIPPED "$work/nccl.log" | cut -c1-100)"
  else
    # Its header (world size, GPUs) and its largest buffer's time.
    row "bench nccl" ok "$(grep -m1 -o 'world size [^:]*' "$work/nccl.log" | sed 's/, median.*//'): $(tail -1 "$work/nccl.log" | awk '{print $1 " floats (" $2 " MB) in " $3 " ms"}')"
  fi
else
  row "bench nccl" FAIL "$(tail -1 "$work/nccl.log")"
fi

# 7. Python on the device: the tessera package's wheel (build.sh) and scvi-tools' with what it
# imports beyond the host's own Python (torch, lightning, numpy...: bench/gpu/wheels.sh fills
# .whl; carry it), installed under the scratch folder. TESSERA_CHECK_PYTHON names another
# Python (e.g. target/scvi-venv/bin/python here).
python=${TESSERA_CHECK_PYTHON:-python3}
wheels=${TESSERA_CHECK_WHEELS:-$here/../../.whl}
shopt -s nullglob
carried_wheels=("$carried"/*.whl "$wheels"/*.whl)
shopt -u nullglob
if [ ${#carried_wheels[@]} -gt 0 ] &&
  $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$scratch/site" "${carried_wheels[@]}" >"$work/wheels.log" 2>&1; then
  export PYTHONPATH=$scratch/site${PYTHONPATH:+:$PYTHONPATH}
fi
accelerator=$([ "$device" = cuda ] && echo gpu || echo cpu)
json_row() { # name, log, python expression over the JSON line r -> detail
  row "$1" ok "$(tail -1 "$2" | python3 -c "import json, sys; r = json.load(sys.stdin); print($3)")"
}

# 7a. tessera.model.SCVI(adata).train(accelerator="gpu") on the training store.
if ! $python -c 'import tessera, anndata' >"$work/python-import.log" 2>&1; then
  row "Python API on the device" SKIPPED "tessera or anndata not importable by $python (build.sh's wheel, wheels.sh)"
elif limit "$python" "$here/python_gpu.py" --data "$store" --accelerator "$accelerator" >"$work/python-api.log" 2>&1 &&
  tail -1 "$work/python-api.log" | grep -q '"latent_ok": true'; then
  json_row "Python API on the device" "$work/python-api.log" \
    "f\"{r['tool']}: {r['cells_per_s']:.0f} cells/s over the train call, last ELBO {r['elbo_train']:.1f}\""
else
  row "Python API on the device" FAIL "$(grep -m1 -E 'Error|error|latent_ok' "$work/python-api.log" | cut -c1-160)"
fi

# 7b. The anchor: scvi-tools' SCVI on the same device and stores, at the same sizes, 2 epochs
# each; the last epoch's cells/s (validation included, as tessera's) side by side.
anchor() { # name, tessera's cells/s, scvi_train.py args...
  local name=$1 ours=$2 log; shift 2
  log=$(logfile "$name")
  if limit "$python" "$here/../scvi_train.py" --epochs 2 --key "" --threads "$(nproc)" \
    --accelerator "$accelerator" "$@" >"$log" 2>&1; then
    json_row "$name" "$log" \
      "f\"{r['tool']}, {r['model']}: {r['last_epoch_cells_per_s']:.0f} cells/s, tessera {float('${ours:-nan}'):.0f}: {float('${ours:-nan}') / r['last_epoch_cells_per_s']:.1f}x\""
  else
    row "$name" FAIL "$(grep -m1 -E 'Error|error' "$log" | cut -c1-160) (log: $log)"
  fi
}
if ! $python -c 'import scvi' >"$work/scvi-import.log" 2>&1; then
  row "scvi-tools on the same device" SKIPPED "scvi-tools not importable by $python (bench/gpu/wheels.sh, carry .whl)"
else
  anchor "scvi-tools, scVI size" "${tessera_scvi_size:-}" --data "$store"
  anchor "scvi-tools, Census size" "${tessera_census_size:-}" --data "$scratch/census.zarr" \
    --hidden 512 --layers 2 --latent 50 --batch-size 1024
  # scvi-tools' own lever for wide data on a GPU (experimental there): sparse minibatches.
  anchor "scvi-tools, Census size, sparse" "${tessera_census_size:-}" --data "$scratch/census.zarr" \
    --hidden 512 --layers 2 --latent 50 --batch-size 1024 --load-sparse
fi

echo
echo "tessera device check: $device, $(( $(date +%s) - started )) s, logs in $work, stores in $scratch"
printf '| %-32s | %-7s | %s |\n' stage result detail
printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..34})" "$(printf -- '-%.0s' {1..9})" "--------"
printf '%s\n' "${rows[@]}"
exit $failed
