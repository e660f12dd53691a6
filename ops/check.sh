#!/usr/bin/env bash
# Checks of everything under ops/ (what CI runs). Installs what it needs when absent.
#
#   ops/check.sh                 run every check; last line "ops: N passed, M failed"
#   ops/check.sh metric-names    print the metric names that alert rules and dashboards use
#                                (ours only, base names of histograms), one per line, sorted
#
# Tools: kubectl (kustomize), kubernetes-validate (pip), promtool (Debian package prometheus),
# nats-server (Debian), python3 with PyYAML; helm when present, else the Helm libraries shipped in
# the helm-sdkpy wheel (lint) and the helm-python-sdk wheel (offline rendering), from PyPI.
set -euo pipefail

OPS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS="$OPS/tools"
HELM_SDKPY_VERSION=0.1.32
HELM_PYTHON_SDK_VERSION=0.2.2

log() { printf '%s\n' "$*" >&2; }

ensure_pyyaml() {
    python3 -c 'import yaml' 2>/dev/null || pip install --quiet pyyaml >&2
}

if [[ "${1:-}" == "metric-names" ]]; then
    ensure_pyyaml
    exec python3 "$TOOLS/opscheck.py" metric-names
fi
if [[ $# -gt 0 ]]; then
    log "usage: $0 [metric-names]"
    exit 2
fi

APT_UPDATED=0
apt_install() {
    if [[ $APT_UPDATED == 0 ]]; then
        apt-get update -qq >&2
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# ---------------------------------------------------------------------------- tools
command -v promtool >/dev/null || { log "installing promtool (Debian package prometheus)"; apt_install prometheus; }
command -v nats-server >/dev/null || { log "installing nats-server (Debian)"; apt_install nats-server; }
command -v kubernetes-validate >/dev/null || { log "installing kubernetes-validate (pip)"; pip install --quiet kubernetes-validate >&2; }
ensure_pyyaml

PASSED=0
FAILED=0
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# check NAME COMMAND...: run one check, count it, show its output only when it fails.
check() {
    local name="$1"
    shift
    if "$@" >"$WORK/out" 2>&1; then
        PASSED=$((PASSED + 1))
        printf 'ok    %s\n' "$name"
    else
        FAILED=$((FAILED + 1))
        printf 'FAIL  %s\n' "$name"
        sed 's/^/      /' "$WORK/out"
    fi
}

# ---------------------------------------------------------------------------- Kubernetes
validate_manifests() { # FILE [SECRETS]: schema per object (CRDs without a schema only warn), then
    # references; SECRETS (comma-separated) are Secrets made outside the manifests (sealed-secrets)
    kubernetes-validate --quiet "$1" && python3 "$TOOLS/opscheck.py" check-k8s --external-secrets "${2:-}" "$1"
}

if command -v kubectl >/dev/null; then
    for dir in base overlays/dev overlays/staging overlays/prod; do
        out="$WORK/kustomize-${dir//\//-}.yaml"
        check "kustomize build k8s/$dir" sh -c "kubectl kustomize '$OPS/k8s/$dir' > '$out'"
        if [[ -s "$out" ]]; then
            check "validate k8s/$dir" validate_manifests "$out"
        fi
    done
    prod="$WORK/kustomize-overlays-prod.yaml"
    check "prod: namespace creto-enablement-prod, image tags pinned" sh -c \
        "grep -q 'namespace: creto-enablement-prod' '$prod' && ! grep -Eq 'image: .*:latest\$' '$prod' \
         && ! grep -E '^  namespace: ' '$prod' | grep -vq 'creto-enablement-prod'"
else
    log "SKIP Kubernetes checks: kubectl is missing (install kubectl; it provides kustomize)"
    FAILED=$((FAILED + 1))
    printf 'FAIL  kubectl missing: kustomize builds not run\n'
fi

# ---------------------------------------------------------------------------- Helm
CHART="$OPS/helm/creto-enablement"
VALUES=("$CHART/values.yaml" "$CHART/values-dev.yaml" "$CHART/values-staging.yaml" "$CHART/values-prod.yaml")
if command -v helm >/dev/null; then
    for values in "${VALUES[@]}"; do
        env="$(basename "$values" .yaml)"
        check "helm lint ($env)" helm lint "$CHART" -f "$values"
        out="$WORK/helm-$env.yaml"
        check "helm template ($env)" sh -c "helm template creto-enablement '$CHART' -n creto-enablement -f '$values' > '$out'"
        external="$(python3 "$TOOLS/opscheck.py" helm-external-secrets "$CHART" "$values")"
        [[ -s "$out" ]] && check "validate helm ($env)" validate_manifests "$out" "$external"
    done
else
    # No helm binary: lint through the Helm library in the helm-sdkpy wheel (Python >= 3.12
    # metadata, but only its shared library is used, through ctypes). Rendering for schema
    # validation needs a real helm; that part is skipped, and said so.
    cache="${XDG_CACHE_HOME:-$HOME/.cache}/creto-ops/helm-sdkpy-$HELM_SDKPY_VERSION"
    so="$cache/helm_sdkpy/_lib/linux-amd64/libhelm_sdkpy.so"
    if [[ ! -f "$so" && "$(uname -m)" == "x86_64" ]]; then
        log "helm missing: fetching helm-sdkpy $HELM_SDKPY_VERSION (PyPI) for its Helm library"
        mkdir -p "$cache"
        if pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
            -d "$cache" "helm-sdkpy==$HELM_SDKPY_VERSION" >&2; then
            python3 -c 'import sys, zipfile, glob; zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0]).extractall(sys.argv[1])' "$cache"
        fi
    fi
    if [[ -f "$so" ]]; then
        check "helm lint via helm-sdkpy library (4 values files)" \
            python3 "$TOOLS/helm_sdk_lint.py" "$so" "$CHART" "${VALUES[@]}"
    else
        log "SKIP helm lint: no helm binary and the helm-sdkpy library could not be fetched"
    fi
    # Rendering (helm template) through the helm-python-sdk wheel's library, offline.
    sdk="${XDG_CACHE_HOME:-$HOME/.cache}/creto-ops/helm-python-sdk-$HELM_PYTHON_SDK_VERSION"
    if [[ ! -d "$sdk/helm_python" && "$(uname -m)" == "x86_64" ]]; then
        log "helm missing: fetching helm-python-sdk $HELM_PYTHON_SDK_VERSION (PyPI) to render the chart"
        mkdir -p "$sdk"
        if pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
            -d "$sdk" "helm-python-sdk==$HELM_PYTHON_SDK_VERSION" >&2; then
            python3 -c 'import sys, zipfile, glob; zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0]).extractall(sys.argv[1])' "$sdk"
        fi
    fi
    if [[ -d "$sdk/helm_python" ]]; then
        for values in "${VALUES[@]}"; do
            env="$(basename "$values" .yaml)"
            out="$WORK/helm-$env.yaml"
            check "helm template via helm-python-sdk library ($env)" \
                python3 "$TOOLS/helm_render.py" "$sdk" "$CHART" "$values" "$out"
            external="$(python3 "$TOOLS/opscheck.py" helm-external-secrets "$CHART" "$values")"
            [[ -s "$out" ]] && check "validate helm ($env)" validate_manifests "$out" "$external"
        done
    else
        log "SKIP helm template + schema validation: no helm binary and the helm-python-sdk library could not be fetched"
    fi
fi

# ---------------------------------------------------------------------------- NATS
nats_conf() {
    # nats-server < 2.10 does not know settings marked "# nats>=2.10"; test the rest with it.
    local dir="$WORK/nats"
    mkdir -p "$dir"
    cp "$OPS/nats/accounts.conf" "$dir/"
    if nats-server --version | grep -Eq 'v2\.([0-9])\.'; then
        grep -v 'nats>=2.10' "$OPS/nats/nats-server.conf" >"$dir/nats-server.conf"
    else
        cp "$OPS/nats/nats-server.conf" "$dir/"
    fi
    SERVER_NAME=nats-0 nats-server -t -c "$dir/nats-server.conf"
}
check "nats-server -t nats-server.conf + accounts.conf" nats_conf

# ---------------------------------------------------------------------------- Prometheus
check "promtool check rules" promtool check rules "$OPS/prometheus/alerts.yaml"
check "promtool test rules" sh -c "cd '$OPS/prometheus' && promtool test rules alerts_test.yaml"
check "every alert has firing and not-firing tests" python3 "$TOOLS/opscheck.py" check-alert-tests

# ---------------------------------------------------------------------------- Grafana
json_ok() { for f in "$OPS"/grafana/dashboards/*.json; do python3 -m json.tool "$f" >/dev/null || return 1; done; }
check "python3 -m json.tool on every dashboard" json_ok
check "dashboards match generate.py" sh -c \
    "python3 '$OPS/grafana/generate.py' '$WORK/dash' && diff -r '$WORK/dash' '$OPS/grafana/dashboards'"
check "dashboard structure (uids, schemaVersion 39, datasource variable)" python3 "$TOOLS/opscheck.py" check-dashboards
check "dashboard queries parse (promtool)" sh -c \
    "python3 '$TOOLS/opscheck.py' dashboard-rules '$WORK/dashboard-rules.yaml' && promtool check rules '$WORK/dashboard-rules.yaml'"

# ---------------------------------------------------------------------------- metric contract
check "alerts + dashboards use exactly metrics-contract.txt" python3 "$TOOLS/opscheck.py" check-metrics

echo "ops: $PASSED passed, $FAILED failed"
[[ $FAILED == 0 ]]
