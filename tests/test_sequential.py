"""Sequential (block-by-block) layer-wise OBS, and the defaults that fit language models."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lm_fixtures import llama_config
from torch import nn

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning, SparseGPT, prune
from lightning_prune.engine.sequential import find_blocks
from lightning_prune.engine.targets import resolve_targets

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int = 3, tie: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = llama_config(24, 40, layers, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches(n: int = 4, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (3, 12), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def obs(**kw) -> OBSPruning:
    args = dict(target=0.5, allocation="reconstruction", scope="layer", solver="exact", verbose=0, eval_batches=0)
    return OBSPruning(**(args | kw))


def test_sequential_equals_pruning_each_block_on_the_pruned_model_before_it():
    """The reference: one prune() per block, in order, each calibrated by a full forward pass of
    the model whose earlier blocks are already pruned. Sequential OBS must give the same masks and
    weights (it reuses the first block's keyword arguments and runs no block before its inputs are
    final). All layers of a block are solved from one capture of its inputs, as SparseGPT does."""
    model, data = tiny_llama(), batches()
    reference = copy.deepcopy(model)
    pruner = obs(blocks="auto", reconstruct="current")
    record = prune(model, data, pruner)
    assert record["info"]["sequential_blocks"] == 3
    for i in range(3):
        step = obs(include=[f"model.layers.{i}.*"], recompute_steps=1)  # one capture per block, as sequential
        prune(reference, data, step)
    got, want = dict(model.named_parameters()), dict(reference.named_parameters())
    for name in pruner.masks:
        assert torch.equal(got[name] == 0, want[name] == 0), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    # and it matters: pruning every layer from the dense model's inputs gives other weights
    parallel = tiny_llama()
    prune(parallel, data, obs(recompute_steps=1))
    later = "model.layers.2.mlp.down_proj.weight"
    assert not torch.allclose(dict(parallel.named_parameters())[later], got[later])


def test_sequential_memory_is_one_blocks_inputs():
    model, data = tiny_llama(), batches(n=5)
    record = prune(model, data, obs(blocks="model.layers.*", reconstruct="current"))
    info = record["info"]
    assert info["block_input_bytes"] == 5 * 3 * 12 * 24 * 4  # batches x rows x tokens x hidden x float32
    assert info["peak_hessian_bytes"] == 40 * 40 * 8  # the widest layer input (down_proj), float64
    # fitting the original outputs carries the original block inputs beside the pruned ones
    record = prune(tiny_llama(), data, obs(blocks="model.layers.*"))
    assert record["info"]["block_input_bytes"] == 2 * 5 * 3 * 12 * 24 * 4


def _layer_inputs(model: nn.Module, names: list[str], data) -> dict[str, torch.Tensor]:
    """Every call's input rows of the named Linear layers over the batches, float64."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    hooks = [
        modules[n].register_forward_hook(lambda m, a, o, n=n: rows[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
        for n in names
    ]
    with torch.no_grad():
        for b in data:
            model(**b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(r).double() for n, r in rows.items()}


def _refit(X: torch.Tensor, Y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    W = torch.zeros(keep.shape, dtype=torch.float64)
    for r in range(keep.shape[0]):
        K = keep[r].nonzero().flatten()
        W[r, K] = torch.linalg.lstsq(X[:, K], Y[:, r : r + 1]).solution.flatten()
    return W


@pytest.mark.parametrize("reconstruct", ["original", "current"])
def test_sequential_block_fits_the_outputs_it_is_asked_to(reconstruct):
    """Block 2's layers, on the inputs they had when solved (blocks 0-1 pruned, block 2 not yet),
    end at the least-squares refit of their kept weights to the original model's outputs
    (``"original"``: W x_orig) or to their own outputs on those inputs (``"current"``: W x)."""
    original, data = tiny_llama(), batches(n=6)
    model = copy.deepcopy(original)
    prune(model, data, obs(blocks="auto", damp=1e-10, reconstruct=reconstruct))
    solved_on = copy.deepcopy(original)  # blocks 0-1 pruned, block 2 as it was
    with torch.no_grad():
        for (n, p), q in zip(solved_on.named_parameters(), model.parameters()):
            if not n.startswith("model.layers.2."):
                p.copy_(q)
    names = [f"model.layers.2.{m}" for m in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")]
    X = _layer_inputs(solved_on, names, data)
    X_orig = _layer_inputs(original, names, data)
    modules, orig = dict(model.named_modules()), dict(original.named_modules())
    for n in names:
        W0, W = orig[n].weight.double(), modules[n].weight.double()
        Y = (X_orig[n] if reconstruct == "original" else X[n]) @ W0.T
        torch.testing.assert_close(W, _refit(X[n], Y, W != 0), rtol=0, atol=2e-4 * float(W0.abs().max()))


def test_find_blocks_auto_and_glob():
    model = tiny_llama(layers=2)
    targets = resolve_targets(model)
    auto = find_blocks(model, "auto", targets)
    assert [b.name for b in auto] == ["model.layers.0", "model.layers.1"]
    assert [b.name for b in find_blocks(model, "model.layers.*", targets)] == ["model.layers.0", "model.layers.1"]
    assert sum(len(b.targets) for b in auto) == len(targets) == 14
    with pytest.raises(ValueError, match=r"`blocks='decoder\.\*'` matches no module"):
        find_blocks(model, "decoder.*", targets)


def test_sequential_refuses_at_bind_what_it_cannot_do():
    model = tiny_llama(layers=2)
    with pytest.raises(ValueError, match="needs a label-free criterion"):
        OBSPruning(target=0.5, blocks="auto")
    with pytest.raises(ValueError, match="scope='layer' or 'row'"):
        OBSPruning(target=0.5, allocation="reconstruction", blocks="auto")
    named = obs(blocks="auto", parameters=[model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight])
    with pytest.raises(ValueError, match=r"leaves targets outside every block: \['lm_head.weight'\]"):
        prune(model, batches(), named)
    assert torch.count_nonzero(model.lm_head.weight) == model.lm_head.weight.numel()  # nothing was touched


def test_lm_head_is_not_a_default_target_but_can_be_named():
    model = tiny_llama(layers=1)
    skipped: list = []
    names = [t.name for t in resolve_targets(model, skipped=skipped)]
    assert "lm_head.weight" not in names and len(names) == 7
    assert dict(skipped)["lm_head.weight"].startswith("output head")
    named = resolve_targets(model, parameters=[model.lm_head.weight])
    assert [t.name for t in named] == ["lm_head.weight"]
    with pytest.raises(ValueError, match="output head"):  # a pattern for it says why it matches nothing
        resolve_targets(model, include=["lm_head*"])


def test_tied_head_named_explicitly_keeps_one_mask_through_the_tie():
    model = tiny_llama(layers=1, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tied"):  # the pattern says why it matches nothing
        resolve_targets(model, include=["*lm_head*"])
    pruner = OBSPruning(target=0.5, parameters=[model.lm_head.weight], verbose=0)
    with pytest.raises(ValueError, match="is tied"):  # curvature cannot describe a tied weight
        prune(model, batches(), pruner)
    from lightning_prune import MagnitudePruning

    mag = MagnitudePruning(target=0.5, parameters=[model.lm_head.weight], verbose=0)
    prune(model, batches(), mag)
    assert (model.model.embed_tokens.weight == 0).float().mean() == pytest.approx(0.5, abs=1e-3)
    ids = batches(1)[0]["input_ids"]
    assert torch.equal(model.model.embed_tokens(ids), torch.nn.functional.embedding(ids, model.lm_head.weight))


class LitLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama(layers=2).train()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_sequential_at_callback_rounds_in_a_step_based_fit():
    """Inside Trainer.fit the round calibrates block by block on the window's stored batches."""
    lit = LitLM()
    data = batches(n=12)
    pruner = obs(target=0.6, blocks="auto", num_batches=4, start_step=2, end_step=8, every_n_steps=3)
    trainer = pl.Trainer(
        max_steps=12,
        callbacks=[pruner],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert [r["global_step"] for r in pruner.history] == [2, 5, 8]
    assert all(r["info"]["sequential_blocks"] == 2 for r in pruner.history)
    assert pruner.sparsity == pytest.approx(0.6, abs=1e-3)
    for name, mask in pruner.masks.items():  # frozen through the last optimizer steps
        assert torch.all(dict(lit.named_parameters())[name][~mask] == 0)


def test_wanda_row_scope_on_llama_prunes_every_row_alike():
    model = tiny_llama(layers=1)
    pruner = OBDPruning(target=0.5, curvature="activations", scope="row", verbose=0)
    prune(model, batches(), pruner)
    for name, mask in pruner.masks.items():
        assert torch.all(mask.sum(1) == mask.shape[1] // 2), name


@pytest.mark.parametrize("solver", ["exact", "fast"])
def test_sequential_2_4_on_llama_is_2_4_in_every_layer_and_beats_magnitude(solver):
    """SparseGPT 2:4 on a decoder: the pattern in every layer (hidden 24, intermediate 40: both
    multiples of 4), and logits closer to the dense model's than magnitude 2:4 gives (a random
    model's loss is log(vocab) whatever is pruned, so the reconstruction is what can be compared)."""
    from lightning_prune import MagnitudePruning

    data = batches(8)

    def logits(model):
        with torch.no_grad():
            return torch.cat([model(**b).logits for b in data])

    model, magnitude = tiny_llama(), tiny_llama()
    dense = logits(model)
    pruner = obs(blocks="auto", solver=solver, pattern="2:4")
    prune(model, data, pruner)
    prune(magnitude, data, MagnitudePruning(0.5, pattern="2:4", scope="layer", verbose=0))
    for t in pruner.targets:
        zeros = t.matrix(t.param.detach() == 0).reshape(t.shape2d[0], -1, 4).sum(2)
        assert torch.all(zeros == 2), t.name
    ours, theirs = float((logits(model) - dense).norm()), float((logits(magnitude) - dense).norm())
    assert ours < 0.95 * theirs  # measured: exact under 0.8x, fast 0.89x magnitude's


def test_sequential_is_a_round_strategy_any_label_free_criterion_uses():
    """Wanda block by block (OBD with the activations' diagonal, as the Wanda reference prunes a decoder):
    the same masks and weights as one prune() per block, in order, on the model whose earlier blocks
    are already pruned."""
    model, data = tiny_llama(), batches()
    reference = copy.deepcopy(model)
    wanda = dict(target=0.5, curvature="activations", scope="row", verbose=0, eval_batches=0)
    record = prune(model, data, OBDPruning(blocks="auto", **wanda))
    assert record["info"]["sequential_blocks"] == 3
    for i in range(3):
        prune(reference, data, OBDPruning(include=[f"model.layers.{i}.*"], **wanda))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    one_pass = copy.deepcopy(tiny_llama())
    prune(one_pass, data, OBDPruning(**wanda))  # later blocks see dense inputs: other masks
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), one_pass.parameters()))


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda: OBDPruning(0.5, curvature="fisher", scope="layer", blocks="auto"), "needs gradients of a loss"),
        (lambda: OBSPruning(0.5, scope="layer", blocks="auto"), r"OBS.*allocation='auto'.*needs gradients"),
        (lambda: MagnitudePruning(0.5, scope="layer", blocks="auto"), "needs no statistics"),
        (lambda: OBSPruning(0.5, allocation="reconstruction", blocks="auto"), "pass scope='layer' or 'row'"),
    ],
)
def test_a_sequential_round_refuses_what_it_cannot_calibrate(make, says):
    with pytest.raises(ValueError, match=says):
        make()


