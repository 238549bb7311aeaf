#!/usr/bin/env bash
# Install the system packages Keyturn's demo and tests need, only if missing.
# Debian/Ubuntu with apt-get; run as root (or with sudo available).
set -euo pipefail

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
  || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v pgbench >/dev/null 2>&1 || need+=(postgresql-contrib)
# The SSH gateway's tests run a throwaway OpenSSH server and the real ssh/scp/sftp clients.
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
# The HTTP gateway's tests drive it with curl.
command -v curl >/dev/null 2>&1 || need+=(curl)
# The portal's browser tests drive Debian's chromium through Playwright. Optional:
# if it cannot be installed, those tests skip and say why.
optional=()
[ -x /usr/bin/chromium ] || optional+=(chromium)
for extra in "$@"; do
  case "$extra" in
    pgbouncer) command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer) ;;
    *) dpkg -s "$extra" >/dev/null 2>&1 || need+=("$extra") ;;
  esac
done
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
# The gateway's compiled hot loops (proxies/postgres/_speedups.c) need a C compiler and
# the headers of the Python that builds the virtualenv.
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  2>/dev/null || need+=(python3-dev)

if [ ${#need[@]} -eq 0 ] && [ ${#optional[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
  echo "installing system packages: ${need[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ ${#optional[@]} -gt 0 ]; then
  echo "installing optional system packages: ${optional[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends "${optional[@]}" >/dev/null \
    || echo "could not install ${optional[*]}; the portal's browser tests will be skipped" >&2
fi
# Debian's postgresql package starts a cluster of its own; Keyturn never uses it.
if [ -x /usr/sbin/service ] && printf '%s\n' "${need[@]}" | grep -qx postgresql; then
  $SUDO service postgresql stop >/dev/null 2>&1 || true
fi
