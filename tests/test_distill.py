"""Distillation beside a pruner: the loss against closed forms, the teacher frozen and outside the
optimizer and the checkpoint, masks kept, the wrapper visible and removed."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, make_trainer
from test_readme import Lit, hf
from torch import nn

from lightning_prune import Distillation, MagnitudePruning, OBSPruning
from lightning_prune.callbacks.distill import find_feature_blocks, kd_loss, squarehead_loss


def lm_batches(n: int = 4, b: int = 4, length: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (b, length), generator=g)
    return [{"input_ids": ids.roll(i, 1), "labels": ids.roll(i, 1)} for i in range(n)]


# ---------------------------------------------------------------- closed forms
def test_kd_loss_is_the_temperature_scaled_kl_of_the_teacher_to_the_student():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    for temperature in (1.0, 2.0, 5.5):
        expected, count = 0.0, 0
        for i in range(2):
            for j in range(3):
                ps = [math.exp(v / temperature) for v in s[i, j].tolist()]
                pt = [math.exp(v / temperature) for v in t[i, j].tolist()]
                ps, pt = [p / sum(ps) for p in ps], [p / sum(pt) for p in pt]
                expected += sum(q * math.log(q / p) for p, q in zip(ps, pt))
                count += 1
        got = kd_loss(s, t, temperature)
        assert got.item() == pytest.approx(expected / count * temperature**2, rel=1e-5)
    # a mask leaves positions out of the mean: only position (0, 0) counted
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0, 0] = True
    alone = kd_loss(s[:1, :1], t[:1, :1], 2.0)
    assert kd_loss(s, t, 2.0, mask).item() == pytest.approx(alone.item(), rel=1e-6)
    assert kd_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_squarehead_is_each_blocks_mse_over_the_teachers_mean_square_summed():
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g) * 10]
    t = [torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g) * 10]
    expected = 0.0
    for a, b in zip(s, t):
        av, bv = a.flatten().tolist(), b.flatten().tolist()
        mse = sum((x - y) ** 2 for x, y in zip(av, bv)) / len(av)
        expected += mse / (sum(y * y for y in bv) / len(bv) + 1e-6)
    assert squarehead_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    # normalised: scaling both by 10 leaves it unchanged (up to eps)
    scaled = squarehead_loss([10 * a for a in s], [10 * b for b in t])
    assert scaled.item() == pytest.approx(expected, rel=1e-5)


def test_feature_blocks_are_the_decoder_layers_or_a_glob():
    model = hf("llama")
    assert find_feature_blocks(model, "auto") == ["model.layers.0", "model.layers.1"]
    assert find_feature_blocks(model, "model.layers.*") == ["model.layers.0", "model.layers.1"]
    with pytest.raises(ValueError, match="squarehead_blocks='nope.*'"):
        find_feature_blocks(model, "nope.*")


CORE = """
import sys

sys.modules.update(dict.fromkeys(ABSENT))  # Lightning and the app's packages cannot be imported
import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.distill.blocks import find_feature_blocks, pair_block
from lightning_prune.distill.capture import Capture
from lightning_prune.distill.losses import kd_loss, squarehead_loss
from lightning_prune.distill.teacher import TeacherSource


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


torch.manual_seed(0)
student, x = Net(), torch.randn(4, 6)
source = TeacherSource(None, torch.float64)  # the default teacher: a copy of the (dense) student
teacher = source.build(student, student, "", torch.device("cpu"))
source.freeze(teacher, student, torch.device("cpu"))
assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
assert next(teacher.parameters()).dtype == torch.float64
assert {id(p) for p in teacher.parameters()}.isdisjoint(id(p) for p in student.parameters())
with torch.no_grad():
    for p in student.parameters():  # the student moves away from its teacher
        p.add_(0.1 * torch.randn_like(p))

blocks = find_feature_blocks(student, "auto")
assert blocks == ["blocks.0", "blocks.1"], blocks
capture = Capture()
capture.attach(student, teacher, blocks, [pair_block(b, teacher, "auto") for b in blocks], torch.float64)
capture.start(active=True)
logits = student(x)
terms = capture.terms(kd_weight=1.0, temperature=2.0, squarehead_weight=1.0)
capture.remove()

