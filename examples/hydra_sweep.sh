#!/usr/bin/env bash
# Sweep three pruners x two sparsities with the Hydra CLI, train the dense baseline, then turn the results
# into a table and plot.
#   bash examples/hydra_sweep.sh                       # digits, default epochs
#   EPOCHS=2 START_EPOCH=0 bash examples/hydra_sweep.sh   # tiny smoke run
set -euo pipefail
out=${SWEEP_DIR:-multirun/example-sweep}
lightning-prune -m pruner=magnitude,obd,obs pruner.target=0.8,0.9 \
  trainer.max_epochs="${EPOCHS:-20}" pruner.start_epoch="${START_EPOCH:-4}" trainer.enable_progress_bar=false \
  pruner.verbose=0 \
  logger=csv hydra.sweep.dir="$out"
# the dense baseline: the same training without pruning, in the sweep's folder (the report reads every results.json)
lightning-prune pruner=none trainer.max_epochs="${EPOCHS:-20}" trainer.enable_progress_bar=false \
  logger=csv hydra.run.dir="$out/dense"
lightning-prune-report "$out"
