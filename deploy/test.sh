#!/usr/bin/env bash
# Install what the test suite needs (where missing), run the static checks, then the suite.
# Debian packages: dcmtk, dicom3tools, orthanc, orthanc-dicomweb, postgresql, chromium, npm;
# npm: @ohif/app (its prebuilt dist/); PyPI: the project with [test].
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# dcmtk by its Debian path: pynetdicom installs console scripts with the same names
[ -x /usr/bin/storescu ] && [ -x /usr/bin/storescp ] || need+=(dcmtk)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v Orthanc >/dev/null || need+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v npm >/dev/null || need+=(npm)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi

# OHIF, the web viewer the viewer tests open the node's objects in: npm's prebuilt @ohif/app
OHIF_VERSION=3.13.2
OHIF_DIR=.cache/ohif/$OHIF_VERSION
if [ ! -f "$OHIF_DIR/dist/index.html" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  mkdir -p "$OHIF_DIR"
  tar xzf "$tmp/ohif-app-$OHIF_VERSION.tgz" -C "$OHIF_DIR" --strip-components=1
  rm -rf "$tmp"
fi

PY=${PYTHON:-python3}
$PY -m pip install -q -e ".[test]"
PYTHON=$PY bash deploy/check.sh  # ruff and mypy (deploy/check.sh says which modules)
# two workers (pytest-xdist), each taking whole test files: most tests keep one core busy
# while the other waits on a server or a peer; TEST_WORKERS=0 runs them in this process
exec $PY -m pytest -q --durations=15 -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
