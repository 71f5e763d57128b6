"""The fast engine: one sampling step captured as a CUDA graph and replayed for every step.

The step is ``step.guided_step`` — the network forward and its VJP, the M-step, the guidance and
the DDPM update on the fused ops — run on static buffers with the step index held in a 0-d device
tensor, so every per-step scalar is a gather from the schedule's device tables and the whole step
replays without a host round trip. Where capture is impossible (CPU, or a failure on CUDA) the same
step runs eagerly, with one warning in the failure case.

The network runs under bf16 autocast (FFTs and the M-step stay float32), with its UNets' torso
convolutions cast to that dtype once per run (``cast_weights``), so that autocast copies no
weight per call; the outputs are bit-identical. With
``EngineConfig.compile`` it runs as Inductor-compiled code (``torch.compile``; its forward and
the backward of its input-VJP), compiled before the capture. Compiled code is cached by torch
itself: in one process by the model's code and input shapes (a second ``run()`` with a freshly
loaded prior of the same shape compiles nothing), and across processes by Inductor's on-disk
caches where enabled. A compilation failure falls back to the eager network with one warning.
With ``EngineConfig.fused_norms`` the UNets' GroupNorm + scale-shift + SiLU run as the fused op
``ops.group_norm_silu`` (forward and input-VJP) instead of torch's separate kernels (refused,
ValueError, where only the op's pure-torch reference could run it); the reference engine never
fuses them.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .observation import Observation
from .samplers import SamplerOutput, StepCallback, first_generator, observation_dtype
from .schedule import Schedule, to_image
from .step import EpsModel, Generators, StepConfig, guided_step, plan_step, standard_normal

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class EngineConfig:
    """precision: the network's autocast dtype (``bf16``, ``fp16`` or ``fp32`` = none);
    graphs: capture the step as a CUDA graph when on CUDA; compile: run the network as
    Inductor-compiled code (module docstring); fused_norms: the UNets' norms as
    ``ops.group_norm_silu`` (module docstring); warmup: eager steps run (and undone) before
    capture so that lazy initialisation happens outside the graph."""

    precision: str = "bf16"
    graphs: bool = True
    compile: bool = False
    fused_norms: bool = False
    warmup: int = 2

    def validate(self) -> EngineConfig:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}"
            )
        for name in ("compile", "fused_norms"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        return self


def cast_weights(eps_model: EpsModel, precision: str, fused_norms: bool = False) -> EpsModel:
    """For a module holding ``UNet``s and a reduced ``precision``: a copy whose UNets' torso
    convolutions hold weights of that dtype (``UNet.convert_torso``). Under autocast those
    convolutions run in that dtype anyway, on activations already in it, so the outputs are
    bit-identical; autocast just finds the weights cast instead of copying them on every call.
    With ``fused_norms``, the copy's UNets run their norms as ``ops.group_norm_silu``
    (``UNet.fuse_norms``). Anything else is returned as it is (autocast casts it per call, as
    before); the caller's model is never changed."""
    from . import ops

    dtype = PRECISIONS[precision]
    if (dtype is None and not fused_norms) or not unets(eps_model):
        return eps_model
    # Nothing is cast in float32: the copy shares the weights and costs no memory for them.
    shared = () if dtype is not None else (*eps_model.parameters(), *eps_model.buffers())
    cast = copy.deepcopy(eps_model, {id(t): t for t in shared})
    for module in unets(cast):
        if dtype is not None:
            module.convert_torso(dtype)
        if fused_norms:
            module.fuse_norms(ops.group_norm_silu)
    return cast


def unets(eps_model: EpsModel) -> list[nn.Module]:
    """The ``UNet``s inside ``eps_model`` (none for a plain callable)."""
    from .models.unet import UNet

    if not isinstance(eps_model, nn.Module):
        return []
    return [module for module in eps_model.modules() if isinstance(module, UNet)]


def fused_norms_pay(device: torch.device, compile: bool) -> bool:
    """Whether ``fused_norms`` is the faster choice for a run on ``device``: on CUDA with the
    op's C++ or Triton kernel, and the network not compiled (Inductor fuses the norms its own
    way). Measured on an H200 (benchmarks/RESULTS.md): 1.33x faster than the plain modules on
    the FFHQ UNet at n = 1, 1.24x at n = 16 with 0.58x the peak memory; 1.16x on the bundled
    prior at n = 1 (timed before the kernel split large groups over several blocks; a group is
    split from 32,768 values, and this prior's are at most 20,736 at a 256² photo's 288² grid:
    one block each either way). On the CPU the C++ op is slower than torch's kernels: off
    there."""
    return device.type == "cuda" and not compile and _fused_norms_run_kernels(device)


def _fused_norms_run_kernels(device: torch.device) -> bool:
    """Whether ``ops.group_norm_silu`` has a C++ or Triton kernel on ``device``."""
    from .ops import _backend

    return _backend.select("group_norm_silu", device) != "reference"


def _check_fused_norms(device: torch.device) -> None:
    """ValueError where ``fused_norms`` would run ``ops.group_norm_silu`` on its pure-torch
    reference: a hand-written backward, 3x slower than the plain modules' autograd (CPU,
    benchmarks/RESULTS.md), so it would slow the engine down and fuse nothing."""
    from .ops import _backend

    if not _fused_norms_run_kernels(device):
        why = _backend.unavailable("cpp", device) or "FASTEM_BACKEND=reference"
        raise ValueError(f"fused_norms=True needs the C++ or Triton group_norm_silu on {device}; "
                         f"only the pure-torch reference is available ({why}): leave it off")


