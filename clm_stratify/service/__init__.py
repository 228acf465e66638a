"""The Subscription receiver (``clm-stratify serve``): the request handler only checks and
stores; a worker drains the queue.

:mod:`~clm_stratify.service.receiver` (HTTP) -> :mod:`~clm_stratify.service.notifications`
(parse) -> :mod:`~clm_stratify.service.inbox` (SQLite, durable) ->
:mod:`~clm_stratify.service.worker` (resolve to patients, evaluate with the pipeline);
:mod:`~clm_stratify.service.reload` (SIGHUP) and :mod:`~clm_stratify.service.subscriptions`
(create / inspect / remove ours on a server).
"""

__all__ = ["receiver", "notifications", "inbox", "worker", "reload", "subscriptions"]
