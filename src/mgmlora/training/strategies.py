"""Training strategies: DeepSpeed with the gradient-accumulation scaling fixed, and help for building under ZeRO-3.

Lightning 2.6 divides the training-step loss by `accumulate_grad_batches` before backward, and DeepSpeed's
`engine.backward(loss, scale_wrt_gas=True)` divides it by `gradient_accumulation_steps` again, so every gradient
(and with it gradient clipping and the logged grad norm) is `accumulate_grad_batches` times too small: 128x with the
MGM-2B recipe (docs/design/deepspeed.md).
mgmlora keeps Lightning's division (its loss normalisation relies on it) and turns DeepSpeed's off.

Resuming never unpickles code: DeepSpeed reads its checkpoint files with `torch.load(weights_only=False)`, so
`MgmDeepSpeedStrategy.load_checkpoint` first loads every file DeepSpeed will read with `weights_only=True`
(`check_deepspeed_checkpoint`) and refuses the checkpoint if one needs more than tensors, plain containers and the
few DeepSpeed bookkeeping types of `deepspeed_trusted()`.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

from mgmlora.errors import UsageError, disk_full, is_disk_full
from mgmlora.training.checkpoint import (
    UnsafeCheckpointError,
    fresh_tmp,
    publish,
    readable,
    recover_once,
    safe_load,
    tree_size,
)


def deepspeed_trusted() -> tuple[type, ...]:
    """The non-tensor classes DeepSpeed 0.19 pickles into its ZeRO optimizer-state files (seen on CPU runs).

    ZeRO-1/2/3 write `loss_scaler` (a `LossScaler`; `DynamicLossScaler` under fp16) and `zero_stage` (a
    `ZeroStageEnum`); ZeRO-1/2 also `param_slice_mappings` (`fragment_address` dataclasses). Unpickling one only
    sets attributes to numbers (or looks up an enum member); none defines `__setstate__`. Nothing else is trusted.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def check_deepspeed_checkpoint(path: str | os.PathLike) -> None:
    """Loads every file DeepSpeed will read from checkpoint `path` with `weights_only=True`; raises if one needs more.

    A directory: the tag named by its `latest` / `latest_universal` files must be a plain directory name inside it,
    and every `*.pt` below that directory (model states, optimizer states, universal-checkpoint fragments) must load.
    A single file (ZeRO-3 `load_full_weights`) must load itself. Files are memory-mapped: only the pickled structure
    is read, not the tensors.

    Raises:
        UnsafeCheckpointError: naming the file and what it needs (or the `latest` file and the tag it names).
    """
    path = Path(path)
    trusted = deepspeed_trusted()
    if path.is_file():
        safe_load(path, allowed=trusted, mmap=zipfile.is_zipfile(path))
        return
    for latest in (path / "latest", path / "latest_universal"):
        if not latest.is_file():
            continue
        tag = latest.read_text().strip()
        if not tag or tag in (".", "..") or Path(tag).name != tag or not (path / tag).is_dir():
            raise UnsafeCheckpointError(f"{latest}: names {tag!r}, which is not a directory inside {path}; DeepSpeed "
                                        "would read checkpoint files from there. Resume from a checkpoint your own "
                                        "run wrote.")
        for file in sorted((path / tag).rglob("*.pt")):
            safe_load(file, allowed=trusted, mmap=zipfile.is_zipfile(file))


def drop_frozen(state: dict, module: Any) -> dict:
    """`state` without any frozen parameter, under every name it has (tied weights have several)."""
    for name, param in module.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            state.pop(name, None)
    return state


class MgmDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy whose backward does not scale the loss by the accumulation steps a second time.

    Takes exactly DeepSpeedStrategy's arguments (stage, offload_optimizer, bucket sizes, ...). Invalid combinations are
    rejected at construction, before any model loads. With `offload_optimizer`, DeepSpeed runs mgmlora's torch AdamW
    on the CPU copies (`zero_force_ds_cpu_optimizer: false`) instead of refusing it: with LoRA the optimizer state is
    small, and DeepSpeedCPUAdam would need a compiled op.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        zero = self.config.get("zero_optimization", {})
        stage = zero.get("stage")
        problems = []
        if zero.get("offload_param") and stage != 3:
            problems.append(f"offload_parameters: true needs stage: 3 (got stage: {stage}); ZeRO-2 cannot offload "
                            "parameters")
        if stage not in (0, 1, 2, 3):
            problems.append(f"stage must be 0, 1, 2 or 3 (got {stage})")
        if problems:
            raise ValueError("trainer.strategy.init_args: " + "; ".join(problems) + ".")
        if zero.get("offload_optimizer"):
            self.config["zero_force_ds_cpu_optimizer"] = False
        self.recovered: set[Path] = set()  # checkpoint directories this run has cleaned (checkpoint.recover_once)

    def setup_environment(self) -> None:
        """Refuses fp16 at stage 0, and a machine without CUDA in one line (Lightning's own check raises there)."""
        precision = str(getattr(self.precision_plugin, "precision", ""))
        if self.config.get("zero_optimization", {}).get("stage") == 0 and precision.startswith("16"):
            # stage 0's fp16 optimizers keep skipping overflowing steps at the minimum scale without ever stopping,
            # so a diverged run would go on to its end; ZeRO-1/2/3 raise there (engine_grad_norm)
            raise UsageError(f"trainer.precision {precision} with DeepSpeed stage 0: DeepSpeed's stage-0 fp16 loss "
                             "scaler never stops a run whose gradients stay non-finite. Use stage 1, 2 or 3, "
                             "trainer.precision bf16-mixed, or no DeepSpeed strategy (Lightning's own 16-mixed).")
        if self.accelerator is not None and not isinstance(self.accelerator, CUDAAccelerator):
            name = type(self.accelerator).__name__.removesuffix("Accelerator").lower()
            raise UsageError(f"trainer.strategy: DeepSpeed runs on CUDA GPUs only and this run's accelerator is "
                             f"{name}; drop the configs/strategy/ fragment (or trainer.strategy) to train without it.")
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """DeepSpeed's save, into a temporary directory renamed into place, with frozen tied weights excluded too.

        Crash safety as for mgmlora's own format (mgmlora.training.checkpoint): every rank writes its files into one
        `.<name>.tmp-<hex8>` directory, and once all have, rank 0 renames it to `filepath` (on a filesystem it does
        not share, each node's local rank 0 does). Overwriting `last.ckpt` in place would leave a mix of two steps
        after a crash. A full disk on any rank stops every rank with one DiskFullError, the partial directory deleted
        and the previous checkpoint kept. DeepSpeed drops frozen weights by iterating `named_parameters()`, which
        lists a tied weight once, so the second name (Gemma's `lm_head.weight`, as large as the embeddings) would stay
        in every "adapter-only" MGM checkpoint; it is excluded here.
        """
        path = Path(self.broadcast(str(filepath)))
        if self.is_global_zero:
            recover_once(path.parent, self.recovered)
        tmp = Path(self.broadcast(str(fresh_tmp(path)) if self.is_global_zero else None))
        engine = self.deepspeed_engine
        original = engine.module_state_dict

        def module_state_dict(*args: Any, exclude_frozen_parameters: bool = False, **kwargs: Any) -> dict:
            state = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
            return drop_frozen(state, engine.module) if exclude_frozen_parameters and state is not None else state

        engine.module_state_dict = module_state_dict
        full = False
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
        except Exception as error:
            if not is_disk_full(error):
                raise
            full = True
        finally:
            del engine.module_state_dict  # back to the class method
        several = self.world_size > 1
        if self.reduce_boolean_decision(full, all=False) if several else full:  # any rank's full disk stops all ranks
            self.barrier("mgmlora: checkpoint save failed")
            written = tree_size(tmp) if self.is_global_zero and tmp.exists() else 0  # measured before any deletion
            self.barrier("mgmlora: partial checkpoint measured")
            if self.local_rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise disk_full(path, written) from None
        self.barrier("mgmlora: checkpoint files written")
        if self.is_global_zero:
            publish(tmp, path)
        self.barrier("mgmlora: checkpoint renamed")
        if self.local_rank == 0 and tmp.exists():
            publish(tmp, path)  # a node-local filesystem, where rank 0's rename did not happen
        self.barrier("mgmlora: checkpoint renamed on every node")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """DeepSpeed's load, after `check_deepspeed_checkpoint` has found nothing in it that would run code.

        While an interrupted save has left `checkpoint_path` renamed away, the complete previous checkpoint of that
        name is loaded (mgmlora.training.checkpoint.readable).
        """
        path = readable(Path(checkpoint_path))
        check_deepspeed_checkpoint(path)
        return super().load_checkpoint(path, weights_only=True)

    def backward(self, closure_loss: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        """Runs DeepSpeed's backward with `scale_wrt_gas=False` (Lightning already divided the loss)."""
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)


