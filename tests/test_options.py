"""One definition of the ring options (ring_sp.options.RingOptions) gives all three places a user sets them:
ring_attention's keywords, the --ring-* flags and the DeepSpeed "ring_attention" JSON keys. An option
added, renamed or re-defaulted in only one place fails here."""

from __future__ import annotations

import argparse
import inspect
import json
import re

import pytest
import torch

from launch.args import parse_and_check
from megatron_patch.options import add_ring_attention_args
from ring_sp import ring_attention, ring_attention_simulated
from ring_sp.options import DEFAULTS, FLAGS, KWARGS, OPTIONS, Json, RingOptions, check_option, json_keys, kwarg_default

# a value other than the default for every field: a new option needs one here
SAMPLE = {"layout": "striped", "backend": "torch", "max_lookback": 4, "reduce_col": False, "bucket_size": 16,
          "ring_size": 2, "documents": True, "causal": True, "softmax_scale": 0.5}
# keyword arguments that are not options (tensors, groups, transports)
NOT_OPTIONS = {ring_attention: {"q", "k", "v", "mask", "group", "cu_seqlens", "transport", "agree"},
               ring_attention_simulated: {"qs", "ks", "vs", "masks", "cu_seqlens", "transport"}}


def test_every_field_has_a_sample_and_a_place():
    assert set(SAMPLE) == set(OPTIONS), "give the new option a non-default value in SAMPLE"
    for name, option in OPTIONS.items():
        assert SAMPLE[name] != getattr(DEFAULTS, name), name
        assert option.kwarg or option.flag or option.json, f"{name} cannot be set anywhere"
        ours = bool(option.flag and option.ours)
        assert ours == bool(option.json), f"{name}: a --ring-* flag and a JSON key come together"
        assert not ours or option.kwarg, f"{name}: a Megatron option is a ring_attention keyword too"


@pytest.mark.parametrize("function", [ring_attention, ring_attention_simulated], ids=lambda f: f.__name__)
def test_keywords_are_the_fields(function):
    parameters = inspect.signature(function).parameters
    wanted = {option.kwarg: name for name, option in OPTIONS.items()
              if option.kwarg and (function is ring_attention or option.simulated)}
    keywords = {p.name for p in parameters.values() if p.kind is p.KEYWORD_ONLY}
    assert keywords - NOT_OPTIONS[function] == set(wanted)
    for keyword, name in wanted.items():
        assert parameters[keyword].default == kwarg_default(name), keyword


@pytest.mark.parametrize("name", [n for n, o in OPTIONS.items() if o.kwarg])
def test_each_keyword_reaches_the_check(name):
    """A bad value of every option keyword is refused, naming the keyword as written."""
    keyword = OPTIONS[name].kwarg
    q, kv = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=rf"^{keyword}='bad'"):
        ring_attention(q, kv, kv, **{keyword: "bad"})
    if OPTIONS[name].simulated:
        with pytest.raises(ValueError, match=rf"^{keyword}='bad'"):
            ring_attention_simulated([q], [kv], [kv], **{keyword: "bad"})


def test_flags_are_the_fields():
    parser = add_ring_attention_args(argparse.ArgumentParser())
    actions = {s: a for a in parser._actions for s in a.option_strings}
    ours = {name: option for name, option in OPTIONS.items() if option.flag and option.ours}
    ring_flags = {s for s in actions if re.match(r"--(no-)?ring-", s)} - {"--ring-attention"}
    assert ring_flags == {option.flag for option in ours.values()}
    argv = []
    for name, option in ours.items():
        action = actions[option.flag]
        assert (action.dest, action.default) == (option.dest, getattr(DEFAULTS, name)), option.flag
        assert action.help, option.flag
        argv += [option.flag] if isinstance(SAMPLE[name], bool) else [option.flag, str(SAMPLE[name])]
    args = parser.parse_args(argv)
    args.reset_attention_mask = True  # Megatron's own flag
    flagged = {name: SAMPLE[name] for name, option in OPTIONS.items() if option.flag}
    assert RingOptions.from_args(args) == RingOptions(**flagged)
    assert RingOptions.from_args(parser.parse_args([])) == DEFAULTS


def test_json_keys_are_the_fields(monkeypatch, tmp_path):
    keys = json_keys()
    assert set(keys.values()) == {name for name, option in OPTIONS.items() if option.json}
    section = {key: SAMPLE[name] for key, name in keys.items()}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"ring_attention": section}))
    monkeypatch.setenv("WORLD_SIZE", str(SAMPLE["ring_size"]))
    args, config = parse_and_check(["--deepspeed_config", str(path), "--ring-attention"])
    assert config["ring_attention"] == section  # the completed section has exactly these keys
    for key, name in keys.items():
        assert getattr(args, OPTIONS[name].json_target[0]) == SAMPLE[name], key
    monkeypatch.setenv("WORLD_SIZE", "1")
    _, config = parse_and_check(["--ring-attention"])  # no section: the defaults (size: the context-parallel size)
    assert config["ring_attention"] == {key: getattr(DEFAULTS, name) if OPTIONS[name].json_flag is None else 1
                                        for key, name in keys.items()}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_one_check_names_the_option_as_written(name):
    option = OPTIONS[name]
    for view, spelled in ((KWARGS, f"{option.kwarg}='bad'"), (FLAGS, option.flag),
                          (Json("ds.json: ring_attention"), f"ds.json: ring_attention.{option.json} = 'bad'")):
        if view.name(option) is None:
            continue
        check_option(name, SAMPLE[name], view)
        with pytest.raises(ValueError) as error:
            check_option(name, "bad", view)
        assert spelled in str(error.value), str(error.value)


@pytest.mark.parametrize("name", ["causal", "softmax_scale"])
def test_megatron_refuses_what_its_layers_set(name):
    """Under Megatron each layer sets causal (its mask type) and the softmax scale: a spec's RingOptions may not."""
    with pytest.raises(ValueError, match=f"RingOptions.{name}=.* cannot be set under Megatron"):
        RingOptions(**{name: SAMPLE[name]}).check(FLAGS)
