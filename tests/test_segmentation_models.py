"""Segmentation networks: shapes, size errors, parity with timm encoders and with torch renderings, encoder loading.

Parity follows tests/test_port.py: random-init timm models with every norm, bias and position-bias value randomised,
eval mode, 'highest' matmul precision, relative error <= 1e-5; those tests skip without torch/timm. The torch
renderings of SSL4MIS's U-Net and Swin-UNet decoder (bench/torch_segmentation.py, shared with the cross-teaching
benchmark) and of smp's Unet decoder follow the reference code's structure, over timm's own ResNet and Swin modules.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bench.torch_segmentation import ssl4mis_unet as torch_ssl4mis_unet
from bench.torch_segmentation import swin_unet_decoder as torch_swin_unet_decoder
from cass_jax.models import ResNetEncoder, SwinTransformer, UNet, create_model, init_variables
from cass_jax.port import (
    load_pretrained_encoder,
    merge_variables,
    port_timm_resnet,
    port_timm_swin,
    save_variables,
)
from cass_jax.port.convert import _conv_kernel, _linear_kernel
from tests.test_port import randomise_norms_and_biases, state_dict_numpy

# The test-sized models run on batch 2 at SIZE px, grayscale for unet_ssl4mis_narrow and swin_unet_micro (which
# repeats it to 3 channels), RGB for unet_resnet_tiny: one input shape per model, so each forward compiles once.
MICRO_SWIN = dict(img_size=64, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4)
NUM_CLASSES = 3
SIZE = 64


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


@functools.cache
def jit_apply(model):
    """model.apply, jitted, always at 'highest' matmul precision (part of the compile key: one compile per shape)."""
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))

    def call(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return apply(*args, **kwargs)

    return call


@functools.cache
def tiny(name: str):
    """(model, abstract variables) of a test-sized registered model; jax.eval_shape, so nothing compiles."""
    model = create_model(name, num_classes=NUM_CLASSES)
    x = jax.ShapeDtypeStruct((1, SIZE, SIZE, model.in_channels), jnp.float32)
    return model, jax.eval_shape(model.init, jax.random.key(0), x)


def random_variables(abstract: dict, seed: int = 0) -> dict:
    """Generic values for abstract variables: parameters N(0, 0.1^2), BatchNorm statistics mean 0 / var 1."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(abstract)
    values = {path: (np.full(leaf.shape, path[-1] == "var", np.float32) if path[0] == "batch_stats"
                     else (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)) for path, leaf in flat.items()}
    return traverse_util.unflatten_dict(values)


@functools.cache
def initialised(name: str):
    """(model, variables) initialised as load_pretrained_encoder initialises them (same compiled init)."""
    model = create_model(name, num_classes=NUM_CLASSES)
    return model, init_variables(model, jax.random.key(0), SIZE)


def dropout_key(seed: int) -> jax.Array:
    """An RBG key: its random bits compile several times faster on XLA:CPU than threefry's (any key works)."""
    return jax.random.key(seed, impl="rbg")


def images(batch: int, channels: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, channels)).astype(np.float32)


def param_count(tree) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