def hidden(model, x):  # each block's output (before the tanh between blocks), by hand
    out = []
    for block in model.blocks:
        out.append(block(x))
        x = torch.tanh(out[-1])
    return out, model.head(x)

with torch.no_grad():
    t_hidden, t_logits = hidden(teacher, x.double())
s_hidden, _ = hidden(student, x)
s_log, t_log = F.log_softmax(logits / 2.0, -1), F.log_softmax(t_logits.float() / 2.0, -1)
kl = F.kl_div(s_log, t_log, reduction="batchmean", log_target=True)  # KL(teacher || student), mean over rows
torch.testing.assert_close(terms["kd"], kl * 4.0)
sq = sum(((s - t.float()) ** 2).mean() / ((t.float() ** 2).mean() + 1e-6) for s, t in zip(s_hidden, t_hidden))
torch.testing.assert_close(terms["squarehead"], sq)
assert terms["kd"] > 0 and terms["squarehead"] > 0 and terms["kd"].requires_grad
torch.testing.assert_close(kd_loss(logits, t_logits, 2.0), terms["kd"])
torch.testing.assert_close(squarehead_loss(s_hidden, t_hidden), terms["squarehead"])
loaded = {n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in ABSENT}
assert not loaded, sorted(loaded)
print("ok")
"""


def test_the_distillation_core_computes_its_terms_without_lightning():
    """lightning_prune.distill is core: with Lightning and the app's packages unimportable, the default teacher
    (a frozen float64 copy), the capture of one forward and its KD and SquareHead terms equal the closed forms."""
    import subprocess
    import sys
    from pathlib import Path

    from test_architecture import ABSENT

    root = Path(__file__).resolve().parent.parent
    code = f"ABSENT = {ABSENT!r}\n{CORE}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"temperature": 0}, "temperature"),
        ({"kd_weight": -1}, "kd_weight"),
        ({"kd_weight": 0}, "kd_weight"),
        ({"teacher_dtype": "int8"}, "teacher_dtype"),
        ({"teacher": "/no/such/file.ckpt"}, "teacher"),
        ({"teacher": 3}, "teacher"),
    ],
)
def test_bad_arguments_are_named(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        Distillation(**kwargs)


# ---------------------------------------------------------------- in Trainer.fit
class Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.net = TinyNet().net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_the_loss_is_task_plus_weighted_kd_of_this_batch(tiny):
    """lr 0: the student stays what it was; the logged terms and the returned loss are the closed form's."""
    tiny.hparams.lr = 0.0
    teacher = Teacher()
    distill = Distillation(teacher=copy.deepcopy(teacher), kd_weight=0.5, temperature=3.0, task_weight=0.25)
    returned = []

    class Spy(pl_callback()):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            returned.append((outputs["loss"].detach(), batch))

    make_trainer(max_steps=2, max_epochs=-1, callbacks=[distill, Spy()]).fit(tiny)
    loss, (x, y) = returned[-1]
    with torch.no_grad():
        task = F.cross_entropy(tiny(x), y)
        kd = kd_loss(tiny(x), teacher(x), 3.0)
    assert distill.last_terms["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert distill.last_terms["task"].item() == pytest.approx(task.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.25 * task.item() + 0.5 * kd.item(), rel=1e-5)
    assert "training_step" not in vars(tiny)  # the wrapper is gone after the fit


def pl_callback():
    from lightning.pytorch.callbacks import Callback

    return Callback


class Weights(pl_callback()):
    """The student module's weights at the start of every training batch."""

    def __init__(self, name: str) -> None:
        self.name, self.seen = name, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        module = pl_module.get_submodule(self.name)
        self.seen.append({k: v.detach().clone() for k, v in module.state_dict().items()})


def test_the_teacher_is_frozen_dense_and_outside_the_optimizer_and_the_checkpoint(tiny, tmp_path):
    """The default teacher follows the dense student until the first round (end of epoch 1, batch 15 of
    8 a epoch), then stays: the weights at the start of that batch."""
    pruner = MagnitudePruning(target=0.6, start_epoch=1, end_epoch=2, verbose=0)
    distill, weights = Distillation(squarehead_weight=0.0), Weights("net")
    trainer = make_trainer(tmp_path, max_epochs=4, callbacks=[weights, pruner, distill])
    trainer.fit(tiny)
    teacher = distill.teacher
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert len(weights.seen) == 32 and pruner.history[0]["epoch"] == 1
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, weights.seen[15][k])  # the last dense weights, untouched by training and pruning
        assert not torch.equal(v, weights.seen[14][k])  # it did follow the student
    in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert in_optimizer == {id(p) for p in tiny.parameters()}
    assert pruner.sparsity == pytest.approx(0.6, abs=0.01)
    params = dict(tiny.named_parameters())
    assert all(bool((params[n][~m] == 0).all()) for n, m in pruner.masks.items())  # masks held
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == set(tiny.state_dict())
    assert "Distillation" not in ckpt.get("callbacks", {})  # no teacher state


