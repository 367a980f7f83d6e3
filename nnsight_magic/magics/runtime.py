"""What rewritten cell code calls: bound as ``__nnsight_magic__`` in the notebook namespace.

In [1]: %%trace net x
   ...: if net.layer1.output.sum() > 0:     # branch(...): a graph condition, because the test is traced
   ...:     print("positive")               # print(...): a log node inside the branch
   ...: for row in net.output:              # iterate(...): net.output[0], net.output[1], ... (length from shapes)
   ...:     print(f"{row.argmax()}")        # format(...): formatted when the model produced the row

Every helper decides at run time, from the real objects: a value traced by a trace that is being built gets
graph code; anything else gets exactly what Python would do, so a function defined in a ``%%trace`` cell still
behaves normally when a later, plain cell calls it. The helpers hold no state of their own except which traces
print into the graph (:func:`printing_into`) and each trace's last print (so prints keep the cell's order).
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import linecache
import weakref
from typing import Any, Iterator

import torch

from ..errors import user_location
from ..intervention.contexts import IterationBlock
from ..intervention.tracer import BUILDING, Tracer
from ..tracing.execution import UNBOUND
from ..tracing.node import describe_location
from ..tracing.proxy import Attribute, Proxy

_printing: contextvars.ContextVar[tuple[Tracer, ...]] = contextvars.ContextVar("nnsight_magic_printing", default=())
_last_print: "weakref.WeakKeyDictionary[Tracer, dict[Any, int]]" = weakref.WeakKeyDictionary()
_MISSING = object()


# ----------------------------------------------------------------------------------------- which trace
def building_tracer(value: Any) -> Tracer | None:
    """The trace that an operation on ``value`` adds nodes to now, or ``None`` when ``value`` is not traced.

    That is the proxy's own trace while it is being built, or, for a value of an earlier trace of the same
    session, the session's trace being built now (the value crosses over through a bridge).
    """
    if not isinstance(value, Proxy):
        return None
    tracer = value.tracer
    if tracer is None:
        return None
    if tracer.status == BUILDING:
        return tracer
    session = tracer.session
    return session.building if session is not None else None


def _traced_in(value: Any, depth: int = 0) -> Tracer | None:
    """The building trace of the first traced value inside ``value`` (lists, tuples and dicts, 4 levels deep)."""
    if isinstance(value, Proxy):
        return building_tracer(value)
    if isinstance(value, (list, tuple)) and depth < 4:
        items: Any = value
    elif isinstance(value, dict) and depth < 4:
        items = value.values()
    else:
        return None
    for item in items:
        found = _traced_in(item, depth + 1)
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def printing_into(tracer: Tracer) -> Iterator[None]:
    """While the block runs, ``print`` of plain values also becomes a log node of ``tracer`` (keeping order)."""
    token = _printing.set(_printing.get() + (tracer,))
    try:
        yield
    finally:
        _printing.reset(token)


def _printing_tracer() -> Tracer | None:
    for tracer in reversed(_printing.get()):
        if tracer.status == BUILDING:
            return tracer
    return None


# ------------------------------------------------------------------------------------------ if / else
class Branch:
    """One ``if`` of a rewritten cell (see :class:`~nnsight_magic.magics.rewrite.IfLowering`).

    Attributes:
        traced: the test is a traced value: both bodies are built, each in its graph branch.
        then_taken, else_taken: whether to run the if body / the else body now.
        before, then_values, else_values: each branch's bindings of the names the ``if`` assigns (traced only).
        merged: the names' bindings after the ``if``: ``tracer.merge(...)`` where the branches differ.
    """

    def __init__(self, test: Any, jump: tuple[str, int] | None):
        __tracebackhide__ = True
        self.tracer = building_tracer(test)
        self.traced = self.tracer is not None
        self.before: dict[str, Any] = {}
        self.then_values: dict[str, Any] = {}
        self.else_values: dict[str, Any] = {}
        self.merged: dict[str, Any] = {}
        if not self.traced:
            self.then_taken = bool(test)
            self.else_taken = not self.then_taken
            return
        if jump is not None:
            raise _jump_error(*jump)
        self.condition = self.tracer.cond(test)
        self.then_taken = self.else_taken = True

    @contextlib.contextmanager
    def then(self) -> Iterator[None]:
        """The if body: inside the condition's graph branch when traced."""
        if not self.traced:
            yield
            return
        with self.condition, printing_into(self.tracer):
            yield

    @contextlib.contextmanager
    def otherwise(self) -> Iterator[None]:
        """The else body: inside the opposite graph branch when traced."""
        if not self.traced:
            yield
            return
        with self.condition.else_(), printing_into(self.tracer):
            yield

    def merge(self) -> None:
        """Each name is the value of the branch that runs: a ``merge`` node where the branches disagree."""
        for name in {**self.then_values, **self.else_values}:
            if_true = self.then_values.get(name, _MISSING)
            if_false = self.else_values.get(name, _MISSING)
            if if_true is if_false:
                self.merged[name] = if_true
                continue
            self.merged[name] = self.tracer.merge(self.condition, UNBOUND if if_true is _MISSING else if_true,
                                                  UNBOUND if if_false is _MISSING else if_false)


def branch(test: Any, jump: tuple[str, int] | None) -> Branch:
    """Evaluate an ``if``'s test once (``jump``: the first break/continue/return/raise/yield in its bodies)."""
    __tracebackhide__ = True
    return Branch(test, jump)


