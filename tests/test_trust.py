"""Nothing silent: step ranges the run never reached, replacements the model cannot take, errors raised inside
the model's forward, wrong child names, warnings at the user's line, and finished tracers that keep nothing alive.
Each case is checked against plain PyTorch (hand-written hooks) where there is a value to compare."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch

from conftest import hook_count, make_tiny, weights
from language_fixtures import END_OF_TEXT, PROMPTS, StepHooks, encode, line_of
from magic_shell import ok, with_net
from nnsight_magic import NNsight

HERE = __file__


class RealCalls:
    """Counts the real (not fake-scan) forward calls of a module, by a hook removed on exit."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.calls = module, 0

    def __enter__(self) -> "RealCalls":
        def count(_module, _args, output):
            if not isinstance(output, torch._subclasses.fake_tensor.FakeTensor):
                self.calls += 1
        self.handle = self.module.register_forward_hook(count)
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.remove()


# ------------------------------------------------------------------------------------------ generation steps
def test_a_stop_in_a_step_block_stops_there_after_an_open_ended_block(gpt2_lm, tiny_gpt2, gpt2_tok):
    with RealCalls(tiny_gpt2.transformer.h[0]) as counter:
        with gpt2_lm.generate(PROMPTS[0], max_new_tokens=8) as tracer:
            seen = tracer.list().save()
            with tracer.all():
                seen.append(gpt2_lm.lm_head.output[:, -1])
            with tracer.iter[2]:
                tracer.stop()
    assert counter.calls == 3                         # steps 0, 1 and 2 ran; nothing after the stop
    with StepHooks(tiny_gpt2) as hooks:
        expected = hooks.record("lm_head", lambda output: output[:, -1])
        tiny_gpt2.generate(encode(gpt2_tok, PROMPTS[0]), max_new_tokens=3, do_sample=False,
                           pad_token_id=END_OF_TEXT)
    assert len(seen.value) == 3 and all(torch.equal(got, want) for got, want in zip(seen.value, expected))
    assert hook_count(tiny_gpt2) == 0


def test_steps_that_generation_never_reached_are_a_warning_at_the_users_line(gpt2_lm, tiny_gpt2, gpt2_tok):
    ids = encode(gpt2_tok, PROMPTS[0])
    second = tiny_gpt2.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=END_OF_TEXT)[0, -1].item()
    with pytest.warns(UserWarning, match=r"tracer.iter\[\[0, 3\]\] names step 3, but the run ended after step [012] "
                                         r"\(generation stopped early") as caught:
        with gpt2_lm.generate(PROMPTS[0], max_new_tokens=5, eos_token_id=second) as tracer:
            with tracer.iter[[0, 3]]:                                     # the step block
                kept = gpt2_lm.transformer.h[0].output.save()
    assert f"{caught[0].filename.split('/')[-1]}:{caught[0].lineno}" == line_of(HERE, "# the step block")
    assert kept.value.shape[1] == ids.shape[1]      # step 0's value, the last step of the block that ran
    assert hook_count(tiny_gpt2) == 0


def test_a_slice_past_max_new_tokens_warns_and_runs_at_the_steps_that_exist(gpt2_lm, tiny_gpt2):
    with RealCalls(tiny_gpt2.transformer.h[0]) as counter:
        with pytest.warns(UserWarning, match=r"tracer.iter\[1:10\] names steps up to 9, but max_new_tokens=3"):
            with gpt2_lm.generate(PROMPTS[0], max_new_tokens=3) as tracer:
                seen = tracer.list().save()
                for _ in tracer.iter[1:10]:
                    seen.append(gpt2_lm.transformer.h[0].output[:, -1])
    assert len(seen.value) == 2 and counter.calls == 3


# ------------------------------------------------------------------------------------- replacements
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("replacement, message", [
    ("None", "layer1.output cannot be replaced by None"),
    ("3", "layer1.output is a tensor|must be Tensor, not int"),
    ("(net.layer1.output, 1)", "layer1.output is a tensor|must be Tensor, not tuple"),
])
def test_a_replacement_the_model_cannot_take_is_a_type_error_at_its_line(net, tiny, x, validate, replacement,
                                                                        message):
    before = weights(tiny)
    with net.trace(x):
        kept = net.layer1.output.save()
    with pytest.raises(TypeError, match=rf"test_trust.py:\d+ `net.layer1.output = eval\(replacement\)`: .*({message})"):
        with net.trace(x, validate=validate):
            net.layer1.output = eval(replacement)
            net.output.save()
    assert hook_count(tiny) == 0 and all(torch.equal(before[k], v) for k, v in weights(tiny).items())
    with torch.no_grad():
        assert torch.equal(kept.value, tiny.layer1(x))