def test_a_sequential_round_that_fails_keeps_the_blocks_it_finished_and_restores_the_one_it_was_pruning():
    """Memory for one block means one block's copy: an error while block 1 is solved restores block 1
    exactly, block 2 is untouched, and block 0, already pruned (and the input of block 1's statistics),
    stays pruned with its masks committed, which the error says. Running the round again prunes the rest."""
    model, data = tiny_llama(), batches()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = obs(blocks="auto", reconstruct="current")
    calls = []
    solve = pruner.criterion.solve_layer

    def failing(t, *args, **kwargs):
        calls.append(t.name)
        if t.name.startswith("model.layers.1.") and len([c for c in calls if c.startswith("model.layers.1.")]) == 2:
            raise RuntimeError("solver exploded")
        return solve(t, *args, **kwargs)

    pruner.criterion.solve_layer = failing
    with pytest.raises(RuntimeError, match="solver exploded") as err:
        prune(model, data, pruner)
    assert "stopped after 1 of 3 blocks (model.layers.0 ... model.layers.0)" in "".join(err.value.__notes__)
    state = model.state_dict()
    for name, mask in pruner.masks.items():
        if name.startswith("model.layers.0."):
            assert 0.45 < 1 - mask.float().mean() < 0.55, name  # committed at the target
            assert torch.equal(state[name] == 0, ~mask)
            assert not torch.equal(state[name], dense[name])
        else:  # block 1 restored (its first layer had been solved), block 2 never reached
            assert bool(mask.all()), name
            assert torch.equal(state[name], dense[name]), name
    assert not pruner.history
    pruner.criterion.solve_layer = solve
    prune(model, data, pruner)
    assert all(abs(1 - m.float().mean() - 0.5) < 0.05 for m in pruner.masks.values())


