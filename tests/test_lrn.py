"""LRN (section 3.3) against the paper's formula written out by hand in numpy, in both alpha modes; its fixed-gain
control (model.lrn_form "gain") against a division by k^beta."""

import numpy as np
import pytest
import torch

from repro.errors import UserError
from repro.models.layers import LRN, LRNGain, lrn_layer


def lrn_by_hand(a: np.ndarray, n: int, alpha: float, beta: float, k: float) -> np.ndarray:
    """b^i = a^i / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} (a^j)^2)^beta, over channels (axis 1)."""
    N = a.shape[1]
    b = np.empty_like(a)
    for i in range(N):
        lo, hi = max(0, i - n // 2), min(N - 1, i + n // 2)
        s = (a[:, lo:hi + 1] ** 2).sum(axis=1)
        b[:, i] = a[:, i] / (k + alpha * s) ** beta
    return b


@pytest.fixture
def activations():
    # Large values so that the alpha term is comparable with k and a wrong alpha shows.
    return np.random.default_rng(0).normal(0, 40, size=(2, 12, 4, 5))


def run(module, a):
    return module(torch.from_numpy(a)).numpy()


def test_paper_mode_applies_alpha_as_written(activations):
    out = run(LRN(alpha_mode="paper"), activations)
    np.testing.assert_allclose(out, lrn_by_hand(activations, 5, 1e-4, 0.75, 2.0), rtol=1e-10)


def test_per_size_mode_divides_alpha_by_n(activations):
    out = run(LRN(alpha_mode="per-size"), activations)
    np.testing.assert_allclose(out, lrn_by_hand(activations, 5, 1e-4 / 5, 0.75, 2.0), rtol=1e-10)
    # the same as torch's own module (and so Caffe's semantics)
    ref = torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)(torch.from_numpy(activations)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-12)


def test_the_two_modes_really_differ(activations):
    paper, per_size = run(LRN(alpha_mode="paper"), activations), run(LRN(alpha_mode="per-size"), activations)
    assert np.max(np.abs(paper - per_size) / np.abs(per_size)) > 0.05


def test_size_three_as_in_the_cifar_net(activations):
    out = run(LRN(size=3, alpha=5e-5, alpha_mode="paper"), activations)
    np.testing.assert_allclose(out, lrn_by_hand(activations, 3, 5e-5, 0.75, 2.0), rtol=1e-10)


def test_two_towers_normalise_only_within_their_own_channels(activations):
    out = run(LRN(alpha_mode="paper", towers=2), activations)
    halves = [lrn_by_hand(h, 5, 1e-4, 0.75, 2.0) for h in np.split(activations, 2, axis=1)]
    np.testing.assert_allclose(out, np.concatenate(halves, axis=1), rtol=1e-10)
    # at the boundary channel the one-tower result differs: the window would cross into the other tower
    joint = lrn_by_hand(activations, 5, 1e-4, 0.75, 2.0)
    assert not np.allclose(out[:, 5], joint[:, 5], rtol=1e-6)


def test_unknown_alpha_mode_is_a_user_error():
    with pytest.raises(UserError, match="lrn_alpha_mode"):
        LRN(alpha_mode="caffe")


def test_gradients_match_torchs_module_in_both_layouts(activations):
    # the window sum is a 1x1 convolution: its backward must equal torch's avg_pool-based LocalResponseNorm
    ref_in = torch.from_numpy(activations).requires_grad_(True)
    torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)(ref_in).pow(2).sum().backward()
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.from_numpy(activations).contiguous(memory_format=layout).requires_grad_(True)
        LRN(alpha_mode="per-size")(x).pow(2).sum().backward()
        np.testing.assert_allclose(x.grad.numpy(), ref_in.grad.numpy(), rtol=1e-10)


def test_float32_matches_float64_by_hand(activations):
    out = run(LRN(alpha_mode="paper", towers=2), activations.astype(np.float32))
    halves = [lrn_by_hand(h, 5, 1e-4, 0.75, 2.0) for h in np.split(activations, 2, axis=1)]
    np.testing.assert_allclose(out, np.concatenate(halves, axis=1), rtol=1e-5)


@pytest.mark.parametrize("towers", [1, 2])
def test_hand_written_gradient_matches_finite_differences(towers):
    # LRN's backward is written out (one power per step instead of two); check it against numerical derivatives,
    # with values large enough that the alpha term matters
    x = (torch.randn(2, 8, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 60)
    x = x.requires_grad_(True)
    assert torch.autograd.gradcheck(LRN(alpha_mode="paper", towers=towers), (x,), eps=1e-4, atol=1e-7, rtol=1e-5)


def test_gradient_in_channels_last_equals_contiguous(activations):
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.from_numpy(activations).contiguous(memory_format=layout).requires_grad_(True)
        LRN(alpha_mode="paper", towers=2)(x).pow(2).sum().backward()
        grads.append(x.grad.numpy())
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-12)


