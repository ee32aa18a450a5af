"""Checkpoint interop: timm ConViT/DeiT state dicts, VISSL checkpoints, export, strict loading."""
import os

import pytest
import timm
import timm.scheduler
import torch

from convit_ssl import CheckpointError, create_trunk, from_timm_state_dict, load_trunk, to_timm_state_dict
from convit_ssl.checkpoint import export_timm, vissl_model_shapes
from payloads import CreatesFileWhenUnpickled


@pytest.mark.parametrize("timm_name,arch", [("convit_tiny", "convit_tiny"),
                                            pytest.param("convit_small", "convit_small", marks=pytest.mark.slow),
                                            ("deit_tiny_patch16_224", "deit_tiny"),
                                            pytest.param("vit_small_patch16_224", "deit_small", marks=pytest.mark.slow)])
def test_arch_inferred_and_outputs_match(timm_name, arch):
    reference = timm.create_model(timm_name).eval()
    trunk, report = from_timm_state_dict(reference.state_dict())
    assert report.arch == arch and report.dropped == ["head.bias", "head.weight"]
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
        got = trunk.eval()(images)[0]
    assert ((got - expected).abs().max() / expected.abs().max()) < 1e-5


def test_a_preset_sized_checkpoint_keeps_its_patch_size_and_mlp_width():
    """Presets fix widths, depths and heads, not the patch size or MLP width: those come from the shapes (DINO's
    ViT-S/8, our 32 px trunks with patch_size=4)."""
    reference = timm.create_model("vit_small_patch8_224", img_size=32, num_classes=0).eval()
    trunk, report = from_timm_state_dict(reference.state_dict())
    assert report.arch == "deit_small" and trunk.patch_size == 8
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(trunk.eval()(images)[0], reference(images), atol=1e-5)
    ours = create_trunk("convit_tiny", img_size=32, patch_size=4, mlp_ratio=2.0).eval()
    loaded, report = from_timm_state_dict(to_timm_state_dict(ours))
    assert report.arch == "convit_tiny" and loaded.patch_size == 4
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images)[0], ours(images)[0])


def test_an_mlp_width_that_is_no_whole_multiple_of_the_width_loads():
    """56 wide with a 61-wide MLP: 56 * (61 / 56) is 60.99... in floats, and the MLP of the ratio read from the
    shapes was built 60 wide, so the checkpoint was refused as mis-shaped; a VISSL config's MLP_DIM=1736 on
    HIDDEN_DIM=432 built 1735."""
    from convit_ssl.trunk_config import trunk_kwargs

    from convit_ssl.models.convit import mlp_ratio_of

    ours = create_trunk("convit_tiny", img_size=32, patch_size=8, embed_dim=56, num_heads=4,
                        mlp_ratio=mlp_ratio_of(61, 56), depth=2, local_up_to_layer=1)
    assert ours.blocks[0].mlp.fc1.out_features == 61 and int(56 * (61 / 56)) == 60
    loaded, _ = from_timm_state_dict(to_timm_state_dict(ours))
    assert loaded.blocks[0].mlp.fc1.out_features == 61
    vit = {"HIDDEN_DIM": 432, "MLP_DIM": 1736, "NUM_HEADS": 9}
    kwargs = trunk_kwargs({"TRUNK": {"NAME": "convit_ssl", "VISION_TRANSFORMERS": vit}})
    assert int(kwargs["embed_dim"] * kwargs["mlp_ratio"]) == 1736


