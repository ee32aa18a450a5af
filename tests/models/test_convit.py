"""The ConViT trunk against timm (the reference port of the official code) and against the definition."""
import copy
import math

import pytest
import torch

from convit_ssl.models import PRESETS, create_trunk
from convit_ssl.models.convit import GatedPositionalSelfAttention, _separable_filter, axis_offsets, relative_positions
from oracles import TINY_ARGS, naive_positional_attention, timm_and_ours


def _relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name,img_size", [("convit_tiny", 224), ("convit_tiny", 160),
                                           pytest.param("convit_small", 224, marks=pytest.mark.slow),
                                           ("convit_small", 96)])
def test_outputs_and_gradients_match_timm(name, img_size):
    reference, trunk = timm_and_ours(name, img_size=img_size)
    images = torch.randn(2, 3, img_size, img_size)
    # train mode without dropout: the same function, and the gradients of every parameter
    reference.train()
    trunk.train()
    ours = trunk(images)[0]
    theirs = reference(images)
    assert _relative_error(ours, theirs) < 1e-5
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    theirs_grads = {name: p.grad for name, p in reference.named_parameters()}
    from convit_ssl.checkpoint import to_timm_state_dict

    names = list(to_timm_state_dict(trunk))
    for our_name, (timm_name, param) in zip(dict(trunk.named_parameters()), zip(names, trunk.parameters())):
        assert param.grad is not None, our_name
        # positional_proj.bias has an exactly zero gradient (softmax ignores a shift): compare to rounding noise
        difference = (param.grad - theirs_grads[timm_name]).abs().max()
        assert difference <= 1e-4 * theirs_grads[timm_name].abs().max() + 1e-6, our_name


def test_float64_parity_is_tight():
    reference, trunk = timm_and_ours("convit_tiny", img_size=64)
    reference.double()
    trunk.double()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert _relative_error(trunk(images)[0], reference(images)) < 1e-12


def test_local_init_peaks_at_assigned_offsets():
    trunk = create_trunk("convit_small", img_size=224)
    attn = trunk.blocks[0].attn
    kernel = 3
    grid = (14, 14)
    positional = attn.positional_attention(grid)
    query_row, query_col = 7, 7
    query = query_row * grid[1] + query_col
    for h1 in range(kernel):
        for h2 in range(kernel):
            head = h1 + kernel * h2
            peak = positional[head, query].argmax().item()
            expected = (query_row + h1 - 1) * grid[1] + (query_col + h2 - 1)
            assert peak == expected, (head, divmod(peak, grid[1]))
    assert torch.allclose(attn.gate(), torch.full((9,), 1 / (1 + math.exp(-1))))
    assert torch.equal(attn.v.weight, torch.eye(432))


def test_non_square_grid_uses_real_grid_shape():
    # 14 x 10 patches: sqrt(140) is not an integer, so a grid taken from sqrt(N) gives other offsets
    trunk = create_trunk("convit_tiny", img_size=(224, 160))
    attn = trunk.blocks[0].attn
    ours = attn.positional_attention((14, 10)).double()
    assert torch.allclose(ours, naive_positional_attention(attn, 14, 10), atol=1e-6)
    # the head with offset (+0.5, +0.5) (H=4: half-integer centres) attends equally to its 2x2 neighbourhood
    table = relative_positions((14, 10), torch.device("cpu"), torch.float32)
    assert table.shape == (140, 140, 3)
    assert table[0, 11].tolist() == [1.0, 1.0, 2.0]  # one row down, one column right on a 10-wide grid
    images = torch.randn(1, 3, 224, 160)
    assert trunk(images)[0].shape == (1, 192)


def test_residual_stream_is_token_major_in_every_block():
    # the patch embedding's flatten + transpose is a channel-major view; carried into the blocks, every layer norm,
    # residual addition and projection of the GPSA blocks works on strided memory
    trunk = create_trunk("convit_tiny", img_size=(64, 48))
    layouts = []
    for block in trunk.blocks:
        block.register_forward_pre_hook(lambda module, args: layouts.append(args[0].is_contiguous()))
    trunk(torch.randn(2, 3, 64, 48))
    assert layouts == [True] * len(trunk.blocks)