def nchw(x: np.ndarray):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def randomise(torch_model, seed: int = 0):
    """test_port's random norms, statistics and biases, plus random relative-position-bias tables."""
    torch = pytest.importorskip("torch")
    randomise_norms_and_biases(torch_model, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, parameter in torch_model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                parameter.copy_(-1.0 + 2.0 * torch.rand(parameter.shape, generator=gen))
    return torch_model.eval()


def timm_swin(seed: int = 0, **kwargs):
    """timm's swin_tiny_patch4_window7_224, or a SwinTransformer with `kwargs`, randomised, in eval mode."""
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    if "depths" in kwargs:
        model = timm.models.swin_transformer.SwinTransformer(patch_size=4, **kwargs)
    else:
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    return randomise(model, seed)


def torch_stage_outputs(torch_model, x: np.ndarray, taps: list[str]) -> list[np.ndarray]:
    """NHWC outputs of the named submodules (NCHW ones transposed)."""
    torch = pytest.importorskip("torch")
    captured = {}
    hooks = [torch_model.get_submodule(tap).register_forward_hook(
        lambda module, inputs, output, tap=tap: captured.__setitem__(tap, output.detach().numpy())) for tap in taps]
    with torch.no_grad():
        torch_model(nchw(x))
    for hook in hooks:
        hook.remove()
    is_swin = hasattr(torch_model, "patch_embed")
    return [captured[tap] if is_swin else captured[tap].transpose(0, 2, 3, 1) for tap in taps]


# --- shapes, training mode, bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,channels,size,classes,expected_params", [
    ("unet_ssl4mis", 1, 224, 4, 1_813_764),  # SSL4MIS UNet(in_chns=1, class_num=4), counted in torch
    ("unet_resnet34", 3, 224, 1, 24_436_369),  # smp.Unet("resnet34", classes=1)
    ("swin_unet_tiny", 3, 224, 4, 27_168_420),  # SSL4MIS SwinUnet with swin_tiny_patch4_window7_224_lite, 4 classes
])
def test_full_size_models_shapes_and_parameter_counts(name, channels, size, classes, expected_params):
    model = create_model(name, num_classes=classes)
    x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    assert param_count(shapes["params"]) == expected_params
    logits = jax.eval_shape(functools.partial(model.apply, train=False), shapes, x)
    assert logits.shape == (2, size, size, classes) and logits.dtype == jnp.float32
    grayscale = jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32)
    assert jax.eval_shape(functools.partial(model.apply, train=False), shapes, grayscale).shape == logits.shape


def test_bfloat16_option_computes_in_bfloat16_with_float32_parameters():
    model = create_model("swin_unet_micro", num_classes=2, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 1), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
    assert jax.eval_shape(functools.partial(model.apply, train=False), shapes, x).dtype == jnp.bfloat16


def test_training_mode_updates_batch_statistics_and_draws_dropout_from_the_rng():
    model, abstract = tiny("unet_ssl4mis_narrow")
    variables = random_variables(abstract)
    x = jnp.asarray(images(2, 1, seed=1))
    outputs = [jit_apply(model)(variables, x, train=True, mutable=("batch_stats",), rngs={"dropout": dropout_key(k)})
               for k in (1, 2)]
    (first, updates), (second, _) = outputs
    assert first.shape == (2, SIZE, SIZE, NUM_CLASSES) and rel_err(first, second) > 1e-3
    old, new = variables["batch_stats"]["encoder"]["down4"]["bn2"], updates["batch_stats"]["encoder"]["down4"]["bn2"]
    assert not np.allclose(old["mean"], new["mean"]) and not np.allclose(old["var"], new["var"])


def test_swin_unet_stochastic_depth_only_in_training():
    model, abstract = tiny("swin_unet_micro")
    variables = random_variables(abstract)
    x = jnp.asarray(images(2, 1, seed=2))
    first, second = (jit_apply(model)(variables, x, train=True, rngs={"dropout": dropout_key(k)}) for k in (1, 2))
    assert first.shape == (2, SIZE, SIZE, NUM_CLASSES) and rel_err(first, second) > 1e-3
    assert rel_err(first, jit_apply(model)(variables, x)) > 1e-3  # evaluation needs no rng and drops nothing


@pytest.mark.parametrize("size,nearest", [(256, "224 and 448"), (230, "224 and 448"), (100, "224")])
def test_swin_unet_rejects_sizes_it_cannot_take_naming_the_nearest_valid_ones(size, nearest):
    with pytest.raises(ValueError, match=rf"img_size={size}.*nearest valid sizes: {nearest}\. Resize") as info:
        create_model("swin_unet_tiny", num_classes=4, img_size=size)
    assert "\n" not in str(info.value)
    assert create_model("swin_unet_tiny", num_classes=4, img_size=448).img_size == 448
    model, variables = tiny("swin_unet_micro")
    variables = random_variables(variables)
    with pytest.raises(ValueError, match=r"built for NHWC input of 64x64.*img_size"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"3-channel \(or 1-channel, repeated\).*got 2 channels"):
        model.apply(variables, jnp.zeros((1, 64, 64, 2)))


@pytest.mark.parametrize("name,multiple,nearest", [("unet_ssl4mis", 16, "96 and 112"),
                                                   ("unet_resnet34", 32, "96 and 128")])