def test_round_trip_is_lossless():
    reference = timm.create_model("convit_tiny")
    trunk, _ = from_timm_state_dict(reference.state_dict())
    exported = to_timm_state_dict(trunk)
    original = {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    incompatible = timm.create_model("convit_tiny").load_state_dict(exported, strict=False)
    assert incompatible.missing_keys == ["head.weight", "head.bias"] and not incompatible.unexpected_keys


def test_wrapper_prefixes_are_stripped():
    reference = timm.create_model("convit_tiny", num_classes=0)
    wrapped = {f"module.backbone.{k}": v for k, v in reference.state_dict().items()}
    trunk, report = from_timm_state_dict(wrapped)
    assert report.mapped == len(reference.state_dict())


def test_bad_keys_are_listed():
    state = timm.create_model("convit_tiny", num_classes=0).state_dict()
    del state["blocks.3.attn.qk.weight"]
    state["blocks.3.attn.extra"] = torch.zeros(1)
    state["norm.weight"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as error:
        from_timm_state_dict(state, arch="convit_tiny")
    message = str(error.value)
    assert "missing: blocks.3.attn.qk.weight" in message
    assert "unexpected: blocks.3.attn.extra" in message
    assert "norm.weight (5,) vs (192,)" in message


def test_not_a_convit_checkpoint():
    with pytest.raises(CheckpointError, match="not a ConViT/DeiT state dict"):
        from_timm_state_dict({"conv1.weight": torch.zeros(64, 3, 7, 7)})


def _foreign_vit_layouts():
    """ViT state dicts of other families: DINOv2's chunked blocks, a SwiGLU MLP, a linear patch embedding."""
    state = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2, num_classes=0).state_dict()
    yield "chunked blocks", {key.replace("blocks.", "blocks.0."): value for key, value in state.items()}
    yield "swiglu", {key.replace("mlp.fc1.", "mlp.w12."): value for key, value in state.items()}
    yield "linear patch embedding", {**state, "patch_embed.proj.weight": torch.zeros(192, 768)}


@pytest.mark.parametrize("layout,state", list(_foreign_vit_layouts()))
def test_a_foreign_vit_layout_is_refused_in_one_line(layout, state):
    with pytest.raises(CheckpointError, match="not a ConViT/DeiT state dict") as error:
        from_timm_state_dict(state)
    assert "\n" not in str(error.value)


def test_vissl_checkpoint_exports_to_timm(tmp_path):
    trunk = create_trunk("convit_tiny", img_size=64)
    vissl_checkpoint = {"phase_idx": 3, "classy_state_dict": {"base_model": {"model": {
        "trunk": trunk.state_dict(), "heads": {"0.weight": torch.zeros(2, 2)}}}}}
    path = tmp_path / "model_phase3.torch"
    torch.save(vissl_checkpoint, path)
    report = export_timm(path, tmp_path / "convit.pth")
    assert report.source_format == "vissl" and report.arch == "convit_tiny"
    reference = timm.create_model("convit_tiny", img_size=64, num_classes=0).eval()
    reference.load_state_dict(torch.load(tmp_path / "convit.pth"), strict=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(reference(images), trunk.eval()(images)[0], atol=1e-5)


def test_a_deit_twin_exports_without_its_head_count(tmp_path):
    """The head count of plain attention blocks leaves no trace in the tensors, so the export needs none: a DeiT
    twin's checkpoint outside its run folder (no train_config.yaml to read it from) exports as well."""
    trunk = create_trunk("convit_tiny", img_size=64, local_up_to_layer=0).eval()
    _vissl_checkpoint(tmp_path / "twin.torch", trunk)
    export_timm(tmp_path / "twin.torch", tmp_path / "twin_timm.pth")
    reference = timm.create_model("convit_tiny", img_size=64, local_up_to_layer=0, num_classes=0).eval()
    reference.load_state_dict(torch.load(tmp_path / "twin_timm.pth", weights_only=True), strict=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(reference(images), trunk(images)[0], atol=1e-5)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_trunk(tmp_path / "nope.torch")
    (tmp_path / "junk.torch").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read by torch.load"):
        load_trunk(tmp_path / "junk.torch")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_payload_is_not_run(tmp_path, zip_format):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "model_final_checkpoint_phase0.torch"
    trunk = create_trunk("convit_tiny", img_size=64)
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk.state_dict()}}},
                "loss": CreatesFileWhenUnpickled(marker)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as error:
        load_trunk(path)
    assert not marker.exists()
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "needs io.open" in message, message
    assert "nothing in it was run" in message


def test_official_checkpoint_with_its_argparse_namespace_loads(tmp_path):
    """Official ConViT/DeiT (main.py) and DINO checkpoints pickle the run's argparse.Namespace beside the weights."""
    import argparse

    reference = timm.create_model("convit_tiny", img_size=64).eval()
    args = argparse.Namespace(model="convit_tiny", lr=5e-4, input_size=64, output_dir="out", smoothing=0.1,
                              local_crops_scale=[0.05, 0.4], distributed=True, resume="")
    optimizer = torch.optim.AdamW(reference.parameters())
    scheduler = timm.scheduler.CosineLRScheduler(optimizer, t_initial=300, warmup_t=5, warmup_lr_init=1e-6)
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 0}  # torch.amp.GradScaler.state_dict()
    torch.save({"model": reference.state_dict(), "model_ema": reference.state_dict(),
                "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(), "scaler": scaler,
                "epoch": 299, "args": args},
               tmp_path / "convit_tiny.pth")  # what DeiT's main.py (and so ConViT's) saves
    trunk, report = load_trunk(tmp_path / "convit_tiny.pth")
    assert report.source_format == "official" and report.arch == "convit_tiny"
    # DINO's MultiCropWrapper(backbone, DINOHead): the backbone's classifier is an Identity, the DINO head is beside it
    teacher = {f"backbone.{key}": value for key, value in reference.state_dict().items() if not key.startswith("head.")}
    dino_head = {"head.mlp.0.weight": torch.zeros(16, 192), "head.mlp.0.bias": torch.zeros(16),
                 "head.last_layer.weight_g": torch.ones(8, 1), "head.last_layer.weight_v": torch.zeros(8, 16)}
    teacher.update(dino_head)
    dino = {"student": {f"module.{key}": value for key, value in teacher.items()}, "teacher": teacher,
            "optimizer": optimizer.state_dict(), "epoch": 100, "args": args, "dino_loss": {"center": torch.zeros(1, 8)},
            "fp16_scaler": scaler}  # what DINO's main_dino.py saves
    torch.save(dino, tmp_path / "dino.pth")
    dino_trunk, dino_report = load_trunk(tmp_path / "dino.pth")
    assert dino_report.source_format == "dino" and dino_report.arch == "convit_tiny"
    assert dino_report.dropped == sorted(dino_head)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
        assert torch.allclose(trunk.eval()(images)[0], expected, atol=1e-5)
        assert torch.allclose(dino_trunk.eval()(images)[0], expected, atol=1e-5)


