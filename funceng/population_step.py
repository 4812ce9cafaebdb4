"""Train and eval steps over a population (`funceng.population`): forward, backward and optimizer of all N members
in one ``torch.func.vmap`` of the single-model step, eager or compiled into one graph.

The body is `funceng.step.TrainStep`'s own, so every option that works per member works here (freezing,
accumulation, bf16 autocast, clipping, injected hyperparameters, schedules, DP-SGD). vmap has no batching rules
for the multi-tensor ``torch._foreach_*`` kernels the optimizers use, so while a population step runs they are
replaced by per-tensor loops of the same operations (`foreach_per_tensor`): the same arithmetic, which a compiled
step fuses again.

Randomness (dropout): every member draws its own random numbers (vmap's ``randomness="different"``), in one
batched draw from the generator of member 0, whose state the step advances; the generators of the other members
are kept for when they train alone (`funceng.population.member`). A population of one is therefore exactly a
single-model run, dropout included.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from funceng import tree
from funceng.grads import FunctionalGradients, LossFn, ModelFunction
from funceng.optim import GradientTransformation
from funceng.population import hyperparameter_leaves
from funceng.rng import StateGenerators
from funceng.state import expected_state
from funceng.step import EvalStep, TrainStep, resolve_compile

# -- the optimizers' multi-tensor kernels as per-tensor loops ----------------------------------------------------

_FOREACH_NAMES = sorted(name for name in dir(torch) if name.startswith("_foreach_"))


def _per_tensor(name: str) -> Callable:
    """``torch._foreach_<op>`` as a loop of ``torch.<op>`` (in-place forms: compute, then ``copy_`` back)."""
    op = name[len("_foreach_") :]
    in_place = op.endswith("_")
    base = op[:-1] if in_place else op

    def run(*args: Any, **kwargs: Any) -> list[Tensor] | None:
        results = []
        for i in range(len(args[0])):
            picked = [arg[i] if isinstance(arg, (list, tuple)) else arg for arg in args]
            if base == "copy":
                picked[0].copy_(picked[1])
                continue
            if base == "zero":
                picked[0].zero_()
                continue
            if base == "lerp" and isinstance(picked[2], Tensor):  # the foreach kernel casts the weight; lerp does not
                picked[2] = picked[2].to(picked[0].dtype)
            result = (
                torch.linalg.vector_norm(*picked, **kwargs)
                if base == "norm"
                else getattr(torch, base)(*picked, **kwargs)
            )
            if in_place:
                picked[0].copy_(result)
            else:
                results.append(result)
        return None if in_place else results

    run.__name__ = name
    return run


# ``torch`` as funceng's modules see it during a population step: torch's own namespace, its foreach kernels
# replaced by loops. torch itself is left alone (torch.compile keeps rules keyed on torch's own functions).
TORCH_WITH_LOOPS = types.ModuleType("torch", "torch, with its torch._foreach_* kernels as per-tensor loops")
TORCH_WITH_LOOPS.__dict__.update({k: v for k, v in vars(torch).items() if k not in ("__name__", "__doc__")})
TORCH_WITH_LOOPS.__dict__.update({name: _per_tensor(name) for name in _FOREACH_NAMES})

_swap_lock = threading.RLock()
_swap_depth = 0


_modules_using_torch: tuple[int, list[types.ModuleType]] = (-1, [])  # (len(sys.modules) when listed, the list)


def _funceng_modules_using_torch() -> list[types.ModuleType]:
    """funceng's modules (this one excepted) with a global ``torch``; listed again only when modules were added."""
    global _modules_using_torch
    if _modules_using_torch[0] != len(sys.modules):
        found = [
            module
            for name, module in list(sys.modules.items())
            if (name == "funceng" or name.startswith("funceng.")) and name != __name__
            and vars(module).get("torch") in (torch, TORCH_WITH_LOOPS)
        ]  # fmt: skip
        _modules_using_torch = (len(sys.modules), found)
    return _modules_using_torch[1]


@contextlib.contextmanager
def foreach_per_tensor() -> Iterator[None]:
    """Within the block, funceng's modules (the optimizers, loss scaling) call ``torch._foreach_*`` as per-tensor
    loops, which vmap can batch. The loops compute the same values, so another thread stepping meanwhile gets the
    right result, only more slowly."""
    global _swap_depth
    with _swap_lock:
        if _swap_depth == 0:
            for module in _funceng_modules_using_torch():
                module.torch = TORCH_WITH_LOOPS
        _swap_depth += 1
    try:
        yield
    finally:
        with _swap_lock:
            _swap_depth -= 1
            if _swap_depth == 0:
                for module in _funceng_modules_using_torch():
                    module.torch = torch


# -- the steps ----------------------------------------------------------------------------------------------------


def _with_members(expected: Any, members: int) -> Any:
    """The expected state of one member with a leading member dimension on every leaf."""
    if isinstance(expected, Tensor):
        return torch.empty((members, *expected.shape), dtype=expected.dtype, device="meta")
    return {key: _with_members(value, members) for key, value in expected.items()}