def _peak_tensor_bytes(fn) -> int:
    """The most bytes of CPU tensors alive at once while ``fn`` runs, beyond those alive before it
    (every allocation and free the profiler records, summed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("preset", ["SparseGPT", "OBC"])
def test_a_sequential_rounds_memory_does_not_grow_with_depth(preset):
    """Counted, not timed: the bytes a block-by-block round holds at its peak are the same for a model
    of 2 blocks and of 8 (the pruner's masks are bits: six more blocks add less than a third of a block's
    weights in bytes). No copy of every target weight, no bool mask per weight, no multiplier per weight
    kept for training steps that prune() never takes."""
    import lightning_prune

    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": (ids := torch.randint(0, 96, (4, 16), generator=g)), "labels": ids} for _ in range(4)]
    held = {}
    for layers in (2, 8):
        model = tiny_llama(layers=layers)
        pruner = getattr(lightning_prune, preset)(0.5, verbose=0)
        peak = _peak_tensor_bytes(lambda: prune(model, data, pruner))
        held[layers] = peak
    block = sum(p.numel() * 4 for n, p in tiny_llama(layers=1).named_parameters() if ".layers.0." in n)
    assert abs(held[8] - held[2]) < block / 3, (held, block)  # 6 more blocks: less than a third of one


def test_prune_runs_obs_defaults_block_by_block_on_a_model_of_blocks_and_says_so(capsys):
    """``OBSPruning(target)`` through prune() on a decoder is the sequential label-free round, equal to
    asking for it; any gradient option, a scope, blocks=None... asked for explicitly keeps the whole-model
    round; a model without repeated blocks keeps it too."""
    data = batches()
    model, explicit = tiny_llama(), tiny_llama()
    pruner = OBSPruning(0.5, eval_batches=0, verbose=1)
    asked = pruner.criterion
    before = dict(vars(asked))
    record = prune(model, data, pruner)
    assert vars(asked) == before  # the criterion the user built is not changed: the plan runs a new one
    assert pruner.criterion is not asked and pruner.criterion.allocation == "reconstruction" and pruner.scope == "layer"
    assert "block by block over the 3 blocks" in record["info"]["plan"]
    assert "prune() chose this for the defaults" in capsys.readouterr().out
    assert record["info"]["sequential_blocks"] == 3
    want = OBSPruning(
        0.5,
        allocation="reconstruction",
        reconstruct="current",
        scope="layer",
        blocks="auto",
        solver_dtype="float32",  # the plan's precision where solver_dtype is left at None
        eval_batches=0,
        verbose=0,
    )
    prune(explicit, data, want)
    for (name, a), b in zip(model.named_parameters(), explicit.parameters()):
        assert torch.equal(a, b), name
    for kwargs in ({"allocation": "auto"}, {"reconstruct": "original"}, {"scope": "global"}, {"fisher_type": "mc"}):
        record = prune(tiny_llama(), data, OBSPruning(0.5, eval_batches=0, verbose=0, **kwargs))
        assert "plan" not in record["info"] and "sequential_blocks" not in record["info"], kwargs
        assert record["info"]["allocation"] != "reconstruction", kwargs
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    xs = [(torch.randn(6, 8), torch.randint(0, 4, (6,))) for _ in range(2)]
    record = prune(mlp, xs, OBSPruning(0.5, verbose=0), loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    assert "plan" not in record["info"]


def test_the_plans_defaults_are_the_exact_solver_on_narrow_layers_and_the_preset_on_wide_ones():
    """Issue #44: the defaults cost the SparseGPT preset's time where layers are wide. Layers 24-40 wide fit the
    plan's budget for the exact solver; at 512 inputs and up every layer's exact and blocked work exceeds it, so
    the defaults are the preset's own round (fast sweep picking its mask, float32 solves): bitwise equal."""
    narrow = prune(tiny_llama(layers=2), batches(), OBSPruning(0.5, eval_batches=0, verbose=0))
    assert narrow["info"]["solver"] == "exact"
    torch.manual_seed(0)
    cfg = llama_config(512, 640, 2, num_attention_heads=4, num_key_value_heads=4)
    wide, preset = transformers.LlamaForCausalLM(cfg).eval(), transformers.LlamaForCausalLM(cfg).eval()
    preset.load_state_dict(wide.state_dict())
    record = prune(wide, batches(), OBSPruning(0.5, eval_batches=0, verbose=0))
    assert record["info"]["solver"] == "fast" and "solver_dtype='float32'" in record["info"]["plan"]
    prune(preset, batches(), SparseGPT(0.5, eval_batches=0, verbose=0))
    for (name, a), b in zip(wide.named_parameters(), preset.parameters()):
        assert torch.equal(a, b), name
    # asking for float64 keeps it; the budget still gives the fast sweep
    asked = prune(preset, batches(), OBSPruning(0.5, solver_dtype="float64", eval_batches=0, verbose=0))
    assert "solver_dtype='float64'" in asked["info"]["plan"]


