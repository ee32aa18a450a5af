"""Every shipped recipe composes with every model file and builds its VISSL model and loss (reduced size)."""

import pytest
import torch

from convit_ssl import engine

CONFIG_ROOT = engine.PACKAGE_CONFIGS / "config" / "convit_ssl"
RECIPES = sorted(p.stem for p in (CONFIG_ROOT / "pretrain").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONFIG_ROOT / "model").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONFIG_ROOT / "data").glob("*.yaml"))
SMALL = ["trunk.depth=2", "trunk.embed_dim=36", "trunk.num_heads=9", "trunk.local_up_to_layer=1"]


def _compose(tmp_path, *words):
    return engine.compose(list(words), run_dir=str(tmp_path / "run"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_builds_model_and_loss(recipe, tmp_path, data_root, monkeypatch):
    import vissl.losses  # noqa: F401  (registers VISSL's losses with classy-vision)
    from classy_vision.losses import build_loss
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
    assert build_loss(loss_config) is not None
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    multi_crop = any(t["name"] == "ImgPilToMultiCrop" for t in config.DATA.TRAIN.TRANSFORMS)
    with torch.no_grad():
        outputs = model(crops if multi_crop else crops[:1])
    assert outputs and all(torch.isfinite(o).all() for output in outputs for o in
                           (output if isinstance(output, (list, tuple)) else [output]))


@pytest.mark.parametrize("model", MODELS)
def test_every_model_file_composes_with_its_width(model, tmp_path, data_root, monkeypatch):
    from convit_ssl.models import PRESETS
    from convit_ssl.vissl_glue import trunk_kwargs

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    config = _compose(tmp_path, "config=dino", f"model={model}", "data=digits")
    kwargs = trunk_kwargs(config.MODEL)
    assert kwargs["embed_dim"] == PRESETS[model]["embed_dim"] == config.MODEL.HEAD.PARAMS[0][1]["dims"][0]
    assert kwargs["img_size"] == 32 and kwargs["patch_size"] == 4


@pytest.mark.parametrize("data", DATA)
def test_every_data_file_composes(data, tmp_path):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="vissl.config", version_base=None):
        cfg = compose("defaults", overrides=[f"hydra.searchpath=[file://{engine.PACKAGE_CONFIGS}]", "config=convit_ssl/pretrain/dino",
                                             f"config/convit_ssl/data={data}"])
    assert cfg.config.CONVIT_SSL.DATASET == data


def test_cluster_defaults_of_the_imagenet_recipes(tmp_path, data_root, monkeypatch):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="vissl.config", version_base=None):
        cfg = compose("defaults", overrides=[f"hydra.searchpath=[file://{engine.PACKAGE_CONFIGS}]",
                                             "config=convit_ssl/pretrain/dino"])
    OmegaConf.resolve(cfg)
    dino = cfg.config
    assert dino.DISTRIBUTED.NUM_PROC_PER_NODE == "auto" and dino.MODEL.AMP_PARAMS.USE_AMP
    assert dino.DATA.TRAIN.TRANSFORMS[0].size_crops == [224, 96] and dino.DATA.TRAIN.TRANSFORMS[0].num_crops == [2, 10]
    assert dino.MODEL.TRUNK.CONVIT_SSL.PRESET == "convit_small" and dino.OPTIMIZER.num_epochs == 300
    assert list(dino.OPTIMIZER.non_regularized_parameters) == ["pos_embedding", "class_token"]


def test_configs_found_from_any_working_directory(tmp_path, data_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    config = _compose(tmp_path, "config=swav", "model=deit_tiny", "data=digits")
    assert config.LOSS.name == "swav_loss" and config.MODEL.TRUNK.CONVIT_SSL.PRESET == "deit_tiny"
    assert not (tmp_path / "train_config.yaml").exists()
