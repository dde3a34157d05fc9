"""KFAC, subnetwork and module-entry Laplace: against exact block-diagonal GGNs (one data point, where KFAC
is exact), against KFAC factors built by hand from an explicit forward pass, against closed-form
subnetwork evidence, and against laplace-torch where it is installed (the ``[bench]`` extra)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from bmm_ppl.inference import Laplace, Posterior, UnsupportedModelError
from bmm_ppl.inference.laplace import linearised_predictive
from bmm_ppl.inference.latents import BlockGaussianLatents
from bmm_ppl.models import BayesianNeuralNetwork
from bmm_ppl.testing.peers import import_laplace_torch

F64 = torch.float64


def sinusoid(n, seed=5):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.rand(n, 1, generator=g, dtype=F64, device="cpu") * 6 - 3
    return x, torch.sin(x).squeeze(-1) + 0.1 * torch.randn(n, generator=g, dtype=F64, device="cpu")


def mlp(sizes, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers).double()


def normal(loc, scale):
    """A float64 Normal (python-float parameters would make it float32 and cost 1e-8 per term)."""
    return torch.distributions.Normal(torch.tensor(loc, dtype=F64), torch.tensor(scale, dtype=F64))


def block_diagonal_evidence(post, model, x, y, noise, prior_precision):
    """The Laplace evidence at the posterior's mode with the exact GGN cut to per-site blocks."""
    mode = post.latent_distribution.mean
    names = list(mode)
    net = model.module

    def output(*flat):
        params = {name.removeprefix("net."): value for name, value in zip(names, flat)}
        return torch.func.functional_call(net, params, (x,)).squeeze(-1)

    jacobians = torch.autograd.functional.jacobian(output, tuple(mode[n] for n in names))
    log_det = 0.0
    for j in jacobians:
        j = j.reshape(len(y), -1)
        log_det += float(torch.logdet(j.T @ j / noise**2 + prior_precision * torch.eye(j.shape[1], dtype=F64)))
    theta = torch.cat([mode[n].reshape(-1) for n in names])
    residual = y - output(*(mode[n] for n in names))
    log_joint = (normal(0.0, noise).log_prob(residual).sum() + normal(0.0, prior_precision**-0.5).log_prob(theta).sum())
    return float(log_joint) + 0.5 * theta.numel() * math.log(2 * math.pi) - 0.5 * log_det


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_kfac_of_one_data_point_is_the_exact_block_diagonal_ggn(approximation):
    """With one data point ``A = a a^T`` and ``G = g^T Lambda g``, so ``kron(G, A)`` is the weight's exact
    GGN block: the KFAC evidence equals the block-diagonal GGN evidence to 1e-8."""
    x, y = sinusoid(1)
    model = BayesianNeuralNetwork(mlp([1, 5, 3, 1]), prior_scale=0.8, noise=0.2)
    post = Laplace(hessian="kron", kfac=approximation, progress=False).fit(model, x, y)
    assert post.diagnostics["converged"]
    assert abs(post.log_evidence.value - block_diagonal_evidence(post, model, x, y, 0.2, 0.8**-2)) < 1e-8


