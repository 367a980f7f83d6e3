"""``%load_ext nnsight_magic`` and ``%%trace``: arguments, options, display, and every kind of error.

Cells run through ``InteractiveShell.run_cell`` as a notebook runs them. Values are checked against plain-PyTorch
hooks; failures are checked for their type, the cell line they name, hooks left on the model (none), and the
notebook names earlier cells bound (untouched).
"""

from __future__ import annotations

import pytest
import torch
from IPython.core.error import UsageError
from torch._subclasses.fake_tensor import FakeTensor

from conftest import hook_count
from language_fixtures import END_OF_TEXT, StepHooks, encode
from magic_shell import module_values, ok, plain, run, with_net
from nnsight_magic import OutOfOrderError
from nnsight_magic.intervention.tracer import Tracer
from nnsight_magic.magics import TraceMagics
from nnsight_magic.magics.cell_code import split_arguments
from nnsight_magic.magics.rewrite import RUNTIME
from nnsight_magic.tracing.proxy import Proxy


def count_real_forwards(module: torch.nn.Module) -> list[int]:
    """A list whose length is the number of forward passes on real (not fake) tensors."""
    calls: list[int] = []
    module.register_forward_pre_hook(lambda _, inputs: None if isinstance(inputs[0], FakeTensor) else calls.append(1))
    return calls


# ------------------------------------------------------------------------------------------- the extension
def test_load_registers_magics_and_options_and_unload_removes_them(ip, capsys):
    assert ip.find_cell_magic("trace") is not None and ip.find_cell_magic("session") is not None
    assert ip.find_line_magic("session") is not None
    ok(ip, "%config TraceMagics")
    shown = capsys.readouterr().out
    assert "TraceMagics.autosave=<Bool>" in shown and "TraceMagics.widget=<Bool>" in shown
    ok(ip, "%load_ext nnsight_magic")  # a second load changes nothing
    assert sum(isinstance(each, TraceMagics) for each in ip.configurables) == 1

    ok(ip, "%unload_ext nnsight_magic")
    assert ip.find_cell_magic("trace") is None and ip.find_cell_magic("session") is None
    assert ip.find_line_magic("session") is None
    assert not any(isinstance(each, TraceMagics) for each in ip.configurables)
    assert RUNTIME not in ip.user_ns
    result = run(ip, "%%trace net x\nh = 1\n")
    assert isinstance(result.error_in_exec, UsageError)  # "Cell magic `%%trace` not found"

    ok(ip, "%load_ext nnsight_magic")
    ok(ip, "%reload_ext nnsight_magic")
    assert sum(isinstance(each, TraceMagics) for each in ip.configurables) == 1
    ok(ip, "%config TraceMagics.widget = False")
    module, x = with_net(ip)
    ok(ip, "%%trace net x\nh = net.layer1.output\n")
    assert torch.equal(ip.user_ns["h"], module_values(module, x)["layer1"])


def test_config_turns_autosave_off(ip):
    module, x = with_net(ip)
    ok(ip, "%config TraceMagics.autosave = False")
    ok(ip, "%%trace net x\nh = net.layer1.output\nkept = net.output.save()\n")
    assert isinstance(ip.user_ns["h"], Proxy) and isinstance(ip.user_ns["kept"], Proxy)
    assert torch.equal(ip.user_ns["kept"].value, module_values(module, x)["output"])
    with pytest.raises(ValueError, match="not saved"):
        ip.user_ns["h"].value


def test_no_autosave_flag(ip):
    module, x = with_net(ip)
    ok(ip, "%%trace net x --no-autosave\nh = net.layer1.output\n")
    assert isinstance(ip.user_ns["h"], Proxy)


def test_help_shows_the_docstring_with_examples(ip, capsys):
    ok(ip, "%%trace?")
    shown = plain(capsys.readouterr().out)
    assert "%%trace [--generate] [--max-new-tokens N] [--scan] [--no-widget]" in shown
    assert "MODEL [INPUT ...]" in shown
    assert "In [1]: %%trace net x" in shown and "if h.sum() > 0:" in shown
    assert "--tracer NAME" in shown


# --------------------------------------------------------------------------------------------- arguments
def test_split_arguments_keeps_python_expressions_whole():
    assert split_arguments('lm "The Eiffel Tower" ids[:, :5] --max-new-tokens 3 -1 f(a, b)  # note') == \
        ["lm", '"The Eiffel Tower"', "ids[:, :5]", "--max-new-tokens", "3", "-1", "f(a, b)"]
    with pytest.raises(UsageError, match="cannot read the magic's arguments"):
        split_arguments('lm "unterminated')


def test_model_and_inputs_are_python_expressions(ip):
    module, x = with_net(ip)
    ip.user_ns["models"] = {"tiny": ip.user_ns["net"]}
    ok(ip, '%%trace models["tiny"] x[:2]*2\nout = net.output\n')
    assert torch.equal(ip.user_ns["out"], module_values(module, x[:2] * 2)["output"])


