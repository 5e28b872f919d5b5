"""Evaluation: benchmark datasets, the mIoU harness and the speed bench.

- :mod:`.datasets`: readers of 13 segmentation benchmarks in their devkit layouts and of
  OpenImages V7 points (``get_dataset``, ``dataset_names``, ``Sample``, ``DatasetError``).
- :mod:`.harness`: ``gem-backend eval`` (``EvalConfig``, ``run_evaluation``,
  ``run_active_learning``, ``protocol_for``, ``sliding_windows``, ``confusion_matrix``).
- :mod:`.bench`: ``gem-backend bench`` (timings, memory, the official package side by side).
"""
