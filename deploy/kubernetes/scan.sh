#!/usr/bin/env bash
# Security scan of the rendered Kubernetes manifests: every overlay through `kubectl kustomize`,
# then checkov (PyPI) over the result. checkov lives in a virtual environment of its own
# (.venv-checkov), because its pinned dependencies would downgrade the project's. Exits
# non-zero on any finding that is not skipped; each skip is justified in docs/kubernetes.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=${CHECKOV_VENV:-.venv-checkov}
version=3.3.30
if [ "$("$venv/bin/checkov" --version 2>/dev/null || true)" != "$version" ]; then
  python3 -m venv "$venv"
  if ! "$venv/bin/pip" install --quiet --disable-pip-version-check "checkov==$version" \
      > "$venv/install.log" 2>&1; then
    cat "$venv/install.log" >&2
    exit 1
  fi
fi

rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
for overlay in deploy/kubernetes/overlays/*/; do
  name=$(basename "$overlay")
  kubectl kustomize "$overlay" > "$rendered/$name.yaml" 2>/dev/null
done
# --skip-download: offline; the checks ship with the package.
"$venv/bin/checkov" -d "$rendered" --framework kubernetes --compact --quiet --skip-download
