"""Losses on small hand-computed cases, and the supervised / ICL / EAM objectives on tiny batches."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny

from napari_consistent_seg.models.unet import BackboneOutput
from napari_consistent_seg.training import losses
from napari_consistent_seg.training.config import DEFAULT_WEIGHTS
from napari_consistent_seg.training.objectives import Objective


def _identity_grid(logits):
    """A BackboneOutput whose maps are already on the input grid (resizing is the identity)."""
    return BackboneOutput(logits, [], tuple(logits.shape[2:]))


# ---- losses ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", [(6, 5), (3, 4, 5)])
def test_seg_loss_of_a_perfect_confident_prediction_is_zero(spatial):
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, *spatial))
    labels[0].flatten()[:3] = torch.tensor([0, 1, 2])
    logits = 50.0 * F.one_hot(labels, 3).movedim(-1, 1).float()
    assert losses.seg_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-4)
    wrong = 50.0 * F.one_hot((labels + 1) % 3, 3).movedim(-1, 1).float()
    assert losses.seg_loss(wrong, labels).item() > 10  # CE of a confident wrong answer, plus Dice


def test_map_supervision_upsamples_each_scale_and_averages():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 16, 16))
    out = BackboneOutput(torch.zeros(2, 3, 16, 16), [], (16, 16))
    maps = [torch.randn(2, 3, 2, 2), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)]
    expected = sum(losses.seg_loss(out.to_input_grid(m), labels) for m in maps) / 3
    assert torch.allclose(losses.map_supervision(maps, out, labels), expected)


def test_map_consistency_zero_for_identical_maps_and_hand_value_otherwise():
    torch.manual_seed(0)
    maps = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    assert losses.map_consistency(maps, [m.clone() for m in maps]).item() == 0.0
    # scale 1: softmax(0, 0) = (0.5, 0.5) against softmax(log 3, 0) = (0.75, 0.25): MSE 0.0625;
    # scale 2 identical: 0. Mean over scales: 0.03125.
    a = [torch.zeros(1, 2, 1, 1, requires_grad=True), torch.ones(1, 2, 1, 1)]
    b = [torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1).requires_grad_(), torch.ones(1, 2, 1, 1)]
    value = losses.map_consistency(a, b)
    assert value.item() == pytest.approx(0.03125, abs=1e-7)
    value.backward()
    assert a[0].grad is not None and b[0].grad is None  # stop-gradient on the second maps


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_representation_kl_by_hand_at_temperature_2():
    rep_a = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    rep_b = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    expected = 0.0
    for ra, rb in zip(rep_a.tolist(), rep_b.tolist()):
        p, q = _softmax([v / 2 for v in ra]), _softmax([v / 2 for v in rb])
        expected += _kl(p, q) + _kl(q, p)
    expected *= 2**2
    value = losses.representation_kl(rep_a, rep_b, [0, 1], temperature=2.0)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert losses.representation_kl(rep_b, rep_a, [0, 1]).item() == pytest.approx(value.item(), rel=1e-6)
    assert losses.representation_kl(rep_a, rep_a.clone(), [0, 1]).item() == pytest.approx(0.0, abs=1e-7)


def test_representation_kl_sums_over_all_given_classes():
    torch.manual_seed(0)
    rep_a, rep_b = torch.randn(5, 8), torch.randn(5, 8)
    classes = [1, 2, 4]
    total = losses.representation_kl(rep_a, rep_b, classes)
    per_class = sum(losses.representation_kl(rep_a, rep_b, [k]) for k in classes)
    assert total.item() == pytest.approx(per_class.item(), rel=1e-5)
    changed = rep_a.clone()
    changed[1] += torch.randn(8)  # the first, not the last, of the given classes
    assert losses.representation_kl(changed, rep_b, classes).item() != pytest.approx(total.item(), rel=1e-4)
    changed = rep_a.clone()
    changed[3] += 5.0  # not a given class: no effect
    assert losses.representation_kl(changed, rep_b, classes).item() == pytest.approx(total.item(), rel=1e-6)


def test_correlation_consistency_by_hand():
    eye = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # G = I against a 45-degree pair (off-diagonal cos = 1/sqrt 2): 2 * (1/sqrt 2)^2 / 4 = 0.25
    tilted = torch.tensor([[2.0, 0.0], [3.0, 3.0]])
    assert losses.correlation_consistency(eye, tilted, [0, 1]).item() == pytest.approx(0.25, rel=1e-6)
    # parallel pair: all ones against I: 2 / 4 = 0.5; a third, unlisted class changes nothing
    parallel = torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 9.0]])
    eye3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 7.0]])
    assert losses.correlation_consistency(eye3, parallel, [0, 1]).item() == pytest.approx(0.5, rel=1e-6)
    assert losses.correlation_consistency(eye, 3 * eye, [0, 1]).item() == pytest.approx(0.0, abs=1e-7)
    assert torch.allclose(losses.correlation_matrix(tilted, [0, 1]),
                          torch.tensor([[1.0, 2**-0.5], [2**-0.5, 1.0]]))


def test_pseudo_label_loss_zero_when_maps_follow_the_backbone_and_backbone_is_stopped():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 6, 6))
    logits = (40.0 * F.one_hot(labels, 3).movedim(-1, 1).float()).requires_grad_()
    maps = logits.detach().clone().requires_grad_()
    value = losses.pseudo_label_loss([maps, maps], _identity_grid(logits), logits)
    assert value.item() == pytest.approx(0.0, abs=1e-4)
    other = torch.roll(maps.detach(), 1, dims=1).requires_grad_()
    value = losses.pseudo_label_loss([other], _identity_grid(logits), logits)
    assert value.item() > 0.5
    value.backward()
    assert other.grad is not None and logits.grad is None


def test_confidence_mask_keeps_only_sure_pixels_and_masked_terms_ignore_the_rest():
    torch.manual_seed(0)
    logits = 0.1 * torch.randn(2, 3, 8, 8)  # the bottom half is unsure
    logits[:, :, :4] = 20.0 * F.one_hot(torch.randint(0, 3, (2, 4, 8)), 3).movedim(-1, 1)  # the top half sure
    assert losses.confidence_mask(logits, 0.0) is None
    mask = losses.confidence_mask(logits, 0.9)
    assert mask.shape == (2, 1, 8, 8) and mask[:, :, :4].all()
    assert torch.equal(mask[:, 0], (logits.softmax(1).amax(1) >= 0.9).float())
    out = _identity_grid(logits)
    maps = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]
    ones = torch.ones(2, 1, 8, 8)
    # an all-ones mask is the unmasked loss
    assert torch.allclose(losses.pseudo_label_loss(maps, out, logits, ones), losses.pseudo_label_loss(maps, out, logits))
    others = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]
    assert torch.allclose(losses.map_consistency(maps, others, ones), losses.map_consistency(maps, others))
    # what happens outside the mask does not count (the coarse scale sees the top half as rows 0-1)
    top = torch.zeros(2, 1, 8, 8)
    top[:, :, :4] = 1
    changed = [m.clone() for m in maps]
    changed[0][:, :, 4:] = torch.randn(2, 3, 4, 8)
    changed[1][:, :, 2:] = torch.randn(2, 3, 2, 4)
    assert torch.allclose(losses.map_consistency(maps, others, top), losses.map_consistency(changed, others, top))
    assert torch.allclose(losses.pseudo_label_loss(maps[:1], out, logits, top),
                          losses.pseudo_label_loss(changed[:1], out, logits, top))
    assert not torch.allclose(losses.map_consistency(maps, others), losses.map_consistency(changed, others))
    assert losses.map_consistency(maps, others, torch.zeros(2, 1, 8, 8)).item() == 0.0


# ---- objectives ------------------------------------------------------------------------------
def _batch(method, b=2, size=(40, 36), k=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def images():
        return torch.rand(b, 1, *size, generator=g)

    def labels():
        return torch.randint(0, k, (b, *size), generator=g)

    if method == "eam":
        return {"domains": [(images(), labels()), (images(), labels())]}
    batch = {"images": images(), "labels": labels()}
    if method == "icl":
        batch["unlabeled"] = images()
    return batch


@pytest.mark.parametrize("method,terms", [
    ("supervised", {"seg"}), ("icl", {"seg", "aux", "pse", "cons"}), ("eam", {"seg", "map", "rep", "corr"}),
])
def test_objectives_forward_and_backward(method, terms):
    backbone, mods = build_tiny(modules={"supervised": None}.get(method, method))
    objective = Objective(method, backbone.train(), mods, DEFAULT_WEIGHTS, aligned_classes=[1, 2, 3])
    loss, logged = objective(_batch(method))
    assert set(logged) == terms
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(not v.requires_grad for v in logged.values())
    loss.backward()
    assert all(p.grad is not None for p in backbone.parameters())
    if mods is not None:
        assert mods.queries.weight.grad.abs().sum() > 0


def test_objective_needs_modules_for_icl_and_eam():
    backbone, _ = build_tiny()
    for method in ("icl", "eam"):
        with pytest.raises(ValueError, match="external modules"):
            Objective(method, backbone)


class _Recorder:
    """Wraps ICLModules' attend/consistent to keep their outputs (their tensors retain grads)."""

    def __init__(self, mods, monkeypatch):
        self.attended, self.consistent, self.proxies = [], [], []
        attend, consistent = mods.attend, mods.consistent

        def rec_attend(features):
            out = attend(features)
            for m in out.maps:
                m.retain_grad()
            self.attended.append(out)
            return out

        def rec_consistent(features, proxies):
            for p in proxies:
                p.retain_grad()
            self.proxies.append(proxies)
            out = consistent(features, proxies)
            for m in out.maps:
                m.retain_grad()
            self.consistent.append(out)
            return out

        monkeypatch.setattr(mods, "attend", rec_attend)
        monkeypatch.setattr(mods, "consistent", rec_consistent)


