#!/usr/bin/env bash
# Try the newest releases of every dependency: a scratch venv set up without tools/constraints.txt, the
# full suite run in it, the outcome appended to docs/dependency_upgrades.md, and tools/constraints.txt
# rewritten from that venv only if the suite passed. Review and commit both files together.
# Usage: bash tools/upgrade_deps.sh   (about as long as setup plus the suite: ~15 min on 2 cores)
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-upgrade}
LOG=docs/dependency_upgrades.md
rm -rf "$VENV"
VENV="$VENV" CONSTRAINTS= bash tools/setup.sh || { echo "upgrade: setup of $VENV failed"; exit 1; }
new=$(mktemp)
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -viE '^(nvidia|triton|cuda|torch==|torchvision==)' > "$new"
changed=$(diff <(grep -v '^#' tools/constraints.txt) "$new" | grep '^[<>]' | sed 's/^</was/; s/^>/now/')
out=$(mktemp)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider > "$out" 2>&1
rc=$?
summary=$(tail -n 1 "$out")
{
  echo
  echo "## $(date -u +%F) $( [ $rc = 0 ] && echo 'passed: constraints moved' || echo "failed (pytest exit $rc): constraints kept")"
  echo
  echo "- suite: \`$summary\`"
  echo "- machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'), torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
  echo "- changed:"
  if [ -n "$changed" ]; then echo "$changed" | sed 's/^/  - /'; else echo "  - nothing"; fi
  if [ $rc != 0 ]; then echo "- failures:"; grep -E '^(FAILED|ERROR) ' "$out" | head -20 | sed 's/^/  - /'; fi
} >> "$LOG"
if [ $rc = 0 ]; then
  { grep '^#' tools/constraints.txt; cat "$new"; } > tools/constraints.txt.new && mv tools/constraints.txt.new tools/constraints.txt
  echo "upgrade: suite passed; tools/constraints.txt moved (see $LOG)"
else
  echo "upgrade: suite failed (exit $rc); tools/constraints.txt kept; failures in $LOG"
fi
exit $rc
