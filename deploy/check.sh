#!/usr/bin/env bash
# Static checks: the formatter, ruff's rules and mypy (strict, with the relaxations in
# pyproject.toml) over the whole tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

$PY -m ruff format --check node tests
$PY -m ruff check node tests
$PY -m mypy node
