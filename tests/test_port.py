"""Porting tests: parity with real timm/torchvision models, file formats, merging and clear errors.

Parity tests randomise every BatchNorm / LayerNorm parameter, running statistic and bias first, so that
no parameter is a no-op (timm zero-initialises each block's last BN scale; torchvision's init explodes).
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cass_jax.models import create_model, init_variables
from cass_jax.port import (
    load_pretrained_variables,
    read_checkpoint,
    load_variables,
    merge_variables,
    port_big_vision_vit,
    port_timm_resnet,
    port_timm_vit,
    port_torchvision_resnet,
    resample_pos_embed,
    save_variables,
)
from cass_jax.port.__main__ import main as port_cli


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


@functools.cache
def jit_apply(model):
    return jax.jit(model.apply, static_argnames=("train", "return_features", "mutable"))


def randomise_norms_and_biases(torch_model, seed: int = 0):
    """Gives every norm parameter, running statistic, bias and class/position token a random value."""
    torch = pytest.importorskip("torch")

    gen = torch.Generator().manual_seed(seed)

    def rand(t, low, high):
        return low + (high - low) * torch.rand(t.shape, generator=gen)

    with torch.no_grad():
        for name, module in torch_model.named_modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                module.weight.copy_(rand(module.weight, 0.5, 1.5))
                module.bias.copy_(rand(module.bias, -0.2, 0.2))
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(rand(module.running_mean, -0.2, 0.2))
                module.running_var.copy_(rand(module.running_var, 0.5, 1.5))
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.bias is not None:
                module.bias.copy_(rand(module.bias, -0.05, 0.05))
        for name in ("cls_token", "pos_embed"):
            if hasattr(torch_model, name):
                getattr(torch_model, name).copy_(rand(getattr(torch_model, name), -0.1, 0.1))
    return torch_model


def state_dict_numpy(torch_model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}


def torch_forward(torch_model, head_name: str, x_nhwc: np.ndarray):
    """Returns (logits, pooled features) of a torch model; features are the head's input."""
    torch = pytest.importorskip("torch")

    captured = {}

    def keep_input(module, inputs, output) -> None:  # returning None leaves the output unchanged
        captured["f"] = inputs[0]

    hook = getattr(torch_model, head_name).register_forward_hook(keep_input)
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
    hook.remove()
    return logits.numpy(), captured["f"].numpy()


def timm_model(name: str, seed: int = 0, **kwargs):
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")

    torch.manual_seed(seed)
    return randomise_norms_and_biases(timm.create_model(name, pretrained=False, **kwargs).eval(), seed)


def tiny_timm_resnet(num_classes: int = 5):
    """timm ResNet with the shape of cass_jax's `resnet_tiny`."""
    pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(1)
    model = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=num_classes, channels=(16, 32, 64, 128))
    return randomise_norms_and_biases(model.eval(), 1)


def micro_timm_vit(img_size: int = 32, num_classes: int = 5):
    """timm ViT with the shape of cass_jax's `vit_micro_patch16`."""
    pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(2)
    model = VisionTransformer(img_size=img_size, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                              num_classes=num_classes)
    return randomise_norms_and_biases(model.eval(), 2)


def param_count(variables) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(variables["params"]))


def random_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def check_eval_parity(torch_model, head_name, model, variables, x):
    logits_ref, features_ref = torch_forward(torch_model, head_name, x)
    with jax.default_matmul_precision("highest"):
        logits, features = jit_apply(model)(variables, jnp.asarray(x), return_features=True)
    assert rel_err(logits, logits_ref) <= 1e-5
    assert rel_err(features, features_ref) <= 1e-5


def check_train_batchnorm_parity(torch_model, model, variables, x):
    """Train-mode forward: logits and updated running statistics match PyTorch's (unbiased running var)."""
    torch = pytest.importorskip("torch")

    torch_model.train()
    with torch.no_grad():
        logits_ref = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    torch_model.eval()
    with jax.default_matmul_precision("highest"):
        logits, updates = jit_apply(model)(variables, jnp.asarray(x), train=True, mutable=("batch_stats",))
    assert rel_err(logits, logits_ref) <= 1e-4
    expected = port_timm_resnet(state_dict_numpy(torch_model))["batch_stats"]
    worst = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(rel_err, updates["batch_stats"], expected)))
    assert worst <= 1e-4


