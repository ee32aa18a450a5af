"""Two real training steps of each SSL method through VISSL's engine (its trainer, train step and hooks), as
solo-learn tests its methods: a 2-block ConViT of width 32 on 8 digits a step, on CPU, in this process.

A recording hook, run after VISSL's own at each event, keeps what a step saw; each method's loss and state
update are then recomputed by hand from the recorded tensors (the formulas of the method papers).
"""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from classy_vision.hooks import ClassyHook

from convit_ssl import engine
from convit_ssl.health import effective_rank, feature_std, mean_entropy
from convit_ssl.run_folder import HEALTH_FILE

WIDTH = 32
TINY = [
    "model=convit_tiny", "data=digits", f"trunk.embed_dim={WIDTH}", "trunk.depth=2", "trunk.local_up_to_layer=1",
    "config.DATA.TRAIN.DATA_LIMIT=16", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",  # 2 steps in one epoch
    "config.DATA.NUM_DATALOADER_WORKERS=0", "config.OPTIMIZER.num_epochs=1",
    "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=false", "config.HOOKS.CONVIT_GATING.ENABLE=false",
    "config.HOOKS.PERF_STATS.MONITOR_PERF_STATS=false", "config.HOOKS.CONVIT_HEALTH.FREQUENCY=1",
    # a learning rate that moves the student well away from the teacher in two steps (the recipes warm up from 1e-6)
    "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.auto_scale=false",
    "config.OPTIMIZER.param_schedulers.lr.schedulers.0.start_value=0.01",
]
# the methods' heads, cut down to CPU size (the recipes' 65,536 prototypes and 8,192-wide projector are not)
SMALL_HEADS = {
    "dino": ["config.MODEL.HEAD.PARAMS=[[swav_head,{use_weight_norm_prototypes:true,dims:[32,32,16],use_bn:false,"
             "return_embeddings:false,activation_name:GELU,num_clusters:[64]}]]", "config.LOSS.dino_loss.output_dim=64"],
    "swav": ["config.MODEL.HEAD.PARAMS=[[swav_head,{dims:[32,32,16],use_bn:false,num_clusters:[30]}]]"],
    "moco": ["config.LOSS.moco_loss.queue_size=32"],
    "barlow_twins": ["config.MODEL.HEAD.PARAMS=[[mlp,{dims:[32,64],use_relu:true,use_bn:true,use_bias:false,"
                     "skip_last_layer_relu_bn:false}],[mlp,{dims:[64,64],use_bias:false}]]",
                     "config.LOSS.barlow_twins_loss.embedding_dim=64"],
}


