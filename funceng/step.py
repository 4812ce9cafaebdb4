"""Pure train and eval steps: ``train_step(state, batch) -> (state, metrics)``, ``eval_step(state, batch)``.

Everything that differs between runs is chosen once, when a step is built: how gradients are taken
(`funceng.grads`: the bound model and autograd in eager mode, ``torch.func`` in one compiled graph, FSDP2's own
backward for a sharded model), how they are reduced across ranks, and whether the loss is scaled
(`funceng.loss_scale`). The body then reads like the math: grads -> reduce -> unscale -> ``tx.update`` -> apply
-> step + 1 -> metrics. It runs over the state's flat leaves, so compiled, a new learning rate or a new state is
a new input, never a recompilation.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from funceng import binding, dist, optim, tree
from funceng.grads import EagerGradients, FunctionalGradients, LossFn, ModelFunction, ShardedGradients, autocast
from funceng.loss import call_model
from funceng.loss_scale import DynamicScaling, NoScaling, parse_amp
from funceng.rng import StateGenerators
from funceng.sharding import check_shares_storage, is_sharded
from funceng.state import REQUIRED_KEYS, TrainState, check_leaves, check_state, donate, expected_state, trainable_names

LOGGED_OPT_STATE = ("lr", "grad_norm")  # optimizer-state leaves reported in the metrics when present


class _Layout:
    """Where each part of a state sits in its flat list of leaves, and what each leaf must be: taken from the
    model and optimizer the step was built for (`funceng.state.expected_state`), never from a state passed in."""

    def __init__(self, expected: dict, devices: list[torch.device]):
        self.template, self.expected = tree.flatten(expected)
        self.devices, self.paths = devices, tree.leaf_paths(self.template)
        self.unflatten = tree.unflattener(self.template)
        self.param_names = list(self.template["params"])
        self.buffer_names = list(self.template["buffers"])
        found = {name: tree.find_leaf(self.template.get("opt_state", {}), name) for name in LOGGED_OPT_STATE}
        self.logged = {name: index for name, index in found.items() if index is not None}
        self.rng = self.template.get("rng")

    def leaves(self, state: Any) -> list[Tensor]:
        """The leaves of ``state``, checked against the expected structure, shapes, dtypes and devices."""
        template, leaves = tree.flatten(state)
        if template != self.template:
            raise ValueError(
                "this state does not match the model and optimizer this step was built for: "
                f"{tree.describe_difference(self.template, template)}. Was it created for another model or "
                "optimizer (e.g. without the same `accumulate`, or before freezing parameters)?"
            )
        check_leaves(self.expected, self.devices, leaves, self.paths)
        return leaves


def resolve_compile(compile: bool | str | dict, model: nn.Module) -> dict | None:
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


def _refuse_function_transforms() -> None:
    """A step donates its state and binds a module, so it cannot run under ``torch.func.vmap`` (or ``grad``):
    say so at once rather than deep inside the generator code."""
    interpreter = torch._C._functorch.peek_interpreter_stack()
    if interpreter is not None:
        raise RuntimeError(
            f"a funceng step cannot run inside torch.func.{str(interpreter.key()).rpartition('.')[2].lower()}: it "
            "updates its state in place. To train several models at once in one vmapped step, build a population "
            "(funceng.population.create) and its step (funceng.population_step.make_population_step); see "
            "docs/population.md"
        )


@contextlib.contextmanager
def _naming_captured_mutations(compiled: bool) -> Iterator[None]:
    """A compiled step differentiates with ``torch.func.grad``, which lets the loss update in place only tensors it
    receives: the state's, and the buffers of the modules the loss function names (`funceng.grads`). Another
    module's buffers, reached through an object, make torch raise a message that names neither the cause nor the
    way out; this one does."""
    try:
        yield
    except Exception as error:
        if not (compiled and "mutate a captured Tensor" in str(error)):
            raise
        raise RuntimeError(
            "the loss function updates, in place, a tensor that is not part of this step's state: most likely the "
            "buffers of another module in training mode (BatchNorm statistics of a discriminator or a teacher) "
            "that the loss reaches through an object or a container. A compiled step passes in the buffers of the "
            "modules a loss function names directly (in its closure or its globals); torch.func.grad forbids "
            "updating others. Name that module directly in the loss function, put it in eval mode for this step, "
            "or build this step with compile=False, where it works"
        ) from error


def _mark_batch_dynamic(tensor: Tensor) -> Tensor:
    """Compiles for any batch size: a smaller last batch then reuses the graph instead of recompiling."""
    if tensor.ndim and tensor.shape[0] > 1:
        torch._dynamo.mark_dynamic(tensor, 0)
    return tensor


class _Step:
    """What train and eval steps share: compile and AMP options, and the layout of the states they take (from the
    model and optimizer). The leaves of the last state this step returned or saw are kept while that state lives,
    so the same state coming back is not flattened (nor checked) again."""

    binds_model = False  # whether a new state is bound to the model (`funceng.binding`) before the first call

    def __init__(self, model: nn.Module, fn: Callable, compile: bool | str | dict, amp: Any, dynamic_batch: bool):
        self.model = model
        self.sharded = is_sharded(model)
        if self.sharded and compile == "auto":
            compile = False
        if self.sharded and compile is not False:
            raise ValueError(
                "compile: a model sharded with fully_shard runs its step eagerly (FSDP2 gathers and frees parameters "
                "in module hooks, which a whole-step graph cannot hold); compile its blocks instead, with "
                "torch.compile(block) before sharding, and pass compile=False"
            )
        self.compile_options = resolve_compile(compile, model)
        self.compiled = self.compile_options is not None
        self.amp_dtype, self.scaling = parse_amp(amp)
        self.dynamic_batch = dynamic_batch and self.compiled
        self.cuda_graphs = self.compiled and self.compile_options.get("mode") in ("reduce-overhead", "max-autotune")
        self.device_type = next(model.parameters()).device.type
        self._fn = torch.compile(fn, **self.compile_options) if self.compiled else fn
        self._layout: _Layout | None = None
        self._known: tuple[weakref.ref, list[Tensor]] | None = None  # (a live state, its leaves)

    def _parts(self, state: TrainState) -> Any:
        """The part of a state this step reads (all of it for training)."""
        return state

    def _expected(self) -> tuple[dict, list[torch.device]]:
        raise NotImplementedError

    def _leaves_of(self, state: TrainState) -> list[Tensor]:
        """The state's flat leaves: flattened, checked and prepared the first time this state object is seen."""
        check_state(state)
        _refuse_function_transforms()
        if self._known is not None and self._known[0]() is state and state.is_locked:
            return self._known[1]
        if self._layout is None:
            self._layout = _Layout(*self._expected())
        leaves = self._layout.leaves(self._parts(state))
        self._prepare_state(leaves)
        self._remember(state, leaves)
        return leaves

    def _remember(self, state: TrainState, leaves: list[Tensor]) -> None:
        self._known = (weakref.ref(state, self._forget), leaves)

    def _forget(self, dead: weakref.ref) -> None:
        """A state this step remembered is gone: drop its leaves too (no hidden copy of a state stays alive)."""
        if self._known is not None and self._known[0] is dead:
            self._known = None

    def _prepare_state(self, leaves: list[Tensor]) -> None:
        """Checks and marks made once per new state, outside the (compiled) function."""
        template = self._layout.template
        params = {name: leaves[template["params"][name]] for name in self._layout.param_names}
        if self.sharded:  # a sharded model computes with its own parameters, so a copy would not be trained
            check_shares_storage(self.model, list(params.values()))
        elif self.binds_model:  # the model shows the trained state's weights; its own earlier copy is freed
            binding.bind(self.model, params, {n: leaves[template["buffers"][n]] for n in self._layout.buffer_names})
        if self.cuda_graphs:  # donation keeps the state's tensors at their addresses
            for leaf in leaves:
                torch._dynamo.mark_static_address(leaf)

    def _prepare(self, batch: Any, training: bool) -> None:
        """What every call sets up outside the (compiled) function: the model's mode, a dynamic batch size."""
        if self.model.training != training:
            self.model.train(training)
        if self.dynamic_batch:
            tree.map_tensors(_mark_batch_dynamic, batch)


