#!/usr/bin/env bash
# Write a DeepSpeed hostfile ("HOST slots=GPUS", one line per node) and print the master
# address (the first node) on stdout.
#
#   cluster/slurm/make_hostfile.sh [--nodes "h1 h2 ..."] [--slots N] HOSTFILE
#
# Nodes, in this order of precedence:
#   --nodes    already-expanded host names, separated by spaces, commas or newlines (any scheduler);
#   otherwise  `scontrol show hostnames "$SLURM_JOB_NODELIST"`, SLURM's own expansion of
#              compressed lists such as gpu[01-03,07].
# Slots (GPUs on each node):
#   --slots N, else SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("8" or typed "a100:8").
#   DeepSpeed starts one rank per slot; every node gets the same count, as SLURM allocates
#   --gpus-per-node uniformly.
# Exit status 2 with a message naming the fix when the nodes or the GPU count are unknown.
set -euo pipefail

die() {
    echo "make_hostfile.sh: $*" >&2
    exit 2
}

nodes=""
slots=""
while (($#)); do
    case "$1" in
        --nodes) nodes="${2:?--nodes needs a value}"; shift 2 ;;
        --slots) slots="${2:?--slots needs a value}"; shift 2 ;;
        -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) break ;;
    esac
done
(($# == 1)) || die "expected exactly one HOSTFILE argument, got $# (usage: make_hostfile.sh [--nodes 'h1 h2'] [--slots N] HOSTFILE)"
hostfile=$1

if [[ -z $nodes ]]; then
    [[ -n ${SLURM_JOB_NODELIST:-} ]] || die "SLURM_JOB_NODELIST is not set: run inside a SLURM allocation or pass --nodes 'h1 h2'"
    nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST") ||
        die "'scontrol show hostnames $SLURM_JOB_NODELIST' failed: is SLURM's scontrol on PATH?"
fi
# Split on spaces, tabs, newlines and commas; read -d '' consumes every line, not just the first.
IFS=$' \t\n,' read -r -d '' -a hosts <<<"$nodes" || true
((${#hosts[@]} > 0)) || die "no host names in the node list '$nodes'"

if [[ -z $slots ]]; then
    slots=${SLURM_GPUS_ON_NODE:-}
    if [[ -z $slots && -n ${SLURM_GPUS_PER_NODE:-} ]]; then
        slots=${SLURM_GPUS_PER_NODE##*:}  # "a100:8" -> "8"
    fi
fi
[[ $slots =~ ^[1-9][0-9]*$ ]] ||
    die "GPUs per node unknown or invalid ('$slots'): submit with --gpus-per-node=N, or pass --slots N"

declare -A seen=()
tmp="$hostfile.tmp.$$"
: >"$tmp"
for host in "${hosts[@]}"; do
    # DeepSpeed refuses a hostfile that names a host twice; say so here, with the list.
    [[ -z ${seen[$host]:-} ]] || { rm -f "$tmp"; die "host '$host' appears twice in '$nodes'"; }
    seen[$host]=1
    printf '%s slots=%s\n' "$host" "$slots" >>"$tmp"
done
mv -f "$tmp" "$hostfile"  # atomic: a reader never sees half a hostfile
printf '%s\n' "${hosts[0]}"