def test_unets_reject_sides_that_do_not_halve_evenly(name, multiple, nearest):
    model = create_model(name, num_classes=2)
    x = jax.ShapeDtypeStruct((1, 100, 128, model.in_channels), jnp.float32)
    with pytest.raises(ValueError, match=rf"100x128 image.*multiples of {multiple}.*for 100: {nearest}\.") as info:
        jax.eval_shape(model.init, jax.random.key(0), x)
    assert str(info.value).startswith(f"{type(model).__name__} cannot take")
    with pytest.raises(ValueError, match="num_classes >= 1"):
        create_model(name, num_classes=0)


# --- encoder parity with timm ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_swin_tiny_encoder_matches_timm_stage_by_stage():
    torch_model = timm_swin()
    ported = port_timm_swin(state_dict_numpy(torch_model))
    model = SwinTransformer()  # Swin-T: depths 2-2-6-2
    x = images(1, 3, size=224)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    assert param_count(ported["params"]) == sum(p.numel() for p in torch_model.parameters())
    del ported["params"]["head"]
    variables = merge_variables(shapes, ported, "timm swin_tiny_patch4_window7_224")
    references = torch_stage_outputs(torch_model, x, ["layers.0", "layers.1", "layers.2", "layers.3", "norm"])
    with jax.default_matmul_precision("highest"):
        features = jax.jit(model.apply)(variables, jnp.asarray(x))
    for ours, theirs in zip([*features.stage_outputs, features.normed], references):
        assert ours.shape == theirs.shape and rel_err(ours, theirs) <= 1e-5


@pytest.mark.slow
def test_resnet34_unet_encoder_matches_timm_stage_by_stage():
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch_model = randomise(timm.create_model("resnet34", pretrained=False))
    ported = port_timm_resnet(state_dict_numpy(torch_model))
    del ported["params"]["head"]
    model = create_model("unet_resnet34", num_classes=2)
    encoder = ResNetEncoder(stage_sizes=model.stage_sizes)  # what the U-Net builds as its "encoder"
    x = images(2, 3, size=128)
    shapes = jax.eval_shape(encoder.init, jax.random.key(0), x)
    assert param_count(shapes["params"]) == sum(p.numel() for n, p in torch_model.named_parameters() if "fc" not in n)
    variables = merge_variables(shapes, ported, "timm resnet34")
    with jax.default_matmul_precision("highest"):
        features = jax.jit(encoder.apply)(variables, jnp.asarray(x))
    references = torch_stage_outputs(torch_model, x, ["act1", "layer1", "layer2", "layer3", "layer4"])
    for ours, theirs in zip(features, references):
        assert ours.shape == theirs.shape and rel_err(ours, theirs) <= 1e-5


# --- whole models against torch renderings of the reference code -----------------------------------------------------

def flax_tree(leaves: dict) -> dict:
    return traverse_util.unflatten_dict({key: np.asarray(value, np.float32) for key, value in leaves.items()})


def port_conv_bn_pairs(pairs) -> dict:
    """[(flax module path, torch Conv2d or BatchNorm2d)] -> variables."""
    leaves = {}
    for path, module in pairs:
        if module.weight.ndim == 4:
            leaves[("params", *path, "kernel")] = _conv_kernel(module.weight.detach().numpy())
            if module.bias is not None:
                leaves[("params", *path, "bias")] = module.bias.detach().numpy()
        else:
            leaves[("params", *path, "scale")] = module.weight.detach().numpy()
            leaves[("params", *path, "bias")] = module.bias.detach().numpy()
            leaves[("batch_stats", *path, "mean")] = module.running_mean.numpy()
            leaves[("batch_stats", *path, "var")] = module.running_var.numpy()
    return flax_tree(leaves)


def test_ssl4mis_unet_matches_torch_rendering():
    pytest.importorskip("torch")
    model, fresh = tiny("unet_ssl4mis_narrow")
    net = randomise(torch_ssl4mis_unet(model.feature_channels, 1, NUM_CLASSES), seed=3)

    def block(path, seq):  # Sequential(conv, BN, LeakyReLU, conv, BN, LeakyReLU)
        return [((*path, name), seq[index]) for name, index in (("conv1", 0), ("bn1", 1), ("conv2", 3), ("bn2", 4))]

    names = ["in_conv", "down1", "down2", "down3", "down4"]
    pairs = [pair for name, seq in zip(names, net.blocks) for pair in block(("encoder", name), seq)]
    for i in range(4):
        pairs += [(("decoder", f"up{i + 1}", "conv1x1"), net.reduce[i]),
                  *block(("decoder", f"up{i + 1}", "conv"), net.up_blocks[i])]
    variables = port_conv_bn_pairs(pairs + [(("decoder", "out_conv"), net.out_conv)])
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(fresh)
    x = images(2, 1, seed=4)
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        reference = net(nchw(x)).numpy().transpose(0, 2, 3, 1)
    assert rel_err(jit_apply(model)(variables, jnp.asarray(x)), reference) <= 1e-5