def _static_shapes(compile: Any, model: nn.Module, dynamic_batch: bool) -> dict | bool:
    """Compile options with static shapes: torch.compile otherwise makes the member dimension symbolic when a
    second population of another size compiles, which the batching rules of some layers (BatchNorm's backward)
    cannot trace. A dynamic batch keeps torch's default."""
    options = resolve_compile(compile, model)
    if options is None:
        return False
    return options if dynamic_batch else {"dynamic": False, **options}


class _MemberGenerators(StateGenerators):
    """The state's generators for a population: member 0's row drives the batched draw of all members."""

    @contextlib.contextmanager
    def __call__(self, leaves: list[Tensor]) -> Iterator[None]:
        rows = [leaves[self.cpu]] + ([leaves[self.cuda]] if self.cuda is not None else [])
        first = [row[0].clone() for row in rows]  # a generator reads a whole tensor: never a row of a stack
        indices = {"cpu": 0} | ({"cuda": 1} if self.cuda is not None else {})
        with StateGenerators(indices)(first):
            yield
        for row, new in zip(rows, first):
            row[0].copy_(new)


def _check_member_batch(batch: Any, members: int) -> None:
    found: list[Tensor] = []
    tree.map_tensors(found.append, batch)
    for tensor in found:
        if tensor.ndim == 0 or tensor.shape[0] != members:
            raise ValueError(
                f"batch_per_member=True: every tensor of the batch needs a leading member dimension of {members}; "
                f"got one of shape {tuple(tensor.shape)}"
            )


class PopulationTrainStep(TrainStep):
    """``step(population, batch) -> (population, metrics)``, metrics with one entry per member; built by
    `make_population_step`."""

    binds_model = False  # the model keeps its single-member shapes; the members' tensors are passed in
    generators = _MemberGenerators

    def __init__(self, model, tx, loss_fn, members, batch_per_member, hyperparam_scales, **options):
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise ValueError(f"make_population_step: members must be a positive int, got {members!r}")
        self.members, self.batch_per_member = members, batch_per_member
        self.user_schedule = options.get("schedule")
        if hyperparam_scales:
            if self.user_schedule is None:
                raise ValueError(
                    "make_population_step: hyperparam_scales scale what a schedule writes; without a schedule, "
                    "give each member its values once with funceng.population.set_hyperparams"
                )
            options["schedule"] = self._scaled_schedule
        options["compile"] = _static_shapes(options["compile"], model, options.get("dynamic_batch", False))
        super().__init__(model, tx, loss_fn, **options)
        if self.sharded:
            raise ValueError("make_population_step: a model sharded with fully_shard cannot be vmapped over members")
        if self.data_parallel:
            raise ValueError(
                "make_population_step: a population trains in one process; collectives cannot run inside vmap. "
                "Pass data_parallel=False (each rank then trains its own population)"
            )
        if self.amp_dtype == torch.float16:
            raise ValueError(
                "make_population_step: amp='fp16' is not supported (the loss-scaling kernels have no vmap rule); "
                "use amp='bf16', which needs no loss scale"
            )
        if self.privacy is None:  # the vmapped body differentiates with torch.func, compiled or not
            self._grads = FunctionalGradients(model, self.loss_fn, self.amp_dtype, self.device_type, self.trainable)
        self._scales = self._member_scales(hyperparam_scales or {})
        compiled_or_eager = self._fn

        def run(leaves: list[Tensor], batch: Any) -> dict[str, Tensor]:
            if batch_per_member:
                _check_member_batch(batch, members)
            with foreach_per_tensor(), self._naming_vmap_failures():
                return compiled_or_eager(leaves, batch, self._scales)

        self._fn = run

    @contextlib.contextmanager
    def _naming_vmap_failures(self) -> Iterator[None]:
        """What vmap cannot batch fails deep in torch with a message about kernels; these say why and what to do."""
        try:
            yield
        except RuntimeError as error:
            if "Batching rule not implemented for aten::_foreach" in str(error):
                raise RuntimeError(
                    "a torch._foreach_* kernel ran inside the population step outside funceng's optimizers (a custom "
                    "transform or loss?): vmap cannot batch those kernels. Use the per-tensor operations instead "
                    f"(torch.add_, torch.lerp, ...) in code that runs inside the step ({error})"
                ) from error
            if self.compiled or self.amp_dtype is None or "expected scalar type" not in str(error):
                raise
            raise RuntimeError(
                f"amp={self.amp_dtype} in an eager population step: torch's vmap of a normalisation layer "
                f"(BatchNorm) under autocast mixes dtypes ({error}). Compile the step (compile=True), where it "
                "works, or train the population in float32"
            ) from error

    def _member_scales(self, scales: Mapping[str, Sequence[float] | Tensor]) -> dict[str, Tensor]:
        device = next(self.model.parameters()).device
        out = {}
        for name, value in scales.items():
            column = torch.as_tensor(value, dtype=torch.float64).to(device)
            if column.shape != (self.members,):
                raise ValueError(
                    f"hyperparam_scales[{name!r}] needs one value per member ({self.members}), got shape "
                    f"{tuple(column.shape)}"
                )
            out[name] = column
        return out

    def _expected(self) -> tuple[dict, list[torch.device]]:
        expected, devices = expected_state(self.model, self.tx)
        return _with_members(expected, self.members), devices

    def _step_on_leaves(self, leaves: list[Tensor], batch: Any, scales: dict) -> dict[str, Tensor]:
        in_dims = (0, 0 if self.batch_per_member else None, 0)
        return torch.func.vmap(self._member_step, in_dims=in_dims, randomness="different")(leaves, batch, scales)

    def _member_step(self, leaves: list[Tensor], batch: Any, scales: dict) -> dict[str, Tensor]:
        return TrainStep._step_on_leaves(self, leaves, batch, *((scales,) if scales else ()))

    def _scaled_schedule(self, step: Tensor, opt_state: dict, scales: dict) -> None:
        """The user's schedule, then this member's scale on each scaled hyperparameter it wrote."""
        self.user_schedule(step, opt_state)
        for name, scale in scales.items():
            for _, target in hyperparameter_leaves(opt_state, name, "hyperparam_scales"):
                target.mul_(scale)  # vmap batches per-tensor ops, not foreach kernels


