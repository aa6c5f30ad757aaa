"""Pipeline parallelism in the pretraining job: 4 gloo ranks = pipeline 2 × ring 2 train the model that one
stage trains (ring 2 × data 2 on the same ranks), and refuse what DeepSpeed's pipeline engine cannot run.

The same global batches, the same initial weights (seeded per layer), 3 iterations of a tiny GPT on the
recall task: every iteration's loss and gradient norm, the validation at the end, and every weight after
the last step must agree. A checkpoint saved by the pipeline resumes to the very same run.
"""

from __future__ import annotations

import json

import pytest
import torch

from launch.args import parse_and_check
from tests import pipeline_jobs
from tests.pretrain_runs import MODEL, read_metrics

ARGS = [*MODEL, "--train-iters", "3", "--eval-interval", "3", "--ring-attention", "--context-parallel-size", "2"]
TIED = ["--tie-embeddings-and-output-weights"]
# Packed documents, learned positions, the output layer of its own, ZeRO-0 with a clipping threshold every step
# reaches.
VARIANT = ["--recall-keys", "4", "--recall-documents", "2", "--position-embedding-type", "learned_absolute",
           "--reset-attention-mask"]


def config(tmp_path, name: str, micro: int, stage: int, clip: float = 1.0, batch: int = 4) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"train_batch_size": batch, "train_micro_batch_size_per_gpu": micro,
                                "zero_optimization": {"stage": stage}, "gradient_clipping": clip,
                                "ring_attention": {"backend": "torch"}}))
    return str(path)


@pytest.fixture(scope="module")
def runs(dist_pool, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    pool, out = dist_pool(4), {"tmp": tmp}

    def run(name: str, argv: list[str]):
        results = pool.run(pipeline_jobs.train, [*argv, "--metrics-file", str(tmp / f"{name}.jsonl")])
        out[name] = {"metrics": read_metrics(tmp / f"{name}.jsonl"), "ranks": results}

    # pipeline 2 × ring 2 (2 micro batches of 2) and ring 2 × data 2 (2 micro batches of 1 per replica)
    run("p2", ["--deepspeed_config", config(tmp, "p2", 2, 1), "--pipeline-model-parallel-size", "2", *ARGS, *TIED,
               "--save", str(tmp / "ckpt"), "--save-interval", "2"])
    run("p1", ["--deepspeed_config", config(tmp, "p1", 1, 1), *ARGS, *TIED])
    # With documents the scored tokens differ between samples and each micro batch's loss is its token mean, so
    # both runs take the same pairs of samples as micro batches: 4 of them, or 2 per replica.
    run("p2_variant", ["--deepspeed_config", config(tmp, "p2v", 2, 0, clip=0.05, batch=8),
                       "--pipeline-model-parallel-size", "2", *ARGS, *VARIANT])
    run("p1_variant", ["--deepspeed_config", config(tmp, "p1v", 2, 1, clip=0.05, batch=8), *ARGS, *VARIANT])
    return out


def _weights(run: dict) -> dict[str, torch.Tensor]:
    """Every weight of the model once, checking that the ranks (ring copies, tied copies) hold equal ones."""
    out: dict[str, torch.Tensor] = {}
    for rank in run["ranks"]:
        for name, copies in rank["weights"].items():
            for w in copies:
                if name in out:
                    assert torch.equal(out[name], w), name
                else:
                    out[name] = w
    return out


def _close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    for i in (1, 2, 3):
        for key in ("loss", "grad_norm"):
            assert abs(a[i][key] - b[i][key]) <= rtol * abs(b[i][key]), (i, key, a[i][key], b[i][key])


@pytest.mark.parametrize("name", ["p2", "p2_variant"])
def test_pipeline_trains_the_model_one_stage_trains(runs, name):
    pipe, one = runs[name], runs[name.replace("p2", "p1")]
    _close(pipe["metrics"], one["metrics"])  # seen: equal to 1e-7
    assert one["metrics"][3]["loss"] < one["metrics"][1]["loss"] - 0.05  # it learns: not a comparison of constants
    assert {r["coord"][0] for r in pipe["ranks"]} == {0, 1}  # two stages, each a ring of 2
    a, b = _weights(pipe), _weights(one)
    assert sorted(a) == sorted(b) and len(a) > 10
    # After three AdamW steps, within 1e-4 of each weight's largest entry. Seen: 3e-5 on linear_qkv.bias, whose key
    # part has a zero gradient in exact arithmetic (softmax ignores a shift of all scores), so that AdamW turns
    # rounding noise into whole steps; 7e-6 at most elsewhere.
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-4 * b[key].abs().max().item()), key
    if name == "p2":  # the same validation samples (the variant's replicas validate 2 micro batches, not 1)
        va, vb = (read_eval(runs["tmp"] / f"{n}.jsonl") for n in ("p2", "p1"))
        assert va["answers_cross"] == vb["answers_cross"] > 0 and abs(va["loss"] - vb["loss"]) <= 1e-5 * vb["loss"]


def test_pipeline_variant_clips_every_step(runs):
    # the norm of ZeRO-0's clipping (ring_sp.pipeline) is the one-stage ZeRO-1 norm, and above the threshold
    assert all(runs["p2_variant"]["metrics"][i]["grad_norm"] > 0.05 for i in (1, 2, 3))


