#!/usr/bin/env bash
# Install what the test suite needs (where missing), then run it.
# Debian packages: dcmtk, dicom3tools, orthanc, postgresql, chromium; PyPI: the project with [test].
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# dcmtk by its Debian path: pynetdicom installs console scripts with the same names
[ -x /usr/bin/storescu ] && [ -x /usr/bin/storescp ] || need+=(dcmtk)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v Orthanc >/dev/null || need+=(orthanc)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi

PY=${PYTHON:-python3}
$PY -m pip install -q -e ".[test]"
exec $PY -m pytest -q "$@"
