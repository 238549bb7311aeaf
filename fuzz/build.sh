#!/usr/bin/env bash
# Build the fuzzing copy of proxies/postgres/_speedups.c: clang with AddressSanitizer,
# UBSan (every report fatal) and libFuzzer's coverage instrumentation, into build/fuzz/.
# The extension in the source tree is never touched. Installs clang and its sanitizer
# runtimes with apt-get when missing (Debian/Ubuntu; root, or sudo available).
# Usage: fuzz/build.sh [python]   (the virtualenv's python by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
updated=""
install() {
  echo "installing system packages for fuzzing: $*"
  [ -n "$updated" ] || $SUDO apt-get update -qq
  updated=1
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" \
    >/dev/null
}
command -v clang >/dev/null 2>&1 || install clang
# this clang's sanitizer runtimes and ignore lists
rt="libclang-rt-$(clang -dumpversion | cut -d. -f1)-dev"
dpkg -s "$rt" >/dev/null 2>&1 || install "$rt"

include="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
suffix="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
src=proxies/postgres/_speedups.c
out="build/fuzz/_speedups${suffix}"
mkdir -p build/fuzz
if [ "$out" -nt "$src" ] && [ "$out" -nt "$0" ]; then
  echo "sanitized extension up to date: $out"
  exit 0
fi
# -O1 keeps the stacks readable; warnings as the project's build has them.
clang -shared -fPIC -g -O1 -fno-omit-frame-pointer \
  -fsanitize=address,undefined,fuzzer-no-link -fno-sanitize-recover=undefined \
  -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers \
  -I"$include" "$src" -o "$out.tmp"
mv "$out.tmp" "$out"
echo "built the sanitized extension: $out ($(clang --version | head -n1))"
