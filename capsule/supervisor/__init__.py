"""The supervisor: the tree of task invocations of one run, their lifecycle
(pending -> running -> completed | failed, through retrying), retries with
exponential backoff, and the typed events that report it all (a public,
versioned schema: docs/events.md) with the stream that carries them; and the
options a run is given (RunOptions), which size and bound it.

It decides what runs and when; the sandbox decides how one attempt runs.

Its parts, each one job:

- ``run``: the run as the rest of Capsule sees it (``Run``): builds the parts
  below and runs the entry task; ``loading``: importing the program.
- ``supervision``: an invocation's attempts and retries (with ``retry`` and
  ``outcomes``); ``restarts``: a supervisor's restarts, its strategy and
  intensity (``intensity``); ``admission``: limits on new tasks.
- ``tree``: the records of the task tree; ``live``: the attempts running now,
  and cancelling parts of the tree.
- ``journaled``: every host call as a step, recorded or replayed from the
  journal (``steps``: the journal's side of it); the steps that may wait run
  by the run's core's StepDriver: on the task's thread, or by continuation
  (``async_host``, for the async core: ``async_core``).
- ``host_calls``: the sandbox's host calls, handed by kind to ``task_calls``,
  ``message_steps`` (with ``messages``), ``time_calls``, ``http_calls`` and
  ``operation_calls`` (with ``operations``); ``waits``: a host call that
  waits, as a wait, run by a driver: ``blocking`` (on the task's thread) or
  ``continuations`` (no thread: awaits on the run's event loop,
  ``run_loop``); ``async_core``: invocations as tasks on that loop.
- ``output``: what tasks print; ``events``: the typed event stream.
- ``options`` (with ``option_specs``): the run's settings, declared once.
"""
