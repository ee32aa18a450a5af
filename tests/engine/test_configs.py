"""Every shipped recipe composes with every model file and builds its VISSL model and loss (reduced size)."""

import pytest
import torch

from convit_ssl import engine
from convit_ssl.shipped_configs import PACKAGE_CONFIGS

CONFIG_ROOT = PACKAGE_CONFIGS / "config" / "convit_ssl"
RECIPES = sorted(p.stem for p in (CONFIG_ROOT / "pretrain").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONFIG_ROOT / "model").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONFIG_ROOT / "data").glob("*.yaml"))
SMALL = ["trunk.depth=2", "trunk.embed_dim=36", "trunk.num_heads=9", "trunk.local_up_to_layer=1"]
# make test-fast composes these (two views, multi-crop, the demo's; a ConViT and its DeiT twin); make test every file
FAST_RECIPES, FAST_MODELS = {"simclr", "dino", "digits_simclr"}, {"convit_tiny", "deit_tiny"}


def fast_first(names, fast):
    """``names`` as parameters, those not in ``fast`` marked slow."""
    return [name if name in fast else pytest.param(name, marks=pytest.mark.slow) for name in names]


def _compose(tmp_path, *words):
    return engine.compose(list(words), run_dir=str(tmp_path / "run"))


@pytest.mark.parametrize("recipe", fast_first(RECIPES, FAST_RECIPES))
def test_recipe_builds_model_and_loss(recipe, tmp_path, data_root, monkeypatch):
    import vissl.losses  # noqa: F401  (registers VISSL's losses with classy-vision)
    from classy_vision.losses import LOSS_REGISTRY, build_loss
    from vissl.models import build_model

    from classy_vision.generic import distributed_util

    monkeypatch.setattr(distributed_util, "_cuda_device_index", -1)  # what VISSL's trainer sets on CPU
    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    config = _compose(tmp_path, f"config={recipe}", "data=digits", *SMALL)
    model = build_model(config.MODEL, config.OPTIMIZER)
    assert model.trunk.embed_dim == 36 and model.trunk.local_up_to_layer == 1
    loss_name = config.LOSS.name
    loss_config = config.LOSS[loss_name]  # VISSL's AttrDict, as the trainer passes it
    loss_config["name"] = loss_name
    if "num_train_samples" in loss_config:
        loss_config["num_train_samples"] = 64
    assert type(build_loss(loss_config)) is LOSS_REGISTRY[loss_name]  # the recipe's method (test_methods trains it)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    multi_crop = any(t["name"] == "ImgPilToMultiCrop" for t in config.DATA.TRAIN.TRANSFORMS)
    with torch.no_grad():
        outputs = model(crops if multi_crop else crops[:1])
    assert outputs and all(torch.isfinite(o).all() for output in outputs for o in
                           (output if isinstance(output, (list, tuple)) else [output]))


@pytest.mark.parametrize("model", fast_first(MODELS, FAST_MODELS))
def test_every_model_file_composes_with_its_width(model, tmp_path, data_root, monkeypatch):
    from convit_ssl.models import PRESETS
    from convit_ssl.trunk_config import trunk_kwargs

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    config = _compose(tmp_path, "config=dino", f"model={model}", "data=digits")
    kwargs = trunk_kwargs(config.MODEL)
    assert kwargs["embed_dim"] == PRESETS[model]["embed_dim"] == config.MODEL.HEAD.PARAMS[0][1]["dims"][0]
    assert kwargs["img_size"] == 32 and kwargs["patch_size"] == 4


@pytest.mark.parametrize("data", DATA)
def test_every_data_file_composes(data, tmp_path):
    cfg = engine.hydra_config(["config=convit_ssl/pretrain/dino", f"config/convit_ssl/data={data}"])
    assert cfg.config.CONVIT_SSL.DATASET == data