def test_a_criterion_shared_by_two_pruners_is_planned_for_each_and_stays_as_built():
    """prune()'s plan replaces the pruner's criterion by a label-free copy: the criterion object itself keeps its
    defaults, so a second pruner built on it is planned the same way (it used to be switched in place, and the
    second pruner then refused allocation='reconstruction' with scope='global')."""
    from lightning_prune import Pruner
    from lightning_prune.criteria import OBS

    criterion, data = OBS(), batches()
    before = dict(vars(criterion))
    models, records = [tiny_llama(), tiny_llama()], []
    for model in models:
        pruner = Pruner(criterion, 0.5, eval_batches=0, verbose=0)
        records.append(prune(model, data, pruner))
        assert vars(criterion) == before and pruner.criterion is not criterion
    assert records[0]["info"]["plan"] == records[1]["info"]["plan"]
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_prune_with_a_device_moves_one_block_at_a_time_and_equals_pruning_in_place(monkeypatch):
    """``prune(model, data, pruner, device=...)``: each block is moved to the device once, in order, and
    back before the next one comes (never two at once); the result is the in-place round's, bitwise.
    The device here is the CPU itself; the moves are counted through ``blocks.onload``/``offload``."""
    import lightning_prune.engine.sequential as blocks_module

    moves: list[tuple[str, str]] = []
    names = {}
    onload, offload = blocks_module.onload, blocks_module.offload

    def counting_onload(module, device):
        moves.append(("on", names[id(module)]))
        assert sum(1 if kind == "on" else -1 for kind, _ in moves) == 1, moves  # one block at a time
        return onload(module, device)

    def counting_offload(module, home):
        moves.append(("off", names[id(module)]))
        offload(module, home)

    monkeypatch.setattr(blocks_module, "onload", counting_onload)
    monkeypatch.setattr(blocks_module, "offload", counting_offload)
    data = batches()
    for make in (lambda: SparseGPT(0.5, verbose=0), lambda: OBSPruning(0.5, verbose=0)):
        model, reference = tiny_llama(), tiny_llama()
        names.update({id(m): n for n, m in model.named_modules()})
        moves.clear()
        prune(model, data, make(), device="cpu")
        layers = [f"model.layers.{i}" for i in range(3)]
        assert moves == [(kind, name) for name in layers for kind in ("on", "off")]
        prune(reference, data, make())
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(a, b), name