def _jump_error(keyword: str, line: int) -> TypeError:
    filename, if_line = user_location()
    source = linecache.getline(filename, line).strip()
    where = describe_location(filename, line)
    return TypeError(
        f"{where} `{source}`: `{keyword}` inside an `if` on a traced value (the `if` on "
        f"{describe_location(filename, if_line)}). Whether that branch runs is known only when the model runs, "
        f"so the cell cannot `{keyword}` now. Keep `{keyword}` under conditions on plain Python values, or set a "
        "value inside the branch and act on it after the cell ran")


# -------------------------------------------------------------------------------------------- bindings
def located(value: Any) -> Any:
    """The value of a top-level assignment: a traced attribute (``out.logits``) gets its node on this line."""
    if isinstance(value, Attribute) and building_tracer(value) is not None:
        value.node
    return value


# -------------------------------------------------------------------------------------- and / or / not
def and_(first: Any, *rest: Any) -> Any:
    """``first and rest[0]() and ...``: short-circuits on plain values, runs on real values once one is traced."""
    return _boolean(python_and, lambda value: not value, first, rest)


def or_(first: Any, *rest: Any) -> Any:
    """``first or rest[0]() or ...`` (see :func:`and_`)."""
    return _boolean(python_or, bool, first, rest)


def not_(value: Any) -> Any:
    """``not value``: on a traced value, decided when the model has produced it."""
    tracer = building_tracer(value)
    return not value if tracer is None else tracer.apply(python_not, value)


def _boolean(combine: Any, decided: Any, first: Any, thunks: tuple) -> Any:
    value = first
    for position, thunk in enumerate(thunks):
        tracer = building_tracer(value)
        if tracer is not None:
            return tracer.apply(combine, value, *(later() for later in thunks[position:]))
        if decided(value):
            return value
        value = thunk()
    return value


def python_and(*values: Any) -> Any:
    """Python's ``and`` over real values: the first false one, else the last."""
    for value in values[:-1]:
        if not value:
            return value
    return values[-1]


def python_or(*values: Any) -> Any:
    """Python's ``or`` over real values: the first true one, else the last."""
    for value in values[:-1]:
        if value:
            return value
    return values[-1]


def python_not(value: Any) -> bool:
    return not value


# ----------------------------------------------------------------------------------------------- loops
def iterate(iterable: Any) -> Any:
    """A ``for`` loop's iterable: iteration blocks run once as graph blocks, traced values yield their items."""
    __tracebackhide__ = True
    if isinstance(iterable, IterationBlock):
        return _steps(iterable)
    if building_tracer(iterable) is not None:
        return _items(iterable, "loop over")
    return iterable


def _steps(block: IterationBlock) -> Iterator[Any]:
    with block as step, printing_into(block.tracer):
        yield step


def _items(proxy: Proxy, action: str, count: int | None = None) -> list[Proxy]:
    """``proxy[0], proxy[1], ...``: as many items as the value has (from its fake value), else ``count``."""
    __tracebackhide__ = True
    fake = proxy.node.fake
    if isinstance(fake, torch.Tensor):
        if fake.dim() == 0:
            raise TypeError(f"cannot {action} {proxy._label()}: it is a 0-d tensor")
        length: int | None = fake.shape[0]
    elif isinstance(fake, (tuple, list)):
        length = len(fake)
    else:
        length = count
    if length is None:
        raise TypeError(f"cannot {action} {proxy._label()}: its length is unknown while the cell is built (shapes "
                        "are off or unknown for this value). Index it explicitly (`x[0]`, `x[1]`) or loop over "
                        "`range(n)`")
    return [proxy[index] for index in range(length)]


def unpack(value: Any, count: int, starred: bool) -> Any:
    """``a, b = value``: a traced value becomes its items (``value[0]``, ``value[1]``) for Python to unpack."""
    __tracebackhide__ = True
    if building_tracer(value) is None:
        return value
    return _items(value, "unpack", None if starred else count)


def loop_condition(test: Any) -> Any:
    """A ``while`` test: fine on plain values; on a traced value the number of iterations is unknowable."""
    __tracebackhide__ = True
    if building_tracer(test) is not None:
        raise TypeError(f"`while` on {test._label()}: how often the loop runs would depend on a value the model "
                        "has not produced yet. Use `for step in tracer.iter[...]` for generation steps, or loop "
                        "a fixed number of times with an `if` inside")
    return test


# ------------------------------------------------------------------------------------------- printing
def print(*values: Any, **options: Any) -> None:
    """``print`` in a traced cell: a log node, printed when the model has produced the values, in cell order.

    Outside a trace being built (or in a ``--scan`` cell, where nothing runs) it prints at once.
    """
    tracer = _traced_in(values) or _traced_in(options) or _printing_tracer()
    if tracer is None or tracer.scan_only:
        builtins.print(*values, **options)
        return
    section = tracer.graph.current_section
    last = _last_print.setdefault(tracer, {})
    previous = last.get(section)
    log = tracer.create_proxy("log", builtins.print, values, options, after=() if previous is None else (previous,))
    last[section] = log.node.index


def format(*parts: Any) -> Any:
    """An f-string: literal parts are ``str``, fields are ``(value, conversion, format_spec)``.

    With a traced field the string is built when the model has produced the value (a traced string).
    """
    tracer = _traced_in(parts)
    if tracer is None or tracer.scan_only:
        return format_string(*parts)
    return tracer.apply(format_string, *parts)


def format_string(*parts: Any) -> str:
    """The f-string's text from its parts (real values)."""
    pieces = []
    for part in parts:
        if isinstance(part, str):
            pieces.append(part)
            continue
        value, conversion, spec = part
        if conversion == "r":
            value = repr(value)
        elif conversion == "s":
            value = str(value)
        elif conversion == "a":
            value = ascii(value)
        pieces.append(builtins.format(value, spec or ""))
    return "".join(pieces)