def _no_reduction(grads: dict, loss: Tensor, logs: dict) -> tuple[dict, Tensor, dict]:
    return grads, loss, logs


def _mean_across_ranks(grads: dict, loss: Tensor, logs: dict) -> tuple[dict, Tensor, dict]:
    """Gradients, loss and logged values averaged over the data-parallel ranks, in one collective per dtype.

    Each rank's loss is the mean over its own B/W samples, so the average is the loss (and gradient) of the
    global batch. fp16 gradients are averaged while still scaled: an overflow on any rank reaches every rank,
    and all skip the step together.
    """
    averaged = dist.mean_across_ranks([*grads.values(), loss, *logs.values()])
    n = len(grads)
    return dict(zip(grads, averaged[:n])), averaged[n], dict(zip(logs, averaged[n + 1 :]))


def _mean_logs_across_ranks(grads: dict, loss: Tensor, logs: dict) -> tuple[dict, Tensor, dict]:
    """FSDP2 averages sharded gradients itself; the logged loss is still the global batch's."""
    _, loss, logs = _mean_across_ranks({}, loss, logs)
    return grads, loss, logs


class TrainStep(_Step):
    """``step(state, batch) -> (new_state, metrics)``; built by `make_train_step`."""

    binds_model = True  # modules that losses close over (a GAN's discriminator) compute with their trained state
    generators = StateGenerators  # how the step draws from the state's generators

    def __init__(
        self,
        model,
        tx,
        loss_fn,
        compile,
        amp,
        accumulate,
        donate,
        dynamic_batch=False,
        data_parallel=None,
        schedule=None,
        privacy=None,
    ):
        super().__init__(model, self._step_on_leaves, compile, amp, dynamic_batch)
        self.schedule = schedule
        if self.sharded and not donate:
            raise ValueError(
                "donate=False: a sharded model's state shares storage with the model, so every step "
                "must update it in place (donate=True)"
            )
        self.tx = optim.accumulate(tx, accumulate)
        self.loss_fn = loss_fn or (lambda m, batch: call_model(m, batch, "loss"))
        self.donate = donate
        self.trainable = trainable_names(model)
        if not self.trainable:
            raise ValueError("make_train_step: every parameter of the model has requires_grad=False: nothing to train")
        self.data_parallel = dist.get_world_size() > 1 if data_parallel is None else data_parallel
        self.privacy = privacy
        if privacy is not None:  # DP-SGD (`funceng.privacy`) brings its own gradients
            self._grads = privacy.gradients(self, accumulate=accumulate, data_parallel=self.data_parallel)
        else:
            gradients = FunctionalGradients if self.compiled else ShardedGradients if self.sharded else EagerGradients
            self._grads = gradients(model, self.loss_fn, self.amp_dtype, self.device_type, self.trainable)
        reduce = _mean_across_ranks if self.data_parallel else _no_reduction
        self._reduce = _mean_logs_across_ranks if self.sharded else reduce
        fp16 = self.amp_dtype == torch.float16
        self._loss_scale = DynamicScaling(self.sharded, **self.scaling) if fp16 else NoScaling()
        self._generators = None

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Tensor]]:
        if not self.donate:
            check_state(state)  # a donated state has nothing to clone
            state = state.clone()
        leaves = self._leaves_of(state)
        self._prepare(batch, training=True)
        if self._generators is None:
            self._generators = self.generators(self._layout.rng)
        with self._generators(leaves), _naming_captured_mutations(self.compiled):
            metrics = self._fn(leaves, batch)
        if self.donate:
            state = donate(state)
        self._remember(state, leaves)
        return state, metrics

    def _parts(self, state: TrainState) -> Any:
        """The six keys of a TrainState; entries a hook or user added (EMA weights, say) are carried along."""
        return {key: state[key] for key in REQUIRED_KEYS}

    def _expected(self) -> tuple[dict, list[torch.device]]:
        return expected_state(self.model, self.tx)

    def _step_on_leaves(self, leaves: list[Tensor], batch: Any, *schedule_args: Any) -> dict[str, Tensor]:
        s = self._layout.unflatten(leaves)
        params, loss_scale = s["params"], s["loss_scale"]
        buffers_before = self._loss_scale.remember(s["buffers"])  # fp16: a skipped step leaves them too
        grads, loss, logs = self._grads(params, s["buffers"], batch, self._loss_scale.factor(loss_scale))
        with torch.no_grad():  # a loss over other trainable modules must leave no autograd history in the state
            grads, loss, logs = self._reduce(grads, loss, logs)
            grads, finite = self._loss_scale.unscale(grads, loss_scale)
            self._loss_scale.restore_if_skipped(s["buffers"], buffers_before, finite)
            trained = params if len(grads) == len(params) else {name: params[name] for name in grads}
            if self.schedule is not None:  # this iteration's hyperparameters, even if the update is skipped
                self.schedule(s["step"], s["opt_state"], *schedule_args)
            updates = optim.update_in_place(self.tx, grads, s["opt_state"], trained, only_if=finite)
            optim.apply_updates(trained, updates)
            s["step"].add_(1)
            return self._metrics(leaves, loss, logs, loss_scale)

    def _metrics(self, leaves: list[Tensor], loss: Tensor, logs: dict, loss_scale: dict) -> dict[str, Tensor]:
        metrics = {"loss": loss, **{k: v for k, v in logs.items() if k != "loss"}}
        metrics.update({name: leaves[index].clone() for name, index in self._layout.logged.items()})
        return {**metrics, **self._loss_scale.logged(loss_scale)}


