"""MMEngine's tutorials and examples (runner, hooks, registry, config, optim_wrapper, evaluation, model, dataset,
the GAN example), shrunk to seconds on a CPU. Each function takes the package to import from, ``"mmengine"`` or
``"funceng"``: the code is the same for both but for that name, as a user moving a project would change it.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def lib(pkg: str, module: str):
    return import_module(f"{pkg}.{module}")


# -- registry (advanced_tutorials/registry.md) ---------------------------------------------------------------------


def registry_tutorial(pkg: str) -> dict:
    Registry = lib(pkg, "registry").Registry
    base = Registry("activation")
    activations = Registry("activation", parent=base, scope="demo")

    @base.register_module()
    class Sigmoid(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x)

    @activations.register_module(name="Clip")
    class ReLU6(nn.Module):
        def __init__(self, inplace=False, top=6.0):
            super().__init__()
            self.inplace, self.top = inplace, top

    built = activations.build(dict(type="Clip", top=3.0), default_args=dict(inplace=True))
    activations.register_module(name="Clip", force=True, module=Sigmoid)
    return {
        "built": (type(built).__name__, built.inplace, built.top),
        "forced": type(activations.build(dict(type="Clip"))).__name__,
        "from_parent": type(activations.build(dict(type="Sigmoid"))).__name__,
        "contains": "Clip" in activations,
        "get_is_class": activations.get("Clip") is Sigmoid,
    }


# -- config (advanced_tutorials/config.md) -------------------------------------------------------------------------


def config_tutorial(pkg: str, folder: Path) -> dict:
    Config = lib(pkg, "config").Config
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "optimizer_cfg.py").write_text("optimizer = dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4)\n")
    (folder / "model_cfg.py").write_text("model = dict(type='ResNet', depth=50, norm=dict(type='BN', eps=1e-5))\n")
    (folder / "child.py").write_text(
        "_base_ = ['optimizer_cfg.py', 'model_cfg.py']\n"
        "optimizer = dict(lr=0.01)\n"
        "model = dict(norm=dict(_delete_=True, type='GN', num_groups=4))\n"
        "pipeline = [dict(type='Load'), dict(type='Resize', scale=32)]\n"
        "head = dict(type='Head', norm={{_base_.model.norm}}, lr={{ _base_.optimizer.lr }})\n"
        "work_dir = './work_dirs/{{ fileBasenameNoExtension }}'\n"
    )
    cfg = Config.fromfile(folder / "child.py")
    read = {"lr": cfg.optimizer.lr, "momentum": cfg.optimizer["momentum"], "norm": cfg.model.norm.to_dict()}
    cfg.merge_from_dict({"optimizer.momentum": 0.5, "model.depth": 101, "pipeline.1.scale": 64})
    cfg.dump(folder / "dumped.py")
    reloaded = Config.fromfile(folder / "dumped.py").to_dict()
    return {"read": read, "merged": cfg.to_dict(), "reloaded": reloaded}


# -- runner, hooks, logging (tutorials/runner.md, hook.md, advanced_tutorials/logging.md) ---------------------------


class TensorData(torch.utils.data.Dataset):
    """Regression samples as dicts, so MMEngine's default collate (pseudo_collate) keeps them as lists."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i], target=self.y[i])


def regression_model(pkg: str):
    BaseModel = lib(pkg, "model").BaseModel

    class Regressor(BaseModel):
        def __init__(self, init_cfg=None):
            super().__init__(init_cfg=init_cfg)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def forward(self, inputs, target, mode="tensor"):
            x, y = torch.stack(inputs), torch.stack(target)
            out = self.net(x).squeeze(-1)
            if mode == "loss":
                return dict(loss=F.mse_loss(out, y))
            return list(zip(out, y))

    return Regressor


def mse_metric(pkg: str):
    BaseMetric = lib(pkg, "evaluator").BaseMetric

    class MSE(BaseMetric):
        def process(self, data_batch, data_samples):
            for out, y in data_samples:
                self.results.append(float((out - y) ** 2))

        def compute_metrics(self, results):
            return dict(mse=sum(results) / len(results))

    return MSE


IN_ORDER = dict(type="DefaultSampler", shuffle=False)


