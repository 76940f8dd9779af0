"""U-Net shapes for odd sizes and both up-sampling paths."""
import pytest
import torch

from model import UNet, count_parameters


@pytest.mark.parametrize("bilinear", [True, False])
@pytest.mark.parametrize("hw", [(16, 16), (33, 47), (64, 64), (17, 31)])
def test_output_size_matches_input(bilinear, hw):
    model = UNet(n_channels=1, n_classes=1, base_channels=4, bilinear=bilinear).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, *hw))
    assert out.shape == (2, 1, *hw)


def test_multichannel_multiclass_and_training_step_transposed():
    model = UNet(n_channels=3, n_classes=3, base_channels=4, bilinear=False)
    x = torch.randn(2, 3, 33, 47)
    out = model(x)
    assert out.shape == (2, 3, 33, 47)
    out.mean().backward()  # the transposed-conv path trains (the post's crashed before the first step)
    assert all(p.grad is not None for p in model.parameters())


def test_rejects_too_small_and_wrong_channels():
    model = UNet(base_channels=4)
    with pytest.raises(ValueError, match=r">= \(16, 16\)"):
        model(torch.zeros(1, 1, 15, 64))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.zeros(1, 3, 32, 32))


def test_post_sized_model_and_args():
    model = UNet(base_channels=64)
    assert 13_000_000 < count_parameters(model) < 13_500_000  # the post's U-Net, without redundant conv biases
    assert model.model_args == {"n_channels": 1, "n_classes": 1, "base_channels": 64, "bilinear": True, "dim": 2,
                                "pool": None, "norm": "batch"}


def test_folded_copy_keeps_its_bias_with_grad_enabled():
    from model import fold_batchnorm
    torch.manual_seed(0)
    model = UNet(base_channels=4).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 1, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
    got = fold_batchnorm(model)(x)  # grad mode on: the folded convolutions must still add their bias
    torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dim,size", [(2, (32, 48)), (3, (17, 16, 19))])
def test_dense_upsampling_gradient_equals_the_plain_backward(dim, size, monkeypatch):
    """The gradient hook in ``Up`` only changes the layout the up-sampling's backward receives, not a value."""
    import model as model_module
    from runtime import channels_last, to_channels_last

    def grads(hook_factory, dense: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(model_module, "_dense_in_format_of", hook_factory)
        monkeypatch.setattr(model_module, "DENSE_UPSAMPLING_GRADIENT", dense)
        torch.manual_seed(0)
        net = to_channels_last(UNet(2, 3, base_channels=4, dim=dim), dim)
        x = channels_last(torch.randn(2, 2, *size))
        net(x).square().mean().backward()
        return [p.grad for p in net.parameters()]

    seen = []  # (the forward output's layout, was the incoming gradient dense in it, is the outgoing one)

    def recording(x):
        hook = original(x)
        fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
        if not x.is_contiguous(memory_format=fmt):  # the 1x1 bottleneck's up-sampling comes out NCHW
            fmt = torch.contiguous_format

        def check(g):
            out = hook(g)
            seen.append((g.is_contiguous(memory_format=fmt), out.is_contiguous(memory_format=fmt)))
            return out
        return check

    original = model_module._dense_in_format_of
    dense = grads(recording, True)
    plain = grads(recording, False)  # the switch the benchmark's lever uses: no hook at all
    for a, b in zip(dense, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(seen) == 4 and all(after for _, after in seen)  # every gradient left the hook dense
    assert not all(before for before, _ in seen)  # and cat's backward had handed on strided ones


# ---------------------------------------------------------------- 3D
@pytest.mark.parametrize("bilinear", [True, False])
@pytest.mark.parametrize("dhw", [(16, 16, 16), (17, 23, 19), (21, 16, 33)])
def test_3d_output_size_matches_odd_input(bilinear, dhw):
    model = UNet(n_channels=2, n_classes=3, base_channels=2, bilinear=bilinear, dim=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 2, *dhw))
    assert out.shape == (1, 3, *dhw)


def test_3d_pooling_can_skip_a_coarse_axis_and_checks_the_minimum_size():
    pool = [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    model = UNet(n_channels=1, n_classes=2, base_channels=2, dim=3, pool=pool).eval()
    assert model.min_size == (4, 16, 16)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 5, 20, 17)).shape == (1, 2, 5, 20, 17)
    with pytest.raises(ValueError, match=r">= \(4, 16, 16\)"):
        model(torch.zeros(1, 1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(N, 1, D, H, W\)"):
        model(torch.zeros(1, 1, 16, 16))
    assert model.model_args["pool"] == pool and model.model_args["dim"] == 3


def test_model_args_of_an_older_checkpoint_rebuild_the_2d_default():
    from checkpoint import build_model
    old = {"n_channels": 1, "n_classes": 1, "base_channels": 4, "bilinear": True}  # written before dim / pool / norm
    model = build_model(old)
    assert model.args.dim == 2 and model.min_size == (16, 16) and model.args.norm == "batch"
    model.load_state_dict(UNet(base_channels=4).state_dict())  # same parameter names as before


def test_instance_norm_normalises_each_patch_alone_and_rebuilds_from_its_args():
    from checkpoint import build_model
    from model import fold_batchnorm
    torch.manual_seed(0)
    model = UNet(n_channels=1, n_classes=3, base_channels=2, dim=3, norm="instance")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(2, 1, 33, 35, 32)  # odd sizes, 2 x 2 x 2 voxels at the bottom: statistics need more than one
    model.train()
    out = model(x)
    assert out.shape == (2, 3, 33, 35, 32)
    # no batch statistics: a patch's output does not depend on the other patch, and eval mode equals train mode
    with torch.no_grad():
        assert torch.allclose(model(x[:1]), out[:1].detach(), atol=1e-5)
        model.eval()
        assert torch.allclose(model(x), out.detach(), atol=1e-5)
        assert torch.allclose(fold_batchnorm(model)(x), out.detach(), atol=1e-5)  # nothing to fold
    again = build_model(model.model_args)
    again.load_state_dict(model.state_dict())
    assert again.args.norm == "instance"
    with pytest.raises(ValueError, match="norm one of batch, instance"):
        UNet(norm="group")


@pytest.mark.parametrize("shape", [(2, 5, 6, 7, 4), (1, 3, 9, 8), (3, 4, 5, 6)])
def test_instance_norm_equals_the_plain_layer_in_the_channels_last_layout(shape):
    """The per-item batch-norm path (``model._PerItemBatchNorm``) against ``torch.nn``'s instance norm: values and
    gradients, channels-last input, output in the input's layout."""
    from model import InstanceNorm2d, InstanceNorm3d
    torch.manual_seed(0)
    dim = len(shape) - 2
    ours = (InstanceNorm2d if dim == 2 else InstanceNorm3d)(shape[1], affine=True)
    plain = (torch.nn.InstanceNorm2d if dim == 2 else torch.nn.InstanceNorm3d)(shape[1], affine=True)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0)
        ours.bias.uniform_(-1.0, 1.0)
        plain.load_state_dict(ours.state_dict())
    fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
    x = (torch.randn(shape) * 3 + 1).contiguous(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(xa), plain(xb)
    assert torch.allclose(a, b, atol=1e-5) and a.is_contiguous(memory_format=fmt)
    g = torch.randn(shape)
    (a * g).sum().backward()
    (b * g).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-4)
    assert torch.allclose(ours.weight.grad, plain.weight.grad, atol=1e-4)
    assert torch.allclose(ours.bias.grad, plain.bias.grad, atol=1e-4)
    ours.eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), b.detach(), atol=1e-5)  # the same in eval mode: no running statistics


