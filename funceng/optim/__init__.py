"""Functional optimizers in the optax style: pure ``(init, update)`` pairs composed with `chain`; and, for
MMEngine code, its imperative optimizer wrappers (`OptimWrapper`, ...; `funceng.optim.imperative`) and
``build_optim_wrapper`` / ``DefaultOptimWrapperConstructor`` (`funceng.optim.constructors`)."""

from funceng.optim.adaptive import adadelta, adafactor, adagrad, adamax, nadam, radam, rmsprop
from funceng.optim.alias import adam, adamw, sgd
from funceng.optim.base import (
    GradientTransformation,
    OptState,
    Params,
    Updates,
    apply_if,
    apply_updates,
    chain,
    identity,
    update_in_place,
)
from funceng.optim.classic import asgd, rprop, sparse_adam
from funceng.optim.constructors import DefaultOptimWrapperConstructor, MultiOptimWrapperConstructor, build_optim_wrapper
from funceng.optim.hyperparams import inject_hyperparams
from funceng.optim.imperative import AmpOptimWrapper, OptimWrapper, OptimWrapperDict
from funceng.optim.muon import muon
from funceng.optim.transforms import (
    add_decayed_weights,
    clip_by_global_norm,
    clip_by_value,
    negate,
    scale_by_adam,
    scale_by_learning_rate,
    set_to_zero,
    trace,
)
from funceng.optim.wrappers import accumulate, freeze, masked, partition

__all__ = [
    "AmpOptimWrapper",
    "DefaultOptimWrapperConstructor",
    "GradientTransformation",
    "MultiOptimWrapperConstructor",
    "OptimWrapper",
    "OptimWrapperDict",
    "OptState",
    "Params",
    "Updates",
    "accumulate",
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decayed_weights",
    "apply_if",
    "apply_updates",
    "asgd",
    "build_optim_wrapper",
    "chain",
    "clip_by_global_norm",
    "clip_by_value",
    "freeze",
    "identity",
    "inject_hyperparams",
    "masked",
    "muon",
    "nadam",
    "negate",
    "radam",
    "rmsprop",
    "rprop",
    "partition",
    "scale_by_adam",
    "scale_by_learning_rate",
    "set_to_zero",
    "sgd",
    "sparse_adam",
    "trace",
    "update_in_place",
]