def test_configs_found_from_any_working_directory(tmp_path, data_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    config = _compose(tmp_path, "config=swav", "model=deit_tiny", "data=digits")
    assert config.LOSS.name == "swav_loss" and config.MODEL.TRUNK.CONVIT_SSL.PRESET == "deit_tiny"
    assert not (tmp_path / "train_config.yaml").exists()


def test_heads_follow_the_trunk_width(tmp_path, data_root, monkeypatch):
    """The width is the preset's (or trunk.embed_dim's), read from Python once: never restated in YAML."""
    from convit_ssl.trunk_config import trunk_kwargs

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    for words, width in ((["config.MODEL.TRUNK.CONVIT_SSL.PRESET=convit_base"], 768),
                         (["model=deit_tiny", "trunk.embed_dim=48", "trunk.num_heads=4"], 48),
                         (["model=convit_tiny_plus"], 256)):
        config = _compose(tmp_path, "config=dino", "data=digits", *words)
        assert trunk_kwargs(config.MODEL)["embed_dim"] == width
        assert config.MODEL.TRUNK.CONVIT_SSL.EMBED_DIM == config.MODEL.HEAD.PARAMS[0][1]["dims"][0] == width
    demo = _compose(tmp_path, "config=digits_simclr")
    assert trunk_kwargs(demo.MODEL)["embed_dim"] == demo.MODEL.HEAD.PARAMS[0][1]["dims"][0] == 96


def test_model_and_data_files_say_one_thing_each():
    """A model file names its preset and nothing else; a data file sets no model field (the 32 px datasets name
    the trunk file that does); the optimizer and schedules live in optimizer/ (the SSL one and DeiT's supervised one)."""
    import yaml

    def read(path):
        return yaml.safe_load(path.read_text())

    for model in MODELS:
        assert read(CONFIG_ROOT / "model" / f"{model}.yaml") == {"config": {"MODEL": {"TRUNK": {"CONVIT_SSL": {
            "PRESET": model}}}}}
    for data in DATA:
        assert "MODEL" not in read(CONFIG_ROOT / "data" / f"{data}.yaml")["config"], data
    schedule_files = [path.relative_to(CONFIG_ROOT) for path in CONFIG_ROOT.rglob("*.yaml")
                      if "base_lr_batch_size" in path.read_text()]
    assert sorted(str(path) for path in schedule_files) == ["optimizer/adamw.yaml", "optimizer/deit_finetune.yaml"]


# Per-channel mean and standard deviation of each dataset's training pixels (scaled to [0, 1]), as published:
PUBLISHED_STATISTICS = {
    # torchvision's ImageNet normalisation (the ImageNet-1k training set), used by DeiT, ConViT, DINO and VISSL
    "imagenet1k": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    # the values in common use, computed over the 50,000 training images of each CIFAR set; CIFAR-10's std is also
    # in circulation as (0.2023, 0.1994, 0.2010), which is not the per-pixel std of the training set
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
}


@pytest.mark.parametrize("data", DATA)
def test_dataset_statistics_are_the_published_ones(data, data_root):
    """Each data file's MEAN/STD (which the probe recipes read) against the published values; digits has none
    published, so they are computed here from its training split as ``ensure_digits`` wrote it."""
    import numpy as np
    import yaml
    from PIL import Image

    section = yaml.safe_load((CONFIG_ROOT / "data" / f"{data}.yaml").read_text())["config"]["CONVIT_SSL"]
    if data == "digits":
        pixels = np.stack([np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
                           for path in sorted((data_root / "digits" / "train").rglob("*.png"))])
        mean, std = pixels.mean(axis=(0, 1, 2)), pixels.std(axis=(0, 1, 2))
    else:
        mean, std = PUBLISHED_STATISTICS[data]
    # the files round to 4 digits, ImageNet's to 3 as published
    assert np.allclose(section["MEAN"], mean, atol=5e-5) and np.allclose(section["STD"], std, atol=5e-5), data



@pytest.mark.parametrize("module", ["convit_ssl.evaluation.features", "convit_ssl.report"])
def test_importing_reads_no_data_file_and_the_default_normalisation_is_imagenets(module, monkeypatch):
    import builtins
    import importlib
    import importlib.util
    import pathlib

    import numpy as np

    from convit_ssl.evaluation.features import Preprocess, imagenet_statistics

    importlib.import_module(module)  # what it imports, imported; then a fresh copy of it runs, the imported one stays
    read, read_text, open_ = [], pathlib.Path.read_text, builtins.open
    monkeypatch.setattr(pathlib.Path, "read_text",
                        lambda path, *a, **k: read.append(str(path)) or read_text(path, *a, **k))
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: read.append(str(file)) or open_(file, *a, **k))
    spec = importlib.util.find_spec(module)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert [path for path in read if path.endswith(".yaml")] == []
    monkeypatch.undo()
    mean, std = PUBLISHED_STATISTICS["imagenet1k"]
    assert np.allclose(imagenet_statistics(), (mean, std), atol=5e-5)
    assert (Preprocess(224).mean, Preprocess(224).std) == imagenet_statistics()