def zero3_config(trainer: Any) -> dict | None:
    """The DeepSpeed config when `trainer` runs ZeRO stage 3, else None."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        return strategy.config
    return None


@contextmanager
def zero3_build(trainer: Any) -> Iterator[Callable[[], AbstractContextManager]]:
    """Context for building a model inside `configure_model` under ZeRO-3; yields a factory of "PEFT-safe" contexts.

    Two silent failures of ZeRO-3 + transformers + PEFT (docs/design/deepspeed.md):
    transformers must see a live `HfDeepSpeedConfig` while `from_config`/`from_pretrained` run (else size-mismatch
    errors or NaN gradients), and `get_peft_model` must run outside `deepspeed.zero.Init` (else PEFT's zero init of
    LoRA B hits the empty partition placeholder and the adapter does not start as a no-op). Outside ZeRO-3 both are
    no-ops.
    """
    config = zero3_config(trainer)
    if config is None:
        yield nullcontext
        return
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context
    from transformers.integrations import HfDeepSpeedConfig

    @contextmanager
    def outside_zero_init() -> Iterator[None]:
        shutdown_init_context()
        try:
            yield
        finally:
            restore_init_context()

    keep_alive = HfDeepSpeedConfig(config)  # transformers holds only a weak reference to it
    try:
        yield outside_zero_init
    finally:
        del keep_alive


def mark_moe_leaves(model: Any, trainer: Any) -> list[str]:
    """Under ZeRO-3, makes every mixture-of-experts block a DeepSpeed leaf module; returns the class names marked.

    ZeRO-3 fetches parameters per submodule through forward hooks. An MoE block only runs the experts its tokens were
    routed to, so ranks whose tokens hit different experts wait on different all-gathers and hang; the per-expert
    weights also change from step to step, which defeats ZeRO-3's prefetch trace. A leaf module is gathered whole
    before its forward. MoE blocks are recognised structurally (a child `experts` next to a router `gate`), so any
    transformers MoE family works, not only Qwen3-MoE. Outside ZeRO-3 nothing is marked.
    """
    if zero3_config(trainer) is None:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(m) for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")},
                     key=lambda c: c.__name__)
    if classes:
        set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


def gathered(module: Any, trainer: Any, modifier_rank: int | None = None) -> AbstractContextManager:
    """Under ZeRO-3, gathers `module`'s trainable parameters (a collective: every rank must enter); else a no-op.

    Without it, saving a PEFT adapter under ZeRO-3 writes the empty partition placeholders (the "40-byte adapter"
    failure reported by PEFT and DeepSpeed users), and loading one into them fails with a size mismatch.
    `modifier_rank=0` re-partitions rank 0's values when the context exits (for loading); None only reads.
    """
    if zero3_config(trainer) is None:
        return nullcontext()
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


# -- what the training step needs to know about the strategy (asked here, so the LightningModule holds no branches) --
def align_rank_zero(trainer: Any) -> str | None:
    """Makes Lightning's rank-zero logging follow the built Trainer's rank, not a stray `RANK` in the environment.

    Lightning reads `RANK` / `LOCAL_RANK` once, when it is imported, to decide which process may log; only its
    multi-process strategies correct that later. A single-process run started from a shell (or a job script) that
    still exports `RANK=3` therefore trained, saved and exported as rank 0 while every info line, the final summary
    included, was silently dropped. Returns a note for the log when the environment disagreed, else None.
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    stray = rank_zero_only.rank != trainer.global_rank
    note = (f"RANK/LOCAL_RANK in the environment said rank {rank_zero_only.rank}, but this run is rank "
            f"{trainer.global_rank} of {trainer.world_size}; logging as rank {trainer.global_rank}") if stray else None
    rank_zero_only.rank = trainer.global_rank
    return note


def steps_itself(trainer: Any) -> bool:
    """Whether the strategy runs the accumulation itself (DeepSpeed: Lightning calls its step every micro-batch)."""
    return bool(trainer.strategy.handles_gradient_accumulation)


