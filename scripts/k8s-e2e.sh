#!/usr/bin/env bash
# End-to-end check of the splice operator on a real cluster: kind (default) or an existing
# cluster (k3s, ...) with USE_CURRENT_CONTEXT=1. Needs docker, kubectl and (for kind) kind.
# It builds the image, installs manifests/, runs manifests/examples/splicejob-mlp.yaml and
# checks: pods created, a deleted worker replaced under a new name with the survivor
# untouched, scale through the scale subresource, suspend/resume, operator fail-over, and
# cleanup on delete. Not run by the test suite (no Docker engine or cluster there).
#
#   scripts/k8s-e2e.sh                    # kind cluster "splice-e2e", deleted at the end
#   KEEP_CLUSTER=1 scripts/k8s-e2e.sh     # keep it for poking around
#   USE_CURRENT_CONTEXT=1 IMAGE=registry.example/splice:dev PUSH=1 scripts/k8s-e2e.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-splice-e2e}
IMAGE=${IMAGE:-splice:dev}
NS=${NS:-splice-e2e}
WAIT=${WAIT:-300s}
JOB=mlp

log() { printf '\n== %s\n' "$*"; }
fail() { printf '\nFAIL: %s\n' "$*" >&2; kubectl -n "$NS" get splicejob,pods -o wide >&2 || true;
         kubectl -n splice-system logs deploy/splice-operator --tail=50 >&2 || true; exit 1; }
need() { command -v "$1" >/dev/null || { echo "k8s-e2e: $1 is required" >&2; exit 2; }; }
workers() { kubectl -n "$NS" get pods -l "splice.dev/job=$JOB,splice.dev/role=worker" \
              --field-selector=status.phase!=Failed -o jsonpath='{.items[*].metadata.name}'; }
count() { wc -w <<<"$(workers)" | tr -d ' '; }
wait_until() {  # wait_until SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@"; do (( SECONDS < deadline )) || fail "timed out waiting for $what"; sleep 2; done
}

need docker; need kubectl
if [[ -z "${USE_CURRENT_CONTEXT:-}" ]]; then
  need kind
  if ! kind get clusters | grep -qx "$CLUSTER"; then
    log "creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --wait 120s
  fi
  [[ -n "${KEEP_CLUSTER:-}" ]] || trap 'kind delete cluster --name "$CLUSTER"' EXIT
  kubectl config use-context "kind-$CLUSTER" >/dev/null
fi

log "building $IMAGE"
docker build -f manifests/Dockerfile -t "$IMAGE" .
if [[ -z "${USE_CURRENT_CONTEXT:-}" ]]; then kind load docker-image "$IMAGE" --name "$CLUSTER"
elif [[ -n "${PUSH:-}" ]]; then docker push "$IMAGE"; fi

log "installing the operator"
kubectl apply -f manifests/
kubectl wait --for=condition=Established crd/splicejobs.splice.dev --timeout=60s
kubectl -n splice-system set image deploy/splice-operator operator="$IMAGE"
kubectl -n splice-system rollout status deploy/splice-operator --timeout="$WAIT"

log "creating SpliceJob $JOB in $NS"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
sed -e "s/namespace: default/namespace: $NS/" -e "s#image: splice:dev#image: $IMAGE#" \
  manifests/examples/splicejob-mlp.yaml | kubectl apply -f -
kubectl -n "$NS" wait "splicejob/$JOB" --for=jsonpath='{.status.phase}'=Running --timeout="$WAIT" \
  || fail "job never reached Running"
kubectl -n "$NS" get splicejobs
[[ $(count) == 2 ]] || fail "expected 2 worker pods, got: $(workers)"
kubectl -n "$NS" get svc "$JOB-controller" >/dev/null || fail "no controller Service"

log "deleting a worker pod: a replacement must appear, the survivor must stay"
read -r victim survivor <<<"$(workers)"
survivor_uid=$(kubectl -n "$NS" get pod "$survivor" -o jsonpath='{.metadata.uid}')
kubectl -n "$NS" delete pod "$victim" --wait=false
wait_until 120 "a replacement pod" bash -c "[[ \$(kubectl -n $NS get pods -l splice.dev/job=$JOB,splice.dev/role=worker -o name | grep -vc $victim) -ge 2 ]]"
[[ $(kubectl -n "$NS" get pod "$survivor" -o jsonpath='{.metadata.uid}') == "$survivor_uid" ]] \
  || fail "the surviving pod $survivor was touched"
wait_until 60 "podReplacements>=1" bash -c "[[ \$(kubectl -n $NS get splicejob $JOB -o jsonpath='{.status.podReplacements}') -ge 1 ]]"

log "scaling to 3 through the scale subresource"
kubectl -n "$NS" scale "splicejob/$JOB" --replicas=3
wait_until 120 "3 worker pods" bash -c "[[ \$(kubectl -n $NS get pods -l splice.dev/job=$JOB,splice.dev/role=worker --field-selector=status.phase!=Failed -o name | wc -l) -eq 3 ]]"

log "suspending and resuming"
kubectl -n "$NS" patch "splicejob/$JOB" --type merge -p '{"spec":{"suspend":true}}'
kubectl -n "$NS" wait "splicejob/$JOB" --for=jsonpath='{.status.phase}'=Suspended --timeout=120s
wait_until 120 "no pods while suspended" bash -c "[[ -z \$(kubectl -n $NS get pods -l splice.dev/job=$JOB -o name) ]]"
kubectl -n "$NS" patch "splicejob/$JOB" --type merge -p '{"spec":{"suspend":false}}'
wait_until 180 "pods back after resume" bash -c "[[ \$(kubectl -n $NS get pods -l splice.dev/job=$JOB,splice.dev/role=worker -o name | wc -l) -eq 3 ]]"

log "operator fail-over: deleting the Lease holder"
leader=$(kubectl -n splice-system get lease splice-operator -o jsonpath='{.spec.holderIdentity}')
kubectl -n splice-system delete pod "$leader" --wait=false
wait_until 120 "a new Lease holder" bash -c "h=\$(kubectl -n splice-system get lease splice-operator -o jsonpath='{.spec.holderIdentity}'); [[ -n \$h && \$h != $leader ]]"
kubectl -n "$NS" delete pod "$(workers | awk '{print $1}')" --wait=false
wait_until 120 "the new leader to replace a pod" bash -c "[[ \$(kubectl -n $NS get splicejob $JOB -o jsonpath='{.status.podReplacements}') -ge 2 ]]"

log "deleting the job: everything it owns must go"
kubectl -n "$NS" delete "splicejob/$JOB" --timeout=120s
wait_until 120 "the job's pods to go" bash -c "[[ -z \$(kubectl -n $NS get pods,svc -l splice.dev/job=$JOB -o name) ]]"

log "PASS"
