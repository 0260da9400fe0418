"""Tests of mmpfl_core.models: shapes, masking, parameter groups, Opacus per-sample gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmpfl_core.errors import ConfigError
from mmpfl_core.models import FUSIONS, CNNConfig, MultiModalCNN, ViTConfig, create_model, get_config, list_presets
from mmpfl_core.models.layers import STEMS

# a very small architecture so that everything below runs in seconds on 2 CPU cores
MICRO = dict(image_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, late_depth=1)

# rows: all present, T2 missing, only FLAIR, only T1
MASK = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)


def _batch(cfg: ViTConfig, mask: torch.Tensor = MASK, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = mask.shape[0]
    images = torch.rand(B, cfg.num_modalities, cfg.image_size, cfg.image_size, generator=g)
    images = images * mask[:, :, None, None]  # contract: missing sequences are zeros
    clinical = torch.randn(B, cfg.num_clinical, generator=g)
    labels = torch.randint(0, cfg.num_classes, (B,), generator=g)
    return images, mask, clinical, labels


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("use_clinical", [True, False])
def test_output_shapes(fusion, use_clinical):
    model = create_model("tiny", fusion=fusion, use_clinical=use_clinical, seed=0)
    cfg = model.config
    for mask in (torch.ones(4, 3, dtype=torch.bool), MASK):
        images, mask, clinical, _ = _batch(cfg, mask)
        feats = model.forward_features(images, mask, clinical)
        assert feats.shape == (4, model.num_features)
        logits = model(images, mask, clinical)
        assert logits.shape == (4, cfg.num_classes)
        assert torch.isfinite(logits).all()
        assert torch.equal(model.forward_head(feats), logits)
    expected = cfg.embed_dim * (2 if use_clinical and fusion != "token" else 1)
    assert model.num_features == expected


@pytest.mark.parametrize("fusion", ["token", "late"])
def test_masked_sequence_values_do_not_matter(fusion):
    model = create_model(get_config("tiny", **MICRO), fusion=fusion, seed=1).eval()
    images, mask, clinical, _ = _batch(model.config)
    noisy = images.clone()
    noisy[~mask] = torch.rand_like(noisy[~mask]) * 100.0  # garbage where the mask says "missing"
    with torch.no_grad():
        a = model(images, mask, clinical)
        b = model(noisy, mask, clinical)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(model(noisy, torch.ones_like(mask), clinical), a)  # mask does matter


@pytest.mark.parametrize("fusion", ["early", "token"])
@pytest.mark.parametrize("all_present", [True, False])
def test_forward_from_any_block_equals_the_forward_pass(fusion, all_present):
    model = create_model(get_config("tiny", **MICRO), fusion=fusion, seed=2).eval()
    mask = torch.ones_like(MASK) if all_present else MASK
    images, mask, clinical, _ = _batch(model.config, mask)
    with torch.no_grad():
        expected = model(images, mask, clinical)
        inputs, keep = model.block_inputs(images, mask, clinical)
        assert len(inputs) == model.config.depth + 1 and (keep is None) == (all_present or fusion == "early")
        for start in range(model.config.depth + 1):
            torch.testing.assert_close(model.forward_from_block(inputs[start], keep, clinical, start), expected,
                                       atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_first_block_of_group_says_where_a_group_acts(fusion):
    model = create_model(get_config("tiny", **MICRO), fusion=fusion, seed=0)
    starts = {g: model.first_block_of_group(g) for g in model.parameter_groups()}
    if fusion == "late":
        assert set(starts.values()) == {None}
        with pytest.raises(ValueError, match="early and token fusion"):
            model.block_inputs(*_batch(model.config)[:3])
        return
    depth = model.config.depth
    assert {g: s for g, s in starts.items() if s is not None} == {
        **{f"block.{i}": i for i in range(depth)}, "norm": depth, "head": depth,
        **({"clinical": depth} if fusion == "early" else {})}
    # a group that starts at block i must leave the tokens entering block i unchanged
    images, mask, clinical, _ = _batch(model.config)
    with torch.no_grad():
        before, _ = model.block_inputs(images, mask, clinical)
        for group, start in starts.items():
            if start is None:
                continue
            for name in model.parameter_groups()[group]:
                model.get_parameter(name).add_(1.0)
            after, _ = model.block_inputs(images, mask, clinical)
            torch.testing.assert_close(after[start], before[start])
            for name in model.parameter_groups()[group]:
                model.get_parameter(name).sub_(1.0)


def test_reset_classifier():
    model = create_model("tiny", seed=0)
    images, mask, clinical, _ = _batch(model.config)
    model.reset_classifier(5)
    assert model(images, mask, clinical).shape == (4, 5)
    model.reset_classifier(0)
    assert model(images, mask, clinical).shape == (4, model.num_features)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("use_clinical", [True, False])
def test_parameter_groups_complete_disjoint_and_named(fusion, use_clinical):
    model = create_model(get_config("tiny", **MICRO), fusion=fusion, use_clinical=use_clinical)
    cfg = model.config
    groups = model.parameter_groups()
    names = [n for members in groups.values() for n in members]
    assert len(names) == len(set(names)), "groups overlap"
    assert set(names) == {n for n, _ in model.named_parameters()}, "groups incomplete"
    if fusion == "late":
        expected = []
        for s in ("t1", "t2", "flair"):
            expected += [f"encoder.{s}.patch_embed", f"encoder.{s}.tokens"]
            expected += [f"encoder.{s}.block.{i}" for i in range(cfg.encoder_depth)]
            expected.append(f"encoder.{s}.norm")
    else:
        expected = ["patch_embed"] if fusion == "early" else ["patch_embed.t1", "patch_embed.t2",
                                                             "patch_embed.flair"]
        expected.append("tokens")
    expected += ["clinical"] if use_clinical else []
    if fusion != "late":
        expected += [f"block.{i}" for i in range(cfg.depth)] + ["norm"]
    expected.append("head")
    assert list(groups) == expected
    sizes = model.group_sizes()
    assert list(sizes) == expected
    assert sum(sizes.values()) == sum(p.numel() for p in model.parameters())


def test_custom_modality_names():
    model = create_model(get_config("tiny", **MICRO), num_modalities=2, modality_names=("dwi", "adc"))
    assert "patch_embed.dwi" in model.parameter_groups()
    assert create_model(get_config("tiny", **MICRO), num_modalities=2).config.names == ("m0", "m1")


@pytest.mark.parametrize("overrides, field", [
    (dict(image_size=30), "image_size"),
    (dict(embed_dim=65), "embed_dim"),
    (dict(fusion="middle"), "fusion"),
    (dict(depth=0), "depth"),
    (dict(drop_rate=1.0), "drop_rate"),
    (dict(late_depth=0), "late_depth"),
    (dict(depth=2.0), "depth"),
    (dict(num_clinical=0), "use_clinical"),
    (dict(modality_names=("a", "a", "b")), "modality_names"),
])
def test_config_validation(overrides, field):
    with pytest.raises(ConfigError, match=field):
        create_model("tiny", **overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="known presets"):
        create_model("huge")
    with pytest.raises(ConfigError, match="unknown ViTConfig field"):
        create_model("tiny", embed_dims=3)
    with pytest.raises(ConfigError, match="either seed or generator"):
        create_model("tiny", seed=1, generator=torch.Generator())


def test_deterministic_init_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = create_model("tiny", fusion="token", seed=3)
    assert torch.equal(state, torch.random.get_rng_state()), "seeded creation changed global RNG"
    b = create_model("tiny", fusion="token", generator=torch.Generator().manual_seed(3))
    c = create_model("tiny", fusion="token", seed=4)
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))
    torch.manual_seed(0)  # unseeded creation still follows the global seed
    d = create_model("tiny")
    torch.manual_seed(0)
    e = create_model("tiny")
    assert all(torch.equal(p, q) for p, q in zip(d.parameters(), e.parameters()))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_attention_maps(fusion):
    model = create_model(get_config("tiny", **MICRO), fusion=fusion, seed=0)
    cfg = model.config
    images, mask, clinical, _ = _batch(cfg)
    N, M = cfg.num_patches, cfg.num_modalities
    T = {"early": 1 + N, "token": 1 + M * N + 1, "late": M * (1 + N)}[fusion]
    with torch.no_grad():
        for block in (0, -1):
            attn = model.attention_maps(images, mask, clinical, block=block)
            assert attn.shape == (4, cfg.num_heads, T, T)
            rows = attn.sum(-1)  # late fusion is block-diagonal: each encoder's rows sum to 1
            torch.testing.assert_close(rows, torch.ones_like(rows))
        if fusion == "token":  # keys of missing sequences get exactly zero attention
            keys = attn[1, :, :, 1 + N:1 + 2 * N]  # subject 1 misses T2
            assert torch.count_nonzero(keys) == 0
        grids = model.cls_attention_grids(images, mask, clinical)
    assert grids.shape == (4, M, cfg.grid_size, cfg.grid_size)
    assert torch.all(grids[~mask] == 0)
    with pytest.raises(ConfigError, match="block"):
        model.attention_maps(images, mask, clinical, block=5)


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # inputs need no grad: expected
def test_opacus_per_sample_gradients_match_autograd(fusion, stem):
    model = create_model(get_config("tiny", **MICRO), fusion=fusion, stem=stem, seed=0)
    _check_per_sample_gradients(model)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_cnn_opacus_per_sample_gradients_match_autograd():
    _check_per_sample_gradients(create_model("cnn", image_size=16, channels=(4, 8, 8, 8), seed=0))


def _check_per_sample_gradients(model):
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    model = model.double()  # exact maths
    assert ModuleValidator.validate(model, strict=False) == []
    images, mask, clinical, labels = _batch(model.config, MASK[:3])
    images, clinical = images.double(), clinical.double()

    # reference: one autograd pass per subject
    expected = {n: [] for n, p in model.named_parameters()}
    for i in range(3):
        model.zero_grad()
        F.cross_entropy(model(images[i:i + 1], mask[i:i + 1], clinical[i:i + 1]), labels[i:i + 1],
                        reduction="sum").backward()
        for n, p in model.named_parameters():
            expected[n].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad()

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")  # hooks mode
    F.cross_entropy(gsm(images, mask, clinical), labels, reduction="sum").backward()
    missing = [n for n, p in model.named_parameters() if getattr(p, "grad_sample", None) is None]
    assert missing == [], f"no per-sample gradient for {missing}"
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, torch.stack(expected[n]), atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=n: f"{n}: {m}")
    gsm._close()


def test_presets_construct():
    assert set(list_presets()) >= {"tiny", "teaching", "paper"}
    teaching = create_model("teaching", seed=0)
    images, mask, clinical, _ = _batch(teaching.config, MASK[:2])
    assert teaching(images, mask, clinical).shape == (2, 3)
    paper = create_model("paper", seed=0)  # constructed only: a forward at 224 px is slow on CPU
    assert paper.config.embed_dim == 384 and len(paper.blocks) == 12
    assert 20e6 < sum(p.numel() for p in paper.parameters()) < 25e6


def test_pretrained_failure_is_a_clear_error(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConfigError, match="pretrained weights.*HF_HOME"):
        create_model("paper", depth=1, pretrained=True)


def test_pretrained_copies_timm_weights():
    import timm
    from mmpfl_core.models import load_timm_vit_weights

    source = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2)
    for fusion in ("token", "late"):
        model = create_model("paper", fusion=fusion, depth=2, late_depth=1, seed=0)
        load_timm_vit_weights(model, source)
        trunk = model if fusion == "token" else model.encoders["t1"]
        assert torch.equal(trunk.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
        assert torch.equal(trunk.cls_token.weight, source.cls_token)
    with pytest.raises(ConfigError, match="does not fit"):
        load_timm_vit_weights(create_model("tiny"), source)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_per_sample_fisher_vmaps_through_the_vit_with_a_missing_sequence(fusion):
    """The key-padding branch must not stop torch.func.vmap: the per-sample Fisher of the kit's ViT runs
    vectorised (no per-sample loop) and equals the loop, a missing sequence included; Opacus's hooks
    (the default) give the same, with dropout and drop-path off although Opacus needs training mode."""
    from mmpfl_core.privacy.fisher import diagonal_fisher

    model = create_model("tiny", seed=0, fusion=fusion, drop_rate=0.3, drop_path_rate=0.2)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[0, 1] = False
    inputs = (torch.randn(4, 3, 32, 32, generator=g), mask, torch.randn(4, model.config.num_clinical, generator=g))
    batches = [(inputs, torch.tensor([0, 1, 2, 1]))]
    vmapped = diagonal_fisher(model, batches, labels="true", method="vmap")
    looped = diagonal_fisher(model, batches, labels="true", method="loop")
    hooked = diagonal_fisher(model, batches, labels="true", method="hooks")
    for name, value in looped.items():
        assert torch.allclose(vmapped[name], value, rtol=1e-4, atol=1e-10), name
        assert torch.allclose(hooked[name], value, rtol=1e-4, atol=1e-10), name
    assert all(m.training for m in model.modules())  # the caller's modes are kept (it was built in training mode)
    # sampled labels (the true Fisher): the same seed draws the same labels in every method
    sampled = {m: diagonal_fisher(model, batches, labels="model", method=m, generator=torch.Generator().manual_seed(5))
               for m in ("hooks", "loop")}
    for name, value in sampled["loop"].items():
        assert torch.allclose(sampled["hooks"][name], value, rtol=1e-4, atol=1e-10), name
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None and not hasattr(p, "grad_sample") for p in model.parameters())


# --------------------------------------------------------------------------- conv stem (hybrid ViT)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_conv_stem_keeps_tokens_groups_and_masking(fusion):
    """The conv stem changes only how patches become tokens: same token count, same group names,
    a masked sequence still cannot reach the output."""
    patch = create_model(get_config("tiny", **MICRO), fusion=fusion, seed=0)
    conv = create_model(get_config("tiny", **MICRO), fusion=fusion, stem="conv", seed=0).eval()
    assert list(conv.parameter_groups()) == list(patch.parameter_groups())
    names = [n for ns in conv.parameter_groups().values() for n in ns]
    assert sorted(names) == sorted(n for n, _ in conv.named_parameters())
    stem_params = [n for n in names if ".backbone." in n]
    assert stem_params and all("patch_embed" in n for n in stem_params)
    images, mask, clinical, _ = _batch(conv.config)
    assert conv(images, mask, clinical).shape == (4, 3)
    if fusion != "early":  # early fusion zeroes a masked channel, so only zeros are invariant there
        noisy = images.clone()
        noisy[~mask] = torch.rand_like(noisy[~mask]) * 100.0
        with torch.no_grad():
            torch.testing.assert_close(conv(noisy, mask, clinical), conv(images, mask, clinical), atol=1e-6, rtol=0)
    x = torch.rand(2, 1 if fusion != "early" else 3, 16, 16)
    embed = conv.patch_embed if fusion == "early" else (
        conv.patch_embed["t1"] if fusion == "token" else conv.encoders["t1"].patch_embed)
    assert embed(x).shape == (2, conv.config.num_patches, conv.config.embed_dim)  # (B, N, D)


@pytest.mark.parametrize("fusion", ["early", "token"])
def test_conv_stem_staged_forward_matches(fusion):
    model = create_model(get_config("tiny", **MICRO), fusion=fusion, stem="conv", seed=2).eval()
    images, mask, clinical, _ = _batch(model.config)
    with torch.no_grad():
        expected = model(images, mask, clinical)
        inputs, keep = model.block_inputs(images, mask, clinical)
        for start in range(model.config.depth + 1):
            torch.testing.assert_close(model.forward_from_block(inputs[start], keep, clinical, start), expected,
                                       atol=1e-6, rtol=1e-5)


def test_conv_stem_validation_and_presets():
    with pytest.raises(ConfigError, match="power of 2"):
        create_model("tiny", image_size=24, patch_size=6, stem="conv")
    with pytest.raises(ConfigError, match="stem"):
        create_model("tiny", stem="resnet")
    with pytest.raises(ConfigError, match="stem='patch'"):
        create_model("hybrid-tiny", pretrained=True)
    assert get_config("hybrid-tiny").stem == "conv" and get_config("tiny").stem == "patch"
    assert get_config("hybrid-teaching").image_size == 64


# --------------------------------------------------------------------------- CNN baseline
def test_cnn_shapes_groups_and_missing_sequences():
    model = create_model("cnn", image_size=16, channels=(4, 8, 8, 8), seed=0).eval()
    assert isinstance(model, MultiModalCNN) and isinstance(model.config, CNNConfig)
    groups = model.parameter_groups()
    assert list(groups) == ["stem", "stage.0", "stage.1", "stage.2", "stage.3", "clinical", "head"]
    names = [n for ns in groups.values() for n in ns]
    assert len(names) == len(set(names)) and set(names) == {n for n, _ in model.named_parameters()}
    assert sum(model.group_sizes().values()) == sum(p.numel() for p in model.parameters())
    images, mask, clinical, _ = _batch(model.config)
    logits = model(images, mask, clinical)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    noisy = images.clone()
    noisy[~mask] = torch.rand_like(noisy[~mask]) * 100.0  # a masked sequence is zeroed before the stem
    with torch.no_grad():
        torch.testing.assert_close(model(noisy, mask, clinical), model(images, mask, clinical), atol=1e-6, rtol=0)
    assert model.first_block_of_group("head") is None
    images_only = create_model("cnn", image_size=16, use_clinical=False, seed=0)
    assert "clinical" not in images_only.parameter_groups()
    assert images_only(images, mask, clinical).shape == (4, 3)
    no_norm_buffers = [n for n, _ in model.named_buffers()]
    assert no_norm_buffers == [], "GroupNorm keeps no running statistics (FedAvg would not average them)"


def test_cnn_init_is_deterministic_and_validated():
    state = torch.random.get_rng_state()
    a, b = create_model("cnn", seed=5), create_model("cnn", seed=5)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    for overrides, field in [(dict(fusion="token"), "fusion"), (dict(channels=(16, 32)), "channels"),
                             (dict(image_size=8), "image_size"), (dict(num_clinical=0), "use_clinical")]:
        with pytest.raises(ConfigError, match=field):
            create_model("cnn", **overrides)
    with pytest.raises(ConfigError, match="unknown CNNConfig field"):
        create_model("cnn", depth=3)
    with pytest.raises(ConfigError, match="stem='patch'"):
        create_model("cnn", pretrained=True)


@pytest.mark.parametrize("strategy, kwargs", [("fedavg", {}), ("fedper", {}),
                                              ("dp-fedavg", dict(noise_multiplier=1.0, clip_norm=0.5,
                                                                 clipping="per-group"))])
def test_cnn_and_hybrid_vit_run_through_the_federated_engine(tiny_federation, strategy, kwargs):
    """The CNN and the hybrid ViT are registry models: the round loop, personal groups and per-group
    DP clipping take them unchanged (one round, one local step)."""
    from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig
    from mmpfl_core.federated.simulation import run_federated
    from mmpfl_core.federated.strategies import create_strategy

    cfg = FederatedConfig(num_rounds=1, local=LocalTrainingConfig(local_steps=1, batch_size=16), checkpoint_every=0,
                          bootstrap_resamples=0, device="cpu")
    for preset, extra in (("cnn", dict(channels=(4, 8, 8, 8))), ("hybrid-tiny", dict(embed_dim=16, depth=1))):
        run = run_federated(tiny_federation, model_factory=lambda: create_model(preset, seed=0, **extra),
                            strategy=create_strategy(strategy, **kwargs), config=cfg, progress=False)
        assert run.global_state and all(torch.isfinite(t).all() for t in run.global_state.values())
