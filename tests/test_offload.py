"""A model larger than memory: loaded with accelerate's ``device_map`` (disk offload, ``offload_folder``) or
``cpu_offload``, pruned block by block with each block's weights read once, pruned and written back, bitwise
equal to the same round on the model in memory; ``save_pretrained`` then writes the pruned weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lm_fixtures import llama_config
from torch import nn

from lightning_prune import OBSPruning, SparseGPT, prune
from lightning_prune.engine.pruner import as_pruner

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
from accelerate.utils.offload import OffloadedWeightsLoader  # noqa: E402

BLOCKS = 4
OFFLOADED = (1, 2, 3)  # on "disk"; block 0, the embeddings, the norm and the head stay on the CPU


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = llama_config(64, 96, BLOCKS)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def in_memory(path: Path) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def on_disk(path: Path, folder: Path) -> nn.Module:
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" if i in OFFLOADED else "cpu" for i in range(BLOCKS)}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=folder)
    assert model.model.layers[1].mlp.up_proj.weight.is_meta  # the blocks really are offloaded
    return model.eval()


def batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (3, 12), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's values, an offloaded one read from its accelerate weights map."""
    out = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            out[full] = module._hf_hook.weights_map[name] if p.is_meta else p.detach()
    return out


def masks(pruner: Any) -> dict[str, torch.Tensor]:
    return {n: m.cpu() for n, m in as_pruner(pruner).masks.items()}


def block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def test_disk_offloaded_model_is_pruned_one_block_at_a_time_as_in_memory(checkpoint, tmp_path, monkeypatch):
    data = batches()
    reference, reference_pruner = in_memory(checkpoint), SparseGPT(0.5, verbose=0, eval_batches=0)
    prune(reference, data, reference_pruner)

    model, pruner = on_disk(checkpoint, tmp_path / "offload"), SparseGPT(0.5, verbose=0, eval_batches=0)
    loads: list[str] = []
    read = OffloadedWeightsLoader.__getitem__
    monkeypatch.setattr(OffloadedWeightsLoader, "__getitem__", lambda self, key: loads.append(key) or read(self, key))
    solved: list[str] = []
    criterion = as_pruner(pruner).criterion
    solve = criterion.prune

    def checked_solve(ctx: Any) -> Any:  # while a block is solved, every other offloaded block is on meta
        index = int(ctx.block.split(".")[-1])
        for name, p in model.named_parameters():
            if block_of(name) in OFFLOADED:
                assert p.is_meta == (block_of(name) != index), (ctx.block, name)
        solved.append(ctx.block)
        return solve(ctx)

    monkeypatch.setattr(criterion, "prune", checked_solve)
    prune(model, data, pruner)
    monkeypatch.undo()

    assert solved == [f"model.layers.{i}" for i in range(BLOCKS)]
    offloaded = [n for n, p in model.named_parameters() if p.is_meta]
    assert {block_of(n) for n in offloaded} == set(OFFLOADED)
    assert loads == offloaded  # each offloaded weight read exactly once, block after block
    assert masks(pruner).keys() == masks(reference_pruner).keys()
    for name, m in masks(reference_pruner).items():
        assert torch.equal(masks(pruner)[name], m), name
    got, want = weights(model), dict(reference.named_parameters())
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    # the checkpoint it was loaded from is left as it was (the pruned weights went to the offload folder)
    untouched = in_memory(checkpoint)
    for i in OFFLOADED:  # random weights have no exact zeros; pruned ones have half
        assert (untouched.model.layers[i].mlp.up_proj.weight == 0).sum() == 0

    # save_pretrained writes the pruned weights: loaded back in memory, the logits of the pruned reference
    model.save_pretrained(tmp_path / "saved")
    back = in_memory(tmp_path / "saved")
    with torch.no_grad():
        ids = data[0]["input_ids"]
        assert torch.equal(back(ids).logits, reference(ids).logits)
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_cpu_offloaded_model_is_pruned_as_in_memory(checkpoint):
    """accelerate's ``cpu_offload``: the weights map is a dict of CPU tensors, updated in place."""
    data = batches()
    reference = in_memory(checkpoint)
    expected = prune(reference, data, SparseGPT(0.5, verbose=0, eval_batches=1))
    model = accelerate.cpu_offload(in_memory(checkpoint), execution_device="cpu")
    assert model.model.layers[0].mlp.up_proj.weight.is_meta
    pruner = SparseGPT(0.5, verbose=0, eval_batches=1)
    record = prune(model, data, pruner, device="cpu")  # the hooks' execution device
    want = dict(reference.named_parameters())
    for name, w in weights(model).items():
        assert torch.equal(w, want[name]), name
    assert (record.loss_before, record.loss_after) == (expected.loss_before, expected.loss_after)
    # the masks stay bound to the offloaded weights (accelerate replaces their parameters at every read)
    with pytest.warns(UserWarning, match="removes nothing: its masks already reach sparsity 0.5000"):
        again = prune(model, data, pruner)
    assert again.info["idle"] and len(as_pruner(pruner).history) == 2


def test_offloaded_model_refuses_what_it_cannot_prune_block_by_block(checkpoint, tmp_path):
    data = batches(1)
    model = on_disk(checkpoint, tmp_path / "offload")
    one_pass = OBSPruning(0.5, allocation="reconstruction", scope="layer", blocks=None, verbose=0, eval_batches=0)
    with pytest.raises(ValueError, match=r"offloaded by accelerate.*only a block-by-block round.*blocks=None"):
        prune(model, data, one_pass)
    for module in model.modules():  # dispatched elsewhere than the device asked for
        if hasattr(module, "_hf_hook"):
            module._hf_hook.execution_device = torch.device("meta")
    with pytest.raises(ValueError, match=r"prune\(device='cpu'\).*dispatched by accelerate to \['meta'\]"):
        prune(model, data, SparseGPT(0.5, verbose=0), device="cpu")


def test_write_back_stores_what_the_next_read_gives(tmp_path):
    """Each kind of accelerate weights map: a dict, a loader's CPU state dict, a loader's ``.dat`` files."""
    from accelerate.utils.offload import PrefixedDataset, offload_weight

    from lightning_prune.runtime.offload import write_back

    old, new = torch.ones(2, 3), torch.arange(6.0).view(2, 3)
    folder = tmp_path / "maps"
    folder.mkdir()
    index = offload_weight(old.clone(), "b.w", str(folder), index={})
    maps = [{"b.w": old.clone()}, OffloadedWeightsLoader(state_dict={"b.w": old.clone()})]
    maps.append(OffloadedWeightsLoader(save_folder=str(folder), index=index))
    for weights_map in maps:
        prefixed = PrefixedDataset(weights_map, "b.")
        assert torch.equal(prefixed["w"], old)
        write_back(prefixed, "w", new.clone())
        assert torch.equal(prefixed["w"], new), type(weights_map).__name__
    with pytest.raises(TypeError, match=r"cannot write the pruned 'w' back into a tuple"):
        write_back((), "w", new)


def test_weights_offloaded_above_the_blocks_are_refused(checkpoint):
    """A hook that offloads a whole subtree (``place_submodules=True``) reads every block at once."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = in_memory(checkpoint)
    add_hook_to_module(model.model, AlignDevicesHook(execution_device="cpu", offload=True, place_submodules=True))
    assert model.model.layers[0].mlp.up_proj.weight.is_meta
    with pytest.raises(ValueError, match=r"offloads 'model' as one piece.*above the blocks \['layers.0', 'layers.1'\]"):
        prune(model, batches(1), SparseGPT(0.5, verbose=0, eval_batches=0))