def test_pipeline_selective_recompute_trains_the_same(runs, dist_pool):
    # selective recompute reaches the stages' layers (each MLP recomputes itself, launch.recompute) and changes
    # no number: the p2 run again with --recompute-granularity selective
    tmp = runs["tmp"]
    ranks = dist_pool(4).run(pipeline_jobs.train, [
        "--deepspeed_config", config(tmp, "p2", 2, 1), "--pipeline-model-parallel-size", "2", *ARGS, *TIED,
        "--recompute-granularity", "selective", "--metrics-file", str(tmp / "p2_selective.jsonl")])
    assert [r["recomputed_mlps"] for r in ranks] == [1, 1, 1, 1]  # one layer per stage
    assert all(r["recomputed_mlps"] == 0 for r in runs["p2"]["ranks"])
    _close(read_metrics(tmp / "p2_selective.jsonl"), runs["p2"]["metrics"], rtol=1e-7)


def read_eval(path) -> dict:
    rows = [json.loads(line) for line in open(path)]
    return [r for r in rows if r["kind"] == "eval"][-1]


def test_pipeline_checkpoint_resumes_the_same_run(runs, dist_pool, monkeypatch):
    tmp, save = runs["tmp"], runs["tmp"] / "ckpt"
    (save / "latest").write_text("iter_0000002")  # the run also saved at its end, iteration 3
    manifest = json.load(open(save / "iter_0000002" / "ring_sp.json"))
    assert manifest["pipeline"] == 2 and any(name.startswith("layer_") for name in manifest["files"])
    resumed = dist_pool(4).run(pipeline_jobs.train, [
        "--deepspeed_config", config(tmp, "p2", 2, 1), "--pipeline-model-parallel-size", "2", *ARGS, *TIED,
        "--load", str(save), "--metrics-file", str(tmp / "resumed.jsonl")])
    got, want = read_metrics(tmp / "resumed.jsonl"), runs["p2"]["metrics"]
    assert sorted(got) == [3] and (got[3]["loss"], got[3]["grad_norm"]) == (want[3]["loss"], want[3]["grad_norm"])
    a, b = _weights({"ranks": resumed}), _weights(runs["p2"])
    assert all(torch.equal(a[k], b[k]) for k in b)
    # a run of another layout is refused before any process group exists (launch.checkpoint.check)
    with pytest.raises(ValueError, match="saved with data=1 but this run has data=2"):
        _parse(monkeypatch, 4, ["--deepspeed_config", config(tmp, "p1", 1, 1), *ARGS, *TIED, "--load", str(save)])


def _parse(monkeypatch, world: int, argv: list[str], section: dict | None = None, tmp_path=None):
    """launch.args.parse_and_check as a rank of ``world`` ranks runs it, with ``section`` as the DeepSpeed config."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    if section is not None:
        (tmp_path / "ds.json").write_text(json.dumps(section))
        argv = ["--deepspeed_config", str(tmp_path / "ds.json"), *argv]
    return parse_and_check(argv)


BAD = [  # (world, flags, DeepSpeed config, message)
    (4, ["--pipeline-model-parallel-size", "4", "--num-layers", "6"], {},
     "--pipeline-model-parallel-size 4 does not divide --num-layers 6"),
    (6, ["--pipeline-model-parallel-size", "2", "--ring-attention", "--context-parallel-size", "2"], {},
     "6 ranks cannot be split into tensor 1 × pipeline 2 × ring 2 (= 4) × data"),
    (4, ["--pipeline-model-parallel-size", "2"], {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2},
     "gradient_accumulation_steps 1 (the micro batches of a step) is below --pipeline-model-parallel-size 2"),
    (2, ["--pipeline-model-parallel-size", "2", "--global-batch-size", "2"], {"zero_optimization": {"stage": 2}},
     "zero_optimization.stage 2 with --pipeline-model-parallel-size 2: DeepSpeed's pipeline engine supports ZeRO "
     "stage 0 and 1 only"),
    (2, ["--pipeline-model-parallel-size", "1"], {"pipeline": {"stages": 2}},
     "pipeline.stages is 2 but the command line says --pipeline-model-parallel-size 1"),
    (2, [], {"pipeline": {"stage": 2}}, "pipeline: unknown key 'stage' (did you mean 'stages'?)"),
    (2, ["--pipeline-model-parallel-size", "0"], {}, "--pipeline-model-parallel-size / pipeline.stages = 0: use a"),
]


@pytest.mark.parametrize("world,flags,section,message", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_pipeline_input_is_refused_before_any_process_group(monkeypatch, tmp_path, world, flags, section,
                                                                message):
    with pytest.raises(ValueError) as error:
        _parse(monkeypatch, world, [*MODEL, *flags], section, tmp_path)
    assert message in str(error.value)


def test_pipeline_size_comes_from_the_config(monkeypatch, tmp_path):
    args, config = _parse(monkeypatch, 4, [*MODEL, "--global-batch-size", "4"], {"pipeline": {"stages": 2}}, tmp_path)
    assert args.pipeline_model_parallel_size == 2 and config["pipeline"] == {"stages": 2}
    assert config["gradient_accumulation_steps"] == 2  # data 2: micro batches of 1
