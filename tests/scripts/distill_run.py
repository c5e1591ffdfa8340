"""A small, deterministic distillation run driven by the tests in a subprocess (single or `accelerate launch`).

    python tests/scripts/distill_run.py --output_dir OUT --result RESULT.pt [--max_steps 6] [--save_steps 2]
        [--per_device_train_batch_size 8] [--kill_at_step K] [--resume] [--transfer] [--peers N] [--fsdp]
        [--eval_best] ...

Writes RESULT.pt (main process) with the logged losses, the final student and the projections. With
--kill_at_step the process kills itself with SIGKILL at the end of that step, as a crash would.
"""

import argparse
import gc
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_models import bert, classification_data, tiny_gpt2, tiny_llama  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hfkd import DistillationConfig, DistillationTrainer  # noqa: E402
from hfkd.sharding import whole_state  # noqa: E402


def lm_dataset(n=32, length=12, vocab=100, seed=0):
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, length - (i % 5) * 2 :] = 0 if i % 5 else 1  # uneven padding: token counts differ per batch
    labels = ids.masked_fill(mask == 0, -100)
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    )


def transfer_dataset():
    """16 classification rows read in order; rows 0-3 hold 3 labels, rows 4-7 none (-100), the rest a few: with 4
    rows per process and per step, the second process's first micro-batch has no label at all."""
    data = classification_data(n=16)
    unlabelled = {2, 4, 5, 6, 7, 9, 12, 13}
    labels = [-100 if i in unlabelled else y for i, y in enumerate(data["labels"])]
    return data.remove_columns("labels").add_column("labels", labels)


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class LastStep(TrainerCallback):
    """The student's and the peers' whole weights at the end of the last step, before load_best_model_at_end brings
    back those of the best checkpoint (a collective under FSDP: every process's callback gathers)."""

    def __init__(self, step):
        self.step, self.trainer, self.states = step, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            peers = {name: {k: v.clone() for k, v in whole_state(p).items()} for name, p in self.trainer.peers.items()}
            self.states = {"student": _full_state(self.trainer), "peers": peers}


class PeerGradNorms(TrainerCallback):
    """Each peer's whole gradient norm after clipping, before every optimizer step (gathered under FSDP)."""

    def __init__(self):
        self.trainer, self.norms = None, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        from torch.distributed.tensor import DTensor
        from torch.nn.utils import get_total_norm

        norms = {}
        for name, peer in self.trainer.peers.items():
            norm = get_total_norm([p.grad for p in peer.parameters() if p.grad is not None])
            norms[name] = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        self.norms.append(norms)


def _local_shares(model):
    """(elements this process holds, elements in all) of the model's parameters (sharded ones are DTensors)."""
    from torch.distributed.tensor import DTensor

    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    return local, sum(p.numel() for p in model.parameters())


