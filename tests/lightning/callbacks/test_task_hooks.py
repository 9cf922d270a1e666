"""Tests of TaskHooksCallback (forward hooks on a task's modules, removed when fitting ends).

Oracles: the number of calls a hook records for a known number of forward passes; the
warnings counted for a module without the task protocol.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from matsciml.lightning.callbacks._base.task_hooks import TaskHooksCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from monitor_models import PlainModule, TinyTask  # noqa: E402


def test_hooks_see_each_forward_until_fit_ends_or_fails():
    callback, calls = TaskHooksCallback(), []
    layer = torch.nn.Linear(2, 1)
    for end in (lambda: callback.on_fit_end(None, None), lambda: callback.on_exception(None, None, RuntimeError())):
        callback.add_forward_hook(layer, lambda module, inputs, output: calls.append(output.shape))
        assert callback.has_hooks
        layer(torch.ones(3, 2))
        layer(torch.ones(5, 2))
        end()
        assert not callback.has_hooks
        layer(torch.ones(7, 2))  # no hook any more
    assert calls == [torch.Size([3, 1]), torch.Size([5, 1])] * 2


def test_a_module_without_the_task_protocol_is_reported_once():
    callback = TaskHooksCallback()
    assert callback.check_task(TinyTask(), "encoder", "nothing is watched")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not callback.check_task(PlainModule(), "encoder", "nothing is watched")
        assert not callback.check_task(PlainModule(), "encoder", "nothing is watched")
        callback.warn_once("another fallback")  # one warning per callback in all
    messages = [str(w.message) for w in caught]
    assert messages == [
        "TaskHooksCallback: PlainModule does not follow the task protocol (encoder): nothing is watched"
    ]
