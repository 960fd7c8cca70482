"""The one module that uses wasmtime-py's internals: what it changes in
wasmtime-py, only while asked, and what it says when a name is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from wasmtime import _bindings, _ffi
from wasmtime.component import RecordType, String

from capsule.sandbox import engine, hostcall
from capsule.sandbox import wasmtime_compat as compat
from capsule.sandbox.engine import Sandbox
from tests.conftest import ProgramRunner


def _current() -> tuple[Any, Any, Any, Any]:
    return (
        _bindings.__dict__["_wasmtime_component_val_delete"],
        _ffi.__dict__["str_to_capi"],
        String.__dict__["convert_from_c"],
        RecordType.__dict__["fields"],
    )


def _patches() -> compat.ConverterPatches:
    return compat.ConverterPatches(
        str_to_capi=hostcall._str_to_c,
        bytes_to_capi=hostcall._bytes_to_c,
        string_from_c=hostcall._string_from_c,
    )


def test_converters_are_replaced_only_while_held_and_put_back_by_the_last_holder() -> None:
    original = _current()
    patches = _patches()
    with patches.held():
        assert _ffi.str_to_capi is hostcall._str_to_c
        with patches.held():
            assert String.__dict__["convert_from_c"] is hostcall._string_from_c
        assert patches.applied and _current() != original
    assert not patches.applied
    assert _current() == original


def test_an_open_sandbox_holds_the_faster_converters(tmp_path: Path) -> None:
    original = _current()
    with Sandbox([tmp_path]):
        assert hostcall.CONVERTERS.applied
        assert _ffi.str_to_capi is hostcall._str_to_c
    assert _current() == original


def test_on_an_unsupported_version_nothing_in_wasmtime_py_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(compat, "SUPPORTED", False)
    original = _current()
    with _patches().held():
        assert _current() == original


def test_programs_run_with_wasmtime_py_s_own_converters(
    monkeypatch: pytest.MonkeyPatch, run_program: ProgramRunner
) -> None:
    monkeypatch.setattr(compat, "SUPPORTED", False)
    monkeypatch.setattr(engine, "CONVERTERS", _patches())
    original = _current()
    outcome = run_program(
        """
        from capsule import task

        @task
        def fails(text: str) -> str:
            raise ValueError(text)

        @task
        def main(text: str) -> dict:
            try:
                fails(text)
            except Exception as exc:
                return {"caught": str(exc), "echo": text}
            return {}
        """,
        "héllo ✓",
    )
    assert outcome.value == {
        "caught": "task 'fails' failed (exception): ValueError: héllo ✓",
        "echo": "héllo ✓",
    }
    assert _current() == original


def test_a_missing_internal_name_is_an_error_naming_the_feature_and_the_fix() -> None:
    def read() -> Any:
        return _ffi.no_such_function

    with pytest.raises(compat.WasmtimeUnsupported) as caught:
        compat._require("epoch deadlines", read, "wasmtime_store_epoch_deadline_callback")
    message = str(caught.value)
    assert "epoch deadlines" in message
    assert "wasmtime_store_epoch_deadline_callback" in message
    assert f"wasmtime-py {compat.VERSION}" in message
    assert "pip install 'wasmtime>=50,<51'" in message


def test_the_version_check_reads_the_installed_distribution() -> None:
    from importlib.metadata import version

    assert compat.VERSION == version("wasmtime")
    assert compat.SUPPORTED == version("wasmtime").startswith(f"{compat.SUPPORTED_MAJOR}.")
