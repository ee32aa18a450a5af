"""VISSL builds our trunk from its own ConViT configs and trains it for an iteration on CPU."""
import pytest
import torch

import convit_ssl
from convit_ssl import engine
from convit_ssl.trunk_config import trunk_kwargs
from convit_ssl.vissl_glue import VisslConViT

VISSL_CONVIT = "pretrain/vision_transformer/supervised/1gpu_convit_s_example"


def _compose_vissl(tmp_path, *extra):
    from vissl.utils.hydra_config import convert_to_attrdict

    cfg = engine.hydra_config([f"config={VISSL_CONVIT}", "config.MODEL.TRUNK.NAME=convit_ssl",
                               f"config.CHECKPOINT.DIR={tmp_path}", *extra])
    return convert_to_attrdict(cfg)[1]


def test_vissl_builds_trunk_from_its_shipped_convit_config(tmp_path):
    from vissl.models import build_model

    config = _compose_vissl(tmp_path)
    assert trunk_kwargs(config.MODEL) == {
        "depth": 12, "local_up_to_layer": 10, "qkv_bias": False, "embed_dim": 576, "num_heads": 9,
        "img_size": 224, "patch_size": 16, "drop_rate": 0, "attn_drop_rate": 0, "drop_path_rate": 0.1,
        "locality_strength": 1.0, "use_local_init": True, "mlp_ratio": 4.0,
    }
    model = build_model(config.MODEL, config.OPTIMIZER)
    assert isinstance(model.trunk, VisslConViT)
    # ConViT-S+ of the paper: 48M parameters with the 1000-way head
    assert abs(sum(p.numel() for p in model.parameters()) / 48e6 - 1) < 0.05
    features = model.trunk(torch.randn(1, 3, 224, 224), ["lastCLS", "blkPOOL3"])
    assert [f.shape for f in features] == [(1, 576), (1, 576)]


def test_preset_takes_precedence_over_vissl_sections(tmp_path):
    config = _compose_vissl(tmp_path, "+config.MODEL.TRUNK.CONVIT_SSL.PRESET=convit_tiny",
                            "+config.MODEL.TRUNK.CONVIT_SSL.OVERRIDES.local_up_to_layer=0")
    kwargs = trunk_kwargs(config.MODEL)
    assert kwargs["embed_dim"] == 192 and kwargs["num_heads"] == 4 and kwargs["local_up_to_layer"] == 0


def test_unsupported_vissl_options_are_clear_errors(tmp_path):
    config = _compose_vissl(tmp_path, "config.MODEL.TRUNK.CONVIT.CLASS_TOKEN_IN_LOCAL_LAYERS=True")
    with pytest.raises(ValueError, match="CLASS_TOKEN_IN_LOCAL_LAYERS=True is not supported"):
        trunk_kwargs(config.MODEL)


def test_weight_decay_excludes_position_embedding_and_class_token(tmp_path):
    from vissl.models import build_model
    from vissl.optimizers.optimizer_helper import get_optimizer_param_groups

    config = _compose_vissl(tmp_path)
    model = build_model(config.MODEL, config.OPTIMIZER)
    groups = get_optimizer_param_groups(model, config.MODEL, config.OPTIMIZER, optimizer_schedulers={"lr": 1.0, "lr_head": 1.0})
    ids = {id(p) for group in groups if group["weight_decay"] == 0.0 for p in group["params"]}
    assert id(model.trunk.pos_embedding) in ids and id(model.trunk.class_token) in ids
    assert id(model.trunk.blocks[0].attn.qk.weight) not in ids


@pytest.mark.slow
def test_one_vissl_training_iteration_on_cpu(tmp_path):
    config = engine.compose([
        f"config={VISSL_CONVIT}", "config.MODEL.TRUNK.NAME=convit_ssl",
        "config.MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=2", "config.MODEL.TRUNK.CONVIT.N_GPSA_LAYERS=1",
        "config.MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM=36", "config.MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=72",
        "config.MODEL.HEAD.PARAMS=[[mlp,{dims:[36,1000]}]]",
        "config.MACHINE.DEVICE=cpu", "config.DISTRIBUTED.BACKEND=gloo", "config.OPTIMIZER.use_larc=False",
        "config.DATA.TRAIN.DATA_SOURCES=[synthetic]", "config.DATA.TRAIN.LABEL_SOURCES=[synthetic]",
        "config.DATA.TRAIN.DATASET_NAMES=[synthetic]", "config.DATA.TRAIN.DATA_LIMIT=2",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=2", "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.OPTIMIZER.num_epochs=2", "config.TEST_MODEL=False",
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False", "config.DISTRIBUTED.RUN_ID=localhost:0",
    ], run_dir=str(tmp_path / "run"))
    run_dir = engine.train(config)
    trunk, report = convit_ssl.load_trunk(run_dir / "checkpoint.torch")
    assert report.source_format == "vissl" and trunk.embed_dim == 36 and trunk.local_up_to_layer == 1
    assert (run_dir / "metrics.json").is_file()
    # one meaning, one number: the updates done (VISSL's iteration_num had an extra tick per epoch)
    final = torch.load(run_dir / "model_final_checkpoint_phase1.torch", map_location="cpu", weights_only=True)
    assert final["iteration"] == final["iteration_num"] == 2, (final["iteration"], final["iteration_num"])


@pytest.mark.parametrize("trunk", [[], ["trunk.depth=3", "trunk.local_up_to_layer=1", "trunk.drop_path_rate=0.2"]])
def test_dino_teacher_has_no_drop_path_and_is_built_without_drawing_random_numbers(tmp_path, monkeypatch, data_root,
                                                                                    trunk):
    """VISSL zeroes VISION_TRANSFORMERS.DROP_PATH_RATE for the teacher, a key that a preset does not read."""
    import types

    from vissl.hooks.dino_hooks import DINOHook
    from vissl.models import build_model

    from convit_ssl.models.convit import DropPath

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    config = engine.compose(["config=dino", "model=convit_tiny", "data=digits", *trunk,
                             "config.MODEL.HEAD.PARAMS=[[swav_head,{dims:[192,16],use_bn:false,num_clusters:[8]}]]",
                             "config.LOSS.dino_loss.output_dim=8"], run_dir=str(tmp_path / "run"))
    overrides = dict(config.MODEL.TRUNK.CONVIT_SSL.OVERRIDES)
    student = build_model(config.MODEL, config.OPTIMIZER)
    task = types.SimpleNamespace(config=config, device=torch.device("cpu"), model=student,
                                 loss=types.SimpleNamespace(checkpoint=None, momentum_teacher=None))
    state = torch.get_rng_state()
    DINOHook()._build_momentum_network(task)
    assert torch.equal(torch.get_rng_state(), state)
    rates = lambda model: [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]  # noqa: E731
    assert max(rates(student)) > 0 and set(rates(task.loss.momentum_teacher)) == {0.0}
    assert dict(config.MODEL.TRUNK.CONVIT_SSL.OVERRIDES) == overrides  # the run's config is left as it was
