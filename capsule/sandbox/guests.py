"""The guests a host application's runs share: one engine and compiled guest
runtime per core and language its runs run on, built by the first run on
that core in that language."""

from __future__ import annotations

import threading

from capsule.sandbox.engine import GuestComponent, Sandbox

#: The cores a guest is made for (the run option ``core``).
CORES = ("threads", "async")
#: The languages of the programs a guest runs.
LANGUAGES = ("python", "javascript")


class SharedGuests:
    """A :class:`GuestComponent` per core and language, made on first use (thread-safe),
    shared by every sandbox of that core given it: the thread core's engine
    has no async support; the async core's runs call futures on its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._guests: dict[tuple[str, str], GuestComponent] = {}

    def for_core(self, core: str, language: str = "python") -> GuestComponent:
        """The guest of ``core`` (one of CORES) for programs in ``language``
        (one of LANGUAGES), built now if no run made it yet (a build that
        fails is tried again by the next run)."""
        if core not in CORES:
            raise ValueError(f"core {core!r:.80} is invalid; expected one of {CORES}")
        if language not in LANGUAGES:
            raise ValueError(f"language {language!r:.80} is invalid; expected one of {LANGUAGES}")
        with self._lock:  # (one build per core, however many runs start at once)
            guest = self._guests.get((core, language))
            if guest is None:
                make_engine = Sandbox._make_engine
                if core == "async":  # (its modules load only for a run on it)
                    from capsule.sandbox.async_sandbox import AsyncSandbox

                    make_engine = AsyncSandbox._make_engine
                # (Beside another language's guest of the core, if one was
                # made: one engine runs both, so one sandbox can.)
                beside = next(
                    (made for (of_core, _), made in self._guests.items() if of_core == core), None
                )
                guest = GuestComponent(make_engine=make_engine, language=language, beside=beside)
                self._guests[core, language] = guest
            return guest
