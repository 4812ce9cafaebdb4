"""Pure train and eval steps: ``train_step(state, batch) -> (state, metrics)``, ``eval_step(state, batch)``.

The step's arithmetic is written once, over the state's leaves. In eager mode the model computes with the
state's tensors bound into it and ``torch.autograd.grad`` takes the gradients; compiled, the whole step
(forward, backward, optimizer) is one ``torch.compile(fullgraph=True)`` graph over ``torch.func.functional_call``
and ``torch.func.grad``, with the leaves as graph inputs so a new learning rate never recompiles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from funceng import dist, optim, tree
from funceng.binding import ModuleBinding
from funceng.sharding import check_shares_storage, is_sharded
from funceng.state import TrainState, check_state, successor

LossFn = Callable[[nn.Module, Any], Any]
AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL = 2.0, 0.5, 2000  # torch.amp.GradScaler's defaults


def call_model(model: nn.Module, batch: Any, mode: str) -> Any:
    """MMEngine's calling convention: ``model(*batch, mode=...)`` (``**batch`` for a dict)."""
    if isinstance(batch, Mapping):
        return model(**batch, mode=mode)
    if isinstance(batch, (tuple, list)):
        return model(*batch, mode=mode)
    return model(batch, mode=mode)


def parse_loss(output: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """The total loss and the values to log from what a loss function returned.

    A scalar tensor is the loss. In a dict, every entry whose key contains ``"loss"`` is averaged (lists of
    tensors are summed) and added to the total; every entry is logged.
    """
    if isinstance(output, Tensor):
        if output.ndim != 0:
            raise ValueError(f"the loss must be a scalar tensor, got shape {tuple(output.shape)}")
        return output, {}
    if not isinstance(output, Mapping):
        raise TypeError(
            "the loss function (or model(..., mode='loss')) must return a scalar tensor or a dict of losses "
            f"with a 'loss' entry; got {type(output).__name__}"
        )
    logs, total = {}, None
    for key, value in output.items():
        if isinstance(value, (list, tuple)):
            value = sum(v.mean() for v in value)
        elif isinstance(value, Tensor):
            value = value.mean()
        else:
            raise TypeError(f"loss entry {key!r} must be a tensor or a list of tensors, got {type(value).__name__}")
        logs[key] = value.detach()
        if "loss" in key:
            total = value if total is None else total + value
    if total is None:
        raise KeyError(f"the loss dict has no entry whose key contains 'loss'; keys: {sorted(output)}")
    return total, logs


class _Layout:
    """Where each part of a state sits in its flat list of leaves."""

    def __init__(self, state: TrainState):
        self.template, _ = tree.flatten(state)
        self.unflatten = tree.unflattener(self.template)
        self.param_names = list(self.template["params"])
        self.buffer_names = list(self.template["buffers"])
        self.lr = tree.find_leaf(self.template["opt_state"], "lr")
        self.grad_norm = tree.find_leaf(self.template["opt_state"], "grad_norm")
        self.rng = self.template["rng"]

    def leaves(self, state: TrainState) -> list[Tensor]:
        cached = state.__dict__.get("_funceng_leaves")
        if cached is not None and cached[0] is self and state.is_locked:
            return cached[1]
        template, leaves = tree.flatten(state)
        if template != self.template:
            raise ValueError(
                "this state does not have the structure this step was built for: "
                f"{tree.describe_difference(self.template, template)}. Was it created for another model or "
                "optimizer (e.g. without the same `accumulate`)?"
            )
        return leaves

    def remember(self, state: TrainState, leaves: list[Tensor]) -> TrainState:
        state._funceng_leaves = (self, leaves)
        return state


class _RngScope:
    """Makes the step draw random numbers from the state's generators, then stores them back."""

    def __init__(self, rng: dict[str, int]):
        self.cpu, self.cuda = rng.get("cpu"), rng.get("cuda")

    @contextlib.contextmanager
    def __call__(self, leaves: list[Tensor]):
        saved_cpu = torch.get_rng_state()
        torch.set_rng_state(leaves[self.cpu])
        if self.cuda is not None:
            saved_cuda = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(leaves[self.cuda])
        try:
            yield
        finally:
            leaves[self.cpu].copy_(torch.get_rng_state())
            torch.set_rng_state(saved_cpu)
            if self.cuda is not None:
                leaves[self.cuda].copy_(torch.cuda.get_rng_state())
                torch.cuda.set_rng_state(saved_cuda)


def _resolve_compile(compile: bool | str | dict, model: nn.Module) -> dict | None:
    """``torch.compile`` options, or ``None`` for eager. A dict is passed to ``torch.compile`` (e.g.
    ``{"mode": "reduce-overhead"}`` for CUDA graphs); ``fullgraph`` is always on."""
    if compile == "auto":
        first = next(model.parameters(), None)
        compile = first is not None and first.device.type == "cuda"
    if isinstance(compile, dict):
        return {**compile, "fullgraph": True}
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False, 'auto' or a dict of torch.compile options, got {compile!r}")
    return {"fullgraph": True} if compile else None


def _amp_dtype(amp: str | torch.dtype | None) -> torch.dtype | None:
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}")
    return AMP_DTYPES[amp]


