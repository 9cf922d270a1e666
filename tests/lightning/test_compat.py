"""One test per private Lightning/PyTorch internal used through :mod:`matsciml.lightning._compat`.

Each fails when the internal moves or stops doing what the wrapper relies on.
"""

from __future__ import annotations

import copy
import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from torch.utils.data import DataLoader, TensorDataset

from matsciml.lightning import _compat

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.logged: list[str] = []

    def log(self, name, value, *args, **kwargs):  # records what reaches the real log
        self.logged.append(name)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, generator=g)
    return DataLoader(TensorDataset(x, x.sum(-1, keepdim=True)), batch_size=4)


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )  # fmt: skip


def test_forward_redirection_calls_the_method_through_the_wrapper(tmp_path):
    trainer = _trainer(tmp_path)
    redirect = _compat.forward_redirection(trainer.strategy)
    assert redirect is not None
    module = Tiny()
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls.append("wrapper")
            return self.inner(*args, **kwargs)

    module.compute = lambda x: x * 2  # the method the redirection must reach
    out = redirect(Wrapper(module), module, "compute", torch.ones(1))
    assert calls == ["wrapper"] and out.item() == 2.0


def test_mark_scaler_step_skipped_makes_the_scaler_skip_and_back_off():
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    before = [p.detach().clone() for p in layer.parameters()]
    scaler.scale(layer(torch.ones(1, 2)).sum()).backward()
    scaler.unscale_(optimizer)  # as Lightning does before on_before_optimizer_step
    assert _compat.mark_scaler_step_skipped(scaler, optimizer, {torch.device("cpu")})
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert scaler.get_scale() == 8.0 * scaler.get_backoff_factor()
    assert not _compat.mark_scaler_step_skipped(None, optimizer, ())


def test_dump_checkpoint_matches_save_checkpoint(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit(Tiny(), _loader())
    dumped = _compat.dump_checkpoint(trainer)
    trainer.save_checkpoint(tmp_path / "saved.ckpt")
    saved = torch.load(tmp_path / "saved.ckpt", weights_only=False)
    assert set(dumped) == set(saved) and dumped["global_step"] == saved["global_step"] == 2
    assert all(torch.equal(dumped["state_dict"][k], v) for k, v in saved["state_dict"].items())


def test_silenced_logging_shadows_log_and_restores_it():
    module = Tiny()
    with _compat.silenced_logging(module):
        module.log("inside", 1.0)
        module.log_dict({"inside_dict": 1.0})
    module.log("after", 1.0)
    assert module.logged == ["after"]
    assert "log" not in module.__dict__ and "log_dict" not in module.__dict__


def test_preserved_trainer_state_undoes_a_nested_test(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = _trainer(tmp_path, callbacks=[checkpoint])
    module = Tiny()
    trainer.fit(module, _loader())
    path = checkpoint.best_model_path
    assert path
    trainer.state.fn, trainer.state.status = TrainerFn.FITTING, TrainerStatus.RUNNING
    state = (trainer.state.fn, trainer.state.status, trainer.state.stage)
    checkpoint.best_model_path = "sentinel"
    with _compat.preserved_trainer_state(trainer):
        trainer.test(module, _loader(), ckpt_path=path, verbose=False)
        inside = (trainer.state.fn, trainer.state.status, checkpoint.best_model_path)
    # the nested test did change both (else the guard would not be needed) ...
    assert inside[:2] != state[:2] and inside[2] == path
    # ... and the guard put them back
    assert (trainer.state.fn, trainer.state.status, trainer.state.stage) == state
    assert checkpoint.best_model_path == "sentinel"


def test_detach_from_trainer_lets_a_copy_answer_trainer():
    module = copy.deepcopy(Tiny())
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
        _ = module.trainer
    _compat.detach_from_trainer(module)
    assert module.trainer is None


def test_logs_at_this_step_follows_log_every_n_steps(tmp_path):
    """True exactly on the steps whose logged values reach the loggers: (step + 1) % log_every_n_steps == 0."""
    seen: list[tuple[int, bool]] = []

    class Recorder(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, _compat.logs_at_this_step(trainer)))

    loader = DataLoader(TensorDataset(torch.randn(12, 2), torch.randn(12, 1)), batch_size=2)
    trainer = _trainer(tmp_path, log_every_n_steps=3, callbacks=[Recorder()])
    trainer.fit_loop.epoch_loop.max_steps = 6
    trainer.fit(Tiny(), loader)
    assert seen == [(s, (s + 1) % 3 == 0) for s in range(6)]
    assert _compat.logs_at_this_step(None) is True


def test_refresh_logged_metric_hands_over_the_new_step_value(tmp_path):
    """After the first ``log`` of an epoch, a refresh gives Lightning the batch's value exactly as ``log`` would."""
    from torchmetrics import MeanMetric

    class Logs(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.mean = MeanMetric()
            self.refreshed: list[bool] = []

        def log(self, *args, **kwargs):  # the real log (Tiny records names instead)
            return pl.LightningModule.log(self, *args, **kwargs)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.mean.update(loss.detach())
            self.mean._forward_cache = loss.detach() * 10  # the value Lightning must show for this step
            done = _compat.refresh_logged_metric(self, "m", self.mean)
            self.refreshed.append(done)
            if not done:
                self.log("m", self.mean, on_step=True, on_epoch=True)
            self.log("plain", loss)
            assert not _compat.refresh_logged_metric(self, "plain", loss)  # a tensor value: not handled
            assert not _compat.refresh_logged_metric(self, "unknown", self.mean)
            return loss

    seen: list[tuple[float, float]] = []

    class Reader(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((float(trainer.callback_metrics["m_step"]), float(outputs["loss"]) * 10))

    module = Logs()
    loader = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=2)
    trainer = _trainer(tmp_path, callbacks=[Reader()])
    trainer.fit_loop.epoch_loop.max_steps = 8
    trainer.fit_loop.max_epochs = 2
    trainer.fit(module, loader)
    assert module.refreshed == [False, True, True, True] * 2  # logged at the start of each epoch, then refreshed
    assert [a for a, _ in seen] == pytest.approx([b for _, b in seen], rel=1e-6)
