"""The Textual app: the live actor tree of a run, a detail pane for the
selected task, and a header and footer with the run's state and the keys.

Updates are batched: a few times a second the app takes every event that
arrived, applies it to the model, and relabels only the tasks that changed.
Everything works from the keyboard, in 80x24, without colour.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, ClassVar

from rich.markup import escape
from rich.style import Style
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, OptionList, Static, Tree
from textual.widgets.option_list import Option
from textual.widgets.tree import TreeNode

from capsule.tui.model import COLOURS, ENDED, STATES, SYMBOLS, RunModel, TaskView, pretty_json
from capsule.tui.sources import Source

#: Seconds between two batches of updates.
REFRESH_S = 0.25
#: States the filter key cycles through (None: every task).
FILTERS: tuple[str | None, ...] = (None, "running", "waiting", "failed", "completed", "cancelled")
_BAR = 8
#: The style of a node's fold icon: its meta makes a click on it fold the node
#: (as Textual's own tree does).
TOGGLE_STYLE = Style.from_meta({"toggle": True})


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
    except (ValueError, TypeError, KeyError):
        return view.call
    parts = [json.dumps(arg) for arg in args]
    parts += [f"{key}={json.dumps(value)}" for key, value in kwargs.items()]
    return f"{view.name}({', '.join(parts)})"


def task_label(view: TaskView, now: float) -> Text:
    state = view.state
    label = Text()
    label.append(f"{SYMBOLS.get(state, '?')} ", style=COLOURS.get(state, ""))
    label.append(f"{view.name[:18]}", style="bold")
    label.append(f" {view.task_id[-12:]}", style="dim")
    label.append(f" {state}", style=COLOURS.get(state, ""))
    if view.replayed:
        label.append(" (journal)", style="dim")
    label.append(f" {view.attempt}/{view.max_attempts} {duration(view.elapsed(now))}")
    label.append(f" {fuel_bar(view.fuel, view.fuel_budget)}", style="cyan")
    budget = short_number(view.fuel_budget) if view.fuel_budget else "-"
    label.append(f" {short_number(view.fuel)}/{budget}")
    memory = "-" if view.peak_memory is None else short_number(view.peak_memory)
    mailbox = "-" if view.mailbox_depth is None else str(view.mailbox_depth)
    label.append(f" mem {memory} mbox {mailbox}", style="dim")
    return label


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
            "  ?    this help\n"
            "  /    search tasks by name or id (Enter; Escape clears)\n"
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
        yield Static(f"{escape(self.question)}\n\n[b]y[/b] yes   [b]n[/b] no", id="confirm")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class RunPicker(ModalScreen[str]):
    """The runs of a journal, newest first: pick one to open."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "app.quit", "quit")]

    def __init__(self, runs: list[Any]) -> None:
        super().__init__()
        self.runs = runs

    def compose(self) -> ComposeResult:
        options = []
        for run in self.runs:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started_at))
            text = f"{run.run_id}  {run.shown_status:10}  {started}  {run.program}"
            options.append(Option(text, id=run.run_id))
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
        self.state_filter: str | None = None
        self.search = ""
        self._tree_nodes: dict[str, TreeNode[str]] = {}
        self._selected: str | None = None
        self._last_full = 0.0
        self._rebuild = False
        self._refreshing = False
        #: Why updates stopped, if they did (shown in the header).
        self.problem: str | None = None

    # -- layout -------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="summary")
        with Vertical():
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
            return needle in view.name.lower() or needle in view.task_id.lower()
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
            for task_id in sorted(dirty, key=lambda t: (t.count("/"), t)):
                view = model.tasks.get(task_id)
                if view is None:
                    continue
                node = self._tree_nodes.get(task_id)
                if node is None:
                    self._add_node(tree, view, now)
                else:
                    changed.append(node)
            tree.changed(changed)
        if self.follow and model.latest in self._tree_nodes:
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
        node = parent.add(view.task_id, data=view.task_id, expand=True)
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
        for task_id in sorted(shown, key=lambda t: (t.count("/"), t)):
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
            modes.append(f"search: {self.search}")
        if self.follow:
            modes.append("following")
        program = model.program.rsplit("/", 1)[-1]
        line1 = (
            f"[b]run {escape(model.run_id or '-')}[/b]  {escape(program)}  {status}  "
            f"elapsed {duration(model.elapsed(now))}  fuel {short_number(model.total_fuel())}"
        )
        line2 = escape(states or "no tasks yet") + (
            f"   [{escape(', '.join(modes))}]" if modes else ""
        )
        if self.problem:
            line2 = f"[b red]{escape(self.problem)}[/]"
        self._summary.update(f"{line1}\n{line2}")

    def _show_detail(self, task_id: str | None) -> None:
        detail = self._detail
        view = self.model.tasks.get(task_id or "")
        if view is None:
            detail.update("Select a task to see its details.")
            return
        now = self.clock()
        lines = [
            f"[b]{escape(view.name)}[/b] {escape(view.task_id)}  "
            f"{SYMBOLS.get(view.state, '?')} {view.state}"
            + (
                f" on {escape(view.waiting_on)}"
                if view.state == "waiting" and view.waiting_on
                else ""
            )
            + (
                f" (hibernated: {view.hibernated_bytes / 2**20:.1f} MB given back)"
                if view.state == "waiting" and view.hibernated_bytes
                else ""
            )
            + f"  attempt {view.attempt}/{view.max_attempts}  {duration(view.elapsed(now))}",
            f"fuel {view.fuel:,}"
            + (f" (budget {view.fuel_budget:,} per attempt)" if view.fuel_budget else "")
            + "  "
            f"peak memory {'-' if view.peak_memory is None else f'{view.peak_memory:,}'}  "
            f"mailbox {'-' if view.mailbox_depth is None else view.mailbox_depth}",
            "",
            "[b]call[/b]",
            escape(call_text(view)),
        ]
        if view.error is not None:
            lines += [
                "",
                f"[b]error[/b] ({escape(str(view.error.get('kind')))})",
                escape(str(view.error.get("message"))),
            ]
            if view.error.get("traceback"):
                lines += ["", "[b]traceback[/b] (in the sandbox)", escape(view.error["traceback"])]
        elif view.result is not None:
            lines += ["", "[b]result[/b]", escape(pretty_json(view.result))]
        lines += ["", f"[b]output[/b] ({len(view.output)} lines)"]
        lines += [escape(line) for line in view.output[-50:]] or ["-"]
        lines += ["", "[b]timeline[/b]"]
        start = self.model.started_at or 0.0
        lines += [f"+{at - start:7.3f}s  {escape(note)}" for at, note in view.timeline[-50:]]
        detail.update("\n".join(lines))

    # -- interaction ----------------------------------------------------------------

    def on_tree_node_highlighted(self, message: Tree.NodeHighlighted[str]) -> None:
        self._selected = message.node.data
        self._show_detail(self._selected)

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
        self.notify("following the newest activity" if self.follow else "follow off")
        self._show_summary(self.clock())

    def action_cancel(self) -> None:
        source, task_id = self.source, self._selected
        if source is None or task_id is None:
            self.notify("select a task first")
            return
        view = self.model.tasks.get(task_id)
        if not source.can_cancel:
            self.notify(source.cancel(task_id), severity="warning")
            return
        if view is None or view.state in ENDED:
            self.notify(f"{task_id} has ended; nothing to cancel", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.notify(source.cancel(task_id))

        self.push_screen(
            ConfirmScreen(f"Cancel {view.name} ({task_id}) and everything under it?"), answered
        )

    def action_quit_app(self) -> None:
        source = self.source
        if source is not None and source.owns_run and source.outcome() is None:

            def answered(yes: bool | None) -> None:
                if yes:
                    source.stop()
                    self.exit(self.model.exit_code or 0, return_code=self.model.exit_code or 0)

            self.push_screen(
                ConfirmScreen("The run is still going. Stop it (it can be resumed) and quit?"),
                answered,
            )
            return
        self.exit(self.model.exit_code or 0, return_code=self.model.exit_code or 0)
