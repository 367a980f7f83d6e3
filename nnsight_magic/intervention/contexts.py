"""The blocks a trace can open: invokes, conditions, and iteration over generation steps.

In [1]: with lm.generate(max_new_tokens=3) as tracer:
   ...:     with tracer.invoke("The Eiffel Tower is in"):         # one input of the batch
   ...:         logits = lm.lm_head.output[0, -1]
   ...:         with tracer.cond(logits.argmax() == paris_id):     # runs only if the condition holds
   ...:             tracer.log("Paris!")
   ...:         for step in tracer.iter[1:3]:                      # steps 1 and 2 of generation
   ...:             lm.model.layers[3].output[:] *= 0.5

A ``%%trace`` cell writes the same thing with a plain ``if``: the magic lowers it to ``tracer.cond``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ..tracing.graph import StepSet
from ..tracing.proxy import Proxy


class Invoker:
    """``with tracer.invoke(*inputs):`` — proxies created inside see only this input's rows of the batch.

    An invoke with no input sees the whole batch. Invokes cannot be nested. Inside the block, ``invoker.inputs``
    is the input as the model takes it, ``(args, kwargs)`` (token ids and attention mask for a language model).
    """

    def __init__(self, tracer: Any, inputs: tuple, kwargs: dict):
        self.tracer = tracer
        self.given = (inputs, kwargs)
        self.inputs: tuple[tuple, dict] | None = None
        self.index: int | None = None

    def __enter__(self) -> "Invoker":
        self.index = self.tracer._open_invoke(*self.given)
        if self.index is not None:
            prepared = self.tracer.invokes[self.index]
            self.inputs = (prepared.args, prepared.kwargs)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.tracer._close_invoke()


class Conditional:
    """``with tracer.cond(value):`` runs its block only if ``value`` is true when the model produces it.

    ``with condition.else_():`` opens the opposite branch. Conditions nest. A module value assigned inside a
    branch (``layer.output = v``) is, after the branches, whatever the branch that ran assigned (a ``merge``
    node), exactly as if the ``if`` had run eagerly.
    """

    def __init__(self, tracer: Any, value: Any):
        self.tracer = tracer
        self.proxy: Proxy = tracer.create_proxy("cond", bool, (value,), {})
        self._start: dict | None = None
        self._then: dict = {}

    def __enter__(self) -> "Conditional":
        self._start = dict(self.tracer._values)
        self._branch = self.tracer.graph.branch(self.proxy.node, True)
        self._branch.__enter__()
        self.tracer._branch_depth += 1
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.tracer._branch_depth -= 1
        self._branch.__exit__(*exc_info)
        if exc_info[0] is None:
            self._then = self.tracer._changed_values(self._start)
            self.tracer._merge_values(self.proxy, self._start, self._then, {})

    @contextlib.contextmanager
    def else_(self) -> Iterator["Conditional"]:
        """The branch that runs when the condition is false."""
        values = self.tracer._values
        start = self._start if self._start is not None else dict(values)
        for key in self._then:  # the else branch sees the module values as they were before the condition
            if key in start:
                values[key] = start[key]
            else:
                values.pop(key, None)
        else_start = dict(values)
        with self.tracer.graph.branch(self.proxy.node, False):
            self.tracer._branch_depth += 1
            try:
                yield self
            finally:
                self.tracer._branch_depth -= 1
        self.tracer._merge_values(self.proxy, start, self._then, self.tracer._changed_values(else_start))


class IterationBlock:
    """A block that runs once per generation step in ``steps``: a context manager, or a one-pass loop.

    In [1]: with tracer.iter[0:3] as step:      # or: for step in tracer.iter[0:3]:
       ...:     hidden.append(lm.model.layers[3].output[0, -1])

    ``step`` is a traced int: the current step. ``tracer.all()`` is ``tracer.iter[:]``. Code after the block runs
    once, after the block's last step (for an open-ended block, after generation ends), and sees the values of
    that last step.
    """

    def __init__(self, tracer: Any, steps: StepSet):
        self.tracer = tracer
        self.steps = steps
        self._section: Any = None

    def __enter__(self) -> Proxy:
        if self.steps.is_empty:
            raise ValueError(f"tracer.iter{self.steps} names no generation step")
        self._section = self.tracer.graph.iteration(self.steps)
        self._section.__enter__()
        return self.tracer.create_proxy("iteration", None, (), {})

    def __exit__(self, *exc_info: Any) -> None:
        self._section.__exit__(*exc_info)

    def __iter__(self) -> Iterator[Proxy]:
        with self as step:
            yield step


class IterationIndexer:
    """``tracer.iter[...]``: an int, a list of ints, or a slice of generation steps."""

    def __init__(self, tracer: Any):
        self.tracer = tracer

    def __getitem__(self, steps: int | list[int] | slice) -> IterationBlock:
        return IterationBlock(self.tracer, StepSet(steps))