def test_kfac_factors_equal_ones_built_from_an_explicit_forward_pass():
    """A 2-4-3-1 tanh network on 30 points: ``A_l = 1/N sum a a^T`` from the layer inputs and
    ``G_l = sum_n g_n g_n^T / sigma^2`` from the output's gradient in the layer output, by hand; the
    evidence with ``kron(G, A)`` weight blocks and exact bias blocks equals the engine's to 1e-8."""
    g = torch.Generator(device="cpu").manual_seed(3)
    x = torch.randn(30, 2, generator=g, dtype=F64, device="cpu")
    y = torch.tanh(x[:, 0] - x[:, 1]) + 0.1 * torch.randn(30, generator=g, dtype=F64, device="cpu")
    noise, delta = 0.1, 2.0
    model = BayesianNeuralNetwork(mlp([2, 4, 3, 1]), prior_scale=delta**-0.5, noise=noise)
    post = Laplace(hessian="kron", progress=False).fit(model, x, y)
    mode = post.latent_distribution.mean
    W = [mode[f"net.{i}.weight"].detach().requires_grad_(True) for i in (0, 2, 4)]
    b = [mode[f"net.{i}.bias"].detach().requires_grad_(True) for i in (0, 2, 4)]
    inputs, outputs, a = [], [], x
    for layer in range(3):
        inputs.append(a.detach())
        h = a @ W[layer].T + b[layer]
        outputs.append(h)
        a = torch.tanh(h) if layer < 2 else h
    f = a.squeeze(-1)
    grads = torch.autograd.grad(f.sum(), outputs)
    f = f.detach()
    log_det = 0.0
    for layer in range(3):
        A = inputs[layer].T @ inputs[layer] / len(y)
        G = grads[layer].T @ grads[layer] / noise**2
        eig = torch.linalg.eigvalsh(G)[:, None] * torch.linalg.eigvalsh(A)[None, :]
        log_det += float((eig.clamp_min(0) + delta).log().sum())
        log_det += float(torch.logdet(G + delta * torch.eye(G.shape[0], dtype=F64)))
    theta = torch.cat([v.reshape(-1) for v in mode.values()])
    log_joint = normal(0.0, noise).log_prob(y - f.detach()).sum() + normal(0.0, delta**-0.5).log_prob(theta).sum()
    expected = float(log_joint) + 0.5 * theta.numel() * math.log(2 * math.pi) - 0.5 * log_det
    assert abs(post.log_evidence.value - expected) < 1e-8