def test_a_model_pruned_before_the_fit_needs_the_dense_teacher_passed(tiny):
    dense = copy.deepcopy(tiny.net)
    with torch.no_grad():  # pruned before this fit
        for m in tiny.net:
            if isinstance(m, nn.Linear):
                m.weight[:, ::2] = 0
    pruner = MagnitudePruning(0.5, every_n_steps=1, verbose=0)  # prune() then fit: its rounds may follow
    with pytest.raises(ValueError, match="already exactly zero.*`teacher`"):
        make_trainer(max_steps=4, max_epochs=-1, callbacks=[pruner, Distillation()]).fit(tiny)
    assert "training_step" not in vars(tiny)  # a failed fit removes the wrapper too
    distill = Distillation(teacher=dense)
    make_trainer(max_steps=1, max_epochs=-1, callbacks=[distill]).fit(tiny)
    assert distill.teacher is dense and distill.last_terms["kd"] > 0


def test_the_teacher_from_a_checkpoint(tiny, tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, max_epochs=-1)
    trainer.fit(tiny)
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    dense = copy.deepcopy(tiny.net.state_dict())
    with torch.no_grad():
        for p in tiny.parameters():
            p.mul_(0.5)
    distill = Distillation(teacher=tmp_path / "dense.ckpt")
    make_trainer(max_steps=1, max_epochs=-1, callbacks=[distill]).fit(tiny)
    for k, v in distill.teacher.state_dict().items():
        assert torch.equal(v, dense[k])


def test_manual_call_without_the_wrapper():
    class Manual(TinyNet):
        def __init__(self, distill: Distillation) -> None:
            super().__init__()
            self.distill = [distill]  # a list: not a submodule or hyper-parameter

        def training_step(self, batch, batch_idx):
            self.distill[0].begin()
            x, y = batch
            return self.distill[0].loss(F.cross_entropy(self(x), y))

    torch.manual_seed(0)
    distill = Distillation(teacher=Teacher(), wrap_training_step=False)  # no pruner: the teacher is given
    model = Manual(distill)
    make_trainer(max_steps=2, max_epochs=-1, callbacks=[distill]).fit(model)
    assert "kd" in distill.last_terms and "training_step" not in vars(model)


def test_obs_and_distillation_on_a_tiny_llama_keep_the_masks():
    batches = lm_batches(8)
    lit = Lit(hf("llama"), batches)
    pruner = OBSPruning(target=0.5, schedule="one_shot", start_step=2, every_n_steps=2, num_batches=2, verbose=0)
    distill, weights = Distillation(squarehead_weight=1.0), Weights("model")
    logged = {}

    class Log(pl_callback()):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("distill/")})
            if "distill/teacher" in logged:
                with torch.no_grad():
                    logged["teacher_loss"] = float(distill.teacher(**batch).loss)

    make_trainer(max_steps=6, max_epochs=-1, callbacks=[weights, pruner, distill, Log()]).fit(lit)
    assert len(pruner.history) == 1 and pruner.sparsity == pytest.approx(0.5, abs=0.01)
    params = dict(lit.named_parameters())
    assert all(bool((params[n][~m] == 0).all()) for n, m in pruner.masks.items())
    assert set(logged) == {"distill/task", "distill/kd", "distill/squarehead", "distill/teacher", "teacher_loss"}
    assert logged["distill/teacher"] == pytest.approx(logged["teacher_loss"], rel=1e-5)  # the teacher's own loss
    assert logged["distill/kd"] > 0 and logged["distill/squarehead"] > 0  # the student moved away from the teacher
    for k, v in distill.teacher.state_dict().items():
        assert torch.equal(v, weights.seen[1][k])  # the round ran after the second step


