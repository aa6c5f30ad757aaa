"""Ring attention over a few gloo ranks on CPU: error against float64 and memory per rank.

    python launch/ring_attention_demo.py --nproc 2            # spawns the ranks itself
    torchrun --nproc-per-node 4 launch/ring_attention_demo.py  # or under torchrun

Every rank builds the same random full sequence, keeps its shard (the layout's), runs ring
attention forward and backward, and compares its shard of out, dq, dk, dv with a float64 dense
attention over the full sequence.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ring_sp import LAYOUTS, ring_attention, split


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not under torchrun")
    p.add_argument("--seq", type=int, default=2048, help="global sequence length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layout", choices=LAYOUTS, default="zigzag")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--lookback", type=int, default=None, help="sliding window in tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    p.add_argument("--bucket-size", type=int, default=256, help="score tile of the torch backend")
    return p.parse_args(argv)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reference(q, k, v, do, causal, lookback):
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    s = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(g, 2)) * q.shape[-1] ** -0.5
    pos = torch.arange(q.shape[1])
    diff = pos[:, None] - pos[None, :]
    visible = torch.ones_like(diff, dtype=torch.bool)
    if causal:
        visible &= diff >= 0
    if lookback:
        visible &= diff < lookback
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(s.masked_fill(~visible, float("-inf")), -1),
                       v.repeat_interleave(g, 2))
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do.double()))


def run(args) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    shape_q = (args.batch, args.seq, args.heads, args.head_dim)
    shape_kv = (args.batch, args.seq, args.kv_heads, args.head_dim)
    q, do = torch.randn(*shape_q, generator=g), torch.randn(*shape_q, generator=g)
    k, v = torch.randn(*shape_kv, generator=g), torch.randn(*shape_kv, generator=g)
    q, k, v, do = (t.to(dtype) for t in (q, k, v, do))
    mine = [split(t, args.layout, world)[rank].clone() for t in (q, k, v, do)]
    ql, kl, vl = (t.requires_grad_() for t in mine[:3])

    before = _peak_rss_mb()
    out = ring_attention(ql, kl, vl, causal=args.causal, layout=args.layout, max_lookback_seq_len=args.lookback,
                         bucket_size=args.bucket_size)
    out.backward(mine[3])
    grown = _peak_rss_mb() - before

    ref = _reference(q, k, v, do, args.causal, args.lookback)
    errors = []
    for got, want in zip((out, ql.grad, kl.grad, vl.grad), ref):
        want = split(want, args.layout, world)[rank]
        errors.append(((got.double() - want).norm() / want.norm()).item())
    dense_mb = args.batch * args.heads * args.seq**2 * 4 / 2**20
    shard_mb = sum(t.numel() * 4 for t in mine) / 2**20
    line = (f"rank {rank}/{world}: rel err out {errors[0]:.1e} dq {errors[1]:.1e} dk {errors[2]:.1e} dv {errors[3]:.1e}"
            f" | {args.seq // world} local tokens | peak RSS grew {grown:.0f} MB in forward+backward")
    tile_mb = args.batch * args.heads * args.bucket_size**2 * 4 / 2**20
    footer = (f"memory per rank is O(local tokens): the shards of q, k, v, dO take {shard_mb:.0f} MB (fp32) and a "
              f"score tile {tile_mb:.0f} MB, while one full fp32 score matrix would take {dense_mb:.0f} MB")
    lines = [None] * world
    dist.all_gather_object(lines, line)
    if rank == 0:
        print(f"ring attention: {args.layout}, causal={args.causal}, lookback={args.lookback}, {args.dtype}, "
              f"seq {args.seq} over {world} gloo ranks, heads {args.heads}/{args.kv_heads}, head_dim {args.head_dim}")
        print("\n".join(lines))
        print(footer)
        bound = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 3e-2}[args.dtype]
        print("OK" if max(errors) < bound else f"FAILED: error above {bound}")


def _spawned(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    _main(args)


def _main(args) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    try:
        run(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    args = parse_args()
    if "RANK" in os.environ:
        _main(args)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(args.nproc, port, args), nprocs=args.nproc)
