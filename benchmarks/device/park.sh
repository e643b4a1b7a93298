#!/usr/bin/env bash
# Run here, not on the GPU machine. A device call copies the working tree beside what it carries,
# 64 MiB in all; the first set-up call carries .gpu/a (about 53 MiB), so the tree must stay
# small for that one call. The tuning journals are the tree's largest files and that call does
# not read them, so park them under .gpu/parked (ignored by git, never carried) for it, and put
# them back before the next call (tune.sh resumes from .tune/ or from the tree):
#
#   bash benchmarks/device/park.sh park       # before call 1
#   bash benchmarks/device/park.sh restore    # straight after it
set -eu
cd "$(dirname "$0")/../.."
parked=.gpu/parked
case "${1:-}" in
  park)
    mkdir -p "$parked"
    for journal in benchmarks/results/*.journal.xz; do
      [ -e "$journal" ] && mv "$journal" "$parked/"
    done
    ls "$parked" ;;
  restore)
    for journal in "$parked"/*.journal.xz; do
      [ -e "$journal" ] && mv "$journal" benchmarks/results/
    done
    git status --short benchmarks/results ;;
  *)
    echo "usage: park.sh park|restore" >&2
    exit 2 ;;
esac