def test_batchnorm_running_stats_are_a_debiased_average():
    """Batches of constant 1, 2, 3: the running mean is the momentum-weighted mean of the batches alone
    (hand-computed), not pulled towards the initial 0; the training output is plain BatchNorm's."""
    from model import BatchNorm2d

    bn, plain = BatchNorm2d(1, momentum=0.1), torch.nn.BatchNorm2d(1, momentum=0.1)
    for v, expected in ((1.0, 1.0), (2.0, (0.09 * 1 + 0.1 * 2) / 0.19), (3.0, (0.081 * 1 + 0.09 * 2 + 0.1 * 3) / 0.271)):
        x = torch.full((2, 1, 3, 3), v) + torch.tensor([[[[0.0]]], [[[1.0]]]])  # batch mean v + 0.5, variance > 0
        assert torch.equal(bn(x), plain(x))
        assert bn.running_mean.item() == pytest.approx(expected + 0.5, rel=1e-6)
    assert bn.num_batches_tracked.item() == 3
    assert set(bn.state_dict()) == set(plain.state_dict())


def test_batchnorm_matches_plain_update_after_the_debias_steps():
    from model import BatchNorm2d

    bn, plain = BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    bn.load_state_dict(plain.state_dict())
    with torch.no_grad():
        bn.num_batches_tracked.fill_(BatchNorm2d.DEBIAS_STEPS)
        plain.num_batches_tracked.fill_(BatchNorm2d.DEBIAS_STEPS)
        x = torch.randn(8, 4, 5, 5)
        bn(x), plain(x)
    assert torch.allclose(bn.running_mean, plain.running_mean, rtol=0, atol=1e-7)
    assert torch.allclose(bn.running_var, plain.running_var, rtol=0, atol=1e-7)
    assert bn._debiased  # no more host reads of the counter
    assert bn.num_batches_tracked.item() == BatchNorm2d.DEBIAS_STEPS + 1
    bn.load_state_dict(torch.nn.BatchNorm2d(4).state_dict())  # a fresh count debiases again
    assert not bn._debiased


def test_unet_uses_the_debiased_batchnorm_and_eval_sees_batch_statistics_after_one_step():
    """One training step from the initial placeholders: eval-mode output equals train-mode output on that batch
    (running statistics = that batch's statistics), which plain BatchNorm only reaches after many steps."""
    from model import BatchNorm2d

    torch.manual_seed(0)
    model = UNet(base_channels=4)
    assert all(type(m) is BatchNorm2d for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(8, 1, 64, 64) * 3 + 2
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
        plain = UNet(base_channels=4)
        plain.load_state_dict(model.state_dict())
        plain.apply(lambda m: m.reset_running_stats() if isinstance(m, torch.nn.BatchNorm2d) else None)
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.__class__ = torch.nn.BatchNorm2d
        plain.train()(x)
        plain_eval = plain.eval()(x)
    # eval normalises with the unbiased variance, training with the biased one: equal up to n / (n - 1)
    assert (eval_out - train_out).abs().max() < 0.05 * train_out.abs().max()
    assert (plain_eval - train_out).abs().max() > 0.3 * train_out.abs().max()  # placeholders still weigh 90 %


def test_batchnorm_compiles_to_one_graph_without_recompiling_per_step():
    """The batch count is a host value: under torch.compile the module is plain BatchNorm instead of a graph
    break plus one recompilation per training step."""
    from model import BatchNorm2d

    torch.compiler.reset()
    compiled = torch.compile(BatchNorm2d(3), backend="eager", fullgraph=True)
    compiled(torch.randn(2, 3, 4, 4))  # the one compilation
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(3):
            compiled(torch.randn(2, 3, 4, 4))
