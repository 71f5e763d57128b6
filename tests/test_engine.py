"""The fast engine replays the reference loop's step: the same results, on every backend."""

import warnings

import pytest
import torch
from device_only import NoHostTensors

from fastem_ext import gaussian_kernel, run
from fastem_ext.engine import EngineConfig, GraphedLoop, autocast_model, graphed_sample
from fastem_ext.models import GaussianPrior
from fastem_ext.mstep import HQSConfig, bundled_denoiser
from fastem_ext.observation import Observation
from fastem_ext.samplers import fast_em, sample
from fastem_ext.schedule import Schedule
from fastem_ext.step import StepConfig, guided_step, plan_step


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(3, 24, 20, generator=g)
    return Observation(y, 0.03), gaussian_kernel(5, 1.0)


@pytest.mark.parametrize("guidance, blind", [("pigdm", True), ("dps", True), ("pigdm", False)])
def test_device_indexed_loop_equals_the_reference_loop(guidance, blind):
    obs, kernel = _problem()
    mstep = HQSConfig(regularizer="l2").validate() if blind else None
    args = dict(schedule=Schedule("6"), shape=(2, 3, 24, 20), guidance=guidance, kernel=kernel,
                mstep=mstep)
    prior = GaussianPrior()
    ref = sample(prior, obs, generator=torch.Generator().manual_seed(1), **args)
    fast = graphed_sample(prior, obs, generator=torch.Generator().manual_seed(1),
                          engine=EngineConfig(precision="fp32"), **args)
    assert torch.equal(ref.particles, fast.particles)
    assert torch.equal(ref.kernel, fast.kernel)


@pytest.mark.parametrize("guidance, regularizer, masked", [
    ("pigdm", "l2", False), ("pigdm", "pnp", False), ("pigdm", "l1", True),
    ("dps", "none", False), ("pigdm", None, True)])
def test_fused_backends_match_the_references(monkeypatch, guidance, regularizer, masked):
    """The C++ ops reorder float32 arithmetic only: the whole run agrees to rounding with the
    same run on the pure-torch references."""
    from fastem_ext.ops import _backend

    if _backend.unavailable("cpp", torch.device("cpu")):
        pytest.skip("no C++ extension")
    g = torch.Generator().manual_seed(7)
    y = torch.rand(3, 32, 32, generator=g)
    mask = None
    if masked:
        mask = torch.zeros(1, 32, 32)
        mask[:, 4:28, 3:29] = 1.0
    obs = Observation(y, 0.03, mask)
    mstep = None
    if regularizer is not None:
        denoiser = bundled_denoiser(9, "cpu") if regularizer == "pnp" else None
        mstep = HQSConfig(regularizer=regularizer, denoiser=denoiser).validate(9)
    args = dict(schedule=Schedule("5"), shape=(2, 3, 32, 32), guidance=guidance,
                kernel=gaussian_kernel(9, 1.5), mstep=mstep)
    prior = GaussianPrior()
    monkeypatch.setenv("FASTEM_BACKEND", "reference")
    ref = sample(prior, obs, generator=torch.Generator().manual_seed(1), **args)
    monkeypatch.setenv("FASTEM_BACKEND", "cpp")
    fast = graphed_sample(prior, obs, generator=torch.Generator().manual_seed(1),
                          engine=EngineConfig(precision="fp32"), **args)
    torch.testing.assert_close(fast.particles, ref.particles, rtol=0, atol=2e-4)
    torch.testing.assert_close(fast.kernel, ref.kernel, rtol=0, atol=2e-5)


def test_fast_em_accepts_the_engine_as_runner():
    obs, kernel = _problem(1)
    common = dict(schedule=Schedule("4"), particles=1, mstep=HQSConfig(regularizer="none"))
    ref = fast_em(GaussianPrior(), obs, kernel, generator=torch.Generator().manual_seed(2),
                  **common)
    fast = fast_em(GaussianPrior(), obs, kernel, generator=torch.Generator().manual_seed(2),
                   runner=graphed_sample, **common)
    torch.testing.assert_close(fast.particles, ref.particles, rtol=0, atol=2e-4)


def test_autocast_wrapper_returns_float32_and_fp32_is_a_no_op():
    def model(x, t):
        return x * 2

    assert autocast_model(model, torch.device("cpu"), "fp32") is model
    conv = torch.nn.Conv2d(3, 3, 1)
    out = autocast_model(lambda x, t: conv(x), torch.device("cpu"), "bf16")(
        torch.rand(1, 3, 4, 4), torch.zeros(1))
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        EngineConfig(precision="int8").validate()


