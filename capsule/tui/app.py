"""The Textual app: the live actor tree of a run, a detail pane for the
selected task, and a header and footer with the run's state and the keys.

Updates are batched: a few times a second the app takes every event that
arrived, applies it to the model, and relabels only the tasks that changed.
Everything works from the keyboard, in 80x24, without colour.
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from rich.style import Style
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, OptionList, Static, Tree
from textual.widgets.option_list import Option
from textual.widgets.tree import TreeNode

from capsule.supervisor.events import PREVIEW_CHARS
from capsule.terminal import visible
from capsule.tui.model import (
    COLOURS,
    ENDED,
    STATES,
    SYMBOLS,
    RunModel,
    TaskView,
    pretty_json,
    task_order,
)
from capsule.tui.sources import Source
from capsule.tui.textual_compat import failure_of

#: Seconds between two batches of updates.
REFRESH_S = 0.25
#: States the filter key cycles through (None: every task).
FILTERS: tuple[str | None, ...] = (None, "running", "waiting", "failed", "completed", "cancelled")
_BAR = 8
#: The style of a node's fold icon: its meta makes a click on it fold the node
#: (as Textual's own tree does).
TOGGLE_STYLE = Style.from_meta({"toggle": True})
#: Longest line of guest text drawn (a longer one is cut, saying by how much).
LINE_CHARS = 4000
#: Longest result drawn (its pretty-printed JSON); the pane scrolls.
RESULT_CHARS = 200_000
#: Lines of output and timeline the detail pane shows (the newest).
DETAIL_LINES = 200


def plain(text: object, *, one_line: bool = False, limit: int = LINE_CHARS) -> str:
    """Guest text as the TUI draws it: only ever inside ``Text`` (never read as
    markup), with control characters, bidirectional overrides and lone
    surrogates shown as escapes, and cut at ``limit`` characters."""
    shown = visible(str(text), one_line=one_line)
    if len(shown) > limit:
        shown = f"{shown[:limit]}… ({len(shown) - limit:,} more characters)"
    return shown


def shown_name(view: TaskView) -> str:
    """The task's name, and the name it was registered under, if any."""
    name = plain(view.name, one_line=True, limit=200)
    if view.actor_name is not None:
        name += f' "{plain(view.actor_name, one_line=True, limit=200)}"'
    return name


def fuel_bar(used: int, budget: int | None) -> str:
    if not budget:
        return "░" * _BAR
    filled = min(_BAR, round(_BAR * used / budget))
    return "█" * filled + "░" * (_BAR - filled)