@pytest.mark.parametrize("towers", [1, 2])
def test_bf16_autocast_computes_in_float32_and_returns_bf16(towers):
    """Under bf16 autocast (the GPU recipe) LRN takes a bf16 input and gives bf16 out, but the window sum and the
    power are float32: the output is float64's of the same input within bf16's own rounding of the result (2^-8),
    and the gradient within bf16 rounding too. In bf16, k + sum rounds in 0.8% steps and the error was 1.2%."""
    gen = torch.Generator().manual_seed(4)
    a = torch.relu(torch.randn(2, 96, 9, 9, generator=gen) * 100).to(torch.bfloat16)
    g = torch.randn(a.shape, generator=gen).to(torch.bfloat16)
    lrn = LRN(towers=towers)
    want_x = a.double().requires_grad_(True)
    want = lrn(want_x)
    want.backward(g.double())
    x = a.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lrn(x)
    got.backward(g)
    assert got.dtype == x.grad.dtype == torch.bfloat16
    shown = a > 1
    assert (want.detach() / a.double())[shown].std() > 0.03  # the normalisation matters at these activations
    assert ((got.double() - want).abs() / want.abs())[shown].max() <= 2.0**-8
    err = (x.grad.double() - want_x.grad).norm() / want_x.grad.norm()
    assert err < 2.0**-8


@pytest.mark.parametrize("form", ["full", "gain"])
def test_compiles_as_one_graph_under_bf16_autocast(form):
    """torch.compile traces LRN and its gain control whole (no graph break), forward and backward, under autocast."""
    lrn = lrn_layer(form, towers=2)
    x = torch.relu(torch.randn(2, 16, 8, 8)).to(torch.bfloat16).requires_grad_(True)
    compiled = torch.compile(lrn, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = compiled(x)
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16


GAIN = 2.0 ** 0.75  # k^beta with the paper's k = 2, beta = 0.75


@pytest.mark.parametrize("towers", [1, 2])
def test_gain_form_divides_by_k_to_the_beta_exactly(towers):
    x = torch.from_numpy(np.random.default_rng(2).normal(0, 40, size=(2, 12, 4, 5)).astype(np.float32))
    gain = lrn_layer("gain", alpha_mode="paper", towers=towers)
    assert isinstance(gain, LRNGain) and not isinstance(gain, LRN)  # not measured as a normalisation
    out = gain(x)
    assert out.dtype == torch.float32 and torch.equal(out, x / GAIN)
    # and within float32's rounding of the exact quotient, whatever the channel (no window, no towers)
    np.testing.assert_allclose(out.numpy(), x.double().numpy() / GAIN, rtol=2**-23)


def test_gain_form_returns_the_inputs_dtype_under_autocast():
    # as LRN: bf16 in, bf16 out and bf16 gradients, each the float32 quotient rounded once
    a = torch.relu(torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(5)) * 100).to(torch.bfloat16)
    x = a.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = LRNGain()(x)
    out.float().sum().backward()
    assert out.dtype == x.grad.dtype == torch.bfloat16
    assert torch.equal(out, (a.float() / GAIN).to(torch.bfloat16))
    assert torch.equal(x.grad, torch.full_like(a, 1 / GAIN, dtype=torch.float32).to(torch.bfloat16))


@pytest.mark.parametrize("towers", [1, 2])
def test_full_lrn_is_its_gain_only_when_activations_are_tiny(towers):
    """b = a / (k + alpha * sum a^2)^beta tends to a / k^beta as alpha * sum a^2 / k -> 0 (demo scale: about 3e-5)
    and departs from it when the sum is comparable with k."""
    rng = np.random.default_rng(3)
    gain = lrn_layer("gain", towers=towers)
    for sd, close in ((0.05, True), (40.0, False)):
        a = rng.normal(0, sd, size=(2, 12, 4, 5))
        by_hand = np.concatenate([lrn_by_hand(h, 5, 1e-4, 0.75, 2.0) for h in np.split(a, towers, axis=1)], axis=1)
        full, fixed = run(LRN(alpha_mode="paper", towers=towers), a), run(gain, a)
        np.testing.assert_allclose(full, by_hand, rtol=1e-10)
        np.testing.assert_allclose(fixed, a / GAIN, rtol=1e-15)
        departure = np.max(np.abs(full - fixed) / np.abs(fixed))
        # tiny: alpha * sum a^2 <= 1e-4 * 5 * 0.05^2 * (a few) ~ 1e-5 of k, so the two agree to ~1e-5
        assert (departure < 1e-4) if close else (departure > 0.05), (sd, departure)