def test_prune_with_a_device_refuses_what_it_cannot_offload():
    data = batches()
    with pytest.raises(ValueError, match=r"prune\(device='cpu'\) moves one block at a time.*blocks=None"):
        prune(tiny_llama(), data, OBSPruning(0.5, allocation="auto", verbose=0), device="cpu")
    with pytest.raises(ValueError, match="`device` must be a torch device.*'gpu7'"):
        prune(tiny_llama(), data, OBSPruning(0.5, verbose=0), device="gpu7")
    hooks = pytest.importorskip("accelerate.hooks")
    model = tiny_llama()
    hooks.add_hook_to_module(model.model.layers[1], hooks.AlignDevicesHook(execution_device="cpu"))
    model.model.layers[1]._hf_hook.execution_device = torch.device("meta")  # dispatched elsewhere than device=
    with pytest.raises(ValueError, match=r"dispatched by accelerate to \['meta'\].*device=None"):
        prune(model, data, OBSPruning(0.5, verbose=0), device="cpu")


def _unavailable_devices() -> list[Any]:
    """Devices this machine cannot compute on, with what the refusal must say: meta (no data), an
    accelerator torch was not built with or that is absent, and an index past the devices present."""
    cases = [("meta", r"meta tensors hold no data.*lose its weights.*device=None")]
    count = torch.cuda.device_count()
    if not torch.cuda.is_available():
        cases.append(("cuda", r"CUDA is not available.*device=None"))
    cases.append((f"cuda:{count}", r"CUDA is not available" if not count else rf"only {count} CUDA device"))
    if not torch.backends.mps.is_available():
        cases.append(("mps", r"MPS is not available"))
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        cases.append(("xpu", r"XPU is not available"))
    return [pytest.param(device, match, id=device) for device, match in cases]


