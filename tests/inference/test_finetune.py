"""Fine-tuning from an EMA checkpoint: new head, frozen layers, encoder learning rate, EMA restarted from the loaded weights."""

from __future__ import annotations

import pytest
import torch
from helpers import write_dedented
from inference_runs import TRAINER, experiment, run

from matsciml.common.errors import ConfigError
from matsciml.runner.weights import freeze_encoder


@pytest.fixture(scope="module")
def finetuned(config_root, force_run, tmp_path_factory):
    # decay 1: the EMA never moves from where it starts, so the saved state_dict shows that start
    write_dedented(config_root / "trainer_still_ema.yaml", TRAINER.replace("EPOCHS", "1").replace("DECAY", "1.0"))
    extra = f"""\
    load_weights:
      method: pretrained
      path: {force_run.last_checkpoint}
      freeze: 1
      encoder_lr: 0.001
    """
    exp = experiment(config_root, "finetune", "forces", "devset", "ScalarRegressionTask", ["energy_per_atom"], extra)
    return run(config_root, exp, tmp_path_factory.mktemp("runs") / "finetune", "trainer_still_ema.yaml")


def test_frozen_layers_encoder_lr_and_ema_restart(force_run, finetuned):
    source = torch.load(force_run.last_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    ckpt = torch.load(finetuned.last_checkpoint, map_location="cpu", weights_only=True)
    ema = ckpt["state_dict"]
    raw = ckpt["callbacks"]["ExponentialMovingAverageCallback"]["raw"]
    encoder_keys = [k for k in source if k.startswith("encoder.")]
    assert encoder_keys
    # the EMA restarted from the loaded (EMA) weights of the first run
    for key in encoder_keys:
        assert torch.equal(ema[key], source[key]), key
    # a new head for the new target
    assert any(k.startswith("output_heads.energy_per_atom.") for k in ema)
    assert not any(k.startswith("output_heads.energy.") for k in ema)
    # frozen: input stage and first layer kept their loaded values; the second layer learned
    frozen = [
        k
        for k in encoder_keys
        if k.startswith(("encoder.atom_embedding.", "encoder.in_projection.", "encoder.layers.0."))
    ]
    learned = [k for k in encoder_keys if k.startswith("encoder.layers.1.") and source[k].is_floating_point()]
    assert frozen and learned
    for key in frozen:
        assert torch.equal(raw[key], source[key]), key
    assert any(not torch.equal(raw[key], source[key]) for key in learned)
    # two parameter groups: heads at lr, the unfrozen encoder at encoder_lr
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert sorted(g["lr"] for g in groups) == pytest.approx([0.001, 0.01])
    task = finetuned.task
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    counted = sum(len(g["params"]) for g in groups)
    assert counted == len(trainable)
    assert finetuned.prepared.loaded_weights["frozen"] == len(set(frozen) & set(dict(task.named_parameters())))


def test_freeze_options_and_errors(force_run):
    from matsciml.inference import load_task

    task = load_task(force_run.last_checkpoint).task
    assert freeze_encoder(task, "all") == len(list(task.encoder.parameters()))
    assert all(not p.requires_grad for p in task.encoder.parameters())
    assert all(p.requires_grad for p in task.output_heads.parameters())
    task = load_task(force_run.last_checkpoint).task
    with pytest.raises(ConfigError, match="has 2"):
        freeze_encoder(task, 3)
    with pytest.raises(ConfigError, match="not valid"):
        freeze_encoder(task, "most")
    assert freeze_encoder(task, 0) == len(list(task.encoder.atom_embedding.parameters())) + len(
        list(task.encoder.in_projection.parameters())
    )
