#!/usr/bin/env bash
# Install the Debian packages a local cluster needs, when missing: nginx, redis-server,
# python3 with python3-venv (for `python3 -m venv`), and make. Extra package names given as
# arguments are installed too when their command is missing (`cluster/system-deps.sh wrk`).
# Installs only as root; otherwise prints the command to run and fails.
set -euo pipefail

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || need+=(redis-server)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
command -v make >/dev/null 2>&1 || need+=(make)
for package in "$@"; do
  command="$package"
  [ "$package" = nodejs ] && command=node
  [ "$package" = kubernetes-client ] && command=kubectl
  [ "$package" = chromium-driver ] && command=chromedriver
  command -v "$command" >/dev/null 2>&1 || need+=("$package")
done

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${need[*]}" >&2
  echo "install them as root, then run this again:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi

echo "installing ${need[*]}"
apt-get update -qq
# The cluster runs its own nginx and Redis on their own ports; the packages' system services
# are not needed, so keep their post-install scripts from starting them where possible.
DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends \
  "${need[@]}" >/dev/null
