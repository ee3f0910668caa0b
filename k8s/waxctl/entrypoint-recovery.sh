#!/bin/sh
# Run by the recovery init container of Bytewax's Helm chart (waxctl --recovery). The
# upstream script creates every partition on every pod's volume; with per-pod volumes that
# leaves copies of each partition on several pods, and Bytewax then resumes from scratch.
# This container is not told the process count, so nothing is created here:
# entrypoint.sh creates this pod's share before the dataflow starts.
echo "entrypoint-recovery.sh: nothing to do; entrypoint.sh creates this pod's partitions"
