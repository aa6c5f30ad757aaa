"""The job with ``--pipeline-model-parallel-size`` P > 1: DeepSpeed's pipeline engine over the GPT's stages.

DeepSpeed's ``PipelineEngine`` runs its 1F1B schedule over the optimizer step's
``gradient_accumulation_steps`` micro batches (at least P). The first stage embeds the tokens,
every stage runs its layers' ring attention over its own ring (the ring ranks of a stage hold
one sequence's shards, as at P = 1), the last stage computes each micro batch's ring share of the
loss (``ring_loss``), and activations and their gradients travel between the stages' ranks of
equal (data, ring, tensor) coordinates. Why DeepSpeed's engine and not Megatron-core's schedules:
README, "Pipeline parallelism".
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from launch import data, gpt_pipe, quiet
from launch.job import Job, Step, build_optimizer
from ring_sp.topology import ring_loss


class PipelineJob(Job):
    """:class:`~launch.job.Job` whose engine is a ``RingPipelineEngine``: one step is ``train_batch``."""

    def build_engine(self, vocab_size: int):
        import deepspeed

        from ring_sp import pipeline

        with quiet.prints_hidden(self.args.verbose):
            module = pipeline.RingPipelineModule(gpt_pipe.layers(self.args, vocab_size), topology=self.mpu.topology,
                                                 mpu=self.mpu, loss_fn=self.loss, partition_method="type:Decoder")
        optimizer, scheduler = build_optimizer(self.args, module)
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                          config=self.config)
        return pipeline.adopt(engine)

    def micro_batches(self, first: int, count: int, split: int = 0):
        """DeepSpeed's pipeline items for micro batches first, first + 1, ...: ((tokens, position_ids[,
        documents]), (labels, loss_mask[, cross])); ``cross`` (validation of the recall task) marks
        the answers whose fact is on another rank of the ring (launch.data.shard_sources)."""
        for step in range(first, first + count):
            b = self.batch(step, split)
            inputs = [b["tokens"], b["position_ids"]]
            if "attention_mask" in b:  # the document mask, at a fixed width (shapes are sent once)
                inputs.append(gpt_pipe.pad_documents(b["attention_mask"], self.args.seq_length))
            labels = [b["labels"], b["loss_mask"]]
            if split and "answer_source" in b:
                labels.append(data.shard_sources(b["answer_source"].cpu(), self.layout, self.ring_rank,
                                                 self.ring_size))
            yield tuple(inputs), tuple(labels)

    def loss(self, logits: torch.Tensor, labels: tuple) -> torch.Tensor:
        """This rank's share of its ring's mean loss (NaN, with every gradient, if it is not finite)."""
        loss = ring_loss(gpt_pipe.token_losses(logits, labels[0]), labels[1], self.ring_group)
        return loss * torch.where(torch.isfinite(loss), 1.0, float("nan"))  # the optimizer's check drops the step

    def train_step(self, iteration: int) -> Step:
        args, engine = self.args, self.engine
        torch.manual_seed(hash((args.seed, iteration, self.rank)) % 2**31)  # resumable: no RNG state to save
        # the mean over data replicas and micro batches of this rank's share, on every stage
        share = engine.train_batch(self.micro_batches(iteration * self.accum, self.accum)).double()
        dist.all_reduce(share, group=self.ring_group)
        norm = engine.get_global_grad_norm()
        return Step(loss=share.item(), grad_norm=None if norm is None else float(norm),
                    grads_finite=engine.grads_finite, applied=engine.was_step_applied())

    def validation_sums(self, logits: torch.Tensor, labels: tuple) -> torch.Tensor:
        """(6,) float64: scored loss, scored tokens, then launch.data.recall_accuracy's counts."""
        logits = self.full_vocab(logits.transpose(0, 1).float())  # (batch, local_seq, vocab)
        token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[0].flatten(),
                                                       reduction="none").view_as(labels[0])
        sums = torch.zeros(6, dtype=torch.float64)
        sums[0], sums[1] = (token_loss * labels[1]).sum().item(), labels[1].sum().item()
        if len(labels) > 2:
            sums[2:] = data.recall_accuracy(logits.argmax(-1).cpu(), labels[0].cpu(), labels[2].cpu())
        return sums

    @torch.no_grad()
    def evaluate(self, iteration: int) -> dict:
        engine, count = self.engine, self.args.eval_iters
        engine.module.loss_fn = self.validation_sums
        engine.total_loss = None  # eval_batch adds to what train_batch left (of another shape)
        try:
            sums = engine.eval_batch(self.micro_batches(0, count, split=1), reduce_output=None, bcast_loss=False,
                                     num_micro_batches=count)
        finally:
            engine.module.loss_fn = self.loss
        s = torch.stack(sums).sum(0) if engine.is_last_stage() else torch.zeros(6, dtype=torch.float64)
        s = self.sum_over_replicas(s.tolist())  # over data × ring on the last stage, zeros elsewhere ...
        dist.all_reduce(s, group=self.mpu.get_pipeline_model_parallel_group())  # ... then to every stage
        return self.eval_result(iteration, s.cpu())