def _copy(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


class Recorder(ClassyHook):
    """Keeps, at each step, what VISSL's hooks and loss left on the task: after the forward (and the
    method's own on_forward hook) and after the optimizer step (and the method's on_update hook)."""

    on_start = on_phase_start = on_loss_and_meter = on_backward = on_step = on_phase_end = on_end = ClassyHook._noop

    def __init__(self):
        super().__init__()
        self.steps = []

    def on_forward(self, task):
        loss, method = task.loss, task.config.LOSS.name
        step = {"iteration": task.iteration, "max_iteration": task.max_iteration, "student_before": _copy(task.model),
                "output": [o.detach().clone() for o in task.last_batch.model_output]
                if isinstance(task.last_batch.model_output, list) else task.last_batch.model_output.detach().clone()}
        if method == "dino_loss":  # DINO: the teacher's output of this step and the centre it is sharpened with
            step.update(teacher_output=loss.teacher_output.detach().clone(), center_before=loss.center.clone(),
                        teacher_temp=loss.teacher_temp)
        if method == "moco_loss":  # MoCo: the keys of this step, the queue they are compared with
            step.update(key=loss.key.detach().clone(), queue_before=loss.queue.clone(),
                        pointer_before=int(loss.queue_ptr), encoder=_copy(loss.moco_encoder))
        self.steps.append(step)

    def on_update(self, task):
        step, loss, method = self.steps[-1], task.loss, task.config.LOSS.name
        step.update(loss=task.last_batch.loss.item(), student_after=_copy(task.model))
        if method == "dino_loss":
            step.update(center_after=loss.center.clone(), teacher=_copy(loss.momentum_teacher))
        if method == "moco_loss":
            step.update(queue_after=loss.queue.clone(), pointer_after=int(loss.queue_ptr))


def _train_two_steps(method, tmp_path, monkeypatch, data_root, head=None):
    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    recorder = Recorder()
    monkeypatch.setattr(engine, "hook_generator", lambda config, original=engine.hook_generator:
                        original(config) + [recorder])
    config = engine.compose([f"config={method}", *TINY, *(head or SMALL_HEADS[method])], run_dir=str(tmp_path / "run"))
    engine.train(config)
    assert [step["iteration"] for step in recorder.steps] == [0, 1]
    return config, recorder.steps


def _close(a, b, atol=1e-6):
    return torch.allclose(a, b, atol=atol, rtol=1e-6)


def _check_common(steps):
    """Finite losses that change; every step moves the trunk's weights."""
    losses = [step["loss"] for step in steps]
    assert all(math.isfinite(loss) for loss in losses) and losses[0] != losses[1], losses
    for step in steps:
        moved = [name for name, before in step["student_before"].items() if name.startswith("trunk.")
                 and before.is_floating_point() and not torch.equal(before, step["student_after"][name])]
        assert "trunk.blocks.0.attn.qk.weight" in moved and "trunk.patch_embed.proj.weight" in moved


def _check_dino(config, steps):
    dino = config.LOSS.dino_loss
    center = torch.zeros(1, dino.output_dim)
    for step in steps:
        # the loss: teacher probabilities (centred, sharpened) against the student's of every other crop
        assert _close(step["center_before"], center)
        teacher = F.softmax((step["teacher_output"] - center) / step["teacher_temp"], dim=-1).chunk(2)
        student = F.log_softmax(step["output"][-1] / dino.student_temp, dim=-1).chunk(dino.num_crops)
        terms = [(-q * student[v]).sum(-1).mean() for iq, q in enumerate(teacher) for v in range(len(student))
                 if v != iq]
        assert len(terms) == 2 * 12 - 2
        assert math.isclose(step["loss"], (sum(terms) / len(terms)).item(), rel_tol=1e-5)
        # the centre: an exponential moving average of the teacher's batch mean
        center = dino.ema_center * center + (1 - dino.ema_center) * step["teacher_output"].mean(0, keepdim=True)
        assert _close(step["center_after"], center)
    # the teacher: an exponential moving average of the student, momentum cosine from 0.996 to 1
    first, second = steps
    m = 1 - 0.5 * (1 - dino.momentum) * (math.cos(math.pi * second["iteration"] / second["max_iteration"]) + 1)
    for name, teacher in second["teacher"].items():
        # a batch norm's running statistics are the teacher's own (from its forward passes), as in VISSL on GPUs
        if teacher.is_floating_point() and "num_batches_tracked" not in name and "running_" not in name:
            expected = m * first["teacher"][name] + (1 - m) * second["student_after"][name]
            assert _close(teacher, expected, atol=1e-8), name
    assert not torch.equal(first["teacher"]["trunk.blocks.0.attn.qk.weight"],
                           second["teacher"]["trunk.blocks.0.attn.qk.weight"])


def _check_moco(config, steps):
    moco = config.LOSS.moco_loss
    for step in steps:
        # InfoNCE of each query against its key (the positive) and the queue of earlier keys (negatives)
        query = F.normalize(step["output"], dim=1)
        logits = torch.cat([(query * step["key"]).sum(1, keepdim=True), query @ step["queue_before"]], 1)
        expected = F.cross_entropy(logits / moco.temperature, torch.zeros(len(query), dtype=torch.long))
        assert math.isclose(step["loss"], expected.item(), rel_tol=1e-5)
        # the keys replace the oldest entries of the queue; the pointer moves on by a batch
        start, batch = step["pointer_before"], len(step["key"])
        assert step["pointer_after"] == (start + batch) % moco.queue_size
        assert _close(step["queue_after"][:, start:start + batch], step["key"].T)
        kept = torch.ones(moco.queue_size, dtype=torch.bool)
        kept[start:start + batch] = False
        assert torch.equal(step["queue_after"][:, kept], step["queue_before"][:, kept])
    # the momentum encoder: built as a copy of the model, then an exponential moving average of it
    first, second = steps
    assert all(torch.equal(first["encoder"][name], value) for name, value in first["student_before"].items())
    for name, encoder in second["encoder"].items():
        if encoder.is_floating_point() and "num_batches_tracked" not in name:
            expected = moco.momentum * first["encoder"][name] + (1 - moco.momentum) * second["student_before"][name]
            assert _close(encoder, expected, atol=1e-8), name


def _sinkhorn(scores, epsilon, iterations):
    """Equal-partition soft codes of a batch of prototype scores (B x K): the SwAV paper's Algorithm 1."""
    codes = torch.exp(scores / epsilon).T
    codes /= codes.sum()
    prototypes, batch = codes.shape
    for _ in range(iterations):
        codes *= (1 / prototypes / codes.sum(1)).unsqueeze(1)
        codes *= (1 / batch / codes.sum(0)).unsqueeze(0)
    return (codes / codes.sum(0, keepdim=True)).T


def _check_swav(config, steps):
    swav = config.LOSS.swav_loss
    assert swav.normalize_last_layer and len(swav.crops_for_assign) == 2
    for step in steps:
        # the codes of each global crop predicted from every other crop, at temperature 0.1
        (scores,) = step["output"][1:]
        crops = scores.chunk(12)
        terms = []
        for assigned in swav.crops_for_assign:
            codes = _sinkhorn(crops[assigned], swav.epsilon, swav.num_iters)
            others = [v for v in range(len(crops)) if v != assigned]
            terms.append(sum(-(codes * F.log_softmax(crops[v] / swav.temperature, dim=1)).sum(1).mean()
                             for v in others) / len(others))
        assert math.isclose(step["loss"], (sum(terms) / len(terms)).item(), rel_tol=1e-5)
        # the prototypes learn, and are L2-normalised after every update (normalize_last_layer)
        before, after = step["student_before"]["heads.0.prototypes0.weight"], step["student_after"][
            "heads.0.prototypes0.weight"]
        assert not torch.equal(before, after)
        assert _close(after.norm(dim=1), torch.ones(len(after)))


def _check_barlow_twins(config, steps):
    barlow = config.LOSS.barlow_twins_loss
    for step in steps:
        # the cross-correlation of the two views' batch-standardised embeddings, pushed towards the identity
        z = step["output"]
        z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
        a, b = z.chunk(2)
        correlation = a.T @ b / len(a)
        on_diagonal = (torch.diagonal(correlation) - 1).pow(2).sum()
        off_diagonal = correlation.pow(2).sum() - torch.diagonal(correlation).pow(2).sum()
        expected = barlow.scale_loss * (on_diagonal + barlow.lambda_ * off_diagonal)
        assert math.isclose(step["loss"], expected.item(), rel_tol=1e-4)


SYMPTOM_KINDS = {"feature_std", "rank", "uniform_teacher", "uniform_assignment", "uniform_contrast", "rising_loss"}


def _check_health(config, steps):
    """health.jsonl holds one record per step with that step's loss (and DINO's teacher entropy, from the
    recorded teacher output and centre); metrics.json's epoch line holds the mean loss of the epoch's steps."""
    folder = Path(config.CHECKPOINT.DIR)
    records = [json.loads(line) for line in (folder / HEALTH_FILE).read_text().splitlines()]
    assert [record["iteration"] for record in records] == [1, 2]
    for record, step in zip(records, steps):
        assert math.isclose(record["loss"], step["loss"], rel_tol=1e-5) and record["loss_steps"] == 1
        # the embedding measured is the head's output of that step (SwAV: its embeddings, before the prototypes)
        embedding = step["output"][0] if isinstance(step["output"], list) else step["output"]
        assert record["method"] == config.LOSS.name and record["embedding_dim"] == embedding.shape[1]
        assert math.isclose(record["feature_std"], feature_std(embedding), rel_tol=1e-4)
        assert math.isclose(record["effective_rank"], effective_rank(embedding), rel_tol=1e-4)
        assert record["trunk_dim"] == WIDTH and 0 < record["trunk_feature_std"] < 1
        assert isinstance(record["symptoms"], dict) and set(record["symptoms"]) <= SYMPTOM_KINDS  # {kind: sentence}
        if config.LOSS.name == "dino_loss":
            teacher = F.softmax((step["teacher_output"] - step["center_before"]) / step["teacher_temp"], dim=-1)
            assert math.isclose(record["teacher_entropy"], mean_entropy(teacher), rel_tol=1e-4)
            assert math.isclose(record["max_entropy"], math.log(config.LOSS.dino_loss.output_dim), rel_tol=1e-5)
        if config.LOSS.name == "swav_loss":
            assert math.isclose(record["max_entropy"], math.log(step["output"][-1].shape[-1]), rel_tol=1e-9)
        if config.LOSS.name == "moco_loss":  # the softmax over the key and the queue
            assert math.isclose(record["max_entropy"], math.log(config.LOSS.moco_loss.queue_size + 1), rel_tol=1e-9)
    epoch = json.loads((folder / "metrics.json").read_text().splitlines()[-1])
    assert epoch["iteration"] == 2 and epoch["train_loss_steps"] == 2
    assert math.isclose(epoch["train_loss"], (steps[0]["loss"] + steps[1]["loss"]) / 2, rel_tol=1e-5)


CHECKS = {"dino": _check_dino, "moco": _check_moco, "swav": _check_swav, "barlow_twins": _check_barlow_twins}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CHECKS))
def test_two_training_steps(method, tmp_path, monkeypatch, data_root):
    config, steps = _train_two_steps(method, tmp_path, monkeypatch, data_root)
    _check_common(steps)
    CHECKS[method](config, steps)
    _check_health(config, steps)


@pytest.mark.slow
def test_dino_with_a_batch_norm_head_trains_on_cpu(tmp_path, monkeypatch, data_root):
    """VISSL turns the teacher's batch norms into SyncBatchNorm, which runs on GPUs only: on a CPU they stay
    BatchNorm1d, and the two steps are DINO's (loss, centre, teacher by hand)."""
    head = [SMALL_HEADS["dino"][0].replace("use_bn:false", "use_bn:true"), *SMALL_HEADS["dino"][1:]]
    config, steps = _train_two_steps("dino", tmp_path, monkeypatch, data_root, head)
    assert "heads.0.projection_head.1.running_mean" in steps[1]["teacher"]
    _check_common(steps)
    _check_dino(config, steps)
