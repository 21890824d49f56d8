"""Priorities: among the tokens queued in one mailbox, higher priority runs first.

A token's priority is its call's (``fn.options(priority=5)(x)``), else its operation's
(``tags={"priority": 5}``), else 0; FIFO among equal priorities. Mailboxes stay plain deques
that workers ``popleft``: a coordinator pushes with :func:`push_by_priority` only once a token
of non-zero priority was routed (before that, the plain ``append`` of ``Worker.push`` is the
whole cost), and that keeps each mailbox sorted, highest first, so no worker, thief or lane
changes. The policy is strict priority: a steady stream of higher-priority work can starve a
lower priority for as long as it lasts (see the README for how to bound it).

Pushing in order: the lower-priority tokens at the mailbox's tail are popped off its right end,
the token pushed, and they are pushed back behind it, each through ``Worker.push`` so that no
wake-up is lost whatever the lane. The worker keeps popping from the left meanwhile; producers
that push in order hold one lock, so they cannot interleave their reorderings.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["priority_of", "push_by_priority"]

_lock = threading.Lock()


def priority_of(token: Any) -> int:
    """The priority ``token`` is queued with: its call's, else its operation's."""
    own: int | None = token._priority
    return token.spec.priority if own is None else own


def push_by_priority(worker: Any, token: Any) -> list[Any]:
    """Push ``token`` to ``worker`` behind every queued token of equal or higher priority and
    ahead of the lower ones; returns the tokens moved back behind it (the caller discards them
    too if the workers stopped meanwhile)."""
    mailbox = worker.mailbox
    priority = priority_of(token)
    moved: list[Any] = []
    with _lock:
        while True:
            try:
                last = mailbox[-1]
            except IndexError:  # empty, or emptied by the worker meanwhile
                break
            if priority_of(last) >= priority:
                break
            try:
                moved.append(mailbox.pop())
            except IndexError:
                break
        worker.push(token)
        push = worker.push
        for other in reversed(moved):
            push(other)
    return moved