class EvalStep(_Step):
    """``eval_step(state, batch) -> outputs`` with no gradients; built by `make_eval_step`."""

    def __init__(self, model, predict_fn, compile, amp, dynamic_batch=False):
        super().__init__(model, self._predict, compile, amp, dynamic_batch)
        self.predict_fn = predict_fn or (lambda m, batch: call_model(m, batch, "predict"))
        if self.compiled:
            self._forward = ModelFunction(model, self.predict_fn).call_with
        elif self.sharded:  # the model computes with the state's rows already
            self._forward = lambda params, buffers, batch: self.predict_fn(model, batch)
        else:
            self._forward = self._forward_bound

    def _parts(self, state: TrainState) -> Any:
        return {"params": state["params"], "buffers": state["buffers"]}

    def _expected(self) -> tuple[dict, list[torch.device]]:
        return expected_state(self.model, None)

    def __call__(self, state: TrainState, batch: Any) -> Any:
        leaves = self._leaves_of(state)
        self._prepare(batch, training=False)
        s = self._layout.unflatten(leaves)
        with torch.no_grad():
            return self._fn(s["params"], s["buffers"], batch)

    def _predict(self, params: dict, buffers: dict, batch: Any) -> Any:
        with autocast(self.device_type, self.amp_dtype):
            return self._forward(params, buffers, batch)

    def _forward_bound(self, params: dict, buffers: dict, batch: Any) -> Any:
        binding.bind(self.model, params, buffers)
        return self.predict_fn(self.model, batch)


