"""Restarts of a blind run (``fastem_ext.restarts``): each restart is the one-restart run of its
seed, and the one whose result has the least total variation is kept, on the whole-image and
the crops paths; bad values are refused (Gaussian prior, tiny images: fast)."""

import warnings

import pytest
import torch

from fastem_ext import gaussian_kernel, run
from fastem_ext.restarts import (
    SEEDS,
    Diverged,
    default_restarts,
    keep_least,
    restart_seed,
    total_variation,
)

FAST = {"prior": "gaussian", "steps": "4", "kernel_size": 5, "regularizer": "l2",
        "progress": False}


def _photo(shape=(3, 30, 41), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def test_restart_seeds_are_the_seed_times_the_count_plus_the_restart_and_wrap():
    assert [restart_seed(7, r, 3) for r in range(3)] == [21, 22, 23]
    assert [restart_seed(7, 0, 1)] == [7]  # one restart: the plain run of the seed
    seeds = {restart_seed(seed, r, 3) for seed in range(50) for r in range(3)}
    assert len(seeds) == 150  # different seeds share no restart
    assert restart_seed(SEEDS - 1, 2, 3) == (3 * (SEEDS - 1) + 2) % SEEDS < SEEDS


def test_keep_least_keeps_the_first_least_score_and_reports_every_restart():
    scores = {6: 0.3, 7: 0.1, 8: 0.1}
    kept, report = keep_least(2, 3, lambda stream: (scores[stream], f"run {stream}"))
    assert kept == "run 7"
    assert report == {"count": 3, "kept": 1, "seeds": [6, 7, 8],
                      "total_variation": [0.3, 0.1, 0.1], "diverged": []}


def _diverging_at(streams, score=None):
    """A restart function whose streams in ``streams`` diverge (raise ``Diverged``, or score
    ``score`` when given); the others score 1/stream."""
    def restart(stream):
        if stream in streams and score is None:
            raise Diverged(f"stream {stream} went NaN")
        return (score if stream in streams else 1.0 / stream), f"run {stream}"
    return restart


@pytest.mark.parametrize("score", [None, float("nan"), float("inf")])
def test_a_restart_that_diverges_is_left_out_with_a_warning(score):
    with pytest.warns(RuntimeWarning, match=r"restarts \[2\] of 3 diverged and were left out"):
        kept, report = keep_least(2, 3, _diverging_at({8}, score))
    assert kept == "run 7"  # 1/7 < 1/6; the diverged 8 would have scored 1/8
    assert report["diverged"] == [2] and report["total_variation"] == [1 / 6, 1 / 7, None]
    assert report["kept"] == 1


def test_the_run_fails_only_when_every_restart_diverged():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the error says it all
        with pytest.raises(Diverged, match=r"all 3 restarts diverged; the first: stream 6 "):
            keep_least(2, 3, _diverging_at({6, 7, 8}))
    with pytest.raises(Diverged, match=r"^stream 5 went NaN$"):  # one restart: its own error
        keep_least(5, 1, _diverging_at({5}))
    assert issubclass(Diverged, RuntimeError)  # what run() raised before restarts existed


def test_total_variation_is_the_mean_neighbour_difference_across_plus_down():
    ramp = torch.arange(5.0)[None, None, :].expand(2, 3, 4, 5) * 0.1  # across: 0.1, down: 0
    assert total_variation(ramp) == pytest.approx(0.1)
    assert total_variation(ramp.transpose(-1, -2)) == pytest.approx(0.1)
    checker = (torch.arange(4)[:, None] + torch.arange(6)[None, :]) % 2
    assert total_variation(checker[None].float()) == pytest.approx(2.0)
    assert total_variation(torch.full((1, 3, 8, 8), 0.4)) == 0.0


@pytest.mark.parametrize("path", ["whole", "crops"])
def test_the_kept_restart_is_the_single_run_of_its_seed_with_the_least_variation(path):
    """Every restart's score is what the one-restart run of its seed scores; the result is
    that run's, and its score is the least."""
    photo = _photo() if path == "whole" else _photo((3, 70, 100))
    options = dict(FAST, seed=4) if path == "whole" else dict(
        FAST, seed=4, working_size=48, tile_steps="3", crops=2)
    result = run(photo, 0.05, restarts=3, **options)
    report = result.info["restarts"]
    assert report["count"] == 3 and report["seeds"] == [12, 13, 14]
    singles = [run(photo, 0.05, restarts=1, **dict(options, seed=seed))
               for seed in report["seeds"]]  # one restart runs the stream of its seed
    for single, score in zip(singles, report["total_variation"], strict=True):
        assert single.info["restarts"]["total_variation"] == [pytest.approx(score, abs=1e-7)]
    scores = report["total_variation"]
    assert len(set(scores)) == 3  # the restarts differ: the choice is not a default
    assert scores[report["kept"]] == min(scores)
    kept = singles[report["kept"]]
    torch.testing.assert_close(result.particles, kept.particles, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.kernel, kept.kernel, rtol=0, atol=1e-7)
    assert result.info["seed"] == 4


def test_run_leaves_out_a_diverging_restart_and_keeps_the_best_other():
    """A prior that turns NaN during restart 1 only (the callback counts the steps, 4 a
    restart): the run warns, reports it, and keeps the single run of a seed that did not."""
    steps = []

    def eps(x, t):
        return x * (float("nan") if len(steps) // 4 == 1 else 0.5)

    options = dict(FAST, prior=eps, seed=1)
    with pytest.warns(RuntimeWarning, match=r"restarts \[1\] of 3 diverged"):
        result = run(_photo(), 0.05, callback=lambda i, x0, k: steps.append(i), **options)
    report = result.info["restarts"]
    assert report["diverged"] == [1] and report["total_variation"][1] is None
    assert report["kept"] in (0, 2) and bool(torch.isfinite(result.particles).all())
    single = run(_photo(), 0.05, restarts=1, **dict(options, prior=lambda x, t: x * 0.5,
                                                    seed=report["seeds"][report["kept"]]))
    torch.testing.assert_close(result.particles, single.particles, rtol=0, atol=1e-6)


def test_fastem_pigdm_restarts_by_default_and_other_methods_run_once():
    steps = []
    blind = run(_photo(), 0.05, callback=lambda i, x0, k: steps.append(i), **FAST)
    assert blind.info["restarts"]["count"] == default_restarts("fastem-pigdm") == 3
    assert steps == [3, 2, 1, 0] * 3  # the callback sees every restart
    dps = run(_photo(), 0.05, method="fastem-dps", **FAST)
    assert dps.info["restarts"]["count"] == 1 and dps.info["restarts"]["seeds"] == [0]
    nonblind = run(_photo(), 0.05, method="pigdm", kernel=gaussian_kernel(5, 1.0), **FAST)
    assert nonblind.info["restarts"] is None


@pytest.mark.parametrize("restarts, method, message", [
    (0, "fastem-pigdm", r"restarts must be \[1, 16\]"),
    (17, "fastem-pigdm", r"restarts must be \[1, 16\]"),
    (True, "fastem-pigdm", "restarts must be an integer"),
    (2.0, "fastem-pigdm", "restarts must be an integer"),
    (2, "pigdm", "restarts applies to the blind methods; 'pigdm' is non-blind"),
])
def test_bad_restarts_are_refused_before_any_work(restarts, method, message):
    kernel = gaussian_kernel(5, 1.0) if method == "pigdm" else None
    with pytest.raises(ValueError, match=message):
        run(_photo(), 0.05, method=method, kernel=kernel, restarts=restarts, **FAST)


@pytest.mark.cuda
def test_restarts_on_the_captured_engine_are_its_single_runs_and_agree_with_the_reference():
    """On a GPU each restart captures and replays its own step (a capture failure, which falls
    back with a warning, fails the test): the kept restart is the fast engine's single run of
    its seed, and the reference engine scores the restarts alike and keeps the same one."""
    options = dict(FAST, seed=4, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fast = run(_photo(), 0.05, restarts=3, engine="fast", precision="fp32", **options)
        report = fast.info["restarts"]
        single = run(_photo(), 0.05, restarts=1, engine="fast", precision="fp32",
                     **dict(options, seed=report["seeds"][report["kept"]]))
    assert fast.info["engine"] == "fast" and report["diverged"] == []
    torch.testing.assert_close(fast.particles, single.particles, rtol=0, atol=1e-6)
    reference = run(_photo(), 0.05, restarts=3, engine="reference", **options)
    assert reference.info["restarts"]["kept"] == report["kept"]
    assert reference.info["restarts"]["total_variation"] == pytest.approx(
        report["total_variation"], abs=1e-4)
    torch.testing.assert_close(fast.particles, reference.particles, rtol=0, atol=1e-4)


@pytest.mark.cuda
def test_batched_restarts_on_the_captured_engine_are_the_restarts_one_after_another():
    """On a GPU the three restarts as kernel groups are one captured step with three registered
    generators (a capture failure, which falls back with a warning, fails the test): the same
    numbers as the restarts one after another (the Gaussian prior treats every sample alone)."""
    options = dict(FAST, seed=4, device="cuda", restarts=3, engine="fast", precision="fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        together = run(_photo(), 0.05, batch_restarts=True, **options)
    one_by_one = run(_photo(), 0.05, **options)
    assert together.info["restarts"]["batched"] and together.info["engine"] == "fast"
    assert together.info["restarts"]["kept"] == one_by_one.info["restarts"]["kept"]
    torch.testing.assert_close(together.particles, one_by_one.particles, rtol=0, atol=1e-5)
    torch.testing.assert_close(together.kernel, one_by_one.kernel, rtol=0, atol=1e-6)