def regression_runner_kwargs(pkg: str, work_dir: Path, **overrides) -> dict:
    torch.manual_seed(0)
    kwargs = dict(
        model=regression_model(pkg)(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            batch_size=4, dataset=TensorData(12, 0), sampler=dict(type="DefaultSampler", shuffle=False)
        ),
        val_dataloader=dict(batch_size=6, dataset=TensorData(6, 1), sampler=dict(type="DefaultSampler", shuffle=False)),
        val_evaluator=dict(type=mse_metric(pkg)),
        train_cfg=dict(by_epoch=True, max_epochs=2, val_interval=1),
        val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9)),
        default_hooks=dict(logger=dict(type="LoggerHook", interval=1)),
        randomness=dict(seed=0),
        experiment_name=f"{pkg}_{abs(hash(str(work_dir)))}",  # MMEngine keys its logger and visualizer by it
    )
    kwargs.update(overrides)
    return kwargs


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logged_losses(work_dir: Path) -> list[float]:
    scalars = sorted(Path(work_dir).glob("*/vis_data/scalars.json"))[-1]
    return [json.loads(line)["loss"] for line in scalars.read_text().splitlines() if "loss" in json.loads(line)]


def hook_recorder(pkg: str):
    Hook = lib(pkg, "hooks").Hook
    STAGES = [
        "before_run",
        "before_train",
        "before_train_epoch",
        "before_train_iter",
        "after_train_iter",
        "after_train_epoch",
        "before_val",
        "before_val_epoch",
        "after_val_epoch",
        "after_val",
        "after_train",
        "after_run",
    ]

    class Recorder(Hook):
        priority = "NORMAL"

        def __init__(self):
            self.calls = []

    def make(stage):
        def record(self, runner, *args, **kwargs):
            lr = runner.optim_wrapper.get_lr()["lr"][0] if stage.endswith("train_iter") else None
            self.calls.append((stage, runner.epoch, runner.iter, lr))

        return record

    for stage in STAGES:
        setattr(Recorder, stage, make(stage))
    return Recorder


# -- weight initialisation (advanced_tutorials/initialize.md) -------------------------------------------------------


def initialize_tutorial(pkg: str) -> dict:
    model_mod = lib(pkg, "model")

    class ToyNet(model_mod.BaseModule):
        def __init__(self, init_cfg):
            super().__init__(init_cfg)
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 2)
            self.block = Block(dict(type="Constant", layer="Linear", val=0.25))

    class Block(model_mod.BaseModule):
        def __init__(self, init_cfg):
            super().__init__(init_cfg)
            self.inner = nn.Linear(3, 3)

    init_cfg = [
        dict(type="Kaiming", layer="Conv2d", mode="fan_in"),
        dict(type="Xavier", layer="Linear", distribution="uniform", gain=2.0),
        dict(type="Normal", layer="LayerNorm", std=0.02, bias_prob=0.1, override=dict(name="head")),
        dict(type="TruncNormal", layer="_ConvNd", std=0.2),
        dict(type="Uniform", layer="NoSuchLayer"),  # matches nothing
    ]
    torch.manual_seed(0)
    model = ToyNet(init_cfg)
    model.init_weights()
    return weights(model)


def scalar_logger(pkg: str):
    """A hook that adds scalars to the message hub (advanced_tutorials/logging.md)."""
    Hook, MessageHub = lib(pkg, "hooks").Hook, lib(pkg, "logging").MessageHub

    class ScalarLogger(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            hub = MessageHub.get_current_instance()
            hub.update_scalar("train/double_loss", 2 * outputs["loss"])
            hub.update_scalar("train/iteration_seen", float(runner.iter))
            self.info = hub.get_info("iter"), hub.get_info("max_iters")

    return ScalarLogger


def check_invalid_loss_hook(pkg: str):
    """tutorials/hook.md's CheckInvalidLossHook, registered in HOOKS and named in custom_hooks."""
    Hook, HOOKS = lib(pkg, "hooks").Hook, lib(pkg, "registry").HOOKS

    @HOOKS.register_module(force=True)
    class CheckInvalidLossHook(Hook):
        checked: list = []

        def __init__(self, interval=50):
            self.interval = interval

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if self.every_n_train_iters(runner, self.interval):
                assert torch.isfinite(outputs["loss"]), runner.logger.info("loss become infinite or NaN!")
                CheckInvalidLossHook.checked.append((runner.iter, self.is_last_train_iter(runner)))

    CheckInvalidLossHook.checked = []
    return CheckInvalidLossHook


def model_steps_tutorial(pkg: str) -> dict:
    """tutorials/model.md: BaseModel.train_step / val_step driven by hand with an OptimWrapper."""
    OptimWrapper = lib(pkg, "optim").OptimWrapper
    collate = lib(pkg, "dataset").pseudo_collate
    torch.manual_seed(0)
    model = regression_model(pkg)()
    optim_wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.05))
    data = TensorData(12, 0)
    logs = []
    for start in range(0, 12, 4):
        batch = collate([data[i] for i in range(start, start + 4)])
        logs.append(model.train_step(batch, optim_wrapper))
    predictions = model.val_step(collate([data[i] for i in range(3)]))
    return {"weights": weights(model), "logs": logs, "predictions": predictions}


