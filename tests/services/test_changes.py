"""p2pcompute.services.changes: every notify wakes every waiter to re-check its predicate."""

from __future__ import annotations

import trio
import trio.testing

from p2pcompute.services.changes import Changes


async def test_wait_for_returns_at_once_when_the_predicate_holds() -> None:
    with trio.fail_after(1):
        await Changes().wait_for(lambda: True)


async def test_every_notify_wakes_every_waiter_to_recheck() -> None:
    changes = Changes()
    value = [0]
    done: list[int] = []

    async def waiter(target: int) -> None:
        await changes.wait_for(lambda: value[0] >= target)
        done.append(target)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, 1)
            nursery.start_soon(waiter, 2)
            await trio.testing.wait_all_tasks_blocked()
            value[0] = 1
            changes.notify()
            await trio.testing.wait_all_tasks_blocked()
            assert done == [1]
            value[0] = 2  # nobody re-checks until told
            await trio.testing.wait_all_tasks_blocked()
            assert done == [1]
            changes.notify()
    assert done == [1, 2]