def short_number(value: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def call_text(view: TaskView) -> str:
    """``name(arg, key=value)`` from the call's JSON (a preview may be cut short)."""
    if view.call is None:
        return "-"
    try:
        call = json.loads(view.call)
        # {"args", "kwargs"}, as the caller wrote them; [args, kwargs] in older journals.
        args, kwargs = (call["args"], call["kwargs"]) if isinstance(call, dict) else call
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            return view.call
    except (ValueError, TypeError, KeyError, RecursionError):
        return view.call
    parts = [json.dumps(arg) for arg in args]
    parts += [f"{key}={json.dumps(value)}" for key, value in kwargs.items()]
    return f"{view.name}({', '.join(parts)})"


#: Width of each column of the tree's lines (the header names them).
_COLUMNS = (("task", 24), ("id", 12), ("state", 10), ("try", 5), ("time", 6),
            ("fuel", 8 + 1 + 13), ("memory", 7), ("mbox", 4))  # fmt: skip


def column_headers() -> Text:
    """The line above the tree naming its columns (over a top-level task's)."""
    numbers = {"time", "memory", "mbox"}
    return Text(
        "    "
        + " ".join(
            name.rjust(width) if name in numbers else name.ljust(width) for name, width in _COLUMNS
        ),
        style="bold",
    )


def task_label(view: TaskView, now: float) -> Text:
    state = view.state
    widths = dict(_COLUMNS)
    label = Text(no_wrap=True)
    label.append(f"{SYMBOLS.get(state, '?')} ", style=COLOURS.get(state, ""))
    label.append(_fit(shown_name(view), widths["task"]), style="bold")
    label.append(f" {_fit(plain(view.task_id[-12:], one_line=True), widths['id'])}", style="dim")
    label.append(f" {state:<10}", style=COLOURS.get(state, ""))
    label.append(f" {f'{view.attempt}/{view.max_attempts}':<5}")
    label.append(f" {duration(view.elapsed(now)):>6}")
    label.append(f" {fuel_bar(view.fuel, view.fuel_budget)}", style="cyan")
    budget = short_number(view.fuel_budget) if view.fuel_budget else "-"
    label.append(f" {f'{short_number(view.fuel)}/{budget}':<13}")
    memory = "-" if view.peak_memory is None else short_number(view.peak_memory)
    mailbox = "-" if view.mailbox_depth is None else str(view.mailbox_depth)
    label.append(f" {memory:>7} {mailbox:>4}", style="dim")
    if view.replayed:
        label.append(" (journal)", style="dim")
    return label


def _fit(text: str, width: int) -> str:
    """``text`` in exactly ``width`` characters: padded, or cut with an ellipsis."""
    return text.ljust(width) if len(text) <= width else text[: width - 1] + "…"


class TaskTree(Tree[str]):
    """The actor tree. Labels are drawn from the model when a line is rendered, so
    a batch of changes costs one cheap refresh per changed node, and only lines
    on screen are ever drawn."""

    def __init__(self, label_of: Callable[[str], Text], **options: Any) -> None:
        super().__init__("tasks", **options)
        self.label_of = label_of

    def changed(self, nodes: list[TreeNode[str]]) -> None:
        """Draw these nodes again (from the model), with one repaint for all.

        ``TreeNode.refresh`` repaints its line at once (about 85 us each: a
        thousand changed actors would take most of a refresh period), so the
        nodes' update counters, which key Tree's line cache, are bumped here
        and the widget repainted once; only lines on screen are drawn."""
        for node in nodes:
            node._updates += 1
        self.refresh()

    def render_label(self, node: TreeNode[str], base_style: Style, style: Style) -> Text:
        if node.data is None:
            return super().render_label(node, base_style, style)
        label = self.label_of(node.data)
        label.stylize(style)
        if node.allow_expand:
            icon = self.ICON_NODE_EXPANDED if node.is_expanded else self.ICON_NODE
            return Text.assemble((icon, base_style + TOGGLE_STYLE), label)
        return label


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        yield Static(
            "[b]Capsule TUI[/b]\n\n"
            "  up/down, left/right  move in the task tree, fold and unfold\n"
            "  tab  move between the tree and the detail pane; there, up/down,\n"
            "       page up/page down and home/end scroll the selected task\n"
            "  ?    this help\n"
            "  /    search by name, registered name or id (Enter; Escape clears)\n"
            "  f    filter: all, running, waiting, failed, completed, cancelled\n"
            "  l    follow the newest activity on or off\n"
            "  c    cancel the selected task while the run goes on (asks first)\n"
            "  q    quit (a run still going is stopped first, and can be resumed)\n\n"
            "States: · pending  ▶ running  … waiting  ↻ retrying  ⟳ restarting\n"
            "        ✓ completed  ✗ failed  ⊘ cancelled\n\n"
            "Escape closes this help.",
            id="help",
        )


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "yes"),
        Binding("n,escape", "answer(False)", "no"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        question = Text(self.question)  # (quotes a task's name: never markup)
        question.append("\n\n")
        question.append_text(Text.assemble(("y", "bold"), " yes   ", ("n", "bold"), " no"))
        yield Static(question, id="confirm")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class RunPicker(ModalScreen[str]):
    """The runs of a journal, newest first: pick one to open."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "app.quit_app", "quit")]

    def __init__(self, runs: list[Any]) -> None:
        super().__init__()
        self.runs = runs

    def compose(self) -> ComposeResult:
        options = []
        for run in self.runs:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started_at))
            text = f"{run.run_id}  {run.shown_status:10}  {started}  {run.program}"
            options.append(Option(Text(plain(text, one_line=True)), id=run.run_id))
        yield Static("Pick a run (Enter), or q to quit", id="picker-title")
        yield OptionList(*options, id="runs")

    def on_option_list_option_selected(self, message: OptionList.OptionSelected) -> None:
        if message.option.id is not None:
            self.dismiss(message.option.id)


class CapsuleApp(App[int]):
    """Watch a run: ``source`` feeds it (a live run here, or a journal)."""

    TITLE = "Capsule"
    CSS = """
    #summary { height: 2; padding: 0 1; background: $boost; }
    #columns { height: 1; padding: 0 1; }
    #tree { height: 3fr; border: round $primary; }
    #detail-box { height: 2fr; border: round $secondary; }
    #detail { padding: 0 1; }
    #search { dock: bottom; display: none; }
    #search.visible { display: block; }
    HelpScreen, ConfirmScreen, RunPicker { align: center middle; }
    #help, #confirm { width: 76; height: auto; padding: 1 2; border: round $accent;
                      background: $panel; }
    #runs { width: 100%; height: 1fr; }
    #picker-title { padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "help", "help"),
        Binding("slash", "search", "search"),
        Binding("f", "filter", "filter"),
        Binding("l", "follow", "follow"),
        Binding("c", "cancel", "cancel"),
        Binding("q", "quit_app", "quit"),
    ]

    def __init__(
        self,
        source: Source | None = None,
        picker: tuple[list[Any], Callable[[str], Any]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.source = source
        self._picker = picker
        self.clock = clock
        self.model = RunModel()
        self.follow = False
        #: model.state_changes when follow last moved the cursor.
        self._followed = -1
        self.state_filter: str | None = None
        self.search = ""
        self._tree_nodes: dict[str, TreeNode[str]] = {}
        self._selected: str | None = None
        self._last_full = 0.0
        self._rebuild = False
        self._refreshing = False
        #: Why updates stopped, if they did (shown in the header).
        self.problem: str | None = None
        #: Tasks whose whole result cannot be read (their preview stays).
        self._unreadable_results: set[str] = set()

    @property
    def failure(self) -> BaseException | None:
        """What made the app itself fail, if something did (it then exits at
        once): a failure of the TUI must not pass for a quit, whose return
        value is the run's exit code (its return code is 0)."""
        return failure_of(self)

    # -- layout -------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="summary")
        with Vertical():
            yield Static(column_headers(), id="columns")
            tree = TaskTree(self._label_of, id="tree")
            tree.show_root = False
            tree.guide_depth = 2
            yield tree
            with VerticalScroll(id="detail-box"):
                yield Static("Select a task to see its details.", id="detail")
        yield Input(placeholder="search tasks by name or id; Escape clears", id="search")
        yield Footer()

    async def on_mount(self) -> None:
        # Kept, not queried: a query looks in the screen on top (a dialog, say).
        self._tree_widget: Tree[str] = self.query_one(Tree)
        self._summary = self.query_one("#summary", Static)
        self._detail = self.query_one("#detail", Static)
        self._search = self.query_one(Input)
        if self.source is None and self._picker is not None:
            runs, opener = self._picker
            self.push_screen(RunPicker(runs), lambda run_id: self._open(opener, run_id))
        else:
            self._start()

    def _open(self, opener: Callable[[str], Any], run_id: str | None) -> None:
        if run_id is None:
            return
        self.source = opener(run_id)
        self._start()

    def _start(self) -> None:
        assert self.source is not None
        self.model = RunModel(self.source.run_id, self.source.program)
        self._tree_widget.focus()
        self.set_interval(REFRESH_S, self.refresh_run)
        self.call_later(self.refresh_run)  # at once, not a period later

    async def on_unmount(self) -> None:
        if self.source is not None:
            await self.source.close()

    # -- updates --------------------------------------------------------------------

    async def refresh_run(self) -> None:
        """Take the events that arrived, apply them, redraw what changed. One at a
        time: a slow read of the journal makes the next tick wait, not overlap."""
        source = self.source
        if source is None or not self.is_running or self._refreshing:
            return
        self._refreshing = True
        try:
            await self._refresh(source)
        finally:
            self._refreshing = False

    async def _refresh(self, source: Source) -> None:
        model = self.model
        try:
            events = await source.fetch()
        except Exception as exc:  # a journal that went away, say: shown, not fatal
            self.problem = f"cannot read the run: {exc}"
            events = []
        for event in events:
            model.apply(event)
        await self._whole_result(source)
        model.apply_live(source.live())
        model.run_id = model.run_id or source.run_id
        outcome = source.outcome()
        if outcome is not None and model.ended_at is None:
            model.finish(*outcome, at=self._last_event_time())
        now = self.clock()
        if now - self._last_full >= 1.0:  # elapsed times move: relabel running tasks
            self._last_full = now
            model.dirty.update(t for t, v in model.tasks.items() if v.state not in ENDED)
        self._apply_dirty(now)
        self._show_summary(now)

    def _last_event_time(self) -> float | None:
        ends = [v.ended_at for v in self.model.tasks.values() if v.ended_at is not None]
        return max(ends) if ends else None

    def _visible(self, view: TaskView) -> bool:
        if self.state_filter is not None and view.state != self.state_filter:
            return False
        if self.search:
            needle = self.search.lower()
            names = (view.name, view.task_id, view.actor_name or "")
            return any(needle in name.lower() for name in names)
        return True

    def _apply_dirty(self, now: float) -> None:
        tree = self._tree_widget
        assert isinstance(tree, TaskTree)
        model = self.model
        dirty, model.dirty = model.dirty, set()
        if self._rebuild or ((self.state_filter or self.search) and dirty):
            self._rebuild = False
            self._rebuild_tree(tree, now)
        else:
            changed = []
            for task_id in sorted(dirty, key=task_order):
                view = model.tasks.get(task_id)
                if view is None:
                    continue
                node = self._tree_nodes.get(task_id)
                if node is None:
                    self._add_node(tree, view, now)
                else:
                    changed.append(node)
            tree.changed(changed)
        # On new activity only: between two, the user moves the cursor freely.
        if (
            self.follow
            and model.state_changes != self._followed
            and model.latest in self._tree_nodes
        ):
            self._followed = model.state_changes
            tree.move_cursor(self._tree_nodes[model.latest])
        if self._selected in dirty:
            self._show_detail(self._selected)

    def _add_node(self, tree: Tree[str], view: TaskView, now: float) -> TreeNode[str]:
        parent_view = self.model.tasks.get(view.parent_id) if view.parent_id else None
        parent = tree.root
        if parent_view is not None:
            parent = self._tree_nodes.get(parent_view.task_id) or self._add_node(
                tree, parent_view, now
            )
        if parent is not tree.root and not parent.allow_expand:
            parent.allow_expand = True
            parent.expand()
        # Among its siblings in task order, however its events arrived (they
        # come from several threads): the same tree live and from the journal.
        # (Mostly in order already: a look at the last sibling, else a bisection.)
        key = task_order(view.task_id)
        siblings = parent.children
        before = None
        if siblings and task_order(siblings[-1].data or "") > key:
            index = bisect.bisect_right(siblings, key, key=lambda n: task_order(n.data or ""))
            before = siblings[index]
        node = parent.add(Text(view.task_id), data=view.task_id, expand=True, before=before)
        node.allow_expand = False  # until a child arrives
        self._tree_nodes[view.task_id] = node
        return node

    def _label_of(self, task_id: str) -> Text:
        view = self.model.tasks.get(task_id)
        return Text(task_id) if view is None else task_label(view, self.clock())

    def _rebuild_tree(self, tree: Tree[str], now: float) -> None:
        """With a filter or search: the matching tasks and their ancestors only."""
        tree.clear()
        self._tree_nodes = {}
        model = self.model
        shown: set[str] = set()
        for view in model.tasks.values():
            if self._visible(view):
                task_id: str | None = view.task_id
                while task_id is not None and task_id not in shown:
                    shown.add(task_id)
                    parent = model.tasks.get(task_id)
                    task_id = parent.parent_id if parent else None
        for task_id in sorted(shown, key=task_order):
            self._add_node(tree, model.tasks[task_id], now)

    def _show_summary(self, now: float) -> None:
        model = self.model
        counts = model.counts()
        states = "  ".join(
            f"{SYMBOLS[state]} {state} {counts[state]}" for state in STATES if counts[state]
        )
        if model.ended_at is None:
            status = "running"
        else:
            code = "" if model.exit_code is None else f", exit code {model.exit_code}"
            status = f"ended: {model.status}{code} (q quits)"
        modes = []
        if self.state_filter:
            modes.append(f"filter: {self.state_filter}")
        if self.search:
            modes.append(f"search: {plain(self.search, one_line=True, limit=60)}")
        if self.follow:
            modes.append("following")
        program = plain(model.program.rsplit("/", 1)[-1], one_line=True, limit=60)
        summary = Text(no_wrap=True)
        summary.append(f"run {plain(model.run_id or '-', one_line=True)}", style="bold")
        summary.append(
            f"  {program}  {status}  elapsed {duration(model.elapsed(now))}  "
            f"fuel {short_number(model.total_fuel())}\n"
        )
        if self.problem:
            summary.append(plain(self.problem, one_line=True), style="bold red")
        else:
            summary.append(states or "no tasks yet")
            if self.search and not self._tree_nodes:
                summary.append("   no matches", style="bold")
            if modes:
                summary.append(f"   [{', '.join(modes)}]")
        self._summary.update(summary)

    def _show_detail(self, task_id: str | None) -> None:
        detail = self._detail
        view = self.model.tasks.get(task_id or "")
        if view is None:
            detail.update("Select a task to see its details.")
            return
        now = self.clock()
        text = Text()
        text.append(shown_name(view), style="bold")
        text.append(f" {plain(view.task_id, one_line=True)}  {SYMBOLS.get(view.state, '?')} ")
        text.append(view.state)
        if view.state == "waiting" and view.waiting_on:
            text.append(f" on {plain(view.waiting_on, one_line=True)}")
        if view.state == "waiting" and view.hibernated_bytes:
            text.append(f" (hibernated: {view.hibernated_bytes / 2**20:.1f} MB given back)")
        text.append(
            f"  attempt {view.attempt}/{view.max_attempts}  {duration(view.elapsed(now))}\n"
        )
        text.append(f"fuel {view.fuel:,}")
        if view.fuel_budget:
            text.append(f" (budget {view.fuel_budget:,} per attempt)")
        memory = "-" if view.peak_memory is None else f"{view.peak_memory:,} bytes"
        mailbox = "-" if view.mailbox_depth is None else str(view.mailbox_depth)
        text.append(f"  peak memory {memory}  mailbox {mailbox}\n")
        self._section(text, "call", plain(call_text(view)))
        if view.error is not None:
            kind = plain(view.error.get("kind"), one_line=True, limit=60)
            self._section(text, f"error ({kind})", plain(view.error.get("message")))
            if view.error.get("traceback"):
                self._section(text, "traceback (in the sandbox)", plain(view.error["traceback"]))
        elif view.result is not None:
            result = plain(pretty_json(view.result), limit=RESULT_CHARS)
            if self._cut(view):
                result += f"\n(a preview: its first {PREVIEW_CHARS} characters)"
            self._section(text, "result", result)
        self._section(text, f"output ({len(view.output)} lines)", "")
        self._output(text, view)
        text.append("\n")
        self._section(text, "timeline", "")
        start = self.model.started_at or 0.0
        for at, note in view.timeline[-DETAIL_LINES:]:
            text.append(f"+{at - start:7.3f}s  {plain(note)}\n")
        text.rstrip()
        detail.update(text)

    def _cut(self, view: TaskView) -> bool:
        """Whether the result shown is its event's preview, the whole not had."""
        result = view.result
        return (
            result is not None
            and len(result) == PREVIEW_CHARS
            and result.endswith("...")
            and not view.whole_result
        )

    def _wants_result(self, view: TaskView | None) -> bool:
        """Whether the whole result of this task is to be read (it completed)."""
        return (
            view is not None
            and view.state == "completed"
            and self._cut(view)
            and view.task_id not in self._unreadable_results
        )

    async def _whole_result(self, source: Source) -> None:
        """The whole result of the selected task, if the journal has it now: its
        completed event carries a preview, and can arrive before the journal
        has committed the rest. The source reads only after a commit, so asking
        at each batch costs nothing while nothing is written. A whole result is
        held once: the model keeps it in place of its preview."""
        view = self.model.tasks.get(self._selected or "")
        if view is None or not self._wants_result(view):
            return
        try:
            whole = await source.full_result(view.task_id)
        except Exception:  # (a journal that went away: the preview stays)
            self._unreadable_results.add(view.task_id)
            return
        if whole is not None:
            view.result, view.whole_result = whole, True
            self.model.dirty.add(view.task_id)  # (drawn again, whole)

    @staticmethod
    def _section(text: Text, title: str, body: str) -> None:
        text.append("\n")
        text.append(title, style="bold")
        text.append(f"\n{body}\n" if body else "\n")

    @staticmethod
    def _output(text: Text, view: TaskView) -> None:
        """What the task printed, the newest lines, each attempt's apart."""
        lines = view.output[-DETAIL_LINES:]
        if not lines:
            text.append("-\n")
            return
        several = any(attempt != lines[0][0] for attempt, _ in lines)
        previous: int | None = None
        for attempt, line in lines:
            if several and attempt != previous:
                text.append(f"── attempt {attempt} ──\n", style="reverse")
                previous = attempt
            text.append(f"{plain(line)}\n")

    # -- interaction ----------------------------------------------------------------

    def on_tree_node_highlighted(self, message: Tree.NodeHighlighted[str]) -> None:
        self._selected = message.node.data
        self._show_detail(self._selected)
        if self._wants_result(self.model.tasks.get(self._selected or "")):
            self.call_later(self.refresh_run)  # its whole result now, not a period later

    def _tell(
        self, message: str, severity: Literal["information", "warning"] = "information"
    ) -> None:
        """A notification; it may quote a task's name or an error: never markup."""
        self.notify(plain(message, limit=300), severity=severity, markup=False)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_search(self) -> None:
        search = self._search
        search.add_class("visible")
        search.focus()

    def on_input_submitted(self, message: Input.Submitted) -> None:
        self.search = message.value.strip()
        self._close_search()

    def on_key(self, event: Any) -> None:
        search = self._search
        if event.key == "escape" and search.has_class("visible"):
            search.value = ""
            self.search = ""
            self._close_search()
            event.stop()

    def _close_search(self) -> None:
        search = self._search
        search.remove_class("visible")
        self._tree_widget.focus()
        self._rebuild_now()

    def _rebuild_now(self) -> None:
        """Redraw the tree for a new filter or search, and the header that names it."""
        self._rebuild = True
        now = self.clock()
        self._apply_dirty(now)
        self._show_summary(now)

    def action_filter(self) -> None:
        index = FILTERS.index(self.state_filter)
        self.state_filter = FILTERS[(index + 1) % len(FILTERS)]
        self._rebuild_now()

    def action_follow(self) -> None:
        self.follow = not self.follow
        self._followed = -1  # (on: to the newest activity at once)
        self._tell("following the newest activity" if self.follow else "follow off")
        self._show_summary(self.clock())

    def action_cancel(self) -> None:
        source, task_id = self.source, self._selected
        if source is None or task_id is None:
            self._tell("select a task first")
            return
        view = self.model.tasks.get(task_id)
        if not source.can_cancel:
            self._tell(source.cancel(task_id), "warning")
            return
        if view is None or view.state in ENDED:
            self._tell(f"{task_id} has ended; nothing to cancel", "warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._tell(source.cancel(task_id))

        self.push_screen(
            ConfirmScreen(f"Cancel {shown_name(view)} ({task_id}) and everything under it?"),
            answered,
        )

    async def action_quit(self) -> None:
        self.action_quit_app()  # (ctrl+q too)

    def action_quit_app(self) -> None:
        """Quit: the run's exit code is the app's return value; its return code
        stays 0, Textual's 1 meaning the app failed (see textual_compat)."""
        source = self.source
        if source is not None and source.owns_run and source.outcome() is None:

            def answered(yes: bool | None) -> None:
                if yes:
                    source.stop()
                    self.exit(self.model.exit_code or 0)

            self.push_screen(
                ConfirmScreen("The run is still going. Stop it (it can be resumed) and quit?"),
                answered,
            )
            return
        self.exit(self.model.exit_code or 0)
