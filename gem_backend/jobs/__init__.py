"""Jobs: long runs over a whole Label Studio project, outside the request path.

- :mod:`.prelabel`: bulk pre-labeling through the API (``resolve_target``, ``select_tasks``,
  ``predict_and_store``, ``run_local``, ``TaskLocks``, ``Summary``, ``PrelabelError``).
- :mod:`.worker`: the RQ queue and worker of ``prelabel --queue`` (``enqueue_run``,
  ``follow_run``, ``run_batch``, ``cmd_worker``).
- :mod:`.learn`: ``gem-backend learn``, prototypes from a project's existing annotations
  (``learn_project``).
- :mod:`.commands`: the ``prelabel`` and ``worker`` subcommands.
"""
