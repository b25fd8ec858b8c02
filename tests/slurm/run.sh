#!/usr/bin/env bash
# A real one-node Slurm cluster for `loracomp sweep submit --slurm`.
#
# As root with apt: installs Debian's slurm-wlm and munge, starts munged, slurmctld and slurmd on this machine
# (state, config, sockets and logs in a temporary directory; nothing in /etc is touched), then
#   1. runs a small sweep (tests/fixtures/tiny-bert, generated tasks) in one process;
#   2. runs the same sweep through `sweep submit --slurm --shards 3` (bank array -> cells array -> report) and
#      checks that the merged results equal the single-process ones cell for cell, bit for bit (every field but
#      train_seconds);
#   3. submits it again into a fresh directory, cancels one cells shard mid-run (scancel), resubmits with
#      --resume and expects the same results again, with no cell twice.
# Elsewhere (not root, no apt-get) it prints `slurm test skipped: <why>` and exits 0. Every wait is bounded;
# the daemons it started are stopped at the end, however it ends.
#
# Environment: LORACOMP_BIN (default: target/debug/loracomp, built if missing), SLURM_TEST_KEEP=1 keeps the
# temporary directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
t_start=$(date +%s)
say() { echo "[slurm test $(($(date +%s) - t_start))s] $*"; }
skip() {
  echo "slurm test skipped: $*"
  exit 0
}

[ "$(id -u)" = 0 ] || skip "not root (it installs packages and starts daemons)"
command -v apt-get > /dev/null || skip "apt-get is not available (not a Debian-like system)"

# --- install ------------------------------------------------------------------------------------------------
if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null; then
  say "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq > /dev/null || skip "apt-get update failed (no package mirror reachable?)"
  # The packages' own services are not started here (no init system needed): policy-rc.d says no.
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
  fi
  timeout 900 apt-get install -y -qq --no-install-recommends slurm-wlm munge > /dev/null ||
    { [ $made_policy = 1 ] && rm -f "$policy"; skip "apt-get install slurm-wlm munge failed"; }
  [ $made_policy = 1 ] && rm -f "$policy"
fi
for p in slurmctld slurmd munged sbatch squeue scancel sinfo; do
  command -v "$p" > /dev/null || skip "$p not found after installing slurm-wlm and munge"
done

bin="${LORACOMP_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/loracomp}"
if [ ! -x "$bin" ]; then
  say "building loracomp"
  (cd "$root" && cargo build --quiet)
fi
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"

