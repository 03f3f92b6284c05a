#!/bin/sh
# Run the octssl workflow in order after `kubectl apply -k`: octssl-ingest runs on the standing cluster
# as soon as it is applied; octssl-pretrain and octssl-sweep are created suspended and released here,
# each once the job whose output it reads has succeeded. Safe to re-run (a released job stays released).
#   NAMESPACE=octssl TIMEOUT=48h k8s/run-workflow.sh
set -eu
ns=${NAMESPACE:-octssl}
timeout=${TIMEOUT:-48h}

wait_for() {
  echo "waiting for rayjob/$1 to succeed"
  kubectl -n "$ns" wait --for=jsonpath='{.status.jobStatus}'=SUCCEEDED "rayjob/$1" --timeout="$timeout"
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
