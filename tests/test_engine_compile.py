"""The fast engine's network: weights cast once (bit-identical to autocast), Inductor-compiled on
request (the same results, compiled once per process), and an eager fallback when compiling
fails."""

import pytest
import torch
from torch import nn

from fastem_ext import api, gaussian_kernel, run
from fastem_ext.engine import (
    EngineConfig,
    GraphedLoop,
    autocast_model,
    cast_weights,
    fused_norms_pay,
)
from fastem_ext.models import GaussianPrior
from fastem_ext.models.natural_prior import load_natural_prior
from fastem_ext.observation import Observation
from fastem_ext.ops import _backend
from fastem_ext.schedule import Schedule
from fastem_ext.step import StepConfig


class TinyEps(nn.Module):
    """A small convolutional eps model: cheap to compile."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)) * (t[:, None, None, None].float() / 1000)


def test_cast_weights_gives_autocast_outputs_bit_for_bit():
    model = load_natural_prior()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([600, 30])
    cpu = torch.device("cpu")
    cast = cast_weights(model, "bf16")
    assert cast is not model
    assert {p.dtype for p in cast.parameters()} == {torch.float32, torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the original is untouched
    assert cast.sqrt_ac.dtype == torch.float32
    expected = autocast_model(model, cpu, "bf16")(x, t)
    assert torch.equal(autocast_model(cast, cpu, "bf16")(x, t), expected)


def test_cast_weights_leaves_what_it_cannot_cast_exactly():
    gaussian, tiny = GaussianPrior(), TinyEps()
    assert cast_weights(gaussian, "bf16") is gaussian  # no UNet inside
    assert cast_weights(tiny, "bf16") is tiny
    assert cast_weights(load_natural_prior(), "fp32").unet.input_blocks[0][0].weight.dtype == (
        torch.float32)


def _loop(model, engine: EngineConfig) -> GraphedLoop:
    g = torch.Generator().manual_seed(3)
    obs = Observation(torch.rand(3, 16, 16, generator=g), 0.05)
    x = torch.randn(1, 3, 16, 16, generator=g)
    return GraphedLoop(model, obs, Schedule("3"), StepConfig("pigdm"),
                       torch.Generator().manual_seed(4), x, gaussian_kernel(5, 1.0), engine)


def test_compiled_network_matches_eager_and_compiles_once_per_process():
    from torch._dynamo.utils import counters

    eager = _loop(TinyEps(), EngineConfig(precision="fp32")).run()
    compiled = _loop(TinyEps(), EngineConfig(precision="fp32", compile=True))
    out = compiled.run()
    assert compiled.compile_seconds is not None and out.compile_seconds is not None
    torch.testing.assert_close(out.particles, eager.particles, rtol=0, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    again = _loop(TinyEps(), EngineConfig(precision="fp32", compile=True)).run()  # a new model
    assert counters["stats"]["unique_graphs"] == graphs  # served from torch's compile cache
    torch.testing.assert_close(again.particles, out.particles, rtol=0, atol=0)


def test_a_failing_compilation_falls_back_to_eager_with_one_warning(monkeypatch):
    expected = _loop(TinyEps(), EngineConfig(precision="fp32")).run()

    class Broken(nn.Module):
        def forward(self, x, t):
            raise RuntimeError("inductor: no C++ compiler\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: Broken())
    loop = _loop(TinyEps(), EngineConfig(precision="fp32", compile=True))
    with pytest.warns(RuntimeWarning, match="compiling the network failed.*no C\\+\\+ compiler") \
            as record:
        out = loop.run()
    assert len(record) == 1 and out.compile_seconds is None
    assert torch.equal(out.particles, expected.particles)


def test_run_checks_the_compile_switch():
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5))
    common = dict(prior="gaussian", steps="2", kernel_size=5, progress=False)
    with pytest.raises(ValueError, match="compile=True needs engine='fast'"):
        run(image, 0.02, engine="reference", compile=True, **common)
    with pytest.raises(ValueError, match="compile must be True or False"):
        run(image, 0.02, engine="fast", compile="yes", **common)
    with pytest.raises(ValueError, match="compile must be True or False"):
        EngineConfig(compile=1).validate()
    info = run(image, 0.02, engine="fast", precision="fp32", **common).info
    assert info["compiled"] is False and info["seconds_compile"] is None


@pytest.mark.skipif(_backend.unavailable("cpp", torch.device("cpu")) is not None,
                    reason="no C++ extension")
def test_fused_norms_agree_and_leave_the_prior_alone(monkeypatch):
    """EngineConfig(fused_norms=True): the run agrees with the plain fast engine to rounding (fp32,
    the C++ CPU op), on a copy that shares the float32 weights; the caller's prior, which the
    reference engine runs, keeps its own norms."""
    monkeypatch.setenv("FASTEM_BACKEND", "cpp")
    prior = load_natural_prior()
    plain = _loop(prior, EngineConfig(precision="fp32")).run()
    loop = _loop(prior, EngineConfig(precision="fp32", fused_norms=True))
    fused = loop.run()
    torch.testing.assert_close(fused.particles, plain.particles, rtol=0, atol=1e-4)
    assert not torch.equal(fused.particles, plain.particles)  # the fused op did run
    assert fused.fused_norms is True and plain.fused_norms is False
    assert prior.unet.fused is None
    assert loop.eager_model.unet.fused is not None
    assert loop.eager_model.unet.out[0].weight is prior.unet.out[0].weight
    with pytest.raises(ValueError, match="fused_norms"):
        EngineConfig(fused_norms=1).validate()


def test_fused_norms_refused_on_the_reference_backend(monkeypatch):
    """Where group_norm_silu would run its pure-torch reference (no kernels: here forced), the
    fused norms would only slow the engine down: fused_norms=True is refused, saying why."""
    monkeypatch.setenv("FASTEM_BACKEND", "reference")
    with pytest.raises(ValueError, match="fused_norms=True needs the C.. or Triton"):
        _loop(TinyEps(), EngineConfig(precision="fp32", fused_norms=True))
    _loop(TinyEps(), EngineConfig(precision="fp32"))  # the plain engine runs there


def test_run_fuses_the_norms_where_it_pays(monkeypatch):
    """run()'s choice (engine.fused_norms_pay): fused norms on CUDA with a kernel for the op and
    an uncompiled network; never on the CPU (the C++ op is slower than torch's kernels there),
    never with compile=True, never on the op's pure-torch reference."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(_backend, "select", lambda op, device: "cuda")
    assert fused_norms_pay(cuda, compile=False)
    assert not fused_norms_pay(cuda, compile=True)
    assert not fused_norms_pay(cpu, compile=False)
    monkeypatch.setattr(_backend, "select", lambda op, device: "reference")
    assert not fused_norms_pay(cuda, compile=False)
    monkeypatch.undo()
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5))
    info = run(image, 0.02, prior="gaussian", steps="2", kernel_size=5, progress=False,
               engine="fast", precision="fp32").info
    assert info["fused_norms"] is False
    # What ran, not what was asked: a network without UNets has no norms to fuse.
    monkeypatch.setattr(_backend, "select", lambda op, device: "cpp")
    assert _loop(TinyEps(), EngineConfig(precision="fp32", fused_norms=True)).run().fused_norms \
        is False


@pytest.mark.cuda
def test_run_on_cuda_fuses_the_norms_and_agrees_with_the_plain_engine(monkeypatch):
    """On CUDA, run() picks the fused norms by itself; the restoration matches the plain fast
    engine's (fp32 without TF32, the same seed) to rounding."""
    if _backend.select("group_norm_silu", torch.device("cuda")) == "reference":
        pytest.skip("no CUDA or Triton group_norm_silu in this build")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(7))
    common = dict(prior="natural", steps="5", kernel_size=9, progress=False, device="cuda",
                  engine="fast", precision="fp32")
    fused = run(image, 0.04, **common)
    monkeypatch.setattr(api, "fused_norms_pay", lambda device, compile: False)
    plain = run(image, 0.04, **common)
    assert fused.info["fused_norms"] is True and plain.info["fused_norms"] is False
    torch.testing.assert_close(fused.image, plain.image, rtol=0, atol=1e-3)
