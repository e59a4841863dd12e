#!/usr/bin/env bash
# Starts N ranks of a command with torchrun's environment (MASTER_ADDR, MASTER_PORT, RANK,
# WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK), the way src/dist.rs expects.
#
#   scripts/launch.sh --nproc N [--nnodes M --node-rank R --master-addr HOST --master-port P]
#                     [--grace S] -- CMD ARGS...
#
# Each rank runs in its own process group, so a signal reaches the whole rank (and whatever it
# spawned). SIGINT/SIGTERM to the launcher are forwarded to every rank. When a rank exits
# non-zero, the others get SIGTERM, then SIGKILL after the grace period (default 10 s), and the
# launcher exits with the failing rank's status, naming it. Exit 0 only if every rank succeeds.
# Needs bash >= 5.1 (wait -n -p) and setsid (util-linux).
set -euo pipefail

prog=launch.sh

usage() {
  cat <<'EOF'
usage: scripts/launch.sh --nproc N [--nnodes M --node-rank R --master-addr HOST --master-port P]
                         [--grace SECONDS] -- CMD ARGS...

  --nproc N          ranks to start on this node (also --nproc-per-node)
  --nnodes M         number of nodes (default 1)
  --node-rank R      this node's index, 0..M-1 (default 0)
  --master-addr HOST address of the node hosting rank 0 (default 127.0.0.1; required if M > 1)
  --master-port P    its TCP port (default: a free port; required if M > 1)
  --grace SECONDS    wait between SIGTERM and SIGKILL when stopping ranks (default 10)
EOF
}

die() {
  echo "$prog: $*" >&2
  exit 2
}

is_uint() {
  [[ $1 =~ ^[0-9]+$ ]]
}

nproc=""
nnodes=1
node_rank=0
master_addr=""
master_port=""
grace=10

while (($# > 0)); do
  case "$1" in
    --nproc | --nproc-per-node | --nproc_per_node)
      (($# >= 2)) || die "$1 needs a value"
      nproc=$2
      shift 2
      ;;
    --nnodes)
      (($# >= 2)) || die "$1 needs a value"
      nnodes=$2
      shift 2
      ;;
    --node-rank | --node_rank)
      (($# >= 2)) || die "$1 needs a value"
      node_rank=$2
      shift 2
      ;;
    --master-addr | --master_addr)
      (($# >= 2)) || die "$1 needs a value"
      master_addr=$2
      shift 2
      ;;
    --master-port | --master_port)
      (($# >= 2)) || die "$1 needs a value"
      master_port=$2
      shift 2
      ;;
    --grace)
      (($# >= 2)) || die "$1 needs a value"
      grace=$2
      shift 2
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      break
      ;;
    *)
      usage >&2
      die "unknown option '$1' (the command goes after --)"
      ;;
  esac
done

(($# > 0)) || {
  usage >&2
  die "no command given after --"
}
[[ -n $nproc ]] || die "--nproc is required"
if ! is_uint "$nproc" || ((nproc < 1)); then
  die "--nproc must be a positive integer, got '$nproc'"
fi
if ! is_uint "$nnodes" || ((nnodes < 1)); then
  die "--nnodes must be a positive integer, got '$nnodes'"
fi
if ! is_uint "$node_rank" || ((node_rank >= nnodes)); then
  die "--node-rank must be in 0..$((nnodes - 1)), got '$node_rank'"
fi
is_uint "$grace" || die "--grace must be a whole number of seconds, got '$grace'"
((BASH_VERSINFO[0] > 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] >= 1))) ||
  die "bash >= 5.1 is required (found $BASH_VERSION)"
command -v setsid >/dev/null || die "setsid (util-linux) is required"

if ((nnodes > 1)); then
  [[ -n $master_addr ]] || die "--master-addr is required with --nnodes > 1"
  [[ -n $master_port ]] || die "--master-port is required with --nnodes > 1"
fi
master_addr=${master_addr:-127.0.0.1}

# A port nothing listens on. Racy like torchrun's choice, but rank 0 binds it within moments.
free_port() {
  local port _
  for _ in $(seq 1 200); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  return 1
}
if [[ -z $master_port ]]; then
  master_port=$(free_port) || die "could not find a free TCP port"
fi
if ! is_uint "$master_port" || ((master_port < 1 || master_port > 65535)); then
  die "--master-port must be a TCP port, got '$master_port'"
fi

world_size=$((nnodes * nproc))
declare -A rank_of=() # pid (= process group id) -> global rank
pids=()

# Sends a signal to every rank's process group, waits up to the grace period for them to
# end, then SIGKILLs whatever is left.
stop_ranks() {
  local sig=$1 pid deadline alive
  for pid in "${pids[@]}"; do
    kill -s "$sig" -- "-$pid" 2>/dev/null || true
  done
  deadline=$((SECONDS + grace))
  while :; do
    alive=0
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then
        alive=1
      fi
    done
    ((alive && SECONDS < deadline)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    kill -s KILL -- "-$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}

# shellcheck disable=SC2317 # invoked through trap
on_signal() {
  local sig=$1 code=$2
  trap - INT TERM
  echo "$prog: received SIG$sig; forwarding it to ${#pids[@]} running rank(s)" >&2
  stop_ranks "$sig"
  exit "$code"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

for ((local_rank = 0; local_rank < nproc; local_rank++)); do
  rank=$((node_rank * nproc + local_rank))
  MASTER_ADDR=$master_addr MASTER_PORT=$master_port RANK=$rank WORLD_SIZE=$world_size \
    LOCAL_RANK=$local_rank LOCAL_WORLD_SIZE=$nproc GROUP_RANK=$node_rank \
    setsid "$@" &
  pids+=("$!")
  rank_of[$!]=$rank
done

while ((${#pids[@]} > 0)); do
  status=0
  finished=""
  wait -n -p finished "${pids[@]}" || status=$?
  if [[ -z $finished ]]; then
    continue # interrupted by a trapped signal that did not exit; wait again
  fi
  remaining=()
  for pid in "${pids[@]}"; do
    [[ $pid == "$finished" ]] || remaining+=("$pid")
  done
  pids=("${remaining[@]}")
  if ((status != 0)); then
    echo "$prog: rank ${rank_of[$finished]} (pid $finished) exited with status $status;" \
      "stopping the other ${#pids[@]} rank(s)" >&2
    if ((${#pids[@]} > 0)); then
      stop_ranks TERM
    fi
    echo "$prog: failed: rank ${rank_of[$finished]} was the first to fail (status $status)" >&2
    exit "$status"
  fi
done
exit 0
