"""bench/torch_methods.py's PyTorch reference pieces compute what our DINO and Barlow Twins steps compute.

The benchmark's ratio means something only if both sides do the same work; these check the pieces that are cheap
to compare (losses, the DINO head, LARS) on small shapes. The official formulas themselves are checked in
test_dino.py and test_barlow_twins.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from bench import torch_methods as T  # noqa: E402
from cass_jax.methods import barlow_twins_parts as bt  # noqa: E402
from cass_jax.methods import dino_parts as D  # noqa: E402


def test_dino_loss_and_centre_match_ours():
    rng = np.random.default_rng(0)
    batch, ncrops, out_dim = 3, 5, 16
    student = rng.normal(size=(ncrops * batch, out_dim)).astype(np.float32)
    teacher = rng.normal(size=(2 * batch, out_dim)).astype(np.float32)
    center = rng.normal(scale=0.1, size=(1, out_dim)).astype(np.float32)
    reference = T.DINOLoss(out_dim, ncrops, np.full(3, 0.04))
    reference.center = torch.tensor(center)
    loss = reference(torch.tensor(student), torch.tensor(teacher), epoch=1)
    ours = D.dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center), teacher_temp=0.04,
                       num_crops=ncrops)
    np.testing.assert_allclose(float(loss), float(ours), rtol=1e-5)
    np.testing.assert_allclose(reference.center.numpy(), D.update_center(jnp.asarray(center), jnp.asarray(teacher)),
                               rtol=1e-6, atol=1e-7)


def test_dino_head_with_our_weights_gives_our_outputs():
    head = D.DINOHead(out_dim=32, hidden_dim=24, bottleneck_dim=8)
    params = head.init(jax.random.key(0), jnp.zeros((2, 12)))["params"]
    reference = T.DINOHead(12, 32, hidden_dim=24, bottleneck_dim=8)
    linears = [module for module in reference.mlp if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        for index, linear in enumerate(linears):
            linear.weight.copy_(torch.tensor(np.asarray(params[f"mlp_{index}"]["kernel"]).T))
            linear.bias.copy_(torch.tensor(np.asarray(params[f"mlp_{index}"]["bias"])))
        weight = reference.last_layer.parametrizations.weight
        weight.original1.copy_(torch.tensor(np.asarray(params["last_layer_v"]).T))
        weight.original0.copy_(torch.tensor(np.asarray(params["last_layer_g"]))[:, None])
    x = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)
    expected = head.apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(reference(torch.tensor(x)).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in reference.parameters()) == sum(p.size for p in jax.tree.leaves(params))
    assert not weight.original0.requires_grad  # norm_last_layer: the scale is not trained


def test_barlow_twins_loss_matches_ours():
    rng = np.random.default_rng(2)
    z1, z2 = (rng.normal(size=(6, 10)).astype(np.float32) for _ in range(2))
    norm = torch.nn.BatchNorm1d(10, affine=False)
    loss = T.cross_correlation_loss(norm(torch.tensor(z1)), norm(torch.tensor(z2)), batch_size=6)
    ours, _ = bt.barlow_twins_loss(jnp.asarray(z1), jnp.asarray(z2))
    np.testing.assert_allclose(float(loss), float(ours), rtol=1e-5)


def test_lars_matches_ours_under_a_changing_learning_rate():
    rng = np.random.default_rng(3)
    params = {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,))}
    grads = [{name: rng.normal(size=value.shape) for name, value in params.items()} for _ in range(2)]
    lr_w, lr_b = (0.5, 2.0), (0.01, 0.03)
    optimizer = bt.lars(lambda step: jnp.where(step == 0, lr_w[0], lr_w[1]), weight_decay=0.1,
                        bias_learning_rate=lambda step: jnp.where(step == 0, lr_b[0], lr_b[1]))
    ours = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = optimizer.init(ours)
    theirs = {name: torch.tensor(value, dtype=torch.float32, requires_grad=True) for name, value in params.items()}
    reference = T.LARS([{"params": [theirs["kernel"]]}, {"params": [theirs["bias"]]}], lr=0, weight_decay=0.1,
                       weight_decay_filter=T.exclude_bias_and_norm, lars_adaptation_filter=T.exclude_bias_and_norm)
    for step in range(2):
        updates, state = optimizer.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads[step]), state,
                                          ours)
        ours = optax.apply_updates(ours, updates)
        for group, lr in zip(reference.param_groups, (lr_w[step], lr_b[step])):
            group["lr"] = lr
        for name, tensor in theirs.items():
            tensor.grad = torch.tensor(grads[step][name], dtype=torch.float32)
        reference.step()
        for name in params:
            np.testing.assert_allclose(theirs[name].detach().numpy(), ours[name], rtol=1e-5, atol=1e-7)
