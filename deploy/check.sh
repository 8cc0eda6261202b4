#!/usr/bin/env bash
# Static checks: ruff over the whole tree (the rules in pyproject.toml), mypy over the
# modules that type-check cleanly today. A module leaves TYPE_DEBT once its errors are
# fixed; no module joins it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

TYPE_DEBT=(
)

$PY -m ruff check node tests
checked=()
while IFS= read -r f; do
  skip=0
  for d in "${TYPE_DEBT[@]}"; do [ "$f" = "$d" ] && skip=1; done
  [ $skip -eq 1 ] || checked+=("$f")
done < <(find node -name '*.py' | sort)
$PY -m mypy --follow-imports=silent "${checked[@]}"
