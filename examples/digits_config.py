"""The digits demo as an MMEngine-style config file:

funceng train examples/digits_config.py [--cfg-options max_epochs=5]
funceng test examples/digits_config.py --checkpoint work_dirs/digits_config/epoch_15
"""

from digits_cnn import Accuracy, DigitsCNN, DigitsDataset

max_epochs = 15
model = dict(type=DigitsCNN)
work_dir = "work_dirs/digits_config"
train_dataloader = dict(
    batch_size=32,
    dataset=dict(type=DigitsDataset, split="train"),
    sampler=dict(type="DefaultSampler", shuffle=True),
    collate_fn=dict(type="default_collate"),
)
val_dataloader = dict(
    batch_size=64,
    dataset=dict(type=DigitsDataset, split="val"),
    sampler=dict(type="DefaultSampler", shuffle=False),
    collate_fn=dict(type="default_collate"),
)
val_evaluator = dict(type=Accuracy)
optim_wrapper = dict(
    optimizer=dict(type="SGD", lr=0.05, momentum=0.9, weight_decay=5e-4),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=40),
    dict(type="CosineAnnealingLR", by_epoch=True, begin=0, end=max_epochs),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
val_cfg = dict()
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=5))
randomness = dict(seed=0)
