"""Bad input gets a ValueError that names the argument and the fix; disagreeing ranks never hang."""

import pytest
import torch

from ring_sp import ring_attention, ring_attention_simulated
from tests import dist_jobs


def qkv(b=1, s=4, h=4, hk=2, d=8, dtype=torch.float32):
    kv = (b, s, hk, d)
    return torch.randn(b, s, h, d, dtype=dtype), torch.randn(*kv, dtype=dtype), torch.randn(*kv, dtype=dtype)


BAD = [
    ("q 3-D", lambda q, k, v: dict(q=q[0]), "q must be a 4-D tensor"),
    ("k shape", lambda q, k, v: dict(k=k[:, :3], v=v[:, :3]), "must match q"),
    ("k != v", lambda q, k, v: dict(v=v[..., :4]), "must have the same shape"),
    ("heads", lambda q, k, v: dict(k=torch.randn(1, 4, 3, 8), v=torch.randn(1, 4, 3, 8)), "not a multiple of kv_heads"),
    ("dtype mix", lambda q, k, v: dict(k=k.double()), "share one dtype"),
    ("int dtype", lambda q, k, v: dict(q=q.long(), k=k.long(), v=v.long()), "use float16, bfloat16"),
    ("mask dtype", lambda q, k, v: dict(mask=torch.ones(1, 4)), "mask must be a bool tensor"),
    ("mask shape", lambda q, k, v: dict(mask=torch.ones(1, 5, dtype=torch.bool)), r"must be \(batch, local_seq\)"),
    ("layout", lambda q, k, v: dict(layout="diagonal"), "layout='diagonal' is unknown"),
    ("backend", lambda q, k, v: dict(backend="cuda-magic"), "backend='cuda-magic' is unknown"),
    ("lookback w/o causal", lambda q, k, v: dict(max_lookback_seq_len=3), "needs causal=True"),
    ("lookback 0", lambda q, k, v: dict(causal=True, max_lookback_seq_len=0), "max_lookback_seq_len=0"),
    ("ring_size", lambda q, k, v: dict(ring_size=3), "ring_size=3 does not divide"),
    ("bucket", lambda q, k, v: dict(bucket_size=0), "bucket_size=0"),
    ("scale", lambda q, k, v: dict(softmax_scale=-1.0), "softmax_scale=-1.0"),
    ("zigzag odd", lambda q, k, v: dict(q=q[:, :3], k=k[:, :3], v=v[:, :3], layout="zigzag"), "must be even"),
]


@pytest.mark.parametrize("name,change,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(name, change, message):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    args.update(change(q, k, v))
    with pytest.raises(ValueError, match=message):
        ring_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        ring_attention(q, k.to("meta"), v.to("meta"))


def test_backend_that_cannot_serve_the_inputs():
    from ring_sp import kernels

    class OnlyFull:
        name = "only_full"

        def unsupported(self, q, k, visibility):
            return None if visibility.kind == "full" else "computes full blocks only"

    kernels.register("only_full", lambda bucket: OnlyFull(), priority=-1)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend='only_full' cannot compute a causal block"):
        ring_attention(q, k, v, causal=True, backend="only_full")


def test_simulated_positions_must_agree():
    qs, ks, vs = zip(qkv(), qkv(s=6))
    with pytest.raises(ValueError, match="positions disagree on local_seq"):
        ring_attention_simulated(list(qs), list(ks), list(vs))


@pytest.mark.parametrize("kind,message", [
    ("seq", "ranks disagree on local_seq"),
    ("causal", "ranks disagree on causal"),
    ("ring_size", "ranks disagree on ring_size"),
    ("bad_input", None),
])
def test_ranks_that_disagree_fail_together(dist_pool, kind, message):
    errors = dist_pool(2).run(dist_jobs.disagreeing_shapes, kind, timeout=60)
    assert all(e != "no error" for e in errors), errors
    if message:
        assert all(message in e for e in errors), errors
    else:
        assert "not a multiple of kv_heads" in errors[1]
        assert "rank [1] rejected their inputs" in errors[0]


def test_query_that_sees_no_key_gets_zero_output_and_gradients():
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = torch.tensor([[False, False, True, True]])
    out = ring_attention(q, k, v, causal=True, mask=mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert (out[:, :2] == 0).all() and (q.grad[:, :2] == 0).all()