def test_resnet_unet_matches_smp_style_torch_rendering():
    """smp's Unet decoder (nearest x2, concat [x, skip], 2x conv-BN-ReLU; 3x3 head) over timm's tiny ResNet."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock, ResNet

    nn = torch.nn
    model, fresh = tiny("unet_resnet_tiny")
    torch.manual_seed(5)
    encoder = ResNet(BasicBlock, (1, 1, 1, 1), channels=(16, 32, 64, 128), num_classes=0)
    skip_channels = [64, 32, 16, 64, 0]  # layer3, layer2, layer1, stem, none
    in_channels = [128, *model.decoder_channels[:-1]]
    blocks = nn.ModuleList([
        nn.Sequential(nn.Conv2d(cin + skip, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                      nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        for cin, skip, cout in zip(in_channels, skip_channels, model.decoder_channels)])
    head = nn.Conv2d(model.decoder_channels[-1], NUM_CLASSES, 3, padding=1)
    randomise(encoder, 5), randomise(blocks, 6), randomise(head, 7)

    def forward(x):
        stem = encoder.act1(encoder.bn1(encoder.conv1(x)))
        feats = [stem]
        x = encoder.maxpool(stem)
        for layer in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4):
            x = layer(x)
            feats.append(x)
        x, skips = feats[-1], [*reversed(feats[:-1]), None]
        for block, skip in zip(blocks, skips):
            x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
            x = block(torch.cat([x, skip], dim=1) if skip is not None else x)
        return head(x)

    ported = port_timm_resnet(state_dict_numpy(encoder))
    pairs = [((f"decoder_blocks_{i}", name), block[index]) for i, block in enumerate(blocks)
             for name, index in (("conv1", 0), ("bn1", 1), ("conv2", 3), ("bn2", 4))]
    decoder = port_conv_bn_pairs(pairs + [(("segmentation_head",), head)])
    variables = {collection: {**decoder[collection], "encoder": ported[collection]} for collection in decoder}
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(fresh)
    x = images(2, 3, seed=5)
    with torch.no_grad():
        reference = forward(nchw(x)).numpy().transpose(0, 2, 3, 1)
    assert rel_err(jit_apply(model)(variables, jnp.asarray(x)), reference) <= 1e-5


def port_torch_swin_decoder(state_dict: dict) -> dict:
    """The rendering's decoder keys are SSL4MIS's, which the flax decoder's names follow."""
    leaves = {}
    for key, value in state_dict.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        module, leaf = key.rsplit(".", 1)
        path = tuple(module.replace("layers_up.", "layers_up_").replace("concat_back_dim.", "concat_back_dim_")
                     .replace("blocks.", "blocks_").split("."))
        if leaf == "relative_position_bias_table":
            leaves[("params", *path, leaf)] = value
        elif path == ("output",):
            leaves[("params", "output", "kernel")] = _conv_kernel(value)
        elif path[-1].startswith("norm"):
            leaves[("params", *path, "scale" if leaf == "weight" else "bias")] = value
        else:
            leaves[("params", *path, "kernel" if leaf == "weight" else "bias")] = (
                _linear_kernel(value) if leaf == "weight" else value)
    return flax_tree(leaves)