@pytest.mark.parametrize("crops", ["global", "local", "both"])
def test_multi_crop_gradients_match_finite_differences_in_float64(crops):
    """One step on 32 px global and 16 px local crops (8 x 8 and 4 x 4 patch grids; the position embedding is
    resampled for the local ones): the gradient of the position embedding, of the positional projection and of the
    gates, along a random direction, equals the central finite difference of the loss in float64."""
    torch.manual_seed(0)
    trunk = create_trunk("convit_tiny", **{**TINY_ARGS, "patch_size": 4}).double()
    with torch.no_grad():
        for block in trunk.blocks[:2]:
            block.attn.gating.normal_()  # gates away from their shared init value
    global_crops = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    local_crops = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    batches = {"global": [global_crops], "local": [local_crops], "both": [global_crops, local_crops]}[crops]
    weights = [torch.randn(len(images), trunk.embed_dim, dtype=torch.float64) for images in batches]

    def loss():  # a random linear function of the features: every feature's gradient counts
        return sum((trunk(images)[0] * weight).sum() for images, weight in zip(batches, weights))

    loss().backward()
    parameters = {"pos_embedding": trunk.pos_embedding, "block 1 positional_proj": trunk.blocks[0].attn.positional_proj,
                  "block 2 gating": trunk.blocks[1].attn.gating}
    step = 1e-4  # rounding error ~ 1e-16 |loss| / step, truncation error ~ step ** 2
    for name, parameter in parameters.items():
        parameter = parameter.weight if isinstance(parameter, torch.nn.Linear) else parameter
        direction = torch.randn_like(parameter)
        analytic = (parameter.grad * direction).sum().item()
        with torch.no_grad():
            parameter += step * direction
            plus = loss().item()
            parameter -= 2 * step * direction
            minus = loss().item()
            parameter += step * direction
        assert analytic == pytest.approx((plus - minus) / (2 * step), rel=1e-6, abs=1e-12), name
        assert abs(analytic) > 1e-6, name  # the direction moves the loss: the comparison is not 0 == 0


def test_axis_offset_tables_cached_per_length_device_dtype():
    axis_offsets.cache_clear()
    trunk = create_trunk("convit_tiny", img_size=64)
    trunk(torch.randn(1, 3, 64, 64))  # 4 x 4 grid
    trunk(torch.randn(1, 3, 32, 32))  # 2 x 2 grid
    trunk(torch.randn(1, 3, 64, 64))
    info = axis_offsets.cache_info()
    # one table per axis length; every GPSA layer asks twice (rows, columns) per forward
    assert info.misses == 2 and info.hits == 3 * 2 * trunk.local_up_to_layer - 2
    assert axis_offsets(3, torch.device("cpu"), torch.float32)[0, 2].tolist() == [2.0, 4.0]


def _random_positional_weights(attn, scale=1.0):
    with torch.no_grad():
        attn.positional_proj.weight.copy_(scale * torch.randn_like(attn.positional_proj.weight))
        attn.positional_proj.bias.copy_(torch.randn_like(attn.positional_proj.bias))


@pytest.mark.parametrize("grid", [(5, 3), (14, 10), (7, 7)])
def test_positional_attention_is_the_kronecker_product_of_its_factors(grid):
    torch.manual_seed(0)
    attn = GatedPositionalSelfAttention(dim=36, num_heads=9).double()
    _random_positional_weights(attn, scale=2.0)
    rows, cols = attn.positional_factors(grid)
    assert rows.shape == (9, grid[0], grid[0]) and cols.shape == (9, grid[1], grid[1])
    product = torch.stack([torch.kron(rows[h], cols[h]) for h in range(9)])
    definition = naive_positional_attention(attn, *grid)  # softmax over all N keys of w . r + b
    assert (product - definition).abs().max() < 1e-13
    assert (attn.positional_attention(grid) - definition).abs().max() < 1e-13
    # the separable filter applies exactly this matrix
    v = torch.randn(2, 9, grid[0] * grid[1], 4, dtype=torch.float64)
    expected = (definition @ v).permute(1, 2, 0, 3)  # (H, N, B, D)
    assert (_separable_filter(rows, cols, v, grid) - expected).abs().max() < 1e-12


