"""A magic cell's body, compiled so that errors and tracebacks show the cell's own lines.

In [2]: %%trace net x
   ...: h = net.layer1.output[:, 99]
IndexError: line 2 `h = net.layer1.output[:, 99]`: index 99 is out of bounds for dimension 1 with size 10

The body goes through IPython's input transformers (so ``%time``/``!cmd`` lines work), is parsed with ``ast``,
numbered as the cell shows it (the magic's line is line 1), rewritten (:mod:`nnsight_magic.magics.rewrite`) and
compiled under a file name that IPython's line cache maps to the visible cell text. Nothing is run through a
nested ``run_cell``: the magic ``exec``s the code object in the notebook namespace itself.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
import types
from dataclasses import dataclass
from types import CodeType
from typing import Any

from IPython.core.error import UsageError

from ..errors import is_annotated
from .rewrite import RewrittenCell, rewrite_cell


@dataclass
class CellCode:
    """A compiled cell body.

    Attributes:
        code: the code object to ``exec`` in the notebook namespace.
        filename: the name the line cache knows the visible cell text by.
        source: the visible cell text (the magic's line, then the body).
        rewritten: what the rewrite found: top-level names, helper names, whether a last expression is kept.
    """

    code: CodeType
    filename: str
    source: str
    rewritten: RewrittenCell


def compile_cell(shell: Any, header: str, body: str) -> CellCode:
    """Compile ``body`` of a cell whose first line is ``header`` (``%%trace net x``)."""
    source = f"{header}\n{body}"
    number = current_cell_number(shell)
    filename = shell.compile.cache(source, number, raw_code=source + "\n# nnsight_magic")
    __tracebackhide__ = True
    python = shell.input_transformer_manager.transform_cell(body)
    try:
        tree = shell.compile.ast_parse(python)
    except SyntaxError as error:
        raise _at_cell_line(error, filename, source, shift=1) from None  # the parser counted body lines
    ast.increment_lineno(tree, 1)
    try:
        rewritten = rewrite_cell(tree)
    except SyntaxError as error:
        raise _at_cell_line(error, filename, source, shift=0) from None
    return CellCode(compile(rewritten.tree, filename, "exec", dont_inherit=True), filename, source, rewritten)


def _at_cell_line(error: SyntaxError, filename: str, source: str, shift: int) -> SyntaxError:
    """The same SyntaxError, located in the visible cell (the magic's line is line 1)."""
    line = (error.lineno or 1) + shift
    end_line = error.end_lineno + shift if error.end_lineno else None
    text = (source.splitlines() + [""])[line - 1] + "\n"
    return type(error)(error.msg, (filename, line, error.offset, text, end_line, error.end_offset))


def trim_to_user_code(error: BaseException, filename: str, shell: Any = None) -> None:
    """Show an error with the cell's own frames only; ``%tb`` (and ``%debug``) still get the whole traceback.

    The traceback keeps the magic's frame (hidden by ``__tracebackhide__``), every frame of the cell, and, for an
    error the engine did not annotate with the user's line, the frame that raised it (a bug in a function the
    cell called, a model that failed); the frames in between (the engine, ``torch.nn``, ``transformers``) are
    dropped. An interrupt gets a note saying what it left: nothing the cell assigns was bound. With ``shell``,
    IPython shows it from the cell's first frame on (no ``run_cell_magic(...)`` line), and the whole traceback
    becomes ``sys.last_traceback`` once the cell's error was shown, so ``%tb`` prints it.
    """
    full = error.__traceback__
    if full is None:
        return
    entries = []
    entry = full
    while entry is not None:
        entries.append(entry)
        entry = entry.tb_next
    kept = [entries[0]] + [each for each in entries[1:] if each.tb_frame.f_code.co_filename == filename]
    interrupted = isinstance(error, KeyboardInterrupt)
    if not is_annotated(error) and not interrupted and entries[-1] is not kept[-1]:
        kept.append(entries[-1])
    if interrupted:
        error.add_note("interrupted: nothing this cell assigns was bound; names keep the values they had before "
                       "the cell (the inspector shows what ran and what was saved)")
    if shell is not None:
        _show_from_the_cell(shell, error, filename, full)
    if len(kept) == len(entries):
        return
    chain = None
    for each in reversed(kept):
        chain = types.TracebackType(chain, each.tb_frame, each.tb_lasti, each.tb_lineno)
    error.__traceback__ = chain
    if not is_annotated(error) or interrupted:
        error.add_note(f"({len(entries) - len(kept)} frames of the engine and the model are hidden: %tb shows them)")


def _show_from_the_cell(shell: Any, error: BaseException, filename: str, full: Any) -> None:
    """IPython shows the error from the cell's first frame on, without the ``run_cell_magic(...)`` line IPython
    compiled the magic into; after the cell, ``%tb`` and ``%debug`` get the whole traceback again.

    IPython asks an exception for ``_render_traceback_()`` (the hook ipyparallel uses for remote errors) before
    formatting it; this one formats the same traceback from the cell's first frame with IPython's own formatter.
    """
    def render() -> list[str]:
        shown = error.__traceback__
        while shown is not None and shown.tb_frame.f_code.co_filename != filename:
            shown = shown.tb_next
        if shown is None:  # the model ran when the cell's trace ended: show the cell at its magic's line
            rest = error.__traceback__
            while rest is not None and rest.tb_frame.f_code.co_filename != __file__.replace("cell_code", "magics"):
                rest = rest.tb_next
            shown = _at_the_magic_line(filename, rest.tb_next if rest is not None else None)
        return shell.InteractiveTB.structured_traceback(type(error), error, shown)

    def restore(*_: Any) -> None:
        shell.events.unregister("post_run_cell", restore)
        error.__dict__.pop("_render_traceback_", None)
        if getattr(sys, "last_value", None) is error:
            sys.last_traceback = full

    error._render_traceback_ = render
    shell.events.register("post_run_cell", restore)


def _at_the_magic_line(filename: str, rest: Any) -> Any:
    """A traceback entry at line 1 of the cell (its ``%%trace`` line), followed by ``rest``.

    The model runs when the cell's trace ends, after the cell's own code returned, so an error or interrupt there
    has no frame in the cell; this entry gives it one: a line of code compiled under the cell's name raises once,
    and its frame stands for the magic's line (IPython shows ``Cell In[N], line 1`` and the cell's text).
    """
    try:
        exec(compile("raise LookupError", filename, "exec"), {})
    except LookupError as anchor:
        cell = anchor.__traceback__.tb_next
        return types.TracebackType(rest, cell.tb_frame, cell.tb_lasti, cell.tb_lineno)
    raise AssertionError("unreachable: the compiled line always raises")


def current_cell_number(shell: Any) -> int:
    """The execution count of the cell being run, on IPython 8 (counts after a cell) and 9.8+ (before)."""
    result = getattr(shell.displayhook, "exec_result", None)
    if result is not None and result.execution_count is not None:
        return result.execution_count
    return shell.execution_count


def split_arguments(line: str) -> list[str]:
    """Split a magic line into words, keeping Python expressions whole.

    Words are separated by spaces outside brackets and quotes: ``lm "The Eiffel Tower" ids[:, :5] --scan`` is
    ``['lm', '"The Eiffel Tower"', 'ids[:, :5]', '--scan']``. Write ``(a + b)`` for an input with spaces.
    """
    words: list[str] = []
    depth = 0
    start = end = None
    try:
        for token in tokenize.generate_tokens(io.StringIO(line.strip()).readline):
            if token.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.COMMENT,
                              tokenize.INDENT, tokenize.DEDENT):
                continue
            if token.type == tokenize.ERRORTOKEN and not token.string.isspace():
                raise SyntaxError(f"unexpected {token.string!r} at column {token.start[1] + 1}")
            column_start, column_end = token.start[1], token.end[1]
            if start is not None and depth == 0 and column_start > end:
                words.append(line.strip()[start:end])
                start = None
            if start is None:
                start = column_start
            end = column_end
            if token.type == tokenize.OP and token.string in ("(", "[", "{"):
                depth += 1
            elif token.type == tokenize.OP and token.string in (")", "]", "}"):
                depth -= 1
    except (tokenize.TokenError, SyntaxError) as error:
        raise UsageError(f"cannot read the magic's arguments `{line.strip()}`: {error}") from None
    if start is not None:
        words.append(line.strip()[start:end])
    return words