@pytest.mark.parametrize("weights, ema", [("model", "model_ema"), ("state_dict", "state_dict_ema")],
                         ids=["deit main.py", "timm train.py"])
def test_a_checkpoint_with_ema_weights_says_they_were_not_read(tmp_path, weights, ema):
    """DeiT's main.py saves ``model_ema`` beside ``model``, timm's train.py ``state_dict_ema`` beside
    ``state_dict``: the load reads the trained weights, and its report says the file's EMA was left."""
    trained, averaged = create_trunk("convit_tiny", img_size=32), create_trunk("convit_tiny", img_size=32)
    torch.save({weights: to_timm_state_dict(trained), ema: to_timm_state_dict(averaged), "epoch": 9},
               tmp_path / "train.pth")
    trunk, report = load_trunk(tmp_path / "train.pth")
    assert torch.equal(trunk.pos_embedding, trained.pos_embedding)
    assert report.part == f"{weights} weights, not the EMA in {ema}", report.part
    assert f"the {weights} weights, not the EMA in {ema}" in str(report)
    torch.save({weights: to_timm_state_dict(trained)}, tmp_path / "plain.pth")
    assert load_trunk(tmp_path / "plain.pth")[1].part == ""


def test_the_student_or_the_ema_is_read_when_asked_for(tmp_path):
    """``network="student"`` reads a DINO run's student (VISSL's or DINO's own checkpoint), ``network="ema"`` a
    training checkpoint's EMA; a network the file does not hold is one line naming what it holds."""
    student, teacher = create_trunk("convit_tiny", img_size=32), create_trunk("convit_tiny", img_size=32)
    loss = {f"momentum_teacher.trunk.{key}": value for key, value in teacher.state_dict().items()}
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": student.state_dict()}}, "loss": loss}},
               tmp_path / "vissl_dino.torch")
    timm_student = {f"module.backbone.{key}": value for key, value in to_timm_state_dict(student).items()}
    timm_teacher = {f"backbone.{key}": value for key, value in to_timm_state_dict(teacher).items()}
    torch.save({"student": timm_student, "teacher": timm_teacher}, tmp_path / "dino.pth")
    torch.save({"model": to_timm_state_dict(teacher), "model_ema": to_timm_state_dict(student)},
               tmp_path / "deit.pth")
    for name, network, part in [("vissl_dino.torch", "student", "DINO student"), ("dino.pth", "student",
                                "DINO student"), ("deit.pth", "ema", "EMA weights in model_ema")]:
        trunk, report = load_trunk(tmp_path / name, network=network)
        assert report.part == part, (name, report.part)
        for key, value in trunk.state_dict().items():
            assert torch.equal(value, student.state_dict()[key]), (name, key)
    for name, network, held in [("deit.pth", "student", "its model and their EMA"),
                                ("vissl_dino.torch", "ema", "a DINO teacher and its student"),
                                ("dino.pth", "ema", "a DINO teacher and its student")]:
        with pytest.raises(CheckpointError) as error:
            load_trunk(tmp_path / name, network=network)
        message = str(error.value)
        assert "\n" not in message and f"holds no {network}" in message and held in message, message
    _vissl_checkpoint(tmp_path / "simclr.torch", student)
    with pytest.raises(CheckpointError, match="holds no student.*its model only"):
        load_trunk(tmp_path / "simclr.torch", network="student")
    with pytest.raises(CheckpointError, match="network 'teacher' is not one of student, ema"):
        load_trunk(tmp_path / "simclr.torch", network="teacher")


def _vissl_checkpoint(path, trunk):
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk.state_dict()}}}}, path)