def _full_state(trainer):
    """The student's whole weights (gathered from every process under FSDP: a collective, called by all)."""
    if trainer.is_fsdp_enabled:
        state = trainer.accelerator.get_state_dict(trainer.model)
    else:
        state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--max_steps", type=int, default=6)
    parser.add_argument("--save_steps", type=int, default=2)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--kill_at_step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--peers", type=int, default=0, help="deep mutual learning with this many peers, no teacher")
    parser.add_argument("--transfer", action="store_true", help="BERT classifiers, rows without labels, with dkd")
    parser.add_argument("--no_use_cpu", action="store_true", help="leave use_cpu unset (hfkd.launch's refusals)")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 over the processes (hfkd.sharding)")
    parser.add_argument("--optim", default="sgd", help="the optimizer (TrainingArguments.optim)")
    parser.add_argument("--learning_rate", type=float, default=0.5)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--wrap_class", default="LlamaDecoderLayer", help="with --fsdp: the layer class to wrap")
    parser.add_argument("--gpt2_teacher", action="store_true", help="a GPT-2 teacher: another family than the student")
    parser.add_argument("--two_teachers", action="store_true", help="teachers a and b (hfkd.mixing), equal weights")
    parser.add_argument("--logit_only", action="store_true", help="no hidden term (and so no projection)")
    parser.add_argument("--ema", type=float, default=None, help="a mean teacher of this decay instead of a teacher")
    parser.add_argument("--eval_best", action="store_true", help="evaluate at each save, load the best at the end")
    args = parser.parse_args()

    torch.set_num_threads(1)
    teacher = tiny_llama(32, 4, seed=0)
    student = tiny_llama(16, 2, seed=1)
    data, extra = lm_dataset(), {}
    if args.transfer:
        teacher, student = bert(dropout=0.0, seed=0), bert(hidden=16, layers=2, dropout=0.0, seed=1)
        with torch.no_grad():  # a confident teacher: the terms are then well above float32 rounding
            teacher.classifier.weight.mul_(30.0)
        data = transfer_dataset()
        extra = {"terms": [{"name": "dkd", "weight": 1.0}], "train_sampling_strategy": "sequential"}
    if args.fsdp:  # each decoder layer its own shard group
        extra = {"fsdp": True, "fsdp_config": {"transformer_layer_cls_to_wrap": [args.wrap_class]}}
    if args.ema is not None:
        extra["teacher_ema_decay"] = args.ema
    if args.eval_best:
        extra.update(eval_strategy="steps", eval_steps=args.save_steps, load_best_model_at_end=True)
        # The highest loss, the first checkpoint's: loading the best then changes every weight.
        extra.update(metric_for_best_model="loss", greater_is_better=True, per_device_eval_batch_size=4)
    config = DistillationConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        optim=args.optim,
        learning_rate=args.learning_rate,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_steps=args.save_steps,
        hidden_weight=0.0 if args.peers or args.logit_only else 1.0,
        report_to=[],
        use_cpu=not args.no_use_cpu,
        disable_tqdm=True,
        seed=0,
        dataloader_drop_last=True,
        **extra,
    )
    callbacks = [KillAt(args.kill_at_step)] if args.kill_at_step else []
    last_step, peer_norms = LastStep(args.max_steps), PeerGradNorms()
    if args.eval_best:
        callbacks.append(last_step)
    if args.peers:
        callbacks.append(peer_norms)
    if args.gpt2_teacher:
        teacher = tiny_gpt2(32, 4, seed=0)
    models = {"teacher_model": teacher}
    if args.two_teachers:
        models = {"teacher_model": {"a": teacher, "b": tiny_llama(32, 4, seed=5)}}
    if args.peers:
        models = {"peer_models": [tiny_llama(16, 2, seed=2 + i) for i in range(args.peers)]}
    if args.ema is not None:
        models = {}
    if args.eval_best:
        models["eval_dataset"] = lm_dataset(n=8, seed=1)
    trainer = DistillationTrainer(model=student, args=config, train_dataset=data, callbacks=callbacks, **models)
    last_step.trainer = peer_norms.trainer = trainer
    teacher_shares = [_local_shares(one) for one in trainer.teachers.values()]
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    teacher_shares_after = [_local_shares(one) for one in trainer.teachers.values()]
    student_state = _full_state(trainer)
    ema_state = trainer.source.ema.gather_state() if args.ema is not None else {}  # all processes: a collective
    peer_states = {name: whole_state(peer) for name, peer in trainer.peers.items()}  # gathered: a collective too
    if trainer.is_world_process_zero():
        torch.save(
            {
                "log": [e for e in trainer.state.log_history if "loss" in e],
                "student": student_state,
                "projector": {
                    k: v.detach().clone() for k, v in trainer.term_set.terms["hidden"].projector.state_dict().items()
                }
                if "hidden" in trainer.term_set.terms and trainer.term_set.terms["hidden"].projector is not None
                else {},
                "peers": {name: {k: v.clone() for k, v in state.items()} for name, state in peer_states.items()},
                "peer_shares": {name: _local_shares(peer) for name, peer in trainer.peers.items()},
                "eval_log": [e for e in trainer.state.log_history if "eval_loss" in e],
                "best": trainer.state.best_model_checkpoint,
                "last_step": last_step.states,
                "peer_grad_norms": peer_norms.norms,
                "ema": ema_state,
                "chunked": trainer.step.plan.head is not None,  # the logit term read the heads by chunks
                "world_size": trainer.args.world_size,
                "fsdp": trainer.is_fsdp_enabled,
                "teacher_shares": teacher_shares,
                "teacher_shares_after": teacher_shares_after,
            },
            args.result,
        )
    # A clean exit. The trainer holds DDP wrappers (the terms' state under FSDP, peers under DDP) whose reducers keep
    # gloo work: freed after the process group, or at interpreter exit, they can abort the process ("terminate called
    # without an active exception") after its result was written. Free them first, wait for every process, then end
    # the group, so that gloo's threads end before the interpreter does.
    last_step.trainer = peer_norms.trainer = trainer = None
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