DIGITS_RECIPES = [recipe for recipe in RECIPES if recipe.startswith("digits_")]
IMAGENET_ONLY_TRANSFORMS = {"RandomHorizontalFlip", "ImgPilColorDistortion", "ImgPilRandomSolarize"}


@pytest.mark.parametrize("recipe", DIGITS_RECIPES)
def test_digits_recipes_are_at_digits_scale(recipe, tmp_path, data_root, monkeypatch):
    """Every digits recipe trains the demo's trunk on 32 px crops without ImageNet's flips and colour
    distortion, for at most 30 epochs with the digits learning-rate schedule, and small heads."""
    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    config = _compose(tmp_path, f"config={recipe}", "data=digits")
    assert dict(config.MODEL.TRUNK.CONVIT_SSL.OVERRIDES) == {"patch_size": 8, "embed_dim": 96, "depth": 4,
                                                             "num_heads": 4, "local_up_to_layer": 2,
                                                             "drop_path_rate": 0.0, "img_size": 32}
    names = [transform["name"] for transform in config.DATA.TRAIN.TRANSFORMS]
    assert not IMAGENET_ONLY_TRANSFORMS & set(names), names
    assert config.CONVIT_SSL.GLOBAL_CROP == 32 and config.OPTIMIZER.num_epochs <= 30
    lr = config.OPTIMIZER.param_schedulers.lr
    assert not lr.auto_lr_scaling.auto_scale and max(s["end_value"] for s in lr.schedulers) == 0.001
    widths = [width for head in config.MODEL.HEAD.PARAMS for width in head[1]["dims"] if isinstance(width, int)]
    widths += [clusters for head in config.MODEL.HEAD.PARAMS for clusters in head[1].get("num_clusters", [])]
    assert max(widths) <= 1024, widths
    loss = config.LOSS[config.LOSS.name]
    if "queue_size" in loss:
        assert loss.queue_size <= 1024 and loss.queue_size % config.DATA.TRAIN.BATCHSIZE_PER_REPLICA == 0


def test_hydra_config_equals_hydras_own_compose_and_keeps_the_cluster_defaults():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    words = ["config=convit_ssl/pretrain/dino"]
    with initialize_config_module(config_module="vissl.config", version_base=None):
        plain = compose("defaults", overrides=[f"hydra.searchpath=[file://{PACKAGE_CONFIGS}]", *words])
    for _ in range(2):  # the second time from the files parsed the first time
        cfg = engine.hydra_config(words)
        assert OmegaConf.to_container(cfg) == OmegaConf.to_container(plain)
    OmegaConf.resolve(cfg)
    dino = cfg.config  # the ImageNet recipe as shipped: cluster settings
    assert dino.DISTRIBUTED.NUM_PROC_PER_NODE == "auto" and dino.MODEL.AMP_PARAMS.USE_AMP
    assert dino.DATA.TRAIN.TRANSFORMS[0].size_crops == [224, 96] and dino.DATA.TRAIN.TRANSFORMS[0].num_crops == [2, 10]
    assert dino.MODEL.TRUNK.CONVIT_SSL.PRESET == "convit_small" and dino.OPTIMIZER.num_epochs == 300
    assert list(dino.OPTIMIZER.non_regularized_parameters) == ["pos_embedding", "class_token"]


def test_a_config_file_is_parsed_once_per_version_and_handed_out_as_copies(tmp_path, monkeypatch):
    import io

    from omegaconf import OmegaConf

    parsed = []
    load = OmegaConf.load
    monkeypatch.setattr(OmegaConf, "load", staticmethod(lambda file_: parsed.append(file_) or load(file_)))
    path = tmp_path / "a.yaml"
    path.write_text("a: {b: 1}\n")
    with engine._config_files_parsed_once():
        with open(path) as stream:
            first = OmegaConf.load(stream)
        first.a.b = 5  # Hydra edits what it loads
        with open(path) as stream:
            assert OmegaConf.load(stream).a.b == 1 and len(parsed) == 1
        path.write_text("a: {b: 22}\n")  # another version of the file
        with open(path) as stream:
            assert OmegaConf.load(stream).a.b == 22 and len(parsed) == 2
        assert OmegaConf.load(io.StringIO("c: 3")).c == 3 and len(parsed) == 3  # not a file: loaded as before
    with open(path) as stream:
        assert OmegaConf.load(stream).a.b == 22 and len(parsed) == 4  # outside the block, Hydra's load again