# -- optimizer wrapper (tutorials/optim_wrapper.md) ------------------------------------------------------------------


def optim_wrapper_tutorial(pkg: str) -> dict:
    OptimWrapper = lib(pkg, "optim").OptimWrapper
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optim_wrapper = OptimWrapper(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        accumulative_counts=2,
        clip_grad=dict(max_norm=0.5),
    )
    optim_wrapper.initialize_count_status(model, 0, 5)
    inputs, targets = torch.randn(5, 3, 4), torch.randn(5, 3, 2)
    for x, y in zip(inputs, targets):
        with optim_wrapper.optim_context(model):
            loss = F.mse_loss(model(x), y)
        optim_wrapper.update_params(loss)
    return {"weights": weights(model), "lr": optim_wrapper.get_lr(), "momentum": optim_wrapper.get_momentum()}


# -- evaluation (tutorials/evaluation.md) --------------------------------------------------------------------------


def offline_evaluation(pkg: str) -> dict:
    Evaluator = lib(pkg, "evaluator").Evaluator
    samples = [(torch.tensor(float(i)), torch.tensor(float(i % 3))) for i in range(7)]
    return Evaluator(mse_metric(pkg)()).offline_evaluate(samples, chunk_size=3)


# -- data (tutorials/dataset.md, advanced_tutorials/basedataset.md, tutorials/model.md) ------------------------------


def torchvision_dataset_tutorial(pkg: str, root: Path) -> dict:
    """tutorials/dataset.md: a torchvision dataset and its transforms registered, then named in a config."""
    import torchvision.transforms as tvt
    from torchvision.datasets import CIFAR10

    DATASETS, TRANSFORMS = lib(pkg, "registry").DATASETS, lib(pkg, "registry").TRANSFORMS
    Compose = lib(pkg, "dataset.base_dataset").Compose

    @DATASETS.register_module(name="Cifar10", force=True)
    def build_torchvision_cifar10(transform=None, **kwargs):
        if isinstance(transform, dict):
            transform = [transform]
        if isinstance(transform, (list, tuple)):
            transform = Compose(transform)
        return CIFAR10(**kwargs, transform=transform)

    TRANSFORMS.register_module("RandomCrop", module=tvt.RandomCrop, force=True)
    TRANSFORMS.register_module("RandomHorizontalFlip", module=tvt.RandomHorizontalFlip, force=True)
    TRANSFORMS.register_module("ToTensor", module=tvt.ToTensor, force=True)
    TRANSFORMS.register_module("Normalize", module=tvt.Normalize, force=True)
    norm_cfg = dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    loader = lib(pkg, "runner").Runner.build_dataloader(
        dict(
            batch_size=4,
            sampler=dict(type="DefaultSampler", shuffle=True, seed=0),
            dataset=dict(
                type="Cifar10",
                root=str(root),
                train=True,
                download=False,
                transform=[
                    dict(type="RandomCrop", size=32, padding=4),
                    dict(type="RandomHorizontalFlip"),
                    dict(type="ToTensor"),
                    dict(type="Normalize", **norm_cfg),
                ],
            ),
            collate_fn=dict(type="default_collate"),
        )
    )
    torch.manual_seed(0)
    images, labels = next(iter(loader))
    return {"images": images, "labels": labels, "batches": len(loader)}