@pytest.mark.parametrize("line, message", [
    ("", "the following arguments are required: MODEL"),
    ("plain x", "MODEL `plain` is a Linear, which cannot be traced; wrap it first"),
    ("torch x", "MODEL `torch` is a module, not a model: the first word of `%%trace` is the model"),   # torch.trace
    ("x x", "MODEL `x` is a Tensor, not a model"),                                                 # Tensor.trace
    ("net x --tracer 2nd", "--tracer needs a Python name"),
    ("net x --max-new-tokens 3", "--max-new-tokens goes with --generate"),
    ("net x --generate", "--generate needs a model that generates"),
    ("net x --bogus", "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_usage_errors_and_change_nothing(ip, line, message):
    module, x = with_net(ip)
    ip.user_ns["plain"] = torch.nn.Linear(2, 2)
    ip.user_ns["torch"] = torch
    ip.user_ns["h"] = "from an earlier cell"
    result = run(ip, f"%%trace {line}\nh = net.layer1.output\n")
    assert isinstance(result.error_in_exec, UsageError)
    assert message in str(result.error_in_exec)
    assert ip.user_ns["h"] == "from an earlier cell"


def test_an_undefined_model_keeps_its_error_type(ip):
    result = run(ip, "%%trace missing x\nh = 1\n")
    assert isinstance(result.error_in_exec, NameError)
    assert "while evaluating the %%trace MODEL `missing`" in result.error_in_exec.__notes__


def test_tracer_name_and_invokes_without_input(ip):
    module, x = with_net(ip)
    a, b = x[:1], x[1:2]
    ip.user_ns.update(a=a, b=b)
    ok(ip, """%%trace net --tracer t
with t.invoke(a):
    clean = net.layer1.output
with t.invoke(b):
    net.layer1.output[:] = clean
    patched = net.output
""")
    assert isinstance(ip.user_ns["t"], Tracer) and "tracer" not in ip.user_ns
    # ground truth: the same batch of two rows by hand, row 1's layer1 output replaced by row 0's
    batch = torch.cat([a, b])
    truth = module_values(module, batch, edits={"layer1": lambda out: torch.cat([out[:1], out[:1]])})
    assert torch.equal(ip.user_ns["clean"], truth["layer1"][:1])
    assert torch.equal(ip.user_ns["patched"], truth["output"][1:])  # b's run now computes a's output


def test_last_expression_is_the_cell_output(ip):
    module, x = with_net(ip)
    result = ok(ip, "%%trace net x\nh = net.layer1.output\nnet.output.argmax(dim=1)\n")
    assert torch.equal(result.result, module_values(module, x)["output"].argmax(dim=1))
    result = ok(ip, "%%trace net x\nh = net.layer1.output\nprint(h.shape)\n")
    assert result.result is None


def test_names_after_an_early_stop_stay_proxies_that_explain_themselves(ip):
    module, x = with_net(ip)
    ok(ip, "%%trace net x\nh = net.layer1.output\ntracer.stop()\nlate = net.layer2.output\n")
    assert torch.equal(ip.user_ns["h"], module_values(module, x)["layer1"])
    assert isinstance(ip.user_ns["late"], Proxy)
    with pytest.raises(ValueError, match="saved but never computed: the run ended before it"):
        ip.user_ns["late"].value


def test_scan_builds_and_shows_shapes_without_running(ip, capsys):
    module, x = with_net(ip)
    forwards = count_real_forwards(module)
    result = ok(ip, "%%trace net x --scan\nh = net.layer1.output[:, :4]\nprint(h)\nh.shape\n")
    assert forwards == []
    assert result.result == torch.Size([3, 4])
    assert isinstance(ip.user_ns["h"], Proxy) and ip.user_ns["h"].shape == torch.Size([3, 4])
    assert "(3, 4) float32" in capsys.readouterr().out  # printed at once, as the proxy and its shape
    assert hook_count(module) == 1  # count_real_forwards' own pre-hook only


# ------------------------------------------------------------------------------------------------- errors
@pytest.fixture
def earlier(ip):
    """Names an earlier cell bound: a failing cell must leave them as they are."""
    module, x = with_net(ip)
    ip.user_ns.update(h="from an earlier cell", tracer="an earlier tracer")
    return module, x


def test_error_while_building_points_at_the_cell_line(ip, earlier, capsys):
    module, _ = earlier
    result = run(ip, "%%trace net x\nh = net.layer1.output\nundefined_name + 1\n")
    assert isinstance(result.error_in_exec, NameError)
    shown = plain(capsys.readouterr().out)
    assert "Cell In[1], line 3" in shown and "----> 3 undefined_name + 1" in shown
    assert ip.user_ns["h"] == "from an earlier cell" and ip.user_ns["tracer"] == "an earlier tracer"
    assert hook_count(module) == 0


def test_shape_error_points_at_the_cell_line_before_the_model_runs(ip, earlier, capsys):
    module, _ = earlier
    forwards = count_real_forwards(module)
    result = run(ip, "%%trace net x\nh = net.layer1.output\nbad = h[:, 99]\n")
    error = result.error_in_exec
    assert type(error) is IndexError
    assert str(error).startswith("line 3 `bad = h[:, 99]`: index 99 is out of bounds")
    shown = plain(capsys.readouterr().out)
    assert "Cell In[1], line 3" in shown and "----> 3 bad = h[:, 99]" in shown
    assert "shapes.py" not in shown  # the engine's frames are cut: the message already names the line
    assert forwards == []
    assert ip.user_ns["h"] == "from an earlier cell" and ip.user_ns["tracer"] == "an earlier tracer"
    assert hook_count(module) == 1  # count_real_forwards' own hook only


def test_error_while_the_model_runs_names_the_line_and_removes_hooks(ip, earlier, capsys):
    module, _ = earlier

    def explode(value):
        raise ValueError("no negative sums")

    ip.user_ns["explode"] = explode
    result = run(ip, "%%trace net x\nh = net.layer1.output\nchecked = tracer.apply(explode, h)\nout = net.output\n")
    error = result.error_in_exec
    assert type(error) is ValueError
    assert str(error) == "line 3 `checked = tracer.apply(explode, h)`: no negative sums"
    assert "In[1]" in plain(capsys.readouterr().out)
    assert ip.user_ns["h"] == "from an earlier cell" and ip.user_ns["tracer"] == "an earlier tracer"
    assert "checked" not in ip.user_ns and "out" not in ip.user_ns
    assert hook_count(module) == 0


def test_out_of_order_edit_names_both_lines(ip, earlier):
    module, _ = earlier
    result = run(ip, "%%trace net x\nlate = net.layer2.output\nnet.layer1.output[:, :2] = late\n")
    error = result.error_in_exec
    assert type(error) is OutOfOrderError
    assert "line 3" in str(error) and "line 2" in str(error)
    assert ip.user_ns["h"] == "from an earlier cell" and hook_count(module) == 0


def test_a_value_the_model_never_produces_is_an_error_not_a_silent_no_op(ip, earlier):
    module, _ = earlier
    result = run(ip, "%%trace net x\nh = net.layer1.next().output\n")
    error = result.error_in_exec
    assert type(error) is RuntimeError and "line 2" in str(error) and "never produced" in str(error)
    assert ip.user_ns["h"] == "from an earlier cell" and hook_count(module) == 0


def test_keyboard_interrupt_while_running_restores_names_and_hooks(ip, earlier):
    module, _ = earlier

    def interrupt(value):
        raise KeyboardInterrupt

    ip.user_ns["interrupt"] = interrupt
    result = run(ip, "%%trace net x\nh = net.layer1.output\ntracer.apply(interrupt, h)\n")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert ip.user_ns["h"] == "from an earlier cell" and hook_count(module) == 0


# ------------------------------------------------------------------------------------------------ widget
def test_the_inspector_is_shown_by_default_and_not_with_no_widget(ip):
    from nnsight_magic.widgets import GraphInspector
    module, x = with_net(ip)
    ok(ip, "%config TraceMagics.widget = True")
    ok(ip, "%%trace net x\nh = net.layer1.output\n")
    assert [type(each) for each in ip.user_ns["tracer"].observers] == [GraphInspector]
    assert torch.equal(ip.user_ns["h"], module_values(module, x)["layer1"])
    ok(ip, "%%trace net x --no-widget\nh = net.layer1.output\n")
    assert ip.user_ns["tracer"].observers == []


# --------------------------------------------------------------------------------------------- generation
def test_generate_cell_with_steps_conditions_and_result(ip, gpt2_lm, tiny_gpt2, gpt2_tok, capsys):
    ip.user_ns["lm"] = gpt2_lm
    ok(ip, """%%trace lm "Hello world" --generate --max-new-tokens 4
for step in tracer.iter[1]:
    lm.lm_head.output[0, -1, 7] = 1e4
steps = tracer.list()
for step in tracer.all():
    top = lm.lm_head.output[0, -1].argmax()
    steps.append(top)
    if top == 7:
        print("forced at step", step)
ids = tracer.result
""")
    prompt = encode(gpt2_tok, "Hello world")

    def force(step, logits):
        if step == 1:
            logits = logits.clone()
            logits[0, -1, 7] = 1e4
            return logits

    with StepHooks(tiny_gpt2) as hooks:
        hooks.on_output("lm_head", force)
        expected = tiny_gpt2.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                      do_sample=False, pad_token_id=END_OF_TEXT)
    assert torch.equal(ip.user_ns["ids"], expected)
    assert [token.item() for token in ip.user_ns["steps"]] == expected[0, prompt.shape[1]:].tolist()
    assert capsys.readouterr().out == "forced at step 1\n"
    assert hook_count(tiny_gpt2) == 0