class PopulationEvalStep(EvalStep):
    """``eval_step(population, batch) -> outputs`` with a leading member dimension; built by
    `make_population_eval_step`."""

    def __init__(self, model, predict_fn, members, batch_per_member, **options):
        self.members, self.batch_per_member = members, batch_per_member
        options["compile"] = _static_shapes(options["compile"], model, options.get("dynamic_batch", False))
        super().__init__(model, predict_fn, **options)
        if self.sharded:
            raise ValueError("make_population_eval_step: a sharded model cannot be vmapped over members")
        self._forward = ModelFunction(model, self.predict_fn).call_with  # never binds the single-member model

    def _expected(self) -> tuple[dict, list[torch.device]]:
        expected, devices = expected_state(self.model, None)
        return _with_members(expected, self.members), devices

    def _predict(self, params: dict, buffers: dict, batch: Any) -> Any:
        if self.batch_per_member:
            _check_member_batch(batch, self.members)
        in_dims = (0, 0, 0 if self.batch_per_member else None)
        return torch.func.vmap(self._member_predict, in_dims=in_dims, randomness="different")(params, buffers, batch)

    def _member_predict(self, params: dict, buffers: dict, batch: Any) -> Any:
        return EvalStep._predict(self, params, buffers, batch)


def make_population_step(
    model: nn.Module,
    tx: GradientTransformation,
    loss_fn: LossFn | None = None,
    *,
    members: int,
    batch_per_member: bool = False,
    hyperparam_scales: Mapping[str, Sequence[float] | Tensor] | None = None,
    compile: bool | str | dict = "auto",
    amp: str | torch.dtype | None = None,
    accumulate: int = 1,
    donate: bool = True,
    dynamic_batch: bool = False,
    data_parallel: bool | None = False,
    schedule: Callable[[Tensor, dict], None] | None = None,
    privacy: Any = None,
) -> PopulationTrainStep:
    """A train step over a population of ``members`` states of ``model`` (`funceng.population.create`):
    ``step(population, batch) -> (population, metrics)``, every metric with one entry per member.

    Member ``i`` follows exactly the trajectory of `funceng.make_train_step` with the same options on
    ``population.member(population, i)`` (to float rounding: vmap batches the matrix products). ``batch``: one batch
    for every member, or with ``batch_per_member=True`` one per member (every tensor with a leading dimension of
    ``members``). ``hyperparam_scales``: with a ``schedule`` (which writes the same values for every member), a
    per-member factor on each named hyperparameter it wrote (``{"lr": [0.5, 1, 2]}``: an lr sweep around a
    schedule). The other options are `funceng.make_train_step`'s; ``amp="fp16"`` and ``data_parallel=True`` are
    refused.
    """
    if next(model.parameters(), None) is None:
        raise ValueError("make_population_step: the model has no parameters to train")
    return PopulationTrainStep(
        model, tx, loss_fn, members, batch_per_member, hyperparam_scales,
        compile=compile, amp=amp, accumulate=accumulate, donate=donate, dynamic_batch=dynamic_batch,
        data_parallel=data_parallel, schedule=schedule, privacy=privacy,
    )  # fmt: skip


def make_population_eval_step(
    model: nn.Module,
    predict_fn: LossFn | None = None,
    *,
    members: int,
    batch_per_member: bool = False,
    compile: bool | str | dict = "auto",
    amp: str | torch.dtype | None = None,
    dynamic_batch: bool = False,
) -> PopulationEvalStep:
    """A no-grad step ``eval_step(population, batch) -> outputs`` evaluating every member: each tensor of the
    outputs gains a leading member dimension. ``predict_fn`` must return tensors (vmap stacks them); to evaluate
    with Python objects (MMEngine data samples), evaluate ``population.member(state, i)`` with `make_eval_step`."""
    if next(model.parameters(), None) is None:
        raise ValueError("make_population_eval_step: the model has no parameters")
    return PopulationEvalStep(
        model, predict_fn, members, batch_per_member, compile=compile, amp=amp, dynamic_batch=dynamic_batch
    )
