#!/usr/bin/env bash
# The real-SLURM test tier (`make test-slurm`, part of `make test`): start the single-node SLURM of
# scripts/slurm/local_cluster.sh, run tests/slurm/ against it, stop the daemons this run started (also on failure).
#
# Where the machine cannot run a SLURM (not root, no apt and no packages), the tier prints why, in a banner, and
# exits 0 (the fake-SLURM tests of tests/sweeps/ still run in the main suite); AVKV_REQUIRE_SLURM=1 makes that a
# failure. The tier shortens SLURM's waits so it runs in minutes: KillWait 3 s (default 30) and a requeue delay
# of 10 s (cred_expire; SLURM's default 120 s).
#   PY=.venv/bin/python scripts/slurm/test_tier.sh [pytest args]
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CLUSTER=scripts/slurm/local_cluster.sh
export AVKV_SLURM_KILLWAIT=${AVKV_SLURM_KILLWAIT:-3} AVKV_SLURM_CRED_EXPIRE=${AVKV_SLURM_CRED_EXPIRE:-10}
export AVKV_SLURM_STATE=${AVKV_SLURM_STATE:-/var/lib/avkv-slurm}

banner() { printf '\n%s\n%s\n%s\n\n' "################################################################################" \
  "### $*" "################################################################################"; }

t0=$(date +%s)
if ! why=$(bash "$CLUSTER" check); then
  banner "SLURM TIER NOT RUN: $why. tests/slurm/ skipped; only the fake-SLURM tests (tests/sweeps) ran."
  [ "${AVKV_REQUIRE_SLURM:-0}" = 1 ] && exit 1
  exit 0
fi

# the daemons started by THIS run (a cluster already up, e.g. started by hand, is left running)
before=$(bash "$CLUSTER" status 2>/dev/null | sed -n 's/^local_cluster: \([a-z]*\) running.*/\1/p' | tr '\n' ' ')
stop_ours() {
  local name started=()
  for name in munged mariadb slurmdbd slurmctld slurmd; do
    case " $before " in *" $name "*) ;; *) started+=("$name") ;; esac
  done
  [ ${#started[@]} -gt 0 ] && bash "$CLUSTER" stop "${started[@]}"
  [ -n "${before// /}" ] && echo "local_cluster: left running (started before this tier): $before"
  true
}
trap stop_ours EXIT
trap 'exit 130' INT TERM

if ! bash "$CLUSTER" start; then
  banner "SLURM TIER FAILED: the local cluster did not start (logs: $AVKV_SLURM_STATE/log)"
  exit 1
fi
export SLURM_CONF=$AVKV_SLURM_STATE/etc/slurm.conf AVKV_SLURM_TIER=1
t1=$(date +%s)
timeout 1500 "$PY" -m pytest tests/slurm -v -rA --durations=0 -p no:cacheprovider "$@"
rc=$?
t2=$(date +%s)
if [ $rc = 0 ]; then
  banner "SLURM TIER PASSED in $((t2 - t0)) s (cluster start $((t1 - t0)) s, tests $((t2 - t1)) s)"
else
  banner "SLURM TIER FAILED (pytest exit $rc) after $((t2 - t0)) s"
fi
exit $rc
