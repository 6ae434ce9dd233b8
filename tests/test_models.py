"""Backbone (2D/3D U-Net), external attention modules (ICL, EAM), and the model store (stripping)."""

import json
import math
import pickle

import pytest
import torch
from conftest import (
    TINY_CHANNELS,
    TINY_CHANNELS_3D,
    TINY_HEADS,
    build_tiny,
    save_tiny,
    tiny_card,
)

from napari_consistent_seg.errors import ModelLoadError
from napari_consistent_seg.models.modules import (
    ClassQueryAttention,
    EAMModule,
    ICLModules,
    build_modules,
)
from napari_consistent_seg.models.store import (
    BACKBONE_FILE,
    CARD_FILE,
    MODULES_FILE,
    load_model,
    read_card,
    save_model,
    save_user_model,
    validate_card,
)
from napari_consistent_seg.models.unet import (
    TAP_STRIDES,
    BackboneOutput,
    UNet,
    count_parameters,
)

pytestmark = pytest.mark.usefixtures("user_model_dir")

SIZES = {2: (61, 47), 3: (13, 30, 21)}  # odd sizes, not multiples of any stride


def _no_grad(module):
    return [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


# ---- backbone --------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
def test_backbone_logits_on_the_input_grid_and_taps_at_strides_8_4_2(dims):
    torch.manual_seed(0)
    channels = TINY_CHANNELS if dims == 2 else TINY_CHANNELS_3D
    net = UNet(dims, 1, 3, channels)
    x = torch.randn(2, 1, *SIZES[dims])
    out = net(x, return_features=True)
    assert isinstance(out, BackboneOutput)
    assert out.logits.shape == (2, 3, *SIZES[dims])
    padded = tuple(-(-n // net.stride_multiple) * net.stride_multiple for n in SIZES[dims])
    assert out.padded_size == padded
    assert TAP_STRIDES == (8, 4, 2)
    for feats, stride, c in zip(out.features, TAP_STRIDES, net.tap_channels):
        assert feats.shape == (2, c, *(p // stride for p in padded))
    assert net.tap_channels == (channels[2], channels[1], channels[0])
    # plain forward gives the same logits
    assert torch.equal(net(x), out.logits)
    # any tap resized back lands exactly on the input grid
    for feats in out.features:
        assert out.to_input_grid(feats).shape == (2, feats.shape[1], *SIZES[dims])
        assert out.to_input_grid(feats, mode="nearest").shape[2:] == SIZES[dims]


@pytest.mark.parametrize("dims", [2, 3])
def test_backbone_gradient_reaches_every_parameter(dims):
    torch.manual_seed(0)
    net = UNet(dims, 1, 3, TINY_CHANNELS if dims == 2 else TINY_CHANNELS_3D)
    out = net(torch.randn(2, 1, *SIZES[dims]), return_features=True)
    loss = out.logits.square().mean() + sum(f.square().mean() for f in out.features)
    loss.backward()
    assert _no_grad(net) == []


@pytest.mark.parametrize("dims,size", [(2, (20, 17)), (2, (1, 1)), (3, (5, 9, 7))])
def test_backbone_takes_images_smaller_than_its_total_stride(dims, size):
    """The deepest level is padded to two voxels: instance norm fails on a single one."""
    net = UNet(dims, 1, 3, TINY_CHANNELS if dims == 2 else TINY_CHANNELS_3D).eval()
    out = net(torch.randn(2, 1, *size), return_features=True)
    assert out.logits.shape == (2, 3, *size)
    assert out.to_input_grid(out.features[0]).shape[2:] == size


@pytest.mark.parametrize("dims,res_units,dropout", [(2, 2, 0.0), (3, 2, 0.0), (2, 1, 0.1)])
def test_backbone_is_monais_unet_key_for_key_and_output_for_output(dims, res_units, dropout):
    """The backbone rebuilds MONAI's UNet without importing MONAI: the same state-dict keys and
    shapes, and the same outputs for the same weights, both ways (train and eval mode)."""
    from monai.networks.nets import UNet as MonaiUNet

    channels = TINY_CHANNELS if dims == 2 else TINY_CHANNELS_3D
    torch.manual_seed(0)
    ours = UNet(dims, 1, 3, channels, num_res_units=res_units, dropout=dropout)
    monai = MonaiUNet(dims, 1, 3, channels, strides=(2,) * (len(channels) - 1), num_res_units=res_units,
                      norm="instance", dropout=dropout)
    theirs = {k: v.shape for k, v in monai.state_dict().items()}
    assert {k.removeprefix("net."): v.shape for k, v in ours.state_dict().items()} == theirs
    # random weights (PReLU slopes too), loaded into MONAI's network from ours
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    monai.load_state_dict({k.removeprefix("net."): v for k, v in ours.state_dict().items()})
    size = tuple(-(-n // 16) * 16 for n in SIZES[dims])  # MONAI's net needs stride multiples
    x = torch.randn(2, 1, *size)
    ours.eval(), monai.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), monai(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(x, return_features=True).logits, monai(x), rtol=1e-4, atol=1e-4)
    if dropout == 0:
        ours.train(), monai.train()
        torch.testing.assert_close(ours(x), monai(x), rtol=1e-4, atol=1e-4)


def test_backbone_import_does_not_load_monai():
    """Segmenting from the CLI must not pay for ``import monai`` (seconds): see models/unet.py."""
    import subprocess
    import sys

    code = ("import sys; import napari_consistent_seg.inference, napari_consistent_seg.cli; "
            "from napari_consistent_seg.models.store import load_model; load_model('cardiac-cine-mri'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'monai'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_backbone_rejects_bad_shapes_and_settings():
    with pytest.raises(ValueError, match="H, W"):
        UNet(2, 1, 3, TINY_CHANNELS)(torch.zeros(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="spatial_dims"):
        UNet(4)
    with pytest.raises(ValueError, match="5 channel levels"):
        UNet(2, 1, 3, (4, 8, 16))


# ---- modules ---------------------------------------------------------------------------------
def _features(dims, size, tap_channels=(16, 8, 4), batch=2):
    """Random decoder taps for an input of ``size``: strides 8, 4, 2 of the padded grid."""
    padded = tuple(-(-n // 32) * 32 for n in size)
    return [torch.randn(batch, c, *(p // s for p in padded), requires_grad=True)
            for c, s in zip(tap_channels, TAP_STRIDES)]


@pytest.mark.parametrize("dims", [2, 3])
def test_class_query_attention_shapes_any_size(dims):
    torch.manual_seed(0)
    att = ClassQueryAttention(16, 4, dims)
    for size in ([(7, 5), (3, 11)] if dims == 2 else [(3, 5, 4), (2, 7, 3)]):
        feats = torch.randn(2, 16, *size)
        out = att(feats, torch.randn(5, 16))  # shared queries (K, C)
        assert out.queries.shape == (2, 5, 16)
        assert out.maps.shape == (2, 5, *size)
        assert out.attention.shape == (2, 4, 5, *size)
        out_b = att(feats, torch.randn(2, 5, 16))  # per-sample queries (B, K, C)
        assert out_b.maps.shape == (2, 5, *size)


@pytest.mark.parametrize("dims", [2, 3])
def test_class_query_attention_gradient_reaches_every_parameter_and_input(dims):
    torch.manual_seed(0)
    att = ClassQueryAttention(8, 2, dims)
    feats = torch.randn(2, 8, *((6, 5) if dims == 2 else (3, 4, 5)), requires_grad=True)
    queries = torch.randn(3, 8, requires_grad=True)
    out = att(feats, queries)
    (out.maps.square().mean() + out.queries.square().mean()).backward()
    assert _no_grad(att) == []
    assert feats.grad.abs().sum() > 0 and queries.grad.abs().sum() > 0


def test_attention_logits_are_per_head_per_class_q_dot_k_over_sqrt_d():
    """No scrambling of heads and classes: A[b, h, k] equals q_k^(h) . k^(h) / sqrt(d) by hand."""
    torch.manual_seed(0)
    c, heads, k_cls = 12, 3, 4
    att = ClassQueryAttention(c, heads, 2)
    feats, queries = torch.randn(2, c, 5, 6), torch.randn(2, k_cls, c)
    out = att(feats, queries)
    d = c // heads
    tokens = att.token_norm(att.token_proj(feats).flatten(2).transpose(1, 2))  # (B, N, C)
    keys = att.k(tokens)
    qs = att.q(queries)
    for b in range(2):
        for h in range(heads):
            for k in range(k_cls):
                manual = keys[b, :, h * d:(h + 1) * d] @ qs[b, k, h * d:(h + 1) * d] / math.sqrt(d)
                assert torch.allclose(out.attention[b, h, k].flatten(), manual, atol=1e-5, rtol=1e-5)


def test_attention_is_equivariant_to_permuting_the_class_queries():
    torch.manual_seed(0)
    att = ClassQueryAttention(16, 4, 2)
    feats, queries = torch.randn(2, 16, 6, 7), torch.randn(5, 16)
    perm = torch.tensor([3, 0, 4, 1, 2])
    out, out_p = att(feats, queries), att(feats, queries[perm])
    assert torch.allclose(out_p.maps, out.maps[:, perm], atol=1e-5, rtol=1e-5)
    assert torch.allclose(out_p.queries, out.queries[:, perm], atol=1e-5, rtol=1e-5)
    assert torch.allclose(out_p.attention, out.attention[:, :, perm], atol=1e-5, rtol=1e-5)


def test_class_map_depends_only_on_its_own_class():
    """Changing one class query changes only that class's map and updated query."""
    torch.manual_seed(0)
    att = ClassQueryAttention(16, 4, 2)
    feats, queries = torch.randn(1, 16, 6, 7), torch.randn(4, 16)
    changed = queries.clone()
    changed[2] += 1.0
    a, b = att(feats, queries), att(feats, changed)
    keep = [0, 1, 3]
    assert torch.allclose(a.maps[:, keep], b.maps[:, keep])
    assert torch.allclose(a.queries[:, keep], b.queries[:, keep])
    assert not torch.allclose(a.maps[:, 2], b.maps[:, 2])


@pytest.mark.parametrize("kind", ["icl", "eam"])
@pytest.mark.parametrize("dims", [2, 3])
def test_modules_shapes_for_any_size(kind, dims):
    torch.manual_seed(0)
    mods = build_modules({"kind": kind, "num_classes": 4, "tap_channels": [16, 8, 4],
                          "heads": list(TINY_HEADS), "spatial_dims": dims})
    for size in (SIZES[dims], tuple(n + 9 for n in SIZES[dims])):
        feats = _features(dims, size)
        dec = mods.attend(feats)
        assert len(dec.scales) == 3
        for scale, f, c in zip(dec.scales, feats, (16, 8, 4)):
            assert scale.maps.shape == (2, 4, *f.shape[2:])
            assert scale.queries.shape == (2, 4, c)
            assert scale.attention.shape == (2, 2, 4, *f.shape[2:])
        assert [p.shape for p in dec.proxies()] == [(4, 16), (4, 8), (4, 4)]
        if kind == "icl":
            uscl = mods.consistent(feats, dec.proxies())
            assert [m.shape for m in uscl.maps] == [m.shape for m in dec.maps]


@pytest.mark.parametrize("dims", [2, 3])
def test_eam_gradient_reaches_every_parameter(dims):
    torch.manual_seed(0)
    mods = EAMModule(4, (16, 8, 4), TINY_HEADS, dims)
    dec = mods.attend(_features(dims, SIZES[dims]))
    # the last scale's queries; the earlier ones reach the loss through the hand-over
    (sum(m.square().mean() for m in dec.maps) + dec.queries[-1].square().mean()).backward()
    assert _no_grad(mods) == []


@pytest.mark.parametrize("dims", [2, 3])
def test_icl_gradient_reaches_every_parameter_but_the_unused_uscl_handover(dims):
    """SSPA: queries, all scales, map heads, hand-over. USCL takes given per-scale proxies, so
    its hand-over layers are never on a path to any output (documented dead weights)."""
    torch.manual_seed(0)
    mods = ICLModules(4, (16, 8, 4), TINY_HEADS, dims)
    feats = _features(dims, SIZES[dims])
    sspa = mods.attend(feats)
    uscl = mods.consistent(feats, sspa.proxies())
    loss = sum(m.square().mean() for m in sspa.maps + uscl.maps)
    loss = loss + sum(q.square().mean() for q in uscl.queries)
    loss.backward()
    assert sorted(_no_grad(mods)) == sorted(
        f"uscl.handover.{i}.{w}" for i in range(2) for w in ("weight", "bias"))
    assert all(f.grad.abs().sum() > 0 for f in feats)


def test_uscl_gradient_reaches_the_labeled_proxies():
    torch.manual_seed(0)
    mods = ICLModules(4, (16, 8, 4), TINY_HEADS, 2)
    sspa = mods.attend(_features(2, (40, 40)))
    uscl = mods.consistent(_features(2, (40, 40)), sspa.proxies())
    sum(m.mean() for m in uscl.maps).backward()
    assert mods.queries.weight.grad.abs().sum() > 0
    assert all(s.q.weight.grad.abs().sum() > 0 for s in mods.sspa.scales)


def _module_counts(channels, dims):
    backbone = UNet(dims, 1, 4, channels)
    return {kind: count_parameters(cls(4, backbone.tap_channels, (8, 4, 2), dims))
            for kind, cls in (("icl", ICLModules), ("eam", EAMModule))}, count_parameters(backbone)


def test_parameter_counts_of_the_default_settings(capsys):
    """Printed for the report: default 2D U-Net (16..256), 3D U-Net (8..128), heads (8, 4, 2), K = 4."""
    counts_2d, bb_2d = _module_counts((16, 32, 64, 128, 256), 2)
    counts_3d, bb_3d = _module_counts((8, 16, 32, 64, 128), 3)
    with capsys.disabled():
        print(f"\n2D backbone {bb_2d:,}; ICL modules {counts_2d['icl']:,}; EAM module {counts_2d['eam']:,}")
        print(f"3D backbone {bb_3d:,}; ICL modules {counts_3d['icl']:,}; EAM module {counts_3d['eam']:,}")
    # small: the reference's N -> N MLP alone had about 1.1 billion parameters
    assert counts_2d["icl"] < 200_000 and counts_3d["icl"] < 200_000
    assert counts_2d["eam"] < counts_2d["icl"]


@pytest.mark.parametrize("dims", [2, 3])
def test_module_parameters_do_not_depend_on_image_size(dims):
    """Size-free: one module instance runs on any size, and a fresh one built for another size
    (nothing to build it from but the channels) has the same parameter count."""
    mods = ICLModules(4, (16, 8, 4), TINY_HEADS, dims)
    n = count_parameters(mods)
    shapes = {name: p.shape for name, p in mods.named_parameters()}
    for size in (SIZES[dims], tuple(2 * s + 1 for s in SIZES[dims])):
        mods.attend(_features(dims, size))
        assert count_parameters(mods) == n
        assert {name: p.shape for name, p in mods.named_parameters()} == shapes
    assert all(s.numel() <= 16 * 16 * 2 for s in shapes.values())  # no N-sized weight anywhere


# ---- store: saving, loading, stripping -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["icl", "eam", None])
def test_saved_model_gives_exactly_the_training_backbone_output(tmp_path, kind):
    backbone, mods = build_tiny(modules=kind)
    folder = save_model(tmp_path / "m", backbone, tiny_card(), mods)
    model = load_model(folder)
    x = torch.randn(2, 1, 61, 47)
    with torch.no_grad():
        assert torch.equal(model.backbone(x), backbone(x))
    assert (model.modules is None) == (kind is None)
    if kind:
        assert model.card.modules["kind"] == kind
        assert all(torch.equal(a, b) for a, b in zip(model.modules.state_dict().values(), mods.state_dict().values()))
        assert model.modules.state_dict().keys() == mods.state_dict().keys()
        assert load_model(folder, with_modules=False).modules is None
    else:
        assert not (folder / MODULES_FILE).exists()
    card = json.loads((folder / CARD_FILE).read_text())
    assert card["architecture"]["channels"] == list(TINY_CHANNELS)
    assert card["format"] == "napari-consistent-seg/1"
    assert set(card["colours"]) == {"1", "2", "3"}


def test_user_models_load_by_name(tiny_model_path, user_model_dir):
    model = load_model(tiny_model_path)
    save_user_model("my-model", model)
    assert (user_model_dir / "my-model" / CARD_FILE).is_file()
    assert load_model("my-model").name == "my-model"
    with pytest.raises(ModelLoadError, match="exists already"):
        save_user_model("my-model", model)
    with pytest.raises(ModelLoadError, match="letters"):
        save_user_model("bad name/..", model)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything tries to unpickle."""
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def test_pickle_checkpoints_and_random_files_are_refused_without_unpickling(tmp_path, no_unpickling):
    backbone, _ = build_tiny()
    pt = tmp_path / "model.pt"
    with open(pt, "wb") as fh:
        pickle.dump(backbone.state_dict(), fh)
    with pytest.raises(ModelLoadError, match="never loaded"):
        load_model(pt)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match="not a napari-consistent-seg model"):
        load_model(junk)
    # a model folder whose backbone file is a pickle in disguise
    folder = save_tiny(tmp_path / "disguised")
    (folder / BACKBONE_FILE).write_bytes(pt.read_bytes())
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_model(folder)
    with pytest.raises(ModelLoadError, match="no model called"):
        load_model("no-such-model")


def test_corrupted_or_mismatched_weights_raise_model_load_error(tmp_path, no_unpickling):
    folder = save_tiny(tmp_path / "m")
    data = (folder / BACKBONE_FILE).read_bytes()
    (folder / BACKBONE_FILE).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_model(folder)
    (folder / BACKBONE_FILE).write_bytes(b"\x00" * 3 + data[3:])  # broken header
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_model(folder)
    # weights of another architecture
    other = save_tiny(tmp_path / "other")
    card = json.loads((other / CARD_FILE).read_text())
    card["architecture"]["channels"] = [8, 16, 32, 64, 128]
    (other / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model(other)
    # corrupted modules file
    third = save_tiny(tmp_path / "third")
    (third / MODULES_FILE).write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_model(third)
    assert load_model(third, with_modules=False).modules is None


def test_card_validation_errors(tmp_path):
    folder = save_tiny(tmp_path / "m")
    good = json.loads((folder / CARD_FILE).read_text())
    assert validate_card(dict(good)) is not None

    def broken(**changes):
        card = json.loads(json.dumps(good))
        for key, value in changes.items():
            if value is None:
                card.pop(key)
            else:
                card[key] = value
        return card

    cases = [
        (broken(classes=None), "missing classes"),
        (broken(classes={"0": "bg", "1": "a", "3": "c", "2": "b", "5": "x"}), "without gaps"),
        (broken(classes={"zero": "bg"}), "must map label values"),
        (broken(classes={"0": "bg", "1": "a"}), "out_channels"),
        (broken(colours={"1": "red"}), "#rrggbb"),
        (broken(modalities=["PET"]), "CT and/or MR"),
        (broken(modalities=[]), "CT and/or MR"),
        (broken(postprocessing={"keep_largest_component": "yes"}), "postprocessing"),
        (broken(postprocessing=["keep_largest_component"]), "postprocessing"),
    ]
    for card, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            validate_card(card)
    (folder / CARD_FILE).write_text(json.dumps(broken(patch_size=None)))
    with pytest.raises(ModelLoadError, match="missing patch_size"):
        load_model(folder)
    (folder / CARD_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read model card"):
        read_card(folder)


@pytest.mark.parametrize("shape", [(2, 4, 40, 36), (2, 16, 40, 36), (2, 32, 12, 10), (2, 8, 33, 40)])
def test_instance_norm_is_the_same_on_channels_last_input(shape):
    """The norm takes the standard layout where torch's channels-last kernel is slow (few pixels or
    few channels) and stays channels-last elsewhere; the values are the same either way."""
    from napari_consistent_seg.models.unet import _InstanceNorm2d

    norm = _InstanceNorm2d(shape[1])
    x = torch.randn(shape) * 3 + 2
    cl = x.contiguous(memory_format=torch.channels_last)
    out = norm(cl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, torch.nn.InstanceNorm2d(shape[1])(x), atol=1e-5, rtol=1e-5)


def test_in_place_activation_and_residual_add_without_gradients_change_nothing():
    """Without gradients the PReLU runs in place and the residual add reuses the unit's output:
    the same logits as with gradients, and the input is left as it was."""
    torch.manual_seed(0)
    net = UNet(2, 1, 3, (8, 16, 32, 64, 128)).eval()
    for module in net.modules():
        if isinstance(module, torch.nn.PReLU):
            torch.nn.init.uniform_(module.weight, 0.05, 0.5)
    x = torch.randn(2, 1, 64, 48)
    before = x.clone()
    with_grad = net(x)
    with torch.no_grad():
        without = net(x)
    torch.testing.assert_close(with_grad.detach(), without)
    assert torch.equal(x, before)
