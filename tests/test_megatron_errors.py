"""Bad input to megatron_patch gets a clear ValueError, raised on every rank before any collective
can hang (the group is used once more afterwards to prove it); the flags, the module-level spec and
the rotary table on their own."""

import argparse

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.spec_utils import import_module

from megatron_patch import (
    LayoutRotaryEmbedding,
    RingCoreAttention,
    RingOptions,
    add_ring_attention_args,
    get_gpt_layer_ring_spec,
    megatron_lm,
    validate_ring_args,
)
from megatron_patch.options import transformer_engine_installed
from tests import megatron_jobs


def _args(argv, **megatron_args):
    args = add_ring_attention_args(argparse.ArgumentParser()).parse_args(argv)
    for key, value in megatron_args.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize("argv, megatron_args, words", [
    (["--ring-attention", "--ring-size", "2"], {}, ["--ring-size 2", "--context-parallel-size 4"]),
    (["--ring-attention"], {"seq_length": 20}, ["--seq-length 20", "multiple of 8"]),
    (["--ring-attention", "--ring-layout", "striped"], {"seq_length": 18}, ["--seq-length 18", "multiple of 4"]),
    (["--ring-attention"], {"attention_dropout": 0.1}, ["--attention-dropout 0"]),
    (["--ring-attention"], {"transformer_impl": "transformer_engine"},
     ["Transformer Engine", "--transformer-impl local"]),
    (["--ring-attention", "--ring-layout", "striped"], {"position_embedding_type": "mrope"}, ["--ring-layout zigzag"]),
    (["--ring-attention", "--ring-max-lookback", "8"], {"window_size": (3, 0)},
     ["--window-size", "--ring-max-lookback"]),
    (["--ring-attention"], {"window_size": (3, 2)}, ["right side of the window must be 0"]),
    (["--ring-attention", "--ring-backend", "nope"], {}, ["--ring-backend 'nope'"]),
    (["--ring-attention", "--ring-bucket-size", "0"], {}, ["--ring-bucket-size 0"]),
    (["--ring-layout", "striped"], {}, ["without --ring-attention"]),
    (["--ring-attention"], {"cp_comm_type": ["a2a"]}, ["--cp-comm-type a2a", "pass p2p"]),
    (["--ring-attention"], {"cp_comm_type": ["p2p", "a2a+p2p"]}, ["--cp-comm-type p2p a2a+p2p"]),
    (["--ring-attention"], {"hierarchical_context_parallel_sizes": [2, 2]}, ["--hierarchical-context-parallel-sizes"]),
    (["--ring-attention"], {"attention_backend": AttnBackend.flash}, ["--attention-backend flash", "--ring-backend"]),
])
def test_validate_ring_args_rejects(argv, megatron_args, words):
    if "transformer_impl" in megatron_args and transformer_engine_installed():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ValueError) as error:
        validate_ring_args(_args(argv, **megatron_args), 4)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_validate_ring_args_accepts_and_reads_options():
    args = _args(["--ring-attention", "--ring-layout", "contiguous", "--ring-max-lookback", "4", "--no-ring-reduce-col",
                  "--ring-bucket-size", "64", "--ring-size", "4"], seq_length=32, attention_dropout=0.0,
                 window_size=(3, 0), position_embedding_type="rope", transformer_impl="local", cp_comm_type=["p2p"],
                 hierarchical_context_parallel_sizes=None, attention_backend=AttnBackend.auto)
    validate_ring_args(args, 4)
    assert RingOptions.from_args(args) == RingOptions("contiguous", "auto", 4, False, 64, 4)
    validate_ring_args(_args([]), 1)  # no ring attention, no ring flags: nothing to say
    assert RingOptions.from_args(argparse.Namespace()) == RingOptions()
    documents = _args(["--ring-attention"], reset_attention_mask=True, seq_length=32)
    validate_ring_args(documents, 4)  # document masking is the ring's too now
    assert RingOptions.from_args(documents).documents
    validate_ring_args(_args([], reset_attention_mask=True), 1)  # Megatron's own flag, no ring: fine


def test_parser_refuses_unknown_layout():
    with pytest.raises(SystemExit):
        _args(["--ring-attention", "--ring-layout", "diagonal"])


@pytest.mark.skipif(transformer_engine_installed(), reason="Transformer Engine is installed here")
def test_transformer_engine_spec_refused_where_missing():
    with pytest.raises(ValueError, match="transformer_engine is not installed"):
        get_gpt_layer_ring_spec(RingOptions(), transformer_engine=True)


