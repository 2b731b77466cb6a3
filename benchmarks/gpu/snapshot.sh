#!/usr/bin/env bash
# On the CPU machine: freeze HEAD into .snap (git-ignored) with a COMMIT file, and run the GPU
# phases from there (carry ".snap" with every call, `cd .snap` first). The device copies the
# working tree as it is, uncommitted edits included; a snapshot keeps a long GPU session on
# one commit, and results name that commit (benchmarks/common.py reads COMMIT).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.snap/' .git/info/exclude 2>/dev/null || echo '/.snap/' >> .git/info/exclude
rm -rf .snap && mkdir .snap
git archive HEAD | tar -x -C .snap
git rev-parse HEAD > .snap/COMMIT
echo "[snapshot] .snap = $(cat .snap/COMMIT) ($(du -sh .snap | cut -f1))"