def test_none_computed_while_running_is_refused_too(net, tiny, x):
    with pytest.raises(TypeError, match=r"test_trust.py:\d+ `net.layer1.output = tracer.apply\(lambda: None\)`: "
                                        r"layer1.output cannot be replaced by None"):
        with net.trace(x) as tracer:
            net.layer1.output = tracer.apply(lambda: None)
    assert hook_count(tiny) == 0


@pytest.mark.parametrize("validate", [True, False])
def test_an_error_inside_the_models_forward_names_the_replacement_that_caused_it(net, tiny, x, validate):
    with pytest.raises(RuntimeError, match=r"test_trust.py:\d+ `net.layer1.output = torch.ones\(3, 4\)`: mat1 and "
                                           r"mat2 shapes cannot be multiplied") as caught:
        with net.trace(x, validate=validate):
            net.layer1.output = torch.ones(3, 4)
            net.output.save()
    assert "raised inside the model's forward after" in "".join(caught.value.__notes__)
    assert hook_count(tiny) == 0


def test_an_input_of_the_wrong_type_names_the_trace_line(net, tiny):
    with pytest.raises(TypeError, match=r"test_trust.py:\d+ `with net.trace\(\"not a tensor\"\, "
                                        r"validate=False\):`: linear\(\)"):
        with net.trace("not a tensor", validate=False):
            net.output.save()
    assert hook_count(tiny) == 0


def test_a_wrong_child_name_names_the_line(net, x):
    with pytest.raises(AttributeError, match=r"test_trust.py:\d+ `net.layer3.output.save\(\)`: model \(Sequential\) "
                                             r"has no child or attribute 'layer3'; did you mean .*'layer1'"):
        with net.trace(x):
            net.layer3.output.save()


def test_library_warnings_point_at_the_users_line():
    class Unscannable(torch.nn.Module):
        def forward(self, x):
            return torch.tensor(x.sum().item())        # .item() cannot run on fake tensors

    net = NNsight(Unscannable())
    with pytest.warns(UserWarning, match="shapes are unavailable for Unscannable") as caught:
        with net.trace(torch.ones(2)):
            out = net.output.save()                    # the first traced value: the scan runs here
    assert f"test_trust.py:{caught[0].lineno}" == line_of(HERE, "# the first traced value: the scan runs here")
    assert out.value.item() == 2.0


# ------------------------------------------------------------------------------------------------ freeing
def test_a_finished_tracer_keeps_no_saved_value_alive(net, x):
    with net.trace(x) as tracer:
        h = net.layer1.output.save()
        out = net.output.save()
    reference = weakref.ref(h.value)
    del h
    gc.collect()
    assert reference() is None and tracer.status == "done" and out.value.shape == (3, 2)


@pytest.mark.parametrize("widget", [False, True])
def test_del_after_a_trace_cell_frees_the_value(ip, widget):
    ip.run_line_magic("config", f"TraceMagics.widget = {widget}")
    with_net(ip)
    ok(ip, "%%trace net x\nbig = net.layer1.output\nout = net.output\n")
    reference = weakref.ref(ip.user_ns["big"])
    ok(ip, "del big")
    gc.collect()
    assert reference() is None and "tracer" in ip.user_ns and ip.user_ns["out"].shape == (3, 2)


def test_a_tracer_kept_in_a_list_keeps_only_what_is_bound(net, x):
    tracers, references = [], []
    for _ in range(3):
        with net.trace(x) as tracer:
            h = net.layer1.output.save()
        tracers.append(tracer)
        references.append(weakref.ref(h.value))
        del h
    gc.collect()
    assert all(reference() is None for reference in references) and len(tracers) == 3


def test_warnings_do_not_fire_for_a_plain_generation(gpt2_lm):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gpt2_lm.generate(PROMPTS[0], max_new_tokens=2) as tracer:
            with tracer.iter[0:2]:
                gpt2_lm.transformer.h[0].output.save()
            ids = tracer.result.save()
    assert ids.value.shape[1] == encode_length(gpt2_lm, PROMPTS[0]) + 2


def encode_length(lm, text: str) -> int:
    return lm.tokenizer(text, return_tensors="pt")["input_ids"].shape[1]


def test_module_outputs_of_make_tiny_are_untouched_by_failed_cells(ip):
    module, x = with_net(ip)
    before = weights(module)
    result = ip.run_cell("%%trace net x\nnet.layer1.output = None\n")
    assert isinstance(result.error_in_exec, TypeError) and "line 2" in str(result.error_in_exec)
    assert hook_count(module) == 0 and all(torch.equal(before[k], v) for k, v in weights(module).items())
    ok(ip, "%%trace net x\nh = net.layer1.output\n")
    with torch.no_grad():
        assert torch.equal(ip.user_ns["h"], make_tiny().layer1(x))
