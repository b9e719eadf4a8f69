"""Training loop, checkpoints and evaluation; import from the submodule that holds what you need:

- :mod:`ivpt.engine.trainer`: :func:`~ivpt.engine.trainer.train` (``ivpt train``), single process or
  under ``torchrun``;
- :mod:`ivpt.engine.step`: :class:`~ivpt.engine.step.TrainStep` and
  :func:`~ivpt.engine.step.build_train_step`, one training step (shared with ``ivpt bench``);
- :mod:`ivpt.engine.evaluate`: :func:`~ivpt.engine.evaluate.evaluate` and
  :func:`~ivpt.engine.evaluate.evaluate_checkpoint` (``ivpt eval``);
- :mod:`ivpt.engine.report`: :func:`~ivpt.engine.report.build_report` (``ivpt report``);
- :mod:`ivpt.engine.schedule`, :mod:`ivpt.engine.rng`, :mod:`ivpt.engine.distributed`,
  :mod:`ivpt.engine.logger`: learning-rate schedules, random state, process groups, run logs;
- :mod:`ivpt.engine.runlock`, :mod:`ivpt.engine.interrupt`: one run per folder, Ctrl-C saving
  ``last.pt``.

Checkpoint files are read and written by :mod:`ivpt.checkpoint`, and models rebuilt from them by
:mod:`ivpt.model.pretrained`, both below the engine. Nothing is imported here, so that loading one part
does not pull in the others.
"""