def autocast_model(eps_model: EpsModel, device: torch.device, precision: str) -> EpsModel:
    """Wrap ``eps_model`` to run under autocast; its output is cast back to float32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return eps_model

    def wrapped(x: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(device_type=device.type, dtype=dtype):
            return eps_model(x, t).float()

    return wrapped


def graphed_sample(eps_model: EpsModel, obs: Observation | Sequence[Observation] | None, *,
                   schedule: Schedule, shape: tuple[int, int, int, int], generator: Generators,
                   guidance: str | None = "pigdm", kernel: Tensor | None = None,
                   mstep=None, guidance_scale: float = 1.0,
                   callback: StepCallback | None = None,
                   engine: EngineConfig = EngineConfig()) -> SamplerOutput:
    """Drop-in for ``samplers.sample`` (same arguments, kernel groups included; same random
    stream)."""
    x = standard_normal(shape, generator, first_generator(generator).device,
                        observation_dtype(obs))
    loop = GraphedLoop(eps_model, obs, schedule, StepConfig(guidance, mstep, guidance_scale),
                       generator, x, kernel, engine.validate())
    return loop.run(callback)


class GraphedLoop:
    """Runs ``len(schedule)`` steps from ``x_init`` on static buffers.

    ``run()`` returns the same ``SamplerOutput`` as ``samplers.sample`` for the same generator
    state.
    """

    def __init__(self, eps_model: EpsModel, obs: Observation | Sequence[Observation] | None,
                 schedule: Schedule, config: StepConfig, generator: Generators, x_init: Tensor,
                 kernel: Tensor | None, engine: EngineConfig) -> None:
        self.device = x_init.device
        if engine.fused_norms:
            _check_fused_norms(self.device)
        network = cast_weights(eps_model, engine.precision, engine.fused_norms)
        self.fused_norms = engine.fused_norms and bool(unets(network))
        self.eager_model = autocast_model(network, self.device, engine.precision)
        self.model = self.eager_model
        if engine.compile:
            compiled = torch.compile(network)
            self.model = autocast_model(compiled, self.device, engine.precision)
        self.compile_seconds: float | None = None  # set by run() when the network is compiled
        self.generator, self.engine = generator, engine
        self.generators = ([] if generator is None else [generator]
                           if isinstance(generator, torch.Generator) else list(generator))
        tables = schedule.tables(self.device, x_init.dtype)
        self.plan = plan_step(obs, tables, config)  # outside any graph
        self.steps = len(tables)
        self.x = x_init.clone()
        self.kernel = None if kernel is None else kernel.clone()
        self.x0 = torch.zeros_like(x_init)
        self.index = torch.full((), self.steps - 1, dtype=torch.int64, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _step(self) -> None:
        x, kernel, x0 = guided_step(self.model, self.plan, self.index, self.x, self.kernel,
                                    self.generator)
        self.x.copy_(x)
        self.x0.copy_(x0)
        if kernel is not None and kernel is not self.kernel:
            self.kernel.copy_(kernel)
        self.index.sub_(1)

    def run(self, callback: StepCallback | None = None) -> SamplerOutput:
        if self.engine.compile:
            self._compile()
        if self.device.type == "cuda" and self.engine.graphs:
            self.graph = self._capture()
        for i in reversed(range(self.steps)):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            if callback is not None:
                # The device index counts down with the host loop: i is known without a sync.
                callback(i, self.x0.clone(), self.kernel)
        particles = to_image(self.x.clamp(-1.0, 1.0))
        return SamplerOutput(particles, None if self.kernel is None else self.kernel.clone(),
                             self.compile_seconds, self.fused_norms)

    def _compile(self) -> None:
        """One step (undone) compiles the network's forward and VJP; on failure the eager
        network replaces it, with one warning."""
        saved = self._snapshot()
        start = time.perf_counter()
        try:
            self._step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_seconds = time.perf_counter() - start
        except Exception as err:  # noqa: BLE001 - any compilation failure falls back to eager
            self.model = self.eager_model
            warnings.warn(f"compiling the network failed ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
                          "running it eagerly", RuntimeWarning, stacklevel=3)
        finally:
            self._restore(saved)

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """Warm up on a side stream, restore the state, capture one step. ``None`` on failure."""
        saved = self._snapshot()
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(self.engine.warmup):
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._restore(saved)
            graph = torch.cuda.CUDAGraph()
            for generator in self.generators:
                _register_generator(graph, generator)
            with torch.cuda.graph(graph):
                self._step()
            self._restore(saved)  # capture records kernels but must not count as a step
            return graph
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager
            torch.cuda.synchronize(self.device)
            self._restore(saved)
            warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); "
                          "running the steps eagerly", RuntimeWarning, stacklevel=3)
            return None

    def _snapshot(self) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        kernel = None if self.kernel is None else self.kernel.clone()
        return self.x.clone(), kernel, [g.get_state() for g in self.generators]

    def _restore(self, saved: tuple[Tensor, Tensor | None, list[Tensor]]) -> None:
        x, kernel, states = saved
        self.x.copy_(x)
        if kernel is not None:
            self.kernel.copy_(kernel)
        self.index.fill_(self.steps - 1)
        for generator, state in zip(self.generators, states, strict=True):
            generator.set_state(state)


def _register_generator(graph: torch.cuda.CUDAGraph, generator: torch.Generator) -> None:
    # A non-default generator must be registered so that each replay advances its Philox offset.
    register: Callable | None = getattr(graph, "register_generator_state", None)
    if register is not None:
        with contextlib.suppress(RuntimeError):  # the default generator is already registered
            register(generator)