def test_capture_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    obs, kernel = _problem(2)
    x = torch.randn(1, 3, 24, 20, generator=torch.Generator().manual_seed(3))

    def make_loop():
        return GraphedLoop(GaussianPrior(), obs, Schedule("3"), StepConfig("pigdm"),
                           torch.Generator().manual_seed(4), x, kernel, EngineConfig())

    expected = make_loop().run()  # CPU: eager
    loop = make_loop()
    monkeypatch.setattr(loop, "device", torch.device("cuda"))  # pretend, so capture is tried

    def broken_stream(*args, **kwargs):
        raise RuntimeError("capture not supported here")

    monkeypatch.setattr(torch.cuda, "Stream", broken_stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    with pytest.warns(RuntimeWarning, match="capture failed") as record:
        out = loop.run()
    assert len(record) == 1 and loop.graph is None
    assert torch.equal(out.particles, expected.particles)


def test_run_reports_the_engine():
    image = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(5))
    common = dict(prior="gaussian", steps="3", kernel_size=5, regularizer="l2", progress=False)
    ref = run(image, 0.02, engine="reference", **common)
    fast = run(image, 0.02, engine="fast", precision="fp32", **common)
    assert ref.info["engine"] == "reference" and fast.info["engine"] == "fast"
    torch.testing.assert_close(fast.image, ref.image, rtol=0, atol=2e-4)
    with pytest.raises(ValueError, match="engine"):
        run(image, 0.02, engine="turbo", **common)


@pytest.mark.cuda
@pytest.mark.parametrize("regularizer", ["l2", "pnp"])
def test_cuda_graph_replay_matches_eager_fp32(regularizer):
    """The step is captured (a capture failure, which would fall back to eager steps with a
    warning, fails the test) and replays like the eager reference loop."""
    obs, kernel = _problem(3)
    obs = Observation(obs.y.cuda(), obs.sigma)
    size = kernel.shape[-1]
    denoiser = bundled_denoiser(size, "cuda") if regularizer == "pnp" else None
    args = dict(schedule=Schedule("8"), shape=(2, 3, 24, 20), kernel=kernel.cuda(),
                mstep=HQSConfig(regularizer=regularizer, denoiser=denoiser).validate(size))
    prior = GaussianPrior().cuda()
    ref = sample(prior, obs, generator=torch.Generator("cuda").manual_seed(1), **args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fast = graphed_sample(prior, obs, generator=torch.Generator("cuda").manual_seed(1),
                              engine=EngineConfig(precision="fp32"), **args)
    torch.testing.assert_close(fast.particles, ref.particles, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.kernel, ref.kernel, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("regularizer", ["pnp", "l1"])
@pytest.mark.parametrize("guidance", ["pigdm", "dps"])
@pytest.mark.parametrize("masked", [False, True])
def test_step_touches_only_device_tensors(regularizer, guidance, masked):
    """The step on the meta device takes no host tensor and reads no value back: what capturing
    it in a CUDA graph needs (tests/device_only.py)."""
    device = torch.device("meta")
    y = torch.rand(3, 32, 32).to(device)
    mask = torch.ones(1, 32, 32).to(device) if masked else None
    obs = Observation(y, 0.05, mask)
    tables = Schedule("10").tables(device)
    denoiser = bundled_denoiser(9, device) if regularizer == "pnp" else None
    config = StepConfig(guidance=guidance,
                        mstep=HQSConfig(regularizer=regularizer, denoiser=denoiser).validate(9))
    prior = GaussianPrior().to(device)
    x, kernel = torch.randn(2, 3, 32, 32, device=device), gaussian_kernel(9, 1.0, device=device)
    index = torch.tensor(5, device=device)
    plan = plan_step(obs, tables, config)
    with NoHostTensors():
        x_prev, kernel_out, x0 = guided_step(prior, plan, index, x, kernel, None)
    assert x_prev.shape == x0.shape == x.shape and kernel_out.shape == kernel.shape


def test_engine_callback_gets_the_step_index():
    """The engine reports the same respaced indices, S−1 down to 0, as the reference loop."""
    obs, kernel = _problem(2)
    seen = {"reference": [], "engine": []}
    args = dict(schedule=Schedule("5"), shape=(1, 3, 24, 20), kernel=kernel,
                mstep=HQSConfig(regularizer="none").validate(5))
    sample(GaussianPrior(), obs, generator=torch.Generator().manual_seed(1),
           callback=lambda i, x0, k: seen["reference"].append(i), **args)
    graphed_sample(GaussianPrior(), obs, generator=torch.Generator().manual_seed(1),
                   callback=lambda i, x0, k: seen["engine"].append(i),
                   engine=EngineConfig(precision="fp32"), **args)
    assert seen["reference"] == seen["engine"] == [4, 3, 2, 1, 0]