def _naive_gpsa(attn, x, grid):
    """The reference GPSA (timm's order: mix, renormalise, then @ v) with the definition's P, (B, N, C)."""
    B, N, C = x.shape
    q, k = attn.qk(x).reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    v = attn.v(x).reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    content = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    gate = attn.gate().view(1, -1, 1, 1)
    mixed = (1 - gate) * content + gate * naive_positional_attention(attn, *grid)
    return attn.proj(((mixed / mixed.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("grid", [(5, 3), (4, 6)])
def test_gpsa_on_non_square_grids_matches_the_definition_in_float64(grid):
    torch.manual_seed(0)
    attn = GatedPositionalSelfAttention(dim=36, num_heads=9).double()
    _random_positional_weights(attn)
    x = torch.randn(2, grid[0] * grid[1], 36, dtype=torch.float64, requires_grad=True)
    ours, theirs = attn(x, grid), _naive_gpsa(attn, x, grid)
    assert _relative_error(ours, theirs) < 1e-12
    weights = torch.randn_like(ours)
    ours_grads = torch.autograd.grad((ours * weights).sum(), [x, *attn.parameters()])
    theirs_grads = torch.autograd.grad((theirs * weights).sum(), [x, *attn.parameters()])
    for name, a, b in zip(["x"] + [n for n, _ in attn.named_parameters()], ours_grads, theirs_grads):
        tolerance = 1e-12 * b.abs().max() + (1e-14 if name == "positional_proj.bias" else 0.0)
        assert (a - b).abs().max() <= tolerance, name


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_gpsa_matches_the_definition_at_extreme_gates(dtype, tolerance):
    """The mix runs as (1 - g) * (content + e^gating * positional): from gates that are all content to
    gates past float32's overflow of e^gating (88.7), output and gradients stay the definition's."""
    torch.manual_seed(0)
    attn = GatedPositionalSelfAttention(dim=36, num_heads=9)
    _random_positional_weights(attn)
    with torch.no_grad():
        attn.gating.copy_(torch.tensor([-40.0, -12.0, -3.0, 0.0, 1.0, 5.0, 17.0, 30.0, 100.0]))
    reference = copy.deepcopy(attn).double()
    grid = (4, 5)
    x = torch.randn(2, 20, 36, dtype=torch.float64)
    ours = attn.to(dtype)(x.to(dtype).requires_grad_(), grid)
    theirs = _naive_gpsa(reference, x.requires_grad_(), grid)
    assert _relative_error(ours.double(), theirs) < tolerance
    weights = torch.randn_like(theirs)
    ours_grads = torch.autograd.grad((ours * weights.to(dtype)).sum(), list(attn.parameters()))
    theirs_grads = torch.autograd.grad((theirs * weights).sum(), list(reference.parameters()))
    for (name, _), a, b in zip(attn.named_parameters(), ours_grads, theirs_grads):
        assert torch.isfinite(a).all(), name
        # positional_proj.bias: zero in exact arithmetic (a softmax ignores a shift), rounding noise here
        assert (a.double() - b).abs().max() <= 10 * tolerance * b.abs().max() + 10 * tolerance, name


def test_positional_attention_subnormals_flushed_below_rounding():
    attn = GatedPositionalSelfAttention(dim=192, num_heads=4)
    attn.local_init()
    rel = relative_positions((14, 14), torch.device("cpu"), torch.float32)
    logits = torch.nn.functional.linear(rel, attn.positional_proj.weight, attn.positional_proj.bias)
    reference = logits.permute(2, 0, 1).softmax(-1)  # the reference's float32 softmax
    tiny = torch.finfo(torch.float32).tiny
    subnormal = (reference > 0) & (reference < tiny)
    assert subnormal.float().mean() > 0.01, "at local init a few percent of the entries are subnormal"
    with torch.no_grad():
        rows, cols = attn.positional_factors((14, 14))
        ours = attn.positional_attention((14, 14))
    for probs in (rows, cols, ours):
        assert not ((probs > 0) & (probs < tiny)).any()
    # the factors' product rounds differently from one softmax over N keys: a few float32 steps per entry
    normal = ~subnormal & (reference > 0)
    assert ((ours - reference).abs() <= 1e-6 * reference)[normal].all()
    # the flushed entries moved by less than the smallest normal float, 1e-31 of the rounding step at 1
    assert (ours - reference)[~normal].abs().max() < tiny


# the presets wider than 192 take seconds each to build and count (twice: ours and timm's); the two tiny ones, with
# and without GPSA, go through the same code in make test-fast
@pytest.mark.parametrize("arch", [pytest.param(arch, marks=pytest.mark.slow) if kwargs["embed_dim"] > 192 else arch
                                  for arch, kwargs in PRESETS.items()])
def test_preset_size_matches_timm_and_paper(arch):
    import timm

    from convit_ssl.models.flops import count_flops

    paper_params = {"convit_tiny": 6e6, "convit_tiny_plus": 10e6, "convit_small": 27e6, "convit_small_plus": 48e6,
                    "convit_base": 86e6, "convit_base_plus": 152e6}
    timm_name = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224",
                 "deit_base": "deit_base_patch16_224"}.get(arch)
    trunk = create_trunk(arch)
    params = sum(p.numel() for p in trunk.parameters())
    flops = count_flops(trunk)
    if timm_name is None:
        heads = PRESETS[arch]["num_heads"]
        reference = timm.create_model("convit_tiny", pretrained=False, num_classes=0,
                                      embed_dim=PRESETS[arch]["embed_dim"] // heads, num_heads=heads)
    else:
        reference = timm.create_model(timm_name, num_classes=0)
    assert params == sum(p.numel() for p in reference.parameters())
    # our fast GPSA filters v by the two factors of P separately: N (GH + GW) C more multiply-adds per GPSA
    # layer; the reference's per-image positional projection (N^2 x 3 -> H) is not executed
    layers, width, heads = PRESETS[arch]["local_up_to_layer"], PRESETS[arch]["embed_dim"], PRESETS[arch]["num_heads"]
    extra = layers * (196 * (14 + 14) * width - 196**2 * 3 * heads)
    assert abs(flops - (count_flops(reference) + extra)) / flops < 0.001
    if arch in paper_params:
        with_head = params + 1000 * PRESETS[arch]["embed_dim"] + 1000
        assert abs(with_head - paper_params[arch]) / paper_params[arch] < 0.05


def test_attention_dropout_keeps_reference_semantics():
    trunk = create_trunk("convit_tiny", **TINY_ARGS, attn_drop_rate=0.5).train()
    attn = trunk.blocks[0].attn
    tokens = torch.randn(2, 16, 36)
    torch.manual_seed(1)
    out = attn(tokens, (4, 4))
    torch.manual_seed(1)
    content = attn.content_attention(tokens)
    mixed = (1 - attn.gate().view(1, -1, 1, 1)) * content + attn.gate().view(1, -1, 1, 1) * attn.positional_attention((4, 4))
    mixed = torch.nn.functional.dropout(mixed / mixed.sum(-1, keepdim=True), 0.5)
    v = attn.v(tokens).reshape(2, 16, 9, 4).transpose(1, 2)
    expected = attn.proj((mixed @ v).transpose(1, 2).reshape(2, 16, 36))
    assert torch.allclose(out, expected, atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    plain = create_trunk("convit_tiny", **TINY_ARGS)
    checkpointed = create_trunk("convit_tiny", **TINY_ARGS, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    for model in (plain, checkpointed):
        model(images)[0].square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.slow
def test_torch_compile_matches_eager():
    trunk = create_trunk("convit_tiny", **TINY_ARGS).eval()
    images = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(trunk)
    with torch.no_grad():
        assert torch.allclose(compiled(images)[0], trunk(images)[0], atol=1e-5)


@pytest.mark.slow
def test_torch_compile_training_step_matches_eager():
    trunk = create_trunk("convit_tiny", **TINY_ARGS).train()
    images = torch.randn(2, 3, 32, 32)
    trunk(images)[0].square().sum().backward()
    eager_grads = {name: p.grad.clone() for name, p in trunk.named_parameters()}
    trunk.zero_grad()
    torch.compile(trunk)(images)[0].square().sum().backward()
    for name, p in trunk.named_parameters():
        if not name.endswith("positional_proj.bias"):  # zero up to rounding (softmax ignores a shift)
            assert _relative_error(p.grad, eager_grads[name]) < 1e-4, name  # float32 rounding is 3e-5 here


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_positional_attention_keeps_full_precision_under_autocast(dtype):
    layer = GatedPositionalSelfAttention(192, 4)
    layer.local_init()
    with torch.no_grad():
        layer.positional_proj.weight.add_(0.3 * torch.randn(4, 3))  # a trained-looking, non-integer map
        full = layer.positional_attention((14, 14))
        with torch.autocast("cpu", dtype=dtype):
            low = layer.positional_attention((14, 14), dtype=dtype)
    assert low.dtype == dtype
    assert torch.equal(low, full.to(dtype))  # only the final cast rounds


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 0.01), (torch.bfloat16, 0.05)])
def test_autocast_training_step_stays_close(dtype, tolerance):
    """VISSL's AMP (float16 autocast with a scaled loss, as its GradScaler does) and bfloat16: the output
    and every gradient stay close to float32's. positional_proj.bias is left out: a softmax ignores a
    shift of its logits, so that gradient is zero in exact arithmetic and rounding noise in practice."""
    trunk = create_trunk("convit_tiny", **TINY_ARGS)
    images = torch.randn(2, 3, 32, 32)
    reference = trunk(images)[0]
    reference.square().mean().backward()
    reference_grads = {name: p.grad.clone() for name, p in trunk.named_parameters()}
    trunk.zero_grad()
    loss_scale = 2.0**16
    with torch.autocast("cpu", dtype=dtype):
        low = trunk(images)[0]
    (low.float().square().mean() * loss_scale).backward()
    assert _relative_error(low.float(), reference) < tolerance
    for name, p in trunk.named_parameters():
        if not name.endswith("positional_proj.bias"):
            assert _relative_error(p.grad / loss_scale, reference_grads[name]) < tolerance, name