def is_deepspeed(trainer: Any) -> bool:
    """Whether `trainer` runs under DeepSpeed (any ZeRO stage)."""
    return trainer is not None and isinstance(trainer.strategy, DeepSpeedStrategy)


def input_cast_needed(trainer: Any, model_dtype: str) -> bool:
    """Whether PEFT's cast of LoRA inputs to the adapter dtype changes anything (mgmlora.training.fastpath).

    No autocast under DeepSpeed. ZeRO-1/2 cast the whole module to one dtype. ZeRO-3 leaves the LoRA weights PEFT
    adds outside zero.Init in fp32 while the activations are bf16, so their input cast is needed there (without it
    the first forward fails in DeepSpeed's linear wrapper: "BFloat16 != float", seen on a GPU). Without a trainer
    (tools, tests) the cast stays.
    """
    if trainer is None:
        return True
    if is_deepspeed(trainer):
        return bool(trainer.strategy.zero_stage_3)
    precision = str(trainer.precision)
    same = precision.endswith("-mixed") or precision in ("bf16-true", "16-true") or model_dtype == "float32"
    return not same


def holds_whole_gradients(trainer: Any) -> bool:
    """Whether this process holds whole gradients (one device or DDP); sharded strategies clip their own way."""
    return isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)) and not is_deepspeed(trainer)


def scales_loss(trainer: Any) -> bool:
    """Whether Lightning runs a loss scaler (16-mixed outside DeepSpeed, which has its own)."""
    return str(trainer.precision) == "16-mixed" and not is_deepspeed(trainer)


def deepspeed_scales_loss(trainer: Any) -> bool:
    """Whether DeepSpeed runs a dynamic fp16 loss scaler, which skips overflowing steps itself (`engine_grad_norm`)."""
    if not is_deepspeed(trainer):
        return False
    engine = trainer.strategy.deepspeed_engine
    return bool(engine.fp16_enabled() and engine.dynamic_loss_scale())


def engine_grad_norm(trainer: Any) -> float | None:
    """DeepSpeed's pre-clipping global gradient norm of the step that just ran (its gradients live in its buffers).

    None for a step its dynamic fp16 loss scaler skipped: under fp16 an overflowing step is routine (above all in the
    first steps, while the scale comes down); the engine drops its update, lowers the scale (ZeRO-1/2/3, with its
    hysteresis: after a second overflow in a row) and reports the step's norm as inf; once the scale is at its minimum,
    the next lowering raises and stops the run (`loss_scale_exhausted`; ZeRO-1/2/3 only: stage 0 never does, which
    is why `MgmDeepSpeedStrategy` refuses fp16 at stage 0). Such a step is the scaler's, as under Lightning's own
    16-mixed scaler (`scales_loss`), not a divergence; FiniteGuard counts it (`scaler_skipped`), and a fit none of whose
    steps was applied fails as having trained nothing. With a static loss scale nothing lowers the scale, so an overflow
    keeps its inf norm and stops the run.
    """
    if scaler_skipped_step(trainer):
        return None
    return trainer.strategy.deepspeed_engine.get_global_grad_norm()


def engine_step_applied(trainer: Any) -> bool:
    """Whether DeepSpeed's engine updated the weights in the step that just ran (it drops an overflowing step)."""
    return bool(trainer.strategy.deepspeed_engine.was_step_applied())


def loss_scale_exhausted(error: BaseException) -> bool:
    """Whether `error` is DeepSpeed's dynamic fp16 loss scaler giving up: an overflow with its scale at the minimum.

    DeepSpeed raises a bare `Exception` then (`DynamicLossScaler.update_scale`, ZeRO-1/2/3), whose message is the only
    way to tell it apart; tests/training/test_strategies.py raises it from the installed DeepSpeed and fails when that
    changes.
    """
    return type(error) is Exception and "loss scale already at minimum" in str(error)


def scaler_skipped_step(trainer: Any) -> bool:
    """Whether DeepSpeed's dynamic fp16 loss scaler dropped the step that just ran (an overflow, `engine_grad_norm`).

    Asked of the engine, not read off a missing norm: ZeRO-1/2 with `compute_grad_norm: false` report no norm for the
    steps they apply too.
    """
    return deepspeed_scales_loss(trainer) and not engine_step_applied(trainer)