@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_timm_resnet_parity_eval_and_train(name):
    torch_model = timm_model(name)
    model = create_model(name)
    variables = merge_variables(init_variables(model, jax.random.key(0), 128),
                                port_timm_resnet(state_dict_numpy(torch_model)), name)
    assert param_count(variables) == sum(p.numel() for p in torch_model.parameters())
    x = random_images(2, 128)
    check_eval_parity(torch_model, "fc", model, variables, x)
    check_train_batchnorm_parity(torch_model, model, variables, x)


@pytest.mark.slow
def test_torchvision_resnet50_parity():
    torchvision = pytest.importorskip("torchvision")
    torch = pytest.importorskip("torch")

    torch.manual_seed(0)
    torch_model = randomise_norms_and_biases(torchvision.models.resnet50(weights=None).eval())
    model = create_model("resnet50")
    variables = merge_variables(init_variables(model, jax.random.key(0), 128),
                                port_torchvision_resnet(state_dict_numpy(torch_model)), "torchvision")
    assert param_count(variables) == 25_557_032
    check_eval_parity(torch_model, "fc", model, variables, random_images(2, 128, seed=1))


@pytest.mark.parametrize("name,size", [
    ("vit_tiny_patch16_224", 224), pytest.param("vit_base_patch16_384", 384, marks=pytest.mark.slow)])
def test_timm_vit_parity(name, size):
    torch_model = timm_model(name)
    model = create_model(name)
    variables = merge_variables(init_variables(model, jax.random.key(0), size),
                                port_timm_vit(state_dict_numpy(torch_model)), name)
    assert param_count(variables) == sum(p.numel() for p in torch_model.parameters())
    check_eval_parity(torch_model, "head", model, variables, random_images(2, size))


