import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from pirl_trainer.model.pirl import PIRLNet

B, S, P, EMBED = 2, 32, 16, 16


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return PIRLNet("resnet18", embed_dim=EMBED).eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, S, S, generator=g), torch.randn(B, 9, 3, P, P, generator=g)


def test_attributes(net):
    assert net.feature_dim == 512
    assert net.image_head.proj.in_features == 512
    assert net.jigsaw_head.patch_proj.in_features == 512


@torch.no_grad()
def test_forward_shapes_and_unit_norm(net):
    f_img, g_jig = net(*_inputs())
    assert f_img.shape == g_jig.shape == (B, EMBED)
    torch.testing.assert_close(f_img.norm(dim=1), torch.ones(B))
    torch.testing.assert_close(g_jig.norm(dim=1), torch.ones(B))


@torch.no_grad()
def test_features_and_image_embedding(net):
    image, patches = _inputs()
    assert net.features(image).shape == (B, 512)
    f_img, _ = net(image, patches)
    torch.testing.assert_close(net.image_embedding(image), f_img)


@torch.no_grad()
def test_batched_patches_equal_per_patch_trunk(net):
    # eval mode: BN uses running statistics, so batching cannot change per-patch outputs.
    image, patches = _inputs()
    _, g_jig = net(image, patches, generator=torch.Generator().manual_seed(5))
    per_patch = torch.stack(
        [torch.cat([net.trunk(patches[b, i : i + 1]) for i in range(9)]) for b in range(B)]
    )  # (B, 9, D), one trunk call per patch
    expected = torch.nn.functional.normalize(
        net.jigsaw_head(per_patch, torch.Generator().manual_seed(5)), dim=1
    )
    torch.testing.assert_close(g_jig, expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_channels_last_inputs_match(net):
    image, patches = _inputs()
    ref = net(image, patches, generator=torch.Generator().manual_seed(1))
    image_cl = image.contiguous(memory_format=torch.channels_last)
    flat_cl = patches.reshape(B * 9, 3, P, P).contiguous(memory_format=torch.channels_last)
    patches_cl = flat_cl.view(B, 9, 3, P, P)
    out = net(image_cl, patches_cl, generator=torch.Generator().manual_seed(1))
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_patches_take_one_trunk_call(net):
    shapes = []
    hook = net.trunk.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    try:
        net(*_inputs())
    finally:
        hook.remove()
    assert shapes == [(B, 3, S, S), (B * 9, 3, P, P)]


def test_wrong_patch_shape_raises(net):
    image, patches = _inputs()
    with pytest.raises(ValueError, match="patches must be"):
        net(image, patches[:, :8])
    with pytest.raises(ValueError, match="batch"):
        net(image[:1], patches)


def test_gradients_reach_trunk_from_both_heads():
    torch.manual_seed(0)
    model = PIRLNet("resnet18", embed_dim=EMBED).train()
    f_img, g_jig = model(*_inputs())
    f_img.sum().backward(retain_graph=True)
    assert model.jigsaw_head.mix.weight.grad is None
    assert model.trunk.conv1.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    g_jig.sum().backward()
    assert model.image_head.proj.weight.grad is None
    assert model.trunk.conv1.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_phases_are_profiled(net):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        net(*_inputs())
    names = {e.name for e in prof.events()}
    assert {"trunk_image", "trunk_patches", "heads"} <= names


@torch.no_grad()
def test_rotation_view_uses_one_linear_head():
    """The rotation view's It is one image: g is a single linear layer on its pooled feature (paper A.2)."""
    torch.manual_seed(0)
    net = PIRLNet("resnet18", embed_dim=EMBED, num_patches=1).eval()
    linears = [m for m in net.jigsaw_head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 512
    image, rotated = torch.randn(B, 3, S, S), torch.randn(B, 1, 3, S, S)
    f_img, g_rot = net(image, rotated)
    assert g_rot.shape == (B, EMBED)
    expected = torch.nn.functional.normalize(linears[0](net.trunk(rotated[:, 0])), dim=1)
    torch.testing.assert_close(g_rot, expected)


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.startswith("trunk.") and ("running_" in k or "num_batches_tracked" in k)}


@pytest.mark.parametrize("sync", [False, True])
def test_patch_pass_leaves_running_bn_stats_to_the_image(sync):
    """Default: after a train-mode forward the trunk's running BatchNorm statistics are exactly those of the
    image pass alone (the patches are normalised by their own batch statistics but do not update them), so an
    evaluation on whole images sees statistics of whole images. patch_bn_stats=True keeps the old blend."""
    from pirl_trainer.model.sync_batchnorm import _convert_to_gloo

    image, patches = _inputs(3)
    patches = patches * 3 + 1  # a distribution unlike the image's, so a blend would show

    def fresh(**kw):
        torch.manual_seed(0)
        model = PIRLNet("resnet18", embed_dim=EMBED, **kw).train()
        return _convert_to_gloo(model) if sync else model  # GlooSyncBatchNorm2d subclasses nn.BatchNorm2d

    net = fresh()
    before = _bn_buffers(net)
    f_img, g_jig = net(image, patches, generator=torch.Generator().manual_seed(0))
    after = _bn_buffers(net)

    ref = fresh()
    ref.trunk(image)  # the image pass alone
    expected = _bn_buffers(ref)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the image pass did update them
    for key, value in expected.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))

    # the patches were still normalised by their own batch statistics (train mode), as before the option
    old = fresh(patch_bn_stats=True)
    f_old, g_old = old(image, patches, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(f_img, f_old)
    torch.testing.assert_close(g_jig, g_old)
    blended = _bn_buffers(old)
    assert any(not torch.equal(blended[k], expected[k]) for k in expected if "running_mean" in k)

    # NPID++ (no patches) is unchanged
    npid = fresh()
    npid(image, None)
    for key, value in expected.items():
        torch.testing.assert_close(_bn_buffers(npid)[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("patches", [9, 1])
def test_bn_heads_centre_each_embedding_dimension_over_the_batch(patches):
    """head_norm="bn": before the L2 normalisation every head's output has zero batch mean per dimension (the
    common direction that collapses short runs is gone); "none" is the paper's plain linear head."""
    torch.manual_seed(0)
    net = PIRLNet("resnet18", embed_dim=EMBED, num_patches=patches, head_norm="bn").train()
    plain = PIRLNet("resnet18", embed_dim=EMBED, num_patches=patches).train()
    plain.load_state_dict(net.state_dict(), strict=False)  # the same linear weights; "bn" adds running stats
    image = torch.randn(8, 3, S, S)
    v = net.trunk(image)
    centred = net.image_head(v)
    torch.testing.assert_close(centred.mean(0), torch.zeros(EMBED), atol=1e-5, rtol=0)
    raw = plain.image_head(v)
    torch.testing.assert_close(centred, (raw - raw.mean(0)) / torch.sqrt(raw.var(0, unbiased=False) + 1e-5))
    assert raw.mean(0).abs().max() > 0.1  # what the plain head keeps: a shared component
    v_patches = torch.randn(8, patches, 512).relu()
    torch.testing.assert_close(net.jigsaw_head(v_patches).mean(0), torch.zeros(EMBED), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="head norm must be one of"):
        PIRLNet("resnet18", head_norm="layer")