class _LossModule(nn.Module):
    """``fn(model, batch)`` as a module, so `torch.func.functional_call` can swap the model's tensors."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Any:
        return self.loss_fn(self.model, batch)


def _functional_call(module: _LossModule, params: dict, buffers: dict, batch: Any) -> Any:
    """Runs ``module`` (a `_LossModule`) with its model's parameters and buffers replaced."""
    tensors = {f"model.{k}": v for k, v in params.items()}
    tensors.update({f"model.{k}": v for k, v in buffers.items()})
    return torch.func.functional_call(module, tensors, (batch,))


def _mark_batch_dynamic(batch: Any) -> None:
    """Compiles for any batch size: a smaller last batch then reuses the graph instead of recompiling."""
    if isinstance(batch, Tensor):
        if batch.ndim and batch.shape[0] > 1:
            torch._dynamo.mark_dynamic(batch, 0)
    elif isinstance(batch, Mapping):
        for value in batch.values():
            _mark_batch_dynamic(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            _mark_batch_dynamic(value)


def _mark_static(leaves: list[Tensor]) -> None:
    """Tells CUDA graphs that the state's tensors keep their addresses (donation updates them in place)."""
    for leaf in leaves:
        if not getattr(leaf, "_funceng_static", False):
            torch._dynamo.mark_static_address(leaf)
            leaf._funceng_static = True


class _Step:
    """What train and eval steps share: compile and AMP options, and the state layout and model binding, which
    are built from the first state seen."""

    def __init__(self, model: nn.Module, fn, compile, amp, dynamic_batch: bool):
        self.model = model
        self.sharded = is_sharded(model)
        if self.sharded and compile == "auto":
            compile = False
        if self.sharded and compile is not False:
            raise ValueError(
                "compile: a model sharded with fully_shard runs its step eagerly (FSDP2 gathers and frees parameters "
                "in module hooks, which a whole-step graph cannot hold); compile its blocks instead, with "
                "torch.compile(block) before sharding, and pass compile=False")
        self.compile_options = _resolve_compile(compile, model)
        self.compiled = self.compile_options is not None
        self.amp_dtype = _amp_dtype(amp)
        self.dynamic_batch = dynamic_batch and self.compiled
        self.device_type = next(model.parameters()).device.type
        self._layout: _Layout | None = None
        self._binding: ModuleBinding | None = None
        self._checked_leaves: list[Tensor] | None = None
        self._fn = torch.compile(fn, **self.compile_options) if self.compiled else fn

    def _layout_for(self, state: TrainState) -> _Layout:
        if self._layout is None:
            self._layout = _Layout(state)
            self._binding = ModuleBinding(self.model, self._layout.param_names, self._layout.buffer_names)
        return self._layout

    def _check_sharded(self, leaves: list[Tensor]) -> None:
        """A sharded model ignores the state's params unless they are its own storage: check once per state."""
        if self.sharded and leaves is not self._checked_leaves:
            layout = self._layout
            check_shares_storage(self.model, [leaves[layout.template["params"][name]] for name in layout.param_names])
            self._checked_leaves = leaves

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)


