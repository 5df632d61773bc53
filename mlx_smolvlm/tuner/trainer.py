"""The training loop: masked next-token loss, accumulation, checkpointing, eval, progress."""

import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from ..models.language import lm_logits
from .datasets import Batch, iterate_batches


@dataclass
class TrainingArgs:
    batch_size: int = 4
    iters: int = 100
    val_batches: int = 25  # -1: the whole valid split
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    grad_accumulation_steps: int = 1
    grad_checkpoint: bool = False
    seed: int = 0


def loss_fn(model, batch: Batch):
    """Mean cross-entropy over the target tokens (labels != -100), as transformers' loss with
    the same labels; returns (loss, number of target tokens).

    Only the positions that predict a target go through the vocabulary projection: with
    image tokens and prompts masked that is a small part of the batch, and the head
    (vocabulary x hidden) is the largest matmul of a small model."""
    text = model.model.text_model
    h = text(None, None, input_embeddings(model, batch))
    h = h.reshape(-1, h.shape[-1])[batch.targets]
    logits = lm_logits(text, model.get("lm_head"), h).astype(mx.float32)
    labels = batch.labels.reshape(-1)[batch.targets + 1]
    ntoks = mx.array(batch.targets.size)
    return nn.losses.cross_entropy(logits, labels).sum() / ntoks, ntoks


def input_embeddings(model, batch: Batch) -> mx.array:
    """Token embeddings with each row's image features (cached, or encoded now) in place."""
    embeds = model.model.text_model.embed_tokens(batch.input_ids)
    if not batch.media:
        return embeds
    feats = [m if isinstance(m, mx.array) else model.encode_images(*m) for m in batch.media]
    feats = mx.concatenate([f.reshape(-1, f.shape[-1]) for f in feats])
    return model.merge_image_features(batch.input_ids, feats, embeds)


def frozen_vision(model) -> bool:
    """Nothing in the vision tower or connector trains: their output per sample is fixed."""
    parts = (model.model.vision_model, model.model.connector)
    return not any(tree_flatten(p.trainable_parameters()) for p in parts)


def cache_image_features(model, *datasets):
    if not frozen_vision(model):
        return
    for ds in datasets:
        if hasattr(ds, "cache_features"):
            ds.cache_features(model.encode_images)


def grad_checkpoint(layers):
    """Recompute each layer's activations in the backward pass instead of keeping them. The
    layers get a subclass (parameter paths stay as they are; other instances are untouched)."""
    for layer in layers:
        cls = type(layer)

        def call(self, *args, _call=cls.__call__, **kwargs):
            def inner(params, *a):
                self.update(params)
                return _call(self, *a, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args)

        layer.__class__ = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": call})


def evaluate(model, dataset, batch_size: int, num_batches: int = -1, pad_id: int = 0) -> float:
    """Token-weighted mean loss over `num_batches` batches (all with -1)."""
    total, ntoks = mx.array(0.0), mx.array(0)
    for i, batch in enumerate(iterate_batches(dataset, batch_size, pad_id=pad_id)):
        if i == num_batches:
            break
        loss, n = loss_fn(model, batch)
        total, ntoks = total + loss * n, ntoks + n
        mx.eval(total, ntoks)
    return (total / ntoks).item()


def train(model, optimizer, train_set, val_set=None, args: TrainingArgs = TrainingArgs(),
          save=None, report=print, pad_id: int = 0, start_step: int = 0, stop=None) -> int:
    """Train the model's trainable parameters. `save(step)` writes a checkpoint (every
    `save_every` steps and at the end); `report(line)` prints progress and eval lines;
    `stop()`, checked between steps, ends the run early. Returns the last step done."""
    if args.grad_checkpoint:
        grad_checkpoint(model.layers)
    cache_image_features(model, train_set, val_set)
    step_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]
    accum = max(1, args.grad_accumulation_steps)

    def step(batch, grads_so_far, k):
        (loss, ntoks), grads = step_fn(model, batch)
        if grads_so_far is not None:
            grads = tree_map(mx.add, grads, grads_so_far)
        if k == accum - 1:
            optimizer.update(model, tree_map(lambda g: g / accum, grads))
            grads = None
        return loss, ntoks, grads

    def validate(it):
        if val_set is None or args.val_batches == 0:
            return
        model.eval()
        t = time.perf_counter()
        val = evaluate(model, val_set, args.batch_size, args.val_batches, pad_id)
        report(f"Iter {it}: val loss {val:.3f}, val took {time.perf_counter() - t:.3f}s")
        model.train()

    batches = iterate_batches(train_set, args.batch_size, train=True, pad_id=pad_id, seed=args.seed)
    validate(start_step)
    model.train()
    losses, tokens, elapsed, grads, n = 0.0, 0, 0.0, None, 0
    for it in range(start_step + 1, args.iters + 1):
        if stop is not None and stop():
            return it - 1
        t0 = time.perf_counter()
        for k in range(accum):
            batch = next(batches)
            loss, ntoks, grads = step(batch, grads, k)
            mx.eval(state, loss, ntoks, grads)
            losses += loss.item() / accum
            tokens += sum(batch.lengths)  # every real token, as mlx-lm counts
        elapsed, n = elapsed + time.perf_counter() - t0, n + 1
        if it % args.steps_per_report == 0 or it == args.iters:
            lr = optimizer.learning_rate
            lr = lr.item() if isinstance(lr, mx.array) else lr
            report(f"Iter {it}: train loss {losses / n:.3f}, lr {lr:.3e}, it/s {n / elapsed:.3f}, "
                   f"tokens/s {tokens / elapsed:.1f}, peak mem {mx.get_peak_memory() / 1e9:.3f} GB")
            losses, tokens, elapsed, n = 0.0, 0, 0.0, 0
        if it % args.steps_per_eval == 0 or it == args.iters:
            validate(it)
        if save is not None and (it % args.save_every == 0 or it == args.iters):
            save(it)
    return args.iters


def build_schedule(config: dict | None, learning_rate: float):
    """A constant rate, or mlx-lm's `lr_schedule` YAML: {name, arguments, warmup, warmup_init}."""
    import mlx.optimizers as optim

    if not config:
        return learning_rate
    schedule = getattr(optim.schedulers, config["name"])(*config.get("arguments", [learning_rate]))
    warmup = config.get("warmup", 0)
    if not warmup:
        return schedule
    ramp = optim.linear_schedule(config.get("warmup_init", 0.0), learning_rate, warmup)
    return optim.join_schedules([ramp, schedule], [warmup])