def test_swin_unet_matches_torch_rendering_of_ssl4mis():
    torch = pytest.importorskip("torch")
    model, fresh = tiny("swin_unet_micro")
    settings = {k: MICRO_SWIN[k] for k in ("embed_dim", "depths", "num_heads", "window_size")}
    encoder = timm_swin(seed=4, img_size=SIZE, num_classes=0, **settings)
    decoder = randomise(torch_swin_unet_decoder(encoder, **settings, grid=SIZE // 4, num_classes=NUM_CLASSES), 5)
    variables = {"params": {"encoder": port_timm_swin(state_dict_numpy(encoder))["params"],
                            **port_torch_swin_decoder(state_dict_numpy(decoder))["params"]}}
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(fresh)
    x = images(2, 1, seed=6)  # grayscale: the model repeats it to 3 channels, as SSL4MIS does
    with torch.no_grad():
        reference = decoder(nchw(np.repeat(x, 3, axis=-1))).numpy().transpose(0, 2, 3, 1)
    assert rel_err(jit_apply(model)(variables, jnp.asarray(x)), reference) <= 1e-5


# --- loading ImageNet encoders ---------------------------------------------------------------------------------------

def microsoft_layout(state_dict: dict) -> dict:
    """timm Swin keys -> the original Microsoft checkpoint's (merging at the end of the previous stage)."""
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        renamed[".".join(parts).replace("head.fc.", "head.")] = value
    return renamed


def test_swin_unet_takes_first_blocks_and_mirrors_them_into_the_decoder(tmp_path):
    from safetensors.numpy import save_file

    model, fresh = initialised("swin_unet_micro")
    deeper = {**MICRO_SWIN, "depths": (2, 2, 4)}
    del deeper["img_size"]
    state_dict = state_dict_numpy(timm_swin(seed=7, img_size=SIZE, num_classes=5, **deeper))
    path = tmp_path / "swin_micro.safetensors"
    save_file(microsoft_layout(state_dict), str(path))
    variables = load_pretrained_encoder(path, model, jax.random.key(0))
    expected = port_timm_swin(state_dict)["params"]
    encoder = variables["params"]["encoder"]
    assert sorted(encoder["layers_2"]) == ["blocks_0", "blocks_1", "downsample"] and "head" not in encoder
    np.testing.assert_array_equal(encoder["layers_2"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                  expected["layers_2"]["blocks_1"]["attn"]["qkv"]["kernel"])
    np.testing.assert_array_equal(encoder["layers_1"]["downsample"]["reduction"]["kernel"],
                                  expected["layers_1"]["downsample"]["reduction"]["kernel"])
    decoder_block = variables["params"]["layers_up_2"]["blocks_1"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, decoder_block, encoder["layers_0"]["blocks_1"])
    for fresh_part in ("concat_back_dim_1", "layers_up_0", "up", "output"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, variables["params"][fresh_part],
                               fresh["params"][fresh_part])
    unmirrored = load_pretrained_encoder(path, model, jax.random.key(0), mirror_into_decoder=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, unmirrored["params"]["layers_up_1"],
                           fresh["params"]["layers_up_1"])
    assert jit_apply(model)(variables, jnp.asarray(images(2, 1))).shape == (2, SIZE, SIZE, NUM_CLASSES)


def test_resnet_unet_encoder_loads_timm_resnet_and_wrong_files_are_clear_errors(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock, ResNet

    model, fresh = initialised("unet_resnet_tiny")
    torch.manual_seed(8)
    resnet = randomise(ResNet(BasicBlock, (1, 1, 1, 1), channels=(16, 32, 64, 128), num_classes=7), 8)
    path = tmp_path / "resnet_tiny.pth"
    torch.save(resnet.state_dict(), path)
    variables = load_pretrained_encoder(path, model, jax.random.key(0))
    ported = port_timm_resnet(state_dict_numpy(resnet))
    del ported["params"]["head"]
    for collection in ("params", "batch_stats"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, variables[collection]["encoder"], ported[collection])
        jax.tree_util.tree_map(np.testing.assert_array_equal, variables[collection]["decoder_blocks_0"],
                               fresh[collection]["decoder_blocks_0"])
    msgpack = tmp_path / "resnet_tiny.msgpack"  # what `python -m cass_jax.port --model resnet_tiny` writes
    save_variables(msgpack, port_timm_resnet(state_dict_numpy(resnet)))
    from_msgpack = load_pretrained_encoder(msgpack, model, jax.random.key(0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_msgpack, variables)
    swin_path = tmp_path / "swin.pth"
    settings = {k: MICRO_SWIN[k] for k in ("embed_dim", "depths", "num_heads", "window_size")}
    torch.save(timm_swin(seed=9, img_size=SIZE, **settings).state_dict(), swin_path)
    with pytest.raises(ValueError, match=r"swin\.pth.*swin weights but ResNetUNet.*wrong architecture"):
        load_pretrained_encoder(swin_path, model, jax.random.key(0))
    with pytest.raises(ValueError, match=r"no pretrained encoder.*from scratch"):
        load_pretrained_encoder(path, UNet(), jax.random.key(0))