def test_spec_module_attribute_for_megatron_lm():
    """`--spec megatron_patch ring_gpt_layer_spec`: Megatron's import_module finds a ring layer spec."""
    spec = import_module(["megatron_patch", "ring_gpt_layer_spec"])
    assert spec.submodules.self_attention.submodules.core_attention.module is RingCoreAttention
    local = get_gpt_layer_ring_spec(RingOptions(layout="striped"), normalization="RMSNorm", qk_layernorm=True)
    core = local.submodules.self_attention.submodules.core_attention
    assert core.module is RingCoreAttention and core.params == {"options": RingOptions(layout="striped")}
    with pytest.raises(ValueError, match="MLA"):
        get_gpt_layer_ring_spec(multi_latent_attention=True)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_table_is_megatrons(interleaved):
    """One rank (no context parallelism): the table's angles are Megatron's own get_cos_sin angles."""
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_interleaved=interleaved,
                           use_cpu_initialization=True)
    cos, sin = rope.get_cos_sin(12, offset=3)  # [12, 4]
    emb = LayoutRotaryEmbedding.convert(rope, "striped")(12, offset=3)
    assert emb.shape == (12, 1, 1, 8)
    angles = emb[:, 0, 0, :4] if not interleaved else emb[:, 0, 0, ::2]
    torch.testing.assert_close(torch.cos(angles), cos, rtol=0, atol=0)
    torch.testing.assert_close(torch.sin(angles), sin, rtol=0, atol=0)
    halves = (emb[..., :4], emb[..., 4:]) if not interleaved else (emb[..., ::2], emb[..., 1::2])
    assert torch.equal(*halves)


def test_parse_args_hook_adds_validates_and_records():
    """apply()'s wrapper around Megatron-LM's parse_args(extra_args_provider, ignore_unknown_args),
    driven by a stand-in with that signature (Megatron-LM itself is not installed here)."""

    def parse_args(extra_args_provider=None, ignore_unknown_args=False, argv=()):
        parser = argparse.ArgumentParser()
        parser.add_argument("--context-parallel-size", type=int, default=1)
        parser.add_argument("--seq-length", type=int)
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        return parser.parse_args(list(argv))

    try:
        wrapped = megatron_lm._wrap_parse_args(lambda p, i: parse_args(p, i, argv))
        argv = ["--context-parallel-size", "2", "--seq-length", "16", "--ring-attention", "--ring-layout", "striped"]
        args = wrapped()
        assert args.ring_attention and args.ring_layout == "striped"
        assert megatron_lm.defaults.megatron_lm_options() == RingOptions(layout="striped")
        argv = ["--context-parallel-size", "2", "--seq-length", "17", "--ring-attention", "--ring-layout", "striped"]
        with pytest.raises(ValueError, match="--seq-length 17"):
            wrapped()
        argv = ["--context-parallel-size", "2"]
        wrapped(lambda parser: add_ring_attention_args(parser))  # the script's own provider added them already
        assert megatron_lm.defaults.megatron_lm_options() is None
    finally:
        megatron_lm.restore()


@pytest.mark.parametrize("kind, words", [
    ("shard_batch", ["batch['tokens']", "multiple of 4"]),
    ("context_parallel_size", ["config.context_parallel_size=1", "2 ranks"]),
    ("dropout", ["attention_dropout=0.0"]),
    ("ring_size", ["--ring-size 1", "--context-parallel-size 2"]),
    ("yarn_striped", ["'yarn'", "zigzag"]),
    ("odd_local_seq", ["multiple of 4"]),
    ("document_mask", ["not the plain causal mask", "attention_mask=None"]),
    ("bad_mask_one_rank", ["attention_mask"]),
    ("local_mask", ["[batch, 1, 8, 16]"]),
    ("packed", ["packed sequences"]),
])
def test_bad_input_raises_on_every_rank(dist_pool, kind, words):
    errors = dist_pool(2).run(megatron_jobs.bad_input, kind, timeout=300)
    for rank, text in enumerate(errors):
        assert text != "no error", f"rank {rank}: {kind} was accepted"
        if kind != "bad_mask_one_rank" or rank == 1:
            for word in words:
                assert word in text, f"rank {rank}: {text}"


def test_python_m_megatron_patch_runs_a_script_after_apply(tmp_path):
    """`python -m megatron_patch SCRIPT ARGS`: the script sees the replaced functions and its own argv,
    and can import modules next to it (as pretrain_gpt.py imports gpt_builders)."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "neighbour.py").write_text("VALUE = 'found'\n")
    (tmp_path / "script.py").write_text(
        "import sys\n"
        "import megatron.core.utils as utils\n"
        "from megatron.core.models.gpt import gpt_model\n"
        "from megatron.core.transformer.attention import Attention\n"
        "from neighbour import VALUE\n"
        "print(getattr(utils.get_batch_on_this_cp_rank, '_megatron_patch', False),\n"
        "      getattr(Attention.__init__, '_megatron_patch', False),\n"
        "      gpt_model.RotaryEmbedding.__name__, VALUE, sys.argv[1:])\n")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-W", "ignore", "-m", "megatron_patch", str(tmp_path / "script.py"),
                          "--ring-attention", "x"], cwd=root, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "True True LayoutRotaryEmbedding found ['--ring-attention', 'x']"
    missing = subprocess.run([sys.executable, "-m", "megatron_patch", str(tmp_path / "nope.py")], cwd=root,
                             capture_output=True, text=True, timeout=900)
    assert missing.returncode != 0 and "is not a file" in missing.stderr
