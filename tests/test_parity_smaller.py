"""Smaller things nnsight users reach for: envoys=, invoker.inputs, streamer= (issue 14, item 7)."""

from __future__ import annotations

import torch

from nnsight_magic import NNsight
from nnsight_magic.intervention.envoy import Envoy
from language_fixtures import END_OF_TEXT, encode


class LinearEnvoy(Envoy):
    """An Envoy with one extra property, for Linear modules only."""

    @property
    def fan_in(self) -> int:
        return self._module.in_features


def test_envoys_gives_chosen_module_classes_their_own_envoy(tiny, x):
    net = NNsight(tiny, envoys={torch.nn.Linear: LinearEnvoy})
    assert type(net.layer1) is LinearEnvoy and net.layer2.fan_in == 10
    with net.trace(x):
        out = net.layer2.output.save()
    with torch.no_grad():
        assert torch.equal(out.value, tiny(x))


def test_invoker_inputs_are_the_prepared_args_and_kwargs(gpt2_lm, gpt2_tok):
    with gpt2_lm.trace() as tracer:
        with tracer.invoke("Hello world") as invoker:
            args, kwargs = invoker.inputs
        with tracer.invoke() as whole:
            assert whole.inputs is None  # an invoke without input has none of its own
    assert args == ()
    assert torch.equal(kwargs["input_ids"], encode(gpt2_tok, "Hello world"))
    assert torch.equal(kwargs["attention_mask"], torch.ones_like(kwargs["input_ids"]))


def test_a_streamer_passed_to_generate_sees_every_token(gpt2_lm, tiny_gpt2, gpt2_tok):
    class Streamer:
        def __init__(self):
            self.tokens: list = []

        def put(self, value):
            self.tokens.append(value.clone())

        def end(self):
            self.tokens.append("end")

    streamer = Streamer()
    with gpt2_lm.generate("Hello world", max_new_tokens=3, streamer=streamer) as tracer:
        result = tracer.result.save()
    ids = encode(gpt2_tok, "Hello world")
    expected = tiny_gpt2.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                  do_sample=False, pad_token_id=END_OF_TEXT)
    assert torch.equal(result.value, expected)
    assert streamer.tokens[-1] == "end" and len(streamer.tokens) == 5     # the prompt, 3 tokens, the end
    assert torch.equal(torch.cat([token.reshape(-1) for token in streamer.tokens[1:-1]]), expected[0, -3:])
