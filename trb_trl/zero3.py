"""DeepSpeed ZeRO-3: hold the teacher gathered, with none of its ZeRO-3 hooks, for the length of a TRB rollout.

A gathered teacher can step on some ranks and not on others (finished ranks skip logits processors under
`synced_gpus`) only if its forward issues no collective at all. TRL's `unwrap_model_for_generation` removes the
per-module fetch/release hooks but leaves DeepSpeed's start-of-forward hook, whose `reset_step` compares module
traces across ranks with a broadcast whenever the trace is incomplete (e.g. the teacher's first forwards): measured
here, that alone deadlocks an uneven rollout. This context also lifts that hook and restores everything afterwards.
"""

import contextlib

from ._compat import DistributedBackend


def _zero3_offload(engine):
    """The `DeepSpeedZeRoOffload` that owns a ZeRO-3 engine's module hooks (training or inference engine)."""
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    if offload is None or not hasattr(offload, "fwd_pre_hook"):
        raise RuntimeError(
            f"Cannot find the ZeRO-3 parameter offload of {type(engine).__name__}; set "
            "`gather_teacher_for_generation=False` to step the sharded teacher with the student instead."
        )
    return offload


@contextlib.contextmanager
def gathered_without_hooks(engine, accelerator, *, gather: bool = True):
    """Yield the unwrapped model of `engine`; under ZeRO-3 with `gather`, fully gathered and hook-free.

    Outside ZeRO-3, or with `gather=False`, this only unwraps.
    """
    if not gather or not DistributedBackend(accelerator).is_zero3:
        yield accelerator.unwrap_model(engine)
        return
    import deepspeed

    offload = _zero3_offload(engine)
    module = offload.module
    start_of_forward = module._forward_pre_hooks[offload.fwd_pre_hook.id]
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        offload._remove_module_hooks()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield accelerator.unwrap_model(engine)
        finally:
            offload.fwd_pre_hook = module.register_forward_pre_hook(start_of_forward)
            offload._register_deepspeed_module(module)  # re-adds the per-module hooks and invalidates the trace