def test_gradient_accumulation_and_bf16_mixed():
    lit = Lit(hf("llama"), lm_batches(4))
    distill = Distillation(teacher=hf("llama", seed=3), squarehead_weight=1.0, teacher_dtype=torch.bfloat16)
    trainer = make_trainer(max_steps=2, max_epochs=-1, accumulate_grad_batches=2, precision="bf16-mixed")
    trainer.callbacks.append(distill)
    trainer.fit(lit)
    assert next(distill.teacher.parameters()).dtype == torch.bfloat16
    assert all(math.isfinite(float(v)) for v in distill.last_terms.values())


def test_gradients_equal_the_closed_form_loss_with_gradient_checkpointing():
    """One backward of the wrapped step gives the gradient of task + kd + squarehead computed by hand,
    also with non-reentrant gradient checkpointing (block hooks do not capture the recomputation)."""
    batch = lm_batches(1)[0]
    grads = []
    for checkpointing in (False, True):
        model = hf("llama")
        teacher = hf("llama", seed=3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        lit = Lit(model, [batch])
        distill = Distillation(teacher=copy.deepcopy(teacher), kd_weight=0.7, squarehead_weight=0.3)
        trainer = types.SimpleNamespace(callbacks=[distill])  # no Trainer: one step by hand
        distill.setup(trainer, lit, "fit")  # type: ignore[arg-type]
        distill.on_fit_start(trainer, lit)  # type: ignore[arg-type]
        lit.training_step(batch, 0).backward()
        distill.teardown(trainer, lit, "fit")  # type: ignore[arg-type]
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    # by hand, without the callback
    model, teacher = hf("llama"), hf("llama", seed=3)
    model.train()
    teacher.eval()
    last_s, last_t = [], []
    model.model.layers[-1].register_forward_hook(lambda m, a, o: last_s.append(o[0] if isinstance(o, tuple) else o))
    teacher.model.layers[-1].register_forward_hook(lambda m, a, o: last_t.append(o[0] if isinstance(o, tuple) else o))
    out = model(**batch, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(**batch, output_hidden_states=True)
    feats_s, feats_t = [out.hidden_states[1], last_s[-1]], [t_out.hidden_states[1], last_t[-1]]
    loss = out.loss + 0.7 * kd_loss(out.logits, t_out.logits, 2.0) + 0.3 * squarehead_loss(feats_s, feats_t)
    loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for got in grads:
        assert set(got) == set(expected)
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6)


def test_without_a_pruner_or_a_teacher_it_is_refused_at_setup(tiny):
    """The default teacher is the dense model at the pruners' first round; with no pruner there is none, and the
    term would only pull the student back to its starting weights. Refused before any step, naming the fixes;
    a teacher passed makes it a plain distillation."""
    before = copy.deepcopy(tiny.state_dict())
    with pytest.raises(ValueError, match=r"Distillation\(teacher=None\).*no pruning callback.*Add a pruner.*`teacher`"):
        make_trainer(max_steps=2, max_epochs=-1, callbacks=[Distillation()]).fit(tiny)
    assert "training_step" not in vars(tiny)
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())  # no step ran
    distill = Distillation(teacher=Teacher())
    make_trainer(max_steps=2, max_epochs=-1, callbacks=[distill]).fit(tiny)
    assert distill.last_terms["kd"] > 0