def augreg_npz(state_dict: dict, num_heads: int) -> dict:
    """A timm ViT state_dict written in the AugReg (big_vision 'opt/target' era) .npz layout."""
    dim = state_dict["cls_token"].shape[-1]
    out = {
        "embedding/kernel": state_dict["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": state_dict["patch_embed.proj.bias"],
        "cls": state_dict["cls_token"],
        "Transformer/posembed_input/pos_embedding": state_dict["pos_embed"],
        "Transformer/encoder_norm/scale": state_dict["norm.weight"],
        "Transformer/encoder_norm/bias": state_dict["norm.bias"],
        "head/kernel": state_dict["head.weight"].T,
        "head/bias": state_dict["head.bias"],
    }
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    for i in range(depth):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        qkv_w, qkv_b = state_dict[b + "attn.qkv.weight"], state_dict[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            out[f"{p}MultiHeadDotProductAttention_1/{n}/kernel"] = \
                qkv_w[j * dim:(j + 1) * dim].T.reshape(dim, num_heads, dim // num_heads)
            out[f"{p}MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * dim:(j + 1) * dim].reshape(num_heads, -1)
        out[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = \
            state_dict[b + "attn.proj.weight"].T.reshape(num_heads, dim // num_heads, dim)
        out[f"{p}MultiHeadDotProductAttention_1/out/bias"] = state_dict[b + "attn.proj.bias"]
        for src, dst in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[f"{p}{dst}/scale"] = state_dict[b + src + ".weight"]
            out[f"{p}{dst}/bias"] = state_dict[b + src + ".bias"]
        for src, dst in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            out[f"{p}MlpBlock_3/{dst}/kernel"] = state_dict[b + f"mlp.{src}.weight"].T
            out[f"{p}MlpBlock_3/{dst}/bias"] = state_dict[b + f"mlp.{src}.bias"]
    return out


def big_vision_scanned_npz(augreg: dict, depth: int) -> dict:
    """AugReg dict -> big_vision's own naming: 'params/' prefix, scanned blocks, no class-token posemb."""
    rename = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "MlpBlock_3": "MlpBlock_0",
              "LayerNorm_2": "LayerNorm_1"}
    out, stacked = {}, {}
    for key, value in augreg.items():
        if key.startswith("Transformer/encoderblock_"):
            index, rest = key[len("Transformer/encoderblock_"):].split("/", 1)
            for old, new in rename.items():
                rest = rest.replace(old, new)
            stacked.setdefault(rest, [None] * depth)[int(index)] = value
        elif key == "Transformer/posembed_input/pos_embedding":
            out["params/pos_embedding"] = value[:, 1:]
        else:
            out["params/" + key] = value
    out.update({f"params/Transformer/encoderblock/{k}": np.stack(v) for k, v in stacked.items()})
    return out


def test_augreg_npz_gives_timm_logits(tmp_path):
    torch_model = timm_model("vit_tiny_patch16_224", seed=3)
    path = tmp_path / "augreg.npz"
    np.savez(path, **augreg_npz(state_dict_numpy(torch_model), num_heads=3))
    model = create_model("vit_tiny_patch16_224")
    variables = load_pretrained_variables(str(path), model, 224, jax.random.key(0))
    check_eval_parity(torch_model, "head", model, variables, random_images(2, 224, seed=2))


def test_big_vision_scanned_npz_gives_timm_logits(tmp_path):
    torch_model = micro_timm_vit()
    torch = pytest.importorskip("torch")

    with torch.no_grad():  # big_vision adds no position embedding to the class token
        torch_model.pos_embed[:, 0] = 0.0
    npz = big_vision_scanned_npz(augreg_npz(state_dict_numpy(torch_model), num_heads=2), depth=2)
    model = create_model("vit_micro_patch16", num_classes=5, img_size=32)
    variables = merge_variables(init_variables(model, jax.random.key(0), 32), port_big_vision_vit(npz), "bv")
    check_eval_parity(torch_model, "head", model, variables, random_images(3, 32))


def test_safetensors_vit_224_resampled_to_384_keeps_class_token(tmp_path):
    from safetensors.numpy import save_file

    state_dict = state_dict_numpy(timm_model("vit_tiny_patch16_224", seed=4))
    path = tmp_path / "vit_tiny.safetensors"
    save_file(state_dict, str(path))
    model = create_model("vit_tiny_patch16_384")
    variables = load_pretrained_variables(str(path), model, 384, jax.random.key(0))
    pos = np.asarray(variables["params"]["pos_embed"])
    assert pos.shape == (1, 577, 192)
    np.testing.assert_array_equal(pos[:, 0], state_dict["pos_embed"][:, 0])
    fc1_bias = variables["params"]["blocks_3"]["mlp"]["fc1"]["bias"]
    np.testing.assert_array_equal(fc1_bias, state_dict["blocks.3.mlp.fc1.bias"])
    logits = jit_apply(model)(variables, jnp.asarray(random_images(1, 384)))
    assert logits.shape == (1, 1000) and np.all(np.isfinite(logits))


def test_resample_pos_embed_is_identity_at_same_size_and_smooth_when_upsampling():
    grid = np.linspace(-1, 1, 4, dtype=np.float32)
    plane = (grid[:, None] + 2 * grid[None, :]).reshape(1, 16, 1)  # linear in both axes
    pos = np.concatenate([np.full((1, 1, 1), 7.0, np.float32), plane], axis=1)
    np.testing.assert_allclose(resample_pos_embed(pos, 17), pos, atol=1e-6)
    up = resample_pos_embed(pos, 1 + 64)
    assert up.shape == (1, 65, 1) and up[0, 0, 0] == 7.0
    assert up[0, 1:].min() >= plane.min() - 0.2 and up[0, 1:].max() <= plane.max() + 0.2
    with pytest.raises(ValueError, match="not square"):
        resample_pos_embed(pos, 1 + 15)


def test_head_is_reinitialised_or_dropped_when_num_classes_differs():
    ported = port_timm_resnet(state_dict_numpy(tiny_timm_resnet(num_classes=5)))
    four = create_model("resnet_tiny", num_classes=4)
    fresh = init_variables(four, jax.random.key(9), 128)
    merged = merge_variables(fresh, ported, "tiny")
    np.testing.assert_array_equal(merged["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"])
    np.testing.assert_array_equal(merged["params"]["conv1"]["kernel"], ported["params"]["conv1"]["kernel"])
    np.testing.assert_array_equal(merged["batch_stats"]["layer4_0"]["bn2"]["var"],
                                  ported["batch_stats"]["layer4_0"]["bn2"]["var"])
    headless = merge_variables(init_variables(create_model("resnet_tiny", num_classes=0), jax.random.key(0), 128),
                               ported, "tiny")
    assert "head" not in headless["params"]


def test_msgpack_round_trip_and_cli_port(tmp_path, capsys):
    torch = pytest.importorskip("torch")

    torch_model = tiny_timm_resnet()
    pth = tmp_path / "tiny.pth"
    torch.save({"state_dict": torch_model.state_dict(), "epoch": 3}, pth)
    out = tmp_path / "weights" / "tiny.msgpack"
    assert port_cli(["--model", "resnet_tiny", "--source", str(pth), "--out", str(out)]) == 0
    assert "num_classes=5" in capsys.readouterr().out
    variables = load_variables(out)
    assert set(variables) == {"params", "batch_stats"}
    check_eval_parity(torch_model, "fc", create_model("resnet_tiny", num_classes=5), variables, random_images(2, 128))
    copy = tmp_path / "copy.msgpack"
    save_variables(copy, variables)
    reloaded = load_pretrained_variables(str(copy), create_model("resnet_tiny", num_classes=5), 128, jax.random.key(1))
    jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, variables)
    assert port_cli(["--model", "resnet_tiny", "--source", str(pth), "--out", str(out), "--num-classes", "0"]) == 0
    assert "head" not in load_variables(out)["params"]


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    timm = pytest.importorskip("timm")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(timm, "create_model", offline)
    # Tests never touch the network: pretend the reachability probe found no hub.
    monkeypatch.setattr(sys.modules["cass_jax.port.__main__"], "hub_reachable", lambda *args, **kwargs: False)
    assert port_cli(["--model", "resnet50", "--source", "timm", "--out", str(tmp_path / "x.msgpack")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--source PATH" in err and "couldn't connect" in err
    assert port_cli(["--model", "resnet50", "--source", str(tmp_path / "nope.pth"), "--out", "x.msgpack"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.pth" in err and "does not exist" in err


def test_wrong_architecture_and_wrong_depth_are_clear_errors(tmp_path):
    torch = pytest.importorskip("torch")

    vit_path = tmp_path / "vit.pth"
    torch.save(micro_timm_vit().state_dict(), vit_path)
    with pytest.raises(ValueError, match=r"vit\.pth.*VIT weights.*ResNet.*wrong architecture"):
        load_pretrained_variables(str(vit_path), create_model("resnet_tiny"), 128, jax.random.key(0))
    resnet_path = tmp_path / "tiny_resnet.pth"
    torch.save(tiny_timm_resnet().state_dict(), resnet_path)
    with pytest.raises(ValueError) as info:
        load_pretrained_variables(str(resnet_path), create_model("resnet18"), 128, jax.random.key(0))
    message = str(info.value)
    for part in ("tiny_resnet.pth", "missing keys", "layer1_1/conv1", "layer4_1/bn2", "shape mismatches",
                 "params/layer1_0/conv1/kernel: file (3, 3, 64, 16) vs model (3, 3, 64, 64)", "another architecture"):
        assert part in message


def test_unsupported_vit_variant_lists_unknown_keys():
    state_dict = state_dict_numpy(micro_timm_vit())
    state_dict["reg_token"] = np.zeros((1, 4, 64), np.float32)
    state_dict["blocks.0.ls1.gamma"] = np.ones(64, np.float32)
    with pytest.raises(ValueError, match=r"2 state_dict key\(s\).*blocks\.0\.ls1\.gamma, reg_token"):
        port_timm_vit(state_dict)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz", ".msgpack"])
def test_truncated_and_missing_files_name_the_problem(tmp_path, suffix):
    arrays = {"conv1.weight": np.ones((4, 3, 7, 7), np.float32), "fc.bias": np.zeros(10, np.float32)}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch = pytest.importorskip("torch")
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, str(path))
    elif suffix == ".npz":
        np.savez(path, **arrays)
    else:
        save_variables(path, {"params": arrays})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = create_model("resnet_tiny")
    with pytest.raises(ValueError, match=rf"weights{suffix}.*truncated"):
        load_pretrained_variables(str(path), model, 128, jax.random.key(0))
    with pytest.raises(FileNotFoundError, match=rf"missing{suffix}.*does not exist"):
        load_pretrained_variables(str(tmp_path / f"missing{suffix}"), model, 128, jax.random.key(0))


class NotATensor:
    """A pickled Python object of the kind torch.load(weights_only=True) refuses."""


def test_pickle_with_objects_is_refused_with_a_plain_message_and_a_conversion_command(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": NotATensor()}, path)
    with pytest.raises(ValueError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert "objects other than tensors" in message and "NotATensor" in message
    assert "not loaded" in message and "safetensors" in message and "\x1b" not in message and "\n" not in message
    command = message.split('python -c "', 1)[1].split('" and use', 1)[0]
    exec(command, {})  # the user's step, if they trust the file: it unpickles NotATensor from this module
    assert read_checkpoint(path.with_suffix(".safetensors"))[1]["w"].shape == (2,)
