#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the whole test suite. Exit status is pytest's (5 = no tests -> 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
set +e
echo "free disk before the tests: $(df -Pk "${TMPDIR:-/tmp}" | awk 'NR==2 {printf "%.1f GiB", $4/1048576}')"
python -m pytest -q --timeout=1200 tests "$@"
rc=$?
echo "free disk after the tests: $(df -Pk "${TMPDIR:-/tmp}" | awk 'NR==2 {printf "%.1f GiB", $4/1048576}')"
set -e
if [ "$rc" -eq 5 ]; then
  echo "no tests were collected: failing" >&2
  exit 1
fi
exit "$rc"