class TrainStep(_Step):
    """``step(state, batch) -> (new_state, metrics)``; built by `make_train_step`."""

    def __init__(self, model, tx, loss_fn, compile, amp, accumulate, donate, dynamic_batch=False,
                 data_parallel=None):
        super().__init__(model, self._step_on_leaves, compile, amp, dynamic_batch)
        if self.sharded and not donate:
            raise ValueError("donate=False: a sharded model's state shares storage with the model, so every step "
                             "must update it in place (donate=True)")
        if data_parallel is None:
            data_parallel = dist.get_world_size() > 1
        self.data_parallel = data_parallel and not self.sharded  # FSDP2 averages sharded gradients itself
        self.tx = optim.accumulate(tx, accumulate)
        self.loss_fn = loss_fn or (lambda m, batch: call_model(m, batch, "loss"))
        self._loss_module = _LossModule(model, self.loss_fn)
        self.donate = donate
        self._rng: _RngScope | None = None

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Tensor]]:
        check_state(state)
        layout = self._layout_for(state)
        if not self.donate:
            state = state.clone()
        leaves = layout.leaves(state)
        self._check_sharded(leaves)
        if self.compiled and self.compile_options.get("mode") in ("reduce-overhead", "max-autotune"):
            _mark_static(leaves)
        if not self.model.training:
            self.model.train()
        if self.dynamic_batch:
            _mark_batch_dynamic(batch)
        with self._rng(leaves):
            metrics = self._fn(leaves, batch)
        return layout.remember(successor(state, donate=self.donate), leaves), metrics

    def _layout_for(self, state: TrainState) -> _Layout:
        if self._layout is None:
            super()._layout_for(state)
            self._rng = _RngScope(self._layout.rng)
        return self._layout

    def _grads_eager(self, params, buffers, batch, scale):
        self._binding.bind(list(params.values()), list(buffers.values()))
        with self._autocast():
            loss, logs = parse_loss(self.loss_fn(self.model, batch))
        grads = torch.autograd.grad(loss if scale is None else loss * scale, self._binding.params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
        return dict(zip(params, grads)), loss.detach(), logs

    def _grads_sharded(self, params, buffers, batch, scale):
        """FSDP2: the model already computes with the state's rows; its backward hooks reduce-scatter the
        averaged gradients into each sharded parameter's ``.grad``, which is taken (and cleared) here."""
        with self._autocast():
            loss, logs = parse_loss(self.loss_fn(self.model, batch))
        (loss if scale is None else loss * scale).backward()
        grads = {}
        for (name, param), local in zip(self.model.named_parameters(), params.values()):
            grads[name] = torch.zeros_like(local) if param.grad is None else param.grad.to_local()
            param.grad = None
        return grads, loss.detach(), logs

    def _grads_functional(self, params, buffers, batch, scale):
        def loss_of(p, b):
            with self._autocast():
                loss, logs = parse_loss(_functional_call(self._loss_module, p, b, batch))
            return (loss if scale is None else loss * scale), (loss.detach(), logs)

        grads, (loss, logs) = torch.func.grad(loss_of, has_aux=True)(params, buffers)
        return grads, loss, logs

    def _step_on_leaves(self, leaves: list[Tensor], batch: Any) -> dict[str, Tensor]:
        layout = self._layout
        s = layout.unflatten(leaves)
        params, buffers, opt_state = s["params"], s["buffers"], s["opt_state"]
        fp16 = self.amp_dtype == torch.float16
        scale = s["loss_scale"]["scale"] if fp16 else None
        if self.compiled:
            grads_fn = self._grads_functional
        else:
            grads_fn = self._grads_sharded if self.sharded else self._grads_eager
        grads, loss, logs = grads_fn(params, buffers, batch, scale)
        if self.data_parallel:
            grads, loss, logs = _mean_across_ranks(grads, loss, logs)
        elif self.sharded:
            _, loss, logs = _mean_across_ranks({}, loss, logs)  # the logged loss is the global batch's
        if fp16:
            updates, finite = self._unscale(grads, s["loss_scale"], across_ranks=self.sharded)
            optim.apply_if(finite, self.tx, updates, opt_state, params)
        else:
            updates, new_opt_state = self.tx.update(grads, opt_state, params)
            optim.base.commit_state(opt_state, new_opt_state)
        optim.apply_updates(params, updates)
        s["step"].add_(1)
        metrics = {"loss": loss, **{k: v for k, v in logs.items() if k != "loss"}}
        if layout.lr is not None:
            metrics["lr"] = leaves[layout.lr].clone()
        if layout.grad_norm is not None:
            metrics["grad_norm"] = leaves[layout.grad_norm].clone()
        if fp16:
            metrics["loss_scale"] = scale.clone()
        return metrics

    @staticmethod
    def _unscale(grads: dict[str, Tensor], loss_scale: dict[str, Tensor],
                 across_ranks: bool = False) -> tuple[dict[str, Tensor], Tensor]:
        """Unscales fp16 gradients, zeroes them if any is non-finite, and updates the dynamic loss scale.

        ``across_ranks``: each rank holds a shard of the gradients, so an overflow found by any rank counts.
        """
        scale, tracker = loss_scale["scale"], loss_scale["growth_tracker"]
        found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        grad_list = list(grads.values())
        torch._amp_foreach_non_finite_check_and_unscale_(grad_list, found_inf, scale.double().reciprocal().float())
        if across_ranks:
            found_inf = dist.mean_across_ranks([found_inf])[0]
        finite = found_inf == 0
        # No foreach select exists; this runs only on fp16 skips' path and fuses into one kernel when compiled.
        clean = dict(zip(grads, [torch.where(finite, g, torch.zeros((), dtype=g.dtype)) for g in grad_list]))
        torch._amp_update_scale_(scale, tracker, found_inf, GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL)
        return clean, finite


def _mean_across_ranks(grads: dict, loss: Tensor, logs: dict) -> tuple[dict, Tensor, dict]:
    """Gradients, loss and logged values averaged over the data-parallel ranks, in one collective per dtype.

    Each rank's loss is the mean over its own B/W samples, so the average is the loss (and gradient) of the
    global batch. fp16 gradients are averaged while still scaled: an overflow on any rank reaches every rank,
    and all skip the step together.
    """
    averaged = dist.mean_across_ranks([*grads.values(), loss, *logs.values()])
    n = len(grads)
    return dict(zip(grads, averaged[:n])), averaged[n], dict(zip(logs, averaged[n + 1:]))


class EvalStep(_Step):
    """``eval_step(state, batch) -> outputs`` with no gradients; built by `make_eval_step`."""

    def __init__(self, model, predict_fn, compile, amp, dynamic_batch=False):
        super().__init__(model, self._predict, compile, amp, dynamic_batch)
        self.predict_fn = predict_fn or (lambda m, batch: call_model(m, batch, "predict"))
        self._predict_module = _LossModule(model, self.predict_fn)

    def __call__(self, state: TrainState, batch: Any) -> Any:
        check_state(state)
        layout = self._layout_for(state)
        leaves = layout.leaves(state)
        self._check_sharded(leaves)
        if self.model.training:
            self.model.eval()
        s = layout.unflatten(leaves)
        if self.dynamic_batch:
            _mark_batch_dynamic(batch)
        if self.sharded:
            with torch.no_grad(), self._autocast():
                return self.predict_fn(self.model, batch)
        with torch.no_grad():
            return self._fn(s["params"], s["buffers"], batch)

    def _predict(self, params, buffers, batch):
        with self._autocast():
            if not self.compiled:
                self._binding.bind(list(params.values()), list(buffers.values()))
                return self.predict_fn(self.model, batch)
            return _functional_call(self._predict_module, params, buffers, batch)


def make_train_step(
    model: nn.Module,
    tx: optim.GradientTransformation,
    loss_fn: LossFn | None = None,
    *,
    compile: bool | str = "auto",
    amp: str | torch.dtype | None = None,
    accumulate: int = 1,
    donate: bool = True,
    dynamic_batch: bool = False,
    data_parallel: bool | None = None,
) -> TrainStep:
    """A pure train step ``step(state, batch) -> (new_state, metrics)``.

    ``loss_fn(model, batch)`` is plain PyTorch returning a scalar or a dict with ``"loss"``; ``None`` calls a
    BaseModel-style ``model(*batch, mode="loss")``. ``compile``: ``True`` compiles the whole step with
    ``fullgraph=True``; ``"auto"`` compiles on CUDA only; a dict adds ``torch.compile`` options
    (``{"mode": "reduce-overhead"}``: CUDA graphs, with the state's tensors marked as static addresses).
    ``amp``: ``"bf16"`` autocasts; ``"fp16"`` also scales the loss dynamically and skips non-finite steps
    without a host sync. ``accumulate=k`` applies the mean of ``k`` consecutive steps' gradients every k-th step
    (build the state with ``optim.accumulate(tx, k)``).
    ``donate``: the input state's storage is reused for the output and the input object is invalidated
    (``False`` keeps it, at the cost of a copy per step). ``dynamic_batch`` compiles for any batch size, so a
    smaller last batch does not recompile. ``data_parallel``: average gradients (and the logged loss) over the
    ranks of the default process group inside the step; ``None`` does so whenever torch.distributed runs
    with more than one rank. Every rank must then call the step the same number of times.

    ``metrics`` holds detached tensors: ``loss`` (unscaled), other logged loss entries, ``lr``, ``grad_norm``
    when clipping by norm and ``loss_scale`` with fp16.
    """
    if next(model.parameters(), None) is None:
        raise ValueError("make_train_step: the model has no parameters to train")
    return TrainStep(model, tx, loss_fn, compile, amp, accumulate, donate, dynamic_batch, data_parallel)


def make_eval_step(
    model: nn.Module,
    predict_fn: LossFn | None = None,
    *,
    compile: bool | str = "auto",
    amp: str | torch.dtype | None = None,
    dynamic_batch: bool = False,
) -> EvalStep:
    """A pure no-grad step ``eval_step(state, batch) -> outputs`` with the model in eval mode.

    ``predict_fn(model, batch)`` defaults to BaseModel's ``model(*batch, mode="predict")``.
    """
    if next(model.parameters(), None) is None:
        raise ValueError("make_eval_step: the model has no parameters")
    return EvalStep(model, predict_fn, compile, amp, dynamic_batch)