def make_train_step(
    model: nn.Module,
    tx: optim.GradientTransformation,
    loss_fn: LossFn | None = None,
    *,
    compile: bool | str | dict = "auto",
    amp: str | torch.dtype | None = None,
    accumulate: int = 1,
    donate: bool = True,
    dynamic_batch: bool = False,
    data_parallel: bool | None = None,
    schedule: Callable[[Tensor, dict], None] | None = None,
    privacy: Any = None,
) -> TrainStep:
    """A pure train step ``step(state, batch) -> (new_state, metrics)``.

    ``loss_fn(model, batch)`` is plain PyTorch returning a scalar or a dict with ``"loss"``; ``None`` calls a
    BaseModel-style ``model(*batch, mode="loss")``. It may run through other modules (a GAN's discriminator, a
    teacher): only ``model``'s parameters are differentiated and the optimizer runs outside autograd. Parameters
    with ``requires_grad=False`` when the step is built are frozen: no gradient, no update, no optimizer state
    (create the state after freezing). The first call checks the state against ``model`` and ``tx`` and names
    the first leaf that differs. ``compile``: ``True`` compiles the whole step with
    ``fullgraph=True``; ``"auto"`` compiles on CUDA only; a dict adds ``torch.compile`` options
    (``{"mode": "reduce-overhead"}``: CUDA graphs, with the state's tensors marked as static addresses).
    ``amp``: ``"bf16"`` autocasts; ``"fp16"`` also scales the loss dynamically and skips non-finite steps
    without a host sync (a dict sets GradScaler's constants, `funceng.loss_scale.parse_amp`).
    ``accumulate=k`` applies the mean of ``k`` consecutive steps' gradients every k-th step (build the state with
    ``optim.accumulate(tx, k)``).
    ``donate``: the input state's storage is reused for the output and the input object is invalidated
    (``False`` keeps it, at the cost of a copy per step). ``dynamic_batch`` compiles for any batch size, so a
    smaller last batch does not recompile. ``data_parallel``: average gradients (and the logged loss) over the
    ranks of the default process group inside the step; ``None`` does so whenever torch.distributed runs
    with more than one rank. Every rank must then call the step the same number of times.
    ``schedule(step, opt_state)``: called inside the step, before the update, with the 0-d count of steps
    taken so far and the optimizer state; it writes scheduled hyperparameters into the state (the Runner's
    MMEngine schedulers, `funceng.runner.param_scheduler.ScheduledHyperparams.write`, index tables with it).
    ``privacy``: `funceng.privacy.DPSGD` takes clipped, noised per-example gradients instead (DP-SGD).

    ``metrics`` holds detached tensors: the (unscaled) ``loss``, other logged entries, ``lr``, clipping's
    ``grad_norm``, fp16's ``loss_scale``.
    """
    if next(model.parameters(), None) is None:
        raise ValueError("make_train_step: the model has no parameters to train")
    return TrainStep(
        model, tx, loss_fn, compile, amp, accumulate, donate, dynamic_batch, data_parallel, schedule, privacy
    )


def make_eval_step(
    model: nn.Module,
    predict_fn: LossFn | None = None,
    *,
    compile: bool | str | dict = "auto",
    amp: str | torch.dtype | None = None,
    dynamic_batch: bool = False,
) -> EvalStep:
    """A pure no-grad step ``eval_step(state, batch) -> outputs`` with the model in eval mode.

    ``predict_fn(model, batch)`` defaults to BaseModel's ``model(*batch, mode="predict")``.
    """
    if next(model.parameters(), None) is None:
        raise ValueError("make_eval_step: the model has no parameters")
    return EvalStep(model, predict_fn, compile, amp, dynamic_batch)