# --- the cluster ----------------------------------------------------------------------------------------------
work="$(mktemp -d /tmp/loracomp-slurm.XXXXXX)"
chmod 700 "$work"
state="$work/state"
mkdir -p "$state/ctld" "$state/d" "$state/munge"
chmod 700 "$state/munge"
pids=()
cleanup() {
  local rc=$?
  if command -v scancel > /dev/null && [ -n "${SLURM_CONF:-}" ]; then
    timeout 10 scancel --user=root > /dev/null 2>&1 || true
  fi
  # stop what this script started, by pid
  for pf in "$state/slurmd.pid" "$state/slurmctld.pid" "$state/munge/munged.pid"; do
    if [ -s "$pf" ]; then
      local pid
      pid="$(cat "$pf")"
      kill "$pid" 2> /dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2> /dev/null || true
    fi
  done
  if [ $rc != 0 ]; then
    for f in "$state"/*.log "$state"/munge/*.log; do
      [ -f "$f" ] && { echo "--- $f (last 30 lines)"; tail -n 30 "$f"; }
    done
    for f in "$work"/*/slurm/logs/*; do
      [ -f "$f" ] && { echo "--- $f"; tail -n 20 "$f"; }
    done
  fi
  if [ "${SLURM_TEST_KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
  say "done (exit $rc)"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# munge: its own key, socket and pid file
dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$state/munge/munge.key"
sock="$state/munge/munge.socket"
munged --force --key-file="$state/munge/munge.key" --socket="$sock" --pid-file="$state/munge/munged.pid" \
  --log-file="$state/munge/munged.log" --seed-file="$state/munge/munged.seed"
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "munged did not start"; exit 1; }

host="$(hostname -s)"
# Two free ports (another cluster, or another run of this test, may hold the default 6817/6818).
port_free() { ! (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }
base=$((20000 + RANDOM % 20000))
until port_free $base && port_free $((base + 1)); do base=$((base + 2)); done
export SLURM_CONF="$state/slurm.conf"
cat > "$SLURM_CONF" << EOF
ClusterName=loracomp-test
# the controller's name must be this host's; it is reached on the loopback address
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$base
SlurmdPort=$((base + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=2
MinJobAge=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -f "$SLURM_CONF" -i
slurmd -f "$SLURM_CONF" -N "$host"
say "waiting for the node to be idle"
deadline=$(($(date +%s) + 60))
until [ "$(timeout 5 sinfo -h -N -o '%t' 2> /dev/null | head -n 1)" = idle ]; do
  [ "$(date +%s)" -lt $deadline ] || { echo "the node did not become idle within 60 s"; timeout 5 sinfo -N || true; exit 1; }
  sleep 1
done
say "cluster up: $(sinfo -h -N -o '%N %t %c CPUs')"

# --- a small sweep ---------------------------------------------------------------------------------------------
mkdir -p "$work/model"
cp "$root/tests/fixtures/tiny-bert/"{config.json,model.safetensors} "$work/model/"
cp "$root/tests/slurm/tiny-tokenizer.json" "$work/model/tokenizer.json"
# A two-class task: each class's examples hold one of its two keywords among filler words w40..w89.
task() { # name key_a key_b seed
  local d="$work/data/$1"
  mkdir -p "$d"
  printf 'a\nb\n' > "$d/labels.txt"
  local s=0
  for split in train valid test; do
    : > "$d/$split.jsonl"
    for i in $(seq 0 7); do
      for label in a b; do
        local k=$2
        [ $label = b ] && k=$3
        local f0=$((40 + (i * 7 + s * 11 + $4) % 50)) f1=$((40 + (i * 7 + 3 + s * 11 + $4) % 50))
        echo "{\"text\": \"w$f0 w$k w$f1\", \"label\": \"$label\"}" >> "$d/$split.jsonl"
      done
    done
    s=$((s + 1))
  done
}
task up1 1 2 0
task up2 3 4 1
task up3 5 6 2
task down 7 8 3
cat > "$work/sweep.toml" << EOF
name = "slurm-test"
model = "model"
data = "data"
upstream = ["up1", "up2", "up3"]
downstream = ["down", "up3"]
exclude_self = true
shots = [1, 2, 4]
seeds = 2
methods = ["linear-probe", "full", "lora", "uniform", "learned"]
[bank]
epochs = 2
rank = 2
alpha = 4
batch = 4
[adapt]
steps = 150
batch = 4
max_len = 16
[ablation]
shots = 1
draws = 1
EOF
cd "$work"

# Every result field but the timing, one sorted line per cell; fails on a cell written twice.
results() {
  local f="$1/results.jsonl"
  [ -s "$f" ] || { echo "$f: missing or empty" >&2; return 1; }
  sed -E 's/"train_seconds":[^,]*,//' "$f" | sort > "$1.cells"
  local dup
  dup="$(grep -o '"key":"[^"]*"' "$1.cells" | sort | uniq -d)"
  [ -z "$dup" ] || { echo "$f: cells twice: $dup" >&2; return 1; }
  cat "$1.cells"
}

# Wait (bounded) until no job of ours is pending or running.
wait_idle() { # seconds
  local deadline=$(($(date +%s) + $1))
  while [ -n "$(timeout 10 squeue -h -o '%i' 2> /dev/null)" ]; do
    if [ "$(date +%s)" -ge $deadline ]; then
      echo "jobs still queued after $1 s:"
      timeout 10 squeue || true
      return 1
    fi
    sleep 1
  done
}

say "single-process sweep"
t0=$(date +%s)
"$bin" --threads 1 sweep --quiet --config sweep.toml --out single > /dev/null
single_s=$(($(date +%s) - t0))
results single > /dev/null
n_cells=$(wc -l < single.cells)
say "single process: $n_cells cells in ${single_s}s"

say "sweep submit --slurm --shards 3"
t0=$(date +%s)
"$bin" --threads 1 sweep submit --slurm --shards 3 --config sweep.toml --out sharded
wait_idle 600
say "slurm run: $(($(date +%s) - t0))s"
ls sharded/shards/cells-{0,1,2}-of-3.jsonl > /dev/null
results sharded > /dev/null
if ! cmp -s single.cells sharded.cells; then
  echo "FAIL: the merged shard results differ from the single-process results:"
  diff single.cells sharded.cells | head -n 20
  exit 1
fi
grep -q '"key"' sharded/results.jsonl
! grep -q 'Missing' sharded/report.md || { echo "FAIL: report.md lists missing cells"; exit 1; }
say "ok: $n_cells merged cells equal the single-process run bit for bit"

say "kill one cells shard mid-run, then --resume"
"$bin" --threads 1 sweep submit --slurm --shards 3 --config sweep.toml --out killed > killed.submit
cells_job="$(sed -n 's/^submitted cells as job //p' killed.submit)"
[ -n "$cells_job" ] || { echo "no cells job in:"; cat killed.submit; exit 1; }
victim=1
file="killed/shards/cells-$victim-of-3.jsonl"
deadline=$(($(date +%s) + 300))
until [ -s "$file" ] && [ "$(wc -l < "$file")" -ge 2 ]; do
  [ "$(date +%s)" -lt $deadline ] || { echo "shard $victim wrote no cells within 300 s"; timeout 10 squeue || true; exit 1; }
  sleep 0.2
done
state_before="$(timeout 10 squeue -h -j "${cells_job}_$victim" -o '%T' 2> /dev/null || true)"
scancel "${cells_job}_$victim"
say "cancelled shard $victim (job ${cells_job}_$victim, was ${state_before:-gone}) after $(wc -l < "$file") cells"
wait_idle 600
[ "$state_before" = RUNNING ] || { echo "FAIL: shard $victim had ended before it was cancelled; the test proves nothing"; exit 1; }
before_resume=$(wc -l < "$file")
dry="$("$bin" --threads 1 sweep submit --slurm --shards 3 --config sweep.toml --out killed --resume --dry-run)"
echo "$dry" | grep -q "^cells: array $victim\$" || { echo "FAIL: --resume does not plan shard $victim alone:"; echo "$dry"; exit 1; }
echo "$dry" | grep -q "^bank: nothing to run" || { echo "FAIL: --resume would retrain the bank:"; echo "$dry"; exit 1; }
"$bin" --threads 1 sweep submit --slurm --shards 3 --config sweep.toml --out killed --resume
wait_idle 600
[ "$(wc -l < "$file")" -gt "$before_resume" ] || { echo "FAIL: the resumed shard added no cells"; exit 1; }
results killed > /dev/null
dup="$(cat killed/shards/cells-*.jsonl | grep -o '"key":"[^"]*"' | sort | uniq -d)"
[ -z "$dup" ] || { echo "FAIL: cells run twice across the shard files: $dup"; exit 1; }
if ! cmp -s single.cells killed.cells; then
  echo "FAIL: results after the kill and --resume differ from the single-process results:"
  diff single.cells killed.cells | head -n 20
  exit 1
fi
say "ok: after scancel and --resume, $n_cells cells equal the single-process run, none twice"
say "slurm test passed in $(($(date +%s) - t_start))s"
