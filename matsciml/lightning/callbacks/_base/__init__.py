"""Base classes of the callbacks: the middle layer of :mod:`matsciml.lightning.callbacks`.

:class:`~.isolation.IsolatedCallback` (a failing callback does not end the run),
:class:`~.periodic.PeriodicCallback` (work every N steps or epochs),
:class:`~.optimizer_step.OptimizerStepCallback` (acts once per optimizer step),
:class:`~.monitored.MonitoredCallback` (follows one metric and its best value),
:class:`~.task_hooks.TaskHooksCallback` (forward hooks on a task's modules, removed when
fitting ends) and :class:`~.train_end.TrainEndCallback` (one stage of the train-end
pipeline, sharing a :class:`~.train_end.TrainEndContext` with the others). They import only
:mod:`matsciml.lightning.callbacks._utils` (and the task protocol,
:mod:`matsciml.models.tasks.protocol`).
"""