@pytest.mark.parametrize(("device", "match"), _unavailable_devices())
def test_prune_refuses_a_device_it_cannot_use_before_moving_any_weight(device, match):
    """``device="meta"`` used to move block 0 there and then fail copying it back (its weights gone);
    ``device="cuda"`` on a CPU-only torch surfaced torch's AssertionError from inside the round. Both are
    refused before any move or any pruner state changes, naming the argument, the value, why, and what
    to pass; every weight stays where it was with its values."""
    model, data = tiny_llama(layers=2), batches(2)
    before = {n: (p.device, p.detach().clone()) for n, p in model.named_parameters()}
    pruner = SparseGPT(0.5, verbose=0)
    with pytest.raises(ValueError, match=rf"prune\(device='{device}'\): .*{match}"):
        prune(model, data, pruner, device=device)
    for name, p in model.named_parameters():
        assert p.device == before[name][0] and torch.equal(p.detach(), before[name][1]), name
    assert not pruner.history and not pruner.masks  # never bound: no masks


def test_a_block_by_block_round_says_which_layer_it_is_solving(monkeypatch):
    """A block of a large model takes minutes: the blocks' bar says, before each layer's solve, which
    layer of which block it is, in the order the layers are solved (never silent for a whole block)."""
    import lightning_prune.engine.round as round_module

    said: list[str] = []

    class Recorder:
        def __init__(self, total: int, desc: str) -> None:
            self.desc = desc

        def __call__(self, n: int = 1) -> None:
            said.append(f"{self.desc}: +{n}")

        def describe(self, text: str) -> None:
            said.append(text)

        def close(self) -> None:
            pass

    monkeypatch.setattr(round_module, "tqdm_progress", Recorder)
    model = tiny_llama(layers=2)
    prune(model, batches(), OBSPruning(0.5, verbose=1, eval_batches=0), num_batches=2)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    expected = []
    for i in range(2):
        block = f"model.layers.{i}"
        expected.append(f"{block}: calibrating")
        expected += [f"{block}: solving {n}.weight" for n in targets if n.startswith(block + ".")]
        expected.append("sequential calibration: +1")
    shown = [s.split(" (")[0] for s in said if "calibrat" in s or "solving" in s]
    assert shown == expected