@pytest.mark.parametrize(
    ("pruner", "limits", "match"),
    [
        (lambda: MagnitudePruning(0.5, start_step=10, every_n_steps=5, end_step=20), dict(max_steps=6), r"step 10.*6"),
        (lambda: MagnitudePruning(0.5, start_epoch=3, end_epoch=4), dict(max_epochs=2), r"epoch 3.*max_epochs=2"),
        (lambda: MagnitudePruning(0.5, start_epoch=1, end_epoch=2), dict(max_steps=6), r"epoch 1.*max_steps=6"),
        (lambda: MagnitudePruning(0.0, every_n_steps=2), dict(max_steps=6), r"target=0.0.*nothing to prune"),
    ],
    ids=["steps", "epochs", "epochs-by-max_steps", "target-0"],
)
def test_a_pruner_with_no_round_in_the_run_leaves_the_default_teacher_nothing_to_do(tiny, pruner, limits, match):
    """The default teacher waits for the first round: a schedule whose first round the run never reaches would
    make Distillation a no-op for the whole fit. Refused before the first step, naming the pruner and its round."""
    before = copy.deepcopy(tiny.state_dict())
    trainer = make_trainer(max_epochs=limits.get("max_epochs", -1), max_steps=limits.get("max_steps", -1))
    trainer.callbacks += [pruner(), Distillation()]
    with pytest.raises(ValueError, match=r"Distillation\(teacher=None\).*MagnitudePruning.*" + match):
        trainer.fit(tiny)
    assert "training_step" not in vars(tiny)
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())


def test_a_teacher_without_values_is_refused_by_name():
    """A teacher module on the meta device used to fail at fit start with torch's "Cannot copy out of meta tensor"
    (and under FSDP2 would have been filled with the student's weights): refused when the callback is built."""
    with torch.device("meta"):
        teacher = Teacher()
    with pytest.raises(ValueError, match=r"`teacher` has 6 parameters/buffers on the meta device.*Load its weights"):
        Distillation(teacher=teacher)


def test_without_the_wrapper_a_training_step_that_never_calls_loss_is_refused():
    """wrap_training_step=False leaves the term to the user's training_step; one that never calls
    distillation.loss(...) trained without it, silently. Refused at the end of the first such step, saying what
    to call (a step that returns None, skipped, is not counted)."""
    distill = Distillation(teacher=Teacher(), wrap_training_step=False)
    with pytest.raises(RuntimeError, match=r"wrap_training_step=False.*no call of distillation.loss\(task_loss\)"):
        make_trainer(max_steps=3, max_epochs=-1, callbacks=[distill]).fit(TinyNet())

    class Manual(TinyNet):  # manual optimization: the step returns nothing
        def __init__(self) -> None:
            super().__init__(n=64)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
            opt.step()

    distill = Distillation(teacher=Teacher(), wrap_training_step=False)
    with pytest.raises(RuntimeError, match=r"no call of distillation.loss\(task_loss\).*\(batch 0\)"):
        make_trainer(max_epochs=1, callbacks=[distill]).fit(Manual())


def test_a_bad_student_name_is_refused():
    lit = Lit(hf("llama"), lm_batches(1))
    with pytest.raises(ValueError, match="`student='nope'`"):
        make_trainer(max_steps=1, max_epochs=-1, callbacks=[Distillation(student="nope")]).fit(lit)


# ---------------------------------------------------------------- the Hydra CLI
def test_the_distill_configs_name_every_argument_and_build():
    import inspect
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lightning_prune.app import cli

    conf = Path(cli.config_dir()) / "distill"
    expected = set(inspect.signature(Distillation.__init__).parameters) - {"self"}
    for name in ("kd", "squarehead"):
        assert set(OmegaConf.load(conf / f"{name}.yaml")) - {"_target_"} == expected, name
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(cli.config_dir()), version_base="1.3"):
        assert not compose("config").distill  # none by default
        cfg = compose(
            "config", overrides=["experiment=llama_text", "distill=squarehead", "distill.teacher_dtype=bfloat16"]
        )
        built = instantiate(cfg.distill)
        assert isinstance(built, Distillation) and built.squarehead_weight == 1.0
        assert built.teacher_dtype is torch.bfloat16
    GlobalHydra.instance().clear()
