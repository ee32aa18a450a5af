"""Supervised training from scratch on a label subset: the protocol of the paper's sample-efficiency table.

The paper trains ConViT-S and DeiT-S on per-class subsets of ImageNet with DeiT's hyper-parameters, multiplying
the number of epochs by 1/f so that every run sees the same number of images. Here: a trunk and a linear head on
``lastCLS``, AdamW (lr 5e-4 x batch / 512, weight decay 0.05 except on biases, norms, position embedding and class
token), linear warm-up over the first 5% of the steps then cosine to 0, label smoothing 0.1, the recipe's
augmentation (random resized crop over ``crop_scale``, flip if ``hflip``). Not reproduced: DeiT's RandAugment,
mixup, cutmix, random erasing, repeated augmentation and stochastic depth, which matter at ImageNet scale.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from convit_ssl.evaluation.accuracy import score_hits
from convit_ssl.evaluation.features import check_feature_choices, image_folder
from convit_ssl.models.modes import eval_mode

BASE_LR = 5e-4  # per 512 images in a batch
WEIGHT_DECAY = 0.05
WARMUP_SHARE = 0.05
LABEL_SMOOTHING = 0.1


def scaled_epochs(base_epochs: int, fraction: float) -> int:
    """Epochs for a fraction f of the labels: base / f, so every fraction sees as many images as the full set."""
    return max(1, round(base_epochs / fraction))


def _parameter_groups(model: nn.Module, skip: set) -> list:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim <= 1 or name.split(".")[-1] in skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def train_supervised(trunk: nn.Module, dataset: str, recipe, indices: Sequence[int], epochs: int, seed: int = 0,
                     num_workers: int = 0) -> dict:
    """Train ``trunk`` (in place) and a new linear head on training images ``indices``; returns test accuracy.

    ``recipe`` gives the image preprocessing, augmentation and batch size. Returns epochs, steps, the number of
    training images, the mean loss of the last epoch, and top-1 / top-5 on the dataset's val split.
    """
    device = next(trunk.parameters()).device
    train_set = image_folder(dataset, "train", recipe.preprocess.train_transform(recipe.crop_scale, recipe.hflip))
    test_set = image_folder(dataset, "val", recipe.preprocess.eval_transform())
    width = check_feature_choices(trunk, ["lastCLS"], recipe.image_size)["lastCLS"]
    torch.manual_seed(seed)
    head = nn.Linear(width, len(train_set.classes)).to(device)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    batch_size = min(recipe.batch_size, len(indices))
    loader = DataLoader(Subset(train_set, [int(i) for i in indices]), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed), num_workers=num_workers)
    skip = set(getattr(trunk, "no_weight_decay", lambda: set())())
    optimizer = torch.optim.AdamW(_parameter_groups(trunk, skip) + _parameter_groups(head, set()),
                                  lr=BASE_LR * batch_size / 512)
    total = epochs * len(loader)
    warmup = max(1, int(WARMUP_SHARE * total))
    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    trunk.train()
    losses = []
    for _ in range(epochs):
        losses = []
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            loss = F.cross_entropy(head(trunk(images, out_feat_keys=["lastCLS"])[0]), labels,
                                   label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    hits = np.zeros(2)
    with torch.no_grad(), eval_mode(trunk):
        for images, labels in DataLoader(test_set, batch_size=recipe.batch_size, num_workers=num_workers):
            logits = head(trunk(images.to(device), out_feat_keys=["lastCLS"])[0])
            hits += score_hits(logits.cpu(), labels).numpy()
    top1, top5 = (100.0 * hits / len(test_set)).tolist()
    return {"epochs": epochs, "steps": total, "train_images": len(indices), "batch_size": batch_size,
            "final_train_loss": float(np.mean(losses)), "top1": top1, "top5": top5}