def shared_weight_model(x, y=None):
    """A linear layer applied at every position of a sequence (``x: [n, T, 3]``), outputs summed."""
    w = pyro.sample("w", dist.Normal(torch.zeros(2, 3, dtype=x.dtype), 1.0).to_event(2))
    v = pyro.sample("v", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
    h = torch.tanh(torch.nn.functional.linear(x, w)).sum(1)
    with pyro.plate("data", x.shape[0]):
        mean = pyro.deterministic("mean", h @ v)
        pyro.sample("obs", dist.Normal(mean, 0.3), obs=y)


def test_expand_and_reduce_follow_their_definitions_under_weight_sharing():
    """Weights shared over T = 4 positions: the engine's ``w`` block equals ``kron(G, A)`` built by hand
    for each definition (Eschenhagen et al. 2023), checked through the log determinant to 1e-8."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(12, 4, 3, generator=g, dtype=F64, device="cpu")
    y = torch.randn(12, generator=g, dtype=F64, device="cpu")
    for approximation in ("expand", "reduce"):
        post = Laplace(hessian="kron", kfac=approximation, progress=False).fit(shared_weight_model, x, y)
        mode = post.latent_distribution.mean
        w = mode["w"].detach()
        v = mode["v"].detach()
        h = torch.nn.functional.linear(x, w).requires_grad_(True)
        f = torch.tanh(h).sum(1) @ v
        (gh,) = torch.autograd.grad(f.sum(), h)  # [n, T, 2]
        if approximation == "expand":
            A = torch.einsum("nti,ntj->ij", x, x) / (12 * 4)
            G = torch.einsum("nto,ntp->op", gh, gh) / 0.3**2
        else:
            mean = x.mean(1)
            A = mean.T @ mean / 12
            summed = gh.sum(1)
            G = summed.T @ summed / 0.3**2
        eig = torch.linalg.eigvalsh(G)[:, None] * torch.linalg.eigvalsh(A)[None, :]
        w_block = float((eig.clamp_min(0) + 1.0).log().sum())
        jv = torch.tanh(torch.nn.functional.linear(x, w)).sum(1)  # the output's Jacobian in v
        v_block = float(torch.logdet(jv.T @ jv / 0.3**2 + torch.eye(2, dtype=F64)))
        assert abs(post.diagnostics["log_det_precision"] - (w_block + v_block)) < 1e-8, approximation


def test_kfac_refuses_a_weight_used_outside_its_layer():
    def leaky(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(1, 2, dtype=x.dtype), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            mean = pyro.deterministic("mean", torch.nn.functional.linear(x, w).squeeze(-1) + w.pow(2).sum())
            pyro.sample("obs", dist.Normal(mean, 0.3), obs=y)

    x, y = sinusoid(10)
    x = torch.cat([x, x**2], -1)
    with pytest.raises(UnsupportedModelError, match=r"KFAC needs site 'w' to enter the output only"):
        Laplace(hessian="kron", progress=False).fit(leaky, x, y)


def test_kfac_refuses_a_prior_scale_that_varies_within_a_weight():
    def varying(x, y=None):
        scale = torch.tensor([[1.0, 2.0]], dtype=x.dtype)
        w = pyro.sample("w", dist.Normal(torch.zeros(1, 2, dtype=x.dtype), scale).to_event(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(pyro.deterministic("mean", torch.nn.functional.linear(x, w).squeeze(-1)), 0.3), obs=y)

    x, y = sinusoid(10)
    with pytest.raises(UnsupportedModelError, match=r"one prior precision per weight matrix, but site 'w'"):
        Laplace(hessian="kron", progress=False).fit(varying, torch.cat([x, x**2], -1), y)


def test_subnetwork_evidence_is_the_closed_form_with_the_rest_at_its_mode():
    """``y = x1 w1 + x2 w2 + e``: the Laplace over ``w2`` alone is exact, ``log N(y - x1 w1*; 0, x2 S x2^T +
    s^2 I)`` with ``w1`` at the joint mode (its prior left out), to 1e-8."""
    g = torch.Generator(device="cpu").manual_seed(1)
    x1 = torch.randn(25, 2, generator=g, dtype=F64, device="cpu")
    x2 = torch.randn(25, 3, generator=g, dtype=F64, device="cpu")
    y = x1 @ torch.tensor([1.0, -1.0], dtype=F64) + x2 @ torch.tensor([0.5, 0.0, 2.0], dtype=F64)

    def model(x1, x2, y=None):
        w1 = pyro.sample("w1", dist.Normal(torch.zeros(2, dtype=F64), 2.0).to_event(1))
        w2 = pyro.sample("w2", dist.Normal(torch.zeros(3, dtype=F64), 0.7).to_event(1))
        with pyro.plate("data", len(x1)):
            pyro.sample("obs", dist.Normal(pyro.deterministic("mean", x1 @ w1 + x2 @ w2), 0.4), obs=y)

    post = Laplace(subset=["w2"], progress=False).fit(model, x1, x2, y)
    w1 = post.latent_distribution.mean["w1"]
    covariance = 0.7**2 * x2 @ x2.T + 0.4**2 * torch.eye(25, dtype=F64)
    expected = torch.distributions.MultivariateNormal(x1 @ w1, covariance).log_prob(y)
    assert post.diagnostics["num_parameters"] == 3 and post.diagnostics["subset"] == ["w2"]
    assert abs(post.log_evidence.value - float(expected)) < 1e-8
    draws = post.samples(50)
    assert torch.equal(draws["w1"], w1.expand(50, 2))  # held at the mode
    full = Laplace(progress=False).fit(model, x1, x2, y)
    assert abs(Laplace(subset=["w1", "w2"], progress=False).fit(model, x1, x2, y).log_evidence.value
               - full.log_evidence.value) < 1e-8


def test_subset_names_must_be_latent_sites():
    x, y = sinusoid(10)
    with pytest.raises(ValueError, match=r"subset names \['net.9.weight'\], which are not latent sites"):
        Laplace(subset=["net.9.weight"], progress=False).fit(BayesianNeuralNetwork(mlp([1, 3, 1]), 1.0, noise=0.1), x, y)


def test_kron_posterior_saves_loads_and_predicts_like_its_dense_matrix(tmp_path):
    """The linearised predictive from the Kronecker blocks equals ``J S S^T J^T`` with the dense factor
    the blocks make (1e-10); saved and loaded, the posterior draws the same."""
    x, y = sinusoid(20)
    model = BayesianNeuralNetwork(mlp([1, 4, 1]), prior_scale=1.0, noise=0.1)
    post = Laplace(hessian="kron", progress=False).fit(model, x, y)
    latents = post.latent_distribution
    assert isinstance(latents, BlockGaussianLatents)
    mean, variance = linearised_predictive(post, x[:5])
    dense = BlockGaussianLatents(latents.loc, latents.site_shapes, [], [])
    factor = latents.scale_factor
    names = list(latents.site_shapes)

    def output(flat):
        params = {n.removeprefix("net."): v for n, v in dense._split(flat).items()}
        return torch.func.functional_call(model.module, params, (x[:5],)).squeeze(-1)

    J = torch.func.jacrev(output)(latents.loc)
    torch.testing.assert_close(variance, ((J @ factor) ** 2).sum(-1), rtol=1e-10, atol=1e-12)
    path = tmp_path / "kron.pt"
    post.save(path)
    loaded = Posterior.load(path, model=model, args=(x, y))
    torch.manual_seed(0)
    a = post.samples(3)
    torch.manual_seed(0)
    b = loaded.samples(3)
    assert all(torch.equal(a[n], b[n]) for n in names)


def test_fit_network_starts_at_the_module_and_leaves_it_unchanged():
    x, y = sinusoid(30)
    net = mlp([1, 6, 1])
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    post = Laplace(progress=False).fit_network(net, x, y, prior_precision=1.0, noise=0.1)
    assert all(torch.equal(before[n], p) for n, p in net.named_parameters())
    assert post.diagnostics["converged"] and post.engine == "Laplace"
    with pytest.raises(ValueError, match="prior_precision must be a positive number or None"):
        Laplace(progress=False).fit_network(net, x, y, prior_precision=-1.0)


def at_mode(net, posterior):
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(posterior.latent_distribution.mean[f"net.{name}"])


laplace_torch = import_laplace_torch()
needs_laplace_torch = pytest.mark.skipif(laplace_torch is None, reason="laplace-torch (the [bench] extra) is not installed")


@pytest.fixture
def float64_default():
    """laplace-torch makes its noise and prior tensors in the default dtype: float32 would cost 1e-5 nats."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(before)


@needs_laplace_torch
@pytest.mark.parametrize("likelihood", ["gaussian", "categorical"])
def test_evidence_equals_laplace_torch_at_the_same_mode(likelihood, float64_default):
    """laplace-torch's FullLaplace / DiagLaplace / KronLaplace ``log_marginal_likelihood`` at our mode, with
    the same prior precision and noise: equal to 1e-8 (measured: below 3e-9 for each structure)."""
    from torch.utils.data import DataLoader, TensorDataset

    if likelihood == "gaussian":
        x, y = sinusoid(60)
        net, target, noise = mlp([1, 10, 1]), y.unsqueeze(-1), 0.1
    else:
        g = torch.Generator(device="cpu").manual_seed(2)
        x = torch.randn(60, 2, generator=g, dtype=F64, device="cpu")
        y = (x[:, 0] * x[:, 1] > 0).long() + (x[:, 0] > 1).long()
        net, target, noise = mlp([2, 6, 3]), y, 1.0
    delta = 2.0
    loader = DataLoader(TensorDataset(x, target), batch_size=len(x))
    for structure in ("full", "diag", "kron"):
        ours = Laplace(hessian=structure, progress=False).fit_network(
            net, x, y, likelihood=likelihood, prior_precision=delta, noise=noise)
        at_mode(net, ours)  # the evidence's log determinant moves at first order with the weights
        peer = laplace_torch.Laplace(net, "regression" if likelihood == "gaussian" else "classification",
                                     subset_of_weights="all", hessian_structure=structure, prior_precision=delta, sigma_noise=noise)
        peer.fit(loader, progress_bar=False)
        assert abs(ours.log_evidence.value - float(peer.log_marginal_likelihood().detach())) < 1e-8, structure


@needs_laplace_torch
def test_last_layer_evidence_equals_laplace_torch(float64_default):
    """laplace-torch's last-layer Laplace (full GGN over the last nn.Linear) against ``subset=`` the last
    layer's weight and bias: equal to 1e-8 at the same mode."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = sinusoid(50)
    net = mlp([1, 6, 6, 1])
    at_mode(net, Laplace(max_iter=3000, progress=False).fit_network(net, x, y, prior_precision=1.0, noise=0.1))  # trained
    ours = Laplace(subset=["net.4.weight", "net.4.bias"], progress=False).fit_network(
        net, x, y, prior_precision=1.0, noise=0.1)
    at_mode(net, ours)
    peer = laplace_torch.Laplace(net, "regression", subset_of_weights="last_layer", hessian_structure="full",
                                 prior_precision=1.0, sigma_noise=0.1)
    peer.fit(DataLoader(TensorDataset(x, y.unsqueeze(-1)), batch_size=len(x)), progress_bar=False)
    assert abs(ours.log_evidence.value - float(peer.log_marginal_likelihood().detach())) < 1e-8
