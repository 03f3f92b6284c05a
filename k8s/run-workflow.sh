#!/bin/sh
# Run the octssl workflow in order after `kubectl apply -k`: octssl-ingest runs on the standing cluster
# as soon as it is applied; octssl-pretrain and octssl-sweep are created suspended and released here,
# each once the job whose output it reads has succeeded. Safe to re-run (a released job stays released,
# a job that already succeeded is passed at once).
#
# It stops as soon as a job fails (or is stopped, or misses TIMEOUT): it names the job, prints the last
# LOG_LINES lines of its log and says how to resume. Every job continues its own run when it starts again
# (its entrypoint passes --resume-if-exists), so nothing finished is redone.
#   NAMESPACE=octssl TIMEOUT=48h POLL=30 LOG_LINES=40 OVERLAY=k8s/overlays/dev-cpu k8s/run-workflow.sh
set -eu
ns=${NAMESPACE:-octssl}
timeout=${TIMEOUT:-48h}
poll=${POLL:-30}
log_lines=${LOG_LINES:-40}
overlay=${OVERLAY:-k8s/overlays/dev-cpu}

seconds() {  # 48h, 30m, 90s or 90 -> seconds
  case $1 in
    *h) echo $((${1%h} * 3600)) ;;
    *m) echo $((${1%m} * 60)) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
  esac
}

stop_on() {  # job, what happened: name it, show its log's end, say how to resume, exit 1
  echo "error: rayjob/$1 $2; the workflow stops here" >&2
  echo "--- last $log_lines lines of its log (kubectl -n $ns logs job/$1) ---" >&2
  kubectl -n "$ns" logs "job/$1" --tail="$log_lines" >&2 || echo "(no log available)" >&2
  echo "--- to resume: fix the cause, then" >&2
  echo "  kubectl -n $ns delete rayjob $1 && kubectl apply -k $overlay && $0" >&2
  echo "  (the job continues its own run from its last checkpoint; finished jobs are not run again)" >&2
  exit 1
}

wait_for() {
  echo "waiting for rayjob/$1 to succeed"
  deadline=$(($(date +%s) + $(seconds "$timeout")))
  while :; do
    status=$(kubectl -n "$ns" get rayjob "$1" -o jsonpath='{.status.jobStatus}/{.status.jobDeploymentStatus}') \
      || stop_on "$1" "cannot be read"
    case $status in
      SUCCEEDED/*) echo "rayjob/$1 succeeded"; return 0 ;;
      FAILED/* | STOPPED/* | */Failed) stop_on "$1" "ended ($status)" ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || stop_on "$1" "did not succeed within $timeout (status: $status)"
    sleep "$poll"
  done
}

release() {
  echo "releasing rayjob/$1"
  kubectl -n "$ns" patch rayjob "$1" --type merge -p '{"spec":{"suspend":false}}'
}

wait_for octssl-ingest
release octssl-pretrain
wait_for octssl-pretrain
release octssl-sweep
wait_for octssl-sweep
echo "workflow done"