@pytest.mark.parametrize("wrapper", ["", "module."])  # DDP wraps the teacher of a distributed run
def test_a_vissl_dino_checkpoint_gives_its_teacher(tmp_path, wrapper):
    """DINO's evaluations and paper use the teacher (it does better than the student); VISSL's DINO loss keeps it in
    the checkpoint's loss state, beside the student in base_model."""
    student, teacher = create_trunk("convit_tiny", img_size=32), create_trunk("convit_tiny", img_size=32)
    loss = {"center": torch.zeros(1, 8), **{f"momentum_teacher.{wrapper}trunk.{key}": value
                                            for key, value in teacher.state_dict().items()},
            f"momentum_teacher.{wrapper}heads.0.prototypes0.weight": torch.zeros(8, 16)}
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": student.state_dict()}}, "loss": loss}},
               tmp_path / "dino.torch")
    trunk, report = load_trunk(tmp_path / "dino.torch")
    assert report.part == "DINO teacher" and "vissl format, the DINO teacher" in str(report)
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, teacher.state_dict()[key]), key
    _vissl_checkpoint(tmp_path / "simclr.torch", student)  # no teacher: the model itself
    trunk, report = load_trunk(tmp_path / "simclr.torch")
    assert report.part == "" and torch.equal(trunk.pos_embedding, student.pos_embedding)


def test_the_checkpoint_of_a_run_folder(tmp_path):
    """One rule: VISSL's link checkpoint.torch, else the final checkpoint, else the one trained furthest."""
    from convit_ssl.run_folder import run_checkpoint

    assert run_checkpoint(tmp_path) is None
    for age, (name, updates) in enumerate((("model_phase2.torch", 66), ("model_iteration50.torch", 50),
                                           ("model_phase1.torch", 44))):
        torch.save({"iteration": updates}, tmp_path / name)
        os.utime(tmp_path / name, ns=(10**18 + age * 10**9,) * 2)  # copied in this order
    assert run_checkpoint(tmp_path).name == "model_phase2.torch"  # the most updates, not the highest number
    (tmp_path / "model_final_checkpoint_phase11.torch").write_bytes(b"")
    os.utime(tmp_path / "model_phase2.torch")  # touched now: newer than the final one
    assert run_checkpoint(tmp_path).name == "model_final_checkpoint_phase11.torch"
    os.symlink("model_phase2.torch", tmp_path / "checkpoint.torch")
    assert run_checkpoint(tmp_path).name == "checkpoint.torch"


def test_a_folder_given_as_checkpoint_is_named_what_it_is(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    trunk = create_trunk("convit_tiny", img_size=64)
    _vissl_checkpoint(run / "model_final_checkpoint_phase1.torch", trunk)
    loaded, report = load_trunk(run)  # a run folder stands for its latest checkpoint
    assert report.file == run / "model_final_checkpoint_phase1.torch"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trunk.state_dict().values()))

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    torch.save({}, downloads / "convit_tiny.pth")
    (tmp_path / "empty").mkdir()
    (tmp_path / "dangling.torch").symlink_to(tmp_path / "gone.torch")
    for path, message in [(downloads, r"downloads is a folder, not a checkpoint file: it holds convit_tiny.pth"),
                          (tmp_path / "empty", r"empty is a folder, not a checkpoint file, and holds no checkpoint"),
                          (tmp_path / "dangling.torch", r"dangling.torch is a link to .*gone.torch, which is missing")]:
        with pytest.raises(CheckpointError, match=message) as error:
            load_trunk(path)
        assert "\n" not in str(error.value) and "does not exist: pass" not in str(error.value)


def test_vissl_model_shapes_reads_zip_and_legacy_files(tmp_path):
    """Shapes come from a memory-mapped zip file (torch's format) and from a legacy file, which cannot be mapped."""
    heads = {"0.clf.0.weight": torch.zeros(128, 48), "0.clf.0.bias": torch.zeros(128)}
    state = {"classy_state_dict": {"base_model": {"model": {"trunk": {"w": torch.zeros(3)}, "heads": heads}}}}
    zip_file, legacy_file = tmp_path / "zip.torch", tmp_path / "legacy.torch"
    torch.save(state, zip_file)
    torch.save(state, legacy_file, _use_new_zipfile_serialization=False)
    expected = {"trunk": {"w": (3,)}, "heads": {"0.clf.0.weight": (128, 48), "0.clf.0.bias": (128,)}}
    assert vissl_model_shapes(zip_file) == expected
    assert vissl_model_shapes(legacy_file) == expected


def test_vissl_model_shapes_of_a_file_in_another_layout_are_empty(tmp_path):
    bare = tmp_path / "bare.pth"
    torch.save({"w": torch.zeros(3)}, bare)
    assert vissl_model_shapes(bare) == {"trunk": {}, "heads": {}}
