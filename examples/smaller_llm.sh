#!/usr/bin/env bash
# Your Hugging Face model and your text -> a smaller dense checkpoint, its model card and its table.
#   bash examples/smaller_llm.sh MODEL_DIR 'TEXT_GLOB' [OUT] [more Hydra overrides]
#   bash examples/smaller_llm.sh ./my-llama 'docs/**/*.txt' small-llama shrink.params=0.3 trainer=ddp_cpu
# MODEL_DIR: a causal LM folder (config.json, weights, tokenizer: what save_pretrained writes) or a hub id
# where the network reaches the hub. TEXT_GLOB: plain-text files (one document each) or JSON lines with a
# "text" field (data.field=...). The recipe (experiment=shrink_distill): shrink_to picks the best shape
# within half the non-embedding parameters (hidden size, heads, MLP neurons, blocks), then the smaller model
# is distilled from yours for trainer.max_steps steps (default 300); held-out perplexity before, after the
# cut and after distillation. OUT (default small-model) gets the checkpoint, the tokenizer and README.md,
# the model card, printed at the end; results.json and the logs go to outputs/<date>/<time>.
set -euo pipefail
model=${1:?usage: bash examples/smaller_llm.sh MODEL_DIR TEXT_GLOB [OUT] [overrides...]}
text=${2:?usage: bash examples/smaller_llm.sh MODEL_DIR TEXT_GLOB [OUT] [overrides...]}
out=${3:-small-model}
shift $(($# < 3 ? $# : 3))
lightning-prune experiment=shrink_distill model.path="$model" "data.files=[$text]" save_hf="$out" "$@"
echo
cat "$out/README.md"