def annotation_file_tutorial(pkg: str, folder: Path) -> dict:
    BaseDataset = lib(pkg, "dataset").BaseDataset
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    annotations = dict(
        metainfo=dict(classes=("cat", "dog"), version="1.0"),
        data_list=[dict(img_path=f"{i}.jpg", img_label=i % 2) for i in range(5)],
    )
    (folder / "annotations" / "train.json").write_text(json.dumps(annotations))

    def load_label(results):
        return {**results, "label": results["img_label"] * 10}

    dataset = BaseDataset(
        data_root=str(folder),
        ann_file="annotations/train.json",
        data_prefix=dict(img_path="images"),
        metainfo=dict(version="2.0"),
        pipeline=[load_label],
    )
    return {"items": [dataset[i] for i in range(len(dataset))], "metainfo": dataset.metainfo}


def data_tutorial(pkg: str) -> dict:
    dataset_mod, model_mod = lib(pkg, "dataset"), lib(pkg, "model")

    class ToyDataset(dataset_mod.BaseDataset):
        METAINFO = dict(classes=("cat", "dog"), task="toy")

        def load_data_list(self):
            return [dict(img_id=i, label=i % 2) for i in range(6)]

    def add_double(results):
        return {**results, "double": results["img_id"] * 2}

    dataset = ToyDataset(metainfo=dict(task="renamed"), pipeline=[add_double], lazy_init=True, indices=4)
    items = [dataset[i] for i in range(len(dataset))]
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 5, 7), generator=g, dtype=torch.uint8) for _ in range(2)]
    images.append(torch.randint(0, 256, (3, 6, 4), generator=g, dtype=torch.uint8))
    samples = [dict(inputs=img, data_samples=dict(label=i)) for i, img in enumerate(images)]
    batch = dataset_mod.pseudo_collate(samples)
    preprocessor = model_mod.ImgDataPreprocessor(
        mean=[10.0, 20.0, 30.0], std=[2.0, 3.0, 4.0], bgr_to_rgb=True, pad_size_divisor=4, pad_value=1
    )
    out = preprocessor(batch, True)
    nested = dataset_mod.pseudo_collate([(torch.tensor(1), dict(a=[1, 2])), (torch.tensor(2), dict(a=[3, 4]))])
    return {
        "items": items,
        "metainfo": dataset.metainfo,
        "length": len(dataset),
        "collated_labels": batch["data_samples"]["label"],
        "inputs": out["inputs"],
        "nested": nested,
    }


# -- the GAN example (examples/train_a_gan.md) ---------------------------------------------------------------------


