"""The guests a host application's runs share: one engine and compiled guest
runtime per core and language its runs run on, built by the first run on
that core in that language."""

from __future__ import annotations

import threading

from capsule.sandbox.engine import EngineParts, GuestComponent, Sandbox

#: The cores a guest is made for (the run option ``core``).
CORES = ("threads", "async")
#: The languages of the programs a guest runs.
LANGUAGES = ("python", "javascript")


class SharedGuests:
    """A :class:`GuestComponent` per core and language, made on first use
    (thread-safe), shared by every sandbox of that core given it: the thread
    core's engine has no async support; the async core's runs call futures on
    its own. The guests of one core share its engine, so that a run can hold
    programs of both languages; each is built under a lock of its own, so that
    a run waits only for the guest it needs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: dict[str, EngineParts] = {}
        self._guests: dict[tuple[str, str], GuestComponent] = {}
        self._building: dict[tuple[str, str], threading.Lock] = {}

    def for_core(self, core: str, language: str = "python") -> GuestComponent:
        """The guest of ``core`` (one of CORES) for programs in ``language``
        (one of LANGUAGES), built now if no run made it yet (a build that
        fails is tried again by the next run)."""
        if core not in CORES:
            raise ValueError(f"core {core!r:.80} is invalid; expected one of {CORES}")
        if language not in LANGUAGES:
            raise ValueError(f"language {language!r:.80} is invalid; expected one of {LANGUAGES}")
        key = (core, language)
        with self._lock:
            guest = self._guests.get(key)
            if guest is not None:
                return guest
            building = self._building.setdefault(key, threading.Lock())
            engine = self._engines.get(core)
            if engine is None:  # (an engine is made in milliseconds)
                make_engine = Sandbox._make_engine
                if core == "async":  # (its modules load only for a run on it)
                    from capsule.sandbox.async_sandbox import AsyncSandbox

                    make_engine = AsyncSandbox._make_engine
                engine = self._engines[core] = EngineParts.make(make_engine)
        with building:  # (one build per guest, however many runs start at once)
            with self._lock:
                guest = self._guests.get(key)
            if guest is None:
                guest = GuestComponent(language=language, on=engine)
                with self._lock:
                    self._guests[key] = guest
            return guest