def _icl_backward(weights, monkeypatch):
    backbone, mods = build_tiny(modules="icl")
    rec = _Recorder(mods, monkeypatch)
    objective = Objective("icl", backbone.train(), mods, weights)
    loss, _ = objective(_batch("icl"))
    loss.backward()
    return mods, rec


def test_icl_uscl_loss_reaches_the_sspa_path_through_the_labeled_proxies(monkeypatch):
    mods, rec = _icl_backward({"aux": 0.0, "pse": 1.0, "cons": 0.0}, monkeypatch)
    assert len(rec.attended) == 2 and len(rec.consistent) == 1  # SSPA on labeled, on unlabeled; USCL
    assert all(p.requires_grad and p.grad_fn is not None for p in rec.proxies[0])  # not detached
    assert all(p.grad.abs().sum() > 0 for p in rec.proxies[0])
    # with L_aux and L_cons weighted 0, SSPA's own weights learn from L_pse through the proxies only
    assert mods.queries.weight.grad.abs().sum() > 0
    for scale in mods.sspa.scales:
        assert scale.q.weight.grad.abs().sum() > 0 and scale.mlp[0].weight.grad.abs().sum() > 0


def test_icl_consistency_does_not_reach_the_sspa_maps(monkeypatch):
    mods, rec = _icl_backward({"aux": 0.0, "pse": 0.0, "cons": 1.0}, monkeypatch)
    _, sspa_unlabeled = rec.attended
    assert all(m.grad is None for m in sspa_unlabeled.maps)  # stop-gradient target of L_cons
    assert all(m.grad.abs().sum() > 0 for m in rec.consistent[0].maps)  # USCL maps do learn
    # nor does it reach SSPA's map heads: only the proxies carry its gradient into SSPA
    for scale in mods.sspa.scales:
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in scale.map_head.parameters())


def test_eam_aligns_only_the_aligned_classes(monkeypatch):
    """With only the representation and correlation terms on, the queries of a class that is not
    aligned get no gradient (class queries do not mix), and the losses see only aligned classes."""
    seen = []
    kl, corr = losses.representation_kl, losses.correlation_consistency
    monkeypatch.setattr(losses, "representation_kl", lambda a, b, c: seen.append(list(c)) or kl(a, b, c))
    monkeypatch.setattr(losses, "correlation_consistency", lambda a, b, c: seen.append(list(c)) or corr(a, b, c))
    backbone, mods = build_tiny(modules="eam")
    objective = Objective("eam", backbone.train(), mods, {"map": 0.0, "rep": 1.0, "corr": 1.0},
                          aligned_classes=[1, 3])
    loss, logged = objective(_batch("eam"))
    loss.backward()
    assert seen and all(c == [1, 3] for c in seen)
    assert len(seen) == 2 * 3  # both terms at each of the three scales
    grad = mods.queries.weight.grad
    assert grad[[1, 3]].abs().sum(1).min() > 0
    assert grad[[0, 2]].abs().sum() == 0
    assert logged["rep"] > 0 and logged["corr"] >= 0
