"""The guests a host application's runs share: one engine and compiled guest
runtime per core its runs run on, built by the first run on that core."""

from __future__ import annotations

import threading

from capsule.sandbox.engine import GuestComponent, Sandbox

#: The cores a guest is made for (the run option ``core``).
CORES = ("threads", "async")


class SharedGuests:
    """A :class:`GuestComponent` per core, made on first use (thread-safe),
    shared by every sandbox of that core given it: the thread core's engine
    has no async support; the async core's runs call futures on its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._guests: dict[str, GuestComponent] = {}

    def for_core(self, core: str) -> GuestComponent:
        """The guest of ``core`` (one of CORES), built now if no run made it
        yet (a build that fails is tried again by the next run)."""
        if core not in CORES:
            raise ValueError(f"core {core!r:.80} is invalid; expected one of {CORES}")
        with self._lock:  # (one build per core, however many runs start at once)
            guest = self._guests.get(core)
            if guest is None:
                make_engine = Sandbox._make_engine
                if core == "async":  # (its modules load only for a run on it)
                    from capsule.sandbox.async_sandbox import AsyncSandbox

                    make_engine = AsyncSandbox._make_engine
                guest = self._guests[core] = GuestComponent(make_engine=make_engine)
            return guest
