"""Bytes a pruner holds: after a one-shot ``prune()`` its masks are bits (one per target weight), and during a
block-by-block round no mask state grows with depth beyond those bits. Counted, not timed."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_prune import SparseGPT, prune
from lightning_prune.engine.masks import PackedMasks, pack_bits, unpack_bits

transformers = pytest.importorskip("transformers")

VOCAB = 64


def llama(layers: int, hidden: int) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def data() -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(0, VOCAB, (2, 12), generator=g)), "labels": ids} for _ in range(3)]


def held_bytes(obj: Any, model: nn.Module) -> int:
    """Bytes of the tensor storages reachable from ``obj`` (attributes, containers, mappings), those of
    ``model``'s parameters and buffers excepted, each storage counted once; modules are not entered."""
    mine = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen_objects: set[int] = set()
    storages: dict[int, int] = {}

    def walk(x: Any) -> None:
        if id(x) in seen_objects or isinstance(x, (nn.Module, str, bytes, int, float, bool, type(None))):
            return
        seen_objects.add(id(x))
        if isinstance(x, Tensor):
            storage = x.untyped_storage()
            if storage.data_ptr() not in mine:
                storages[storage.data_ptr()] = storage.nbytes()
            return
        if isinstance(x, PackedMasks):
            for name in x:
                walk(x.bits(name))
            return
        if isinstance(x, Mapping):
            for k, v in x.items():
                walk(k)
                walk(v)
            return
        if isinstance(x, (list, tuple, set, frozenset)):
            for v in x:
                walk(v)
            return
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name))
        if hasattr(x, "__dict__"):
            walk(vars(x))
        for slot in getattr(type(x), "__slots__", ()):
            walk(getattr(x, slot, None))

    walk(obj)
    return sum(storages.values())


def target_weights(pruner: Any) -> int:
    return sum(t.param.numel() for t in pruner.targets)


def test_pack_bits_round_trips_and_matches_the_checkpoint_layout():
    """Bits in checkpoint order (first entry in the highest bit, the last byte zero-padded), ceil(n/8) bytes."""
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (8,), (2, 3, 7), (0,), (1,), (16, 8)]:
        mask = torch.rand(shape, generator=g) > 0.5
        bits = pack_bits(mask)
        assert bits.dtype == torch.uint8 and bits.numel() == (mask.numel() + 7) // 8
        assert torch.equal(unpack_bits(bits, shape), mask)
        flat = torch.cat([mask.flatten(), mask.new_zeros((-mask.numel()) % 8)]).view(-1, 8).to(torch.int64)
        expected = (flat * torch.tensor([128, 64, 32, 16, 8, 4, 2, 1])).sum(1)  # brute force
        assert torch.equal(bits.to(torch.int64), expected)
    packed = PackedMasks({"a": torch.tensor([True, False, True])})
    got = packed["a"]
    got[0] = False  # a new tensor each read: the bits do not change
    assert packed["a"].tolist() == [True, False, True] and packed.nbytes == 1
    with pytest.raises(TypeError, match="bool"):
        pack_bits(torch.ones(3))


@pytest.mark.parametrize("hidden", [16, 32])
def test_after_prune_the_pruner_holds_one_bit_per_target_weight(hidden):
    """The pruner's tensors after a one-shot prune(): its masks as bits, ceil(numel/8) bytes per layer, and
    nothing else that grows with the model: at 2 and at 8 blocks, the bytes are those of the bits plus the
    same small constant."""
    extra = {}
    for layers in (2, 8):
        model = llama(layers, hidden)
        pruner = SparseGPT(0.5, verbose=0)
        prune(model, data(), pruner)
        n = target_weights(pruner)
        bits = sum((t.param.numel() + 7) // 8 for t in pruner.targets)
        held = held_bytes(pruner, model)
        assert bits <= n / 8 + len(pruner.targets)
        assert held >= bits, (held, bits)  # the masks are there ...
        extra[layers] = held - bits
        assert held <= n / 8 + 1024, (layers, held, n)  # ... and are what is held: one bit per target weight
        assert sorted(pruner.masks) == sorted(t.name for t in pruner.targets)
        for t in pruner.targets:  # the bits are the zeros the round made
            assert torch.equal(pruner.masks[t.name], t.param.detach() != 0), t.name
    assert extra[8] == extra[2], extra  # depth adds bits, nothing else


@pytest.mark.parametrize("hidden", [16, 32])
def test_mask_state_during_a_sequential_round_does_not_grow_with_depth(hidden):
    """At the start of each block's calibration, the masks alive in the process (packed bits and unpacked bool
    tensors outside the model) are summed: bits for the blocks done (and the pruner's), never a bool mask
    per target weight of the model. Their most, minus the bits of the model's target weights (three sets at
    most: the masks before the round, the finished blocks', the committed ones), is the same at 2 and 8 blocks."""
    excess = {}
    for layers in (2, 8):
        gc.collect()  # garbage an earlier test left (same worker) would be counted, then collected mid-round
        model = llama(layers, hidden)
        pruner = SparseGPT(0.5, eval_batches=0, verbose=0)
        peaks: list[tuple[int, int]] = []
        seen: set[str] = set()

        def count(module: nn.Module, args: Any, name: str) -> None:
            if name in seen:  # once per block (its first calibration batch)
                return
            seen.add(name)
            packed = sum(o.nbytes for o in gc.get_objects() if isinstance(o, PackedMasks))
            unpacked = sum(o.numel() for o in gc.get_objects() if isinstance(o, Tensor) and o.dtype == torch.bool)
            peaks.append((packed, unpacked))

        handles = [
            block.register_forward_pre_hook(lambda m, a, name=f"{i}": count(m, a, name))
            for i, block in enumerate(model.model.layers)
        ]
        try:
            prune(model, data(), pruner)
        finally:
            for h in handles:
                h.remove()
        assert len(peaks) == layers
        n = target_weights(pruner)
        block_weights = n // layers
        packed, unpacked = max(p for p, _ in peaks), max(u for _, u in peaks)
        assert unpacked <= block_weights, (layers, unpacked, block_weights)  # at most one block unpacked
        assert packed <= 3 * (n / 8 + len(pruner.targets)), (layers, packed, n)
        excess[layers] = unpacked
    assert excess[8] == excess[2], excess
