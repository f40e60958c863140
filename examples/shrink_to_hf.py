"""Prune, shrink, save, load: a smaller LLaMA that any Hugging Face loader reads.

Structured OBS removes half the attention heads and MLP neurons of every block of a small
random-init LLaMA; ``shrink`` turns the masks into smaller dense layers and writes the new sizes
into the config; ``save_pretrained`` writes an ordinary checkpoint, and ``from_pretrained`` loads
it with no custom code. The loaded model computes what the pruned model computes.

python examples/shrink_to_hf.py                       # writes ./small-llama, a few seconds on an idle CPU
python examples/shrink_to_hf.py --out DIR --target 0.25
OMP_NUM_THREADS=1 python examples/shrink_to_hf.py     # on a busy machine: one thread, not torch's one per core
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_prune import OBSPruning, prune, shrink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="small-llama", help="the checkpoint directory to write")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of heads and neurons removed per block")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=128,
    )  # fmt: skip
    model = LlamaForCausalLM(config)  # in practice: from_pretrained("your/model")
    g = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": (ids := torch.randint(0, 256, (4, 64), generator=g)), "labels": ids} for _ in range(4)]

    # on a Hugging Face model the default scope removes the same number of heads and neurons in every
    # block (OBS chooses which): the only shrunk model a standard config can describe
    pruner = OBSPruning(target=args.target, pattern="channels", num_batches=len(calibration), verbose=0)
    prune(model, calibration, pruner)

    ids = calibration[0]["input_ids"][:2, :16]
    small = shrink(model, example_inputs={"input_ids": ids})  # raises if the small model computes anything else
    print(f"parameters: {small.params_before:,} -> {small.params_after:,}; config: {small.hf_configs['']}")
    small.save_pretrained(args.out)

    loaded = AutoModelForCausalLM.from_pretrained(args.out).eval()  # no custom code
    with torch.no_grad():
        diff = (loaded(input_ids=ids).logits - model.eval()(input_ids=ids).logits).abs().max().item()
    kw = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    same = torch.equal(loaded.generate(ids, **kw), model.generate(ids, **kw))
    print(f"{args.out}: max |logits difference| vs the pruned model {diff:.2e}; cached generate() identical: {same}")
    if diff > 1e-4 or not same:
        raise SystemExit("the loaded model computes something else")


if __name__ == "__main__":
    main()