def gan_example(pkg: str, work_dir: Path, max_epochs: int = 2, resume: bool = False) -> dict:
    BaseDataset = lib(pkg, "dataset").BaseDataset
    BaseModel = lib(pkg, "model").BaseModel
    optim = lib(pkg, "optim")
    Runner = lib(pkg, "runner").Runner

    class DigitsDataset(BaseDataset):  # MNISTDataset, with 4x4 images made here
        def __init__(self, data_root, pipeline, test_mode=False):
            g = torch.Generator().manual_seed(3)
            self.images = torch.randint(0, 256, (24, 4, 4), generator=g, dtype=torch.uint8).numpy()
            super().__init__(data_root=data_root, pipeline=pipeline, test_mode=test_mode)

        @staticmethod
        def totensor(img):
            if len(img.shape) < 3:
                img = np.expand_dims(img, -1)
            return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))

        def load_data_list(self):
            return [dict(inputs=self.totensor(np.array(x))) for x in self.images]

    dataset = DigitsDataset("./data", [])
    train_dataloader = dict(
        batch_size=8, num_workers=0, sampler=dict(type="DefaultSampler", shuffle=True, seed=0), dataset=dataset
    )
    train_dataloader = Runner.build_dataloader(train_dataloader)

    class Generator(nn.Module):
        def __init__(self, noise_size, img_shape):
            super().__init__()
            self.img_shape, self.noise_size = img_shape, noise_size
            self.model = nn.Sequential(
                nn.Linear(noise_size, 16),
                nn.BatchNorm1d(16, 0.8),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Linear(16, int(np.prod(img_shape))),
                nn.Tanh(),
            )

        def forward(self, z):
            img = self.model(z)
            return img.view(img.size(0), *self.img_shape)

    class Discriminator(nn.Module):
        def __init__(self, img_shape):
            super().__init__()
            self.model = nn.Sequential(
                nn.Linear(int(np.prod(img_shape)), 16), nn.LeakyReLU(0.2, inplace=True), nn.Linear(16, 1), nn.Sigmoid()
            )

        def forward(self, img):
            return self.model(img.view(img.size(0), -1))

    def set_requires_grad(nets, requires_grad=False):
        for net in nets if isinstance(nets, list) else [nets]:
            for param in net.parameters():
                param.requires_grad = requires_grad

    class GAN(BaseModel):
        def __init__(self, generator, discriminator, noise_size, data_preprocessor):
            super().__init__(data_preprocessor=data_preprocessor)
            self.generator, self.discriminator, self.noise_size = generator, discriminator, noise_size

        def train_step(self, data, optim_wrapper):
            inputs_dict = self.data_preprocessor(data, True)
            disc_optimizer_wrapper = optim_wrapper["discriminator"]
            with disc_optimizer_wrapper.optim_context(self.discriminator):
                log_vars = self.train_discriminator(inputs_dict, disc_optimizer_wrapper)
            set_requires_grad(self.discriminator, False)
            gen_optimizer_wrapper = optim_wrapper["generator"]
            with gen_optimizer_wrapper.optim_context(self.generator):
                log_vars_gen = self.train_generator(inputs_dict, gen_optimizer_wrapper)
            set_requires_grad(self.discriminator, True)
            log_vars.update(log_vars_gen)
            return log_vars

        def forward(self, batch_inputs, data_samples=None, mode=None):
            return self.generator(batch_inputs)

        def disc_loss(self, disc_pred_fake, disc_pred_real):
            losses = dict(
                loss_disc_fake=F.binary_cross_entropy(disc_pred_fake, 0.0 * torch.ones_like(disc_pred_fake)),
                loss_disc_real=F.binary_cross_entropy(disc_pred_real, 1.0 * torch.ones_like(disc_pred_real)),
            )
            return self.parse_losses(losses)

        def gen_loss(self, disc_pred_fake):
            losses = dict(loss_gen=F.binary_cross_entropy(disc_pred_fake, 1.0 * torch.ones_like(disc_pred_fake)))
            return self.parse_losses(losses)

        def train_discriminator(self, inputs, optimizer_wrapper):
            real_imgs = inputs["inputs"]
            z = torch.randn((real_imgs.shape[0], self.noise_size)).type_as(real_imgs)
            with torch.no_grad():
                fake_imgs = self.generator(z)
            parsed_losses, log_vars = self.disc_loss(self.discriminator(fake_imgs), self.discriminator(real_imgs))
            optimizer_wrapper.update_params(parsed_losses)
            return log_vars

        def train_generator(self, inputs, optimizer_wrapper):
            real_imgs = inputs["inputs"]
            z = torch.randn(real_imgs.shape[0], self.noise_size).type_as(real_imgs)
            parsed_loss, log_vars = self.gen_loss(self.discriminator(self.generator(z)))
            optimizer_wrapper.update_params(parsed_loss)
            return log_vars

    torch.manual_seed(0)
    generator, discriminator = Generator(8, (1, 4, 4)), Discriminator((1, 4, 4))
    model = GAN(generator, discriminator, 8, dict(type="ImgDataPreprocessor", mean=([127.5]), std=([127.5])))
    opt_g = torch.optim.Adam(generator.parameters(), lr=0.001, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=0.001, betas=(0.5, 0.999))
    opt_wrapper_dict = optim.OptimWrapperDict(
        generator=optim.OptimWrapper(opt_g), discriminator=optim.OptimWrapper(opt_d)
    )
    runner = Runner(
        model,
        work_dir=str(work_dir),
        train_dataloader=train_dataloader,
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        optim_wrapper=opt_wrapper_dict,
        randomness=dict(seed=0),
        resume=resume,
        experiment_name=f"{pkg}_gan_{abs(hash(str(work_dir)))}_{max_epochs}",
    )
    runner.train()
    return {"weights": weights(runner.model), "losses": logged_losses(work_dir)}
