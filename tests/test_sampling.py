import pytest
import torch
from diffusers import FlowMatchLCMScheduler

from swd.sampling import generator_noise, guided_velocity, sample_euler, sample_scalewise
from swd.schedule import ScaleSchedule, teacher_sigmas


def toy_velocity(x, sigma):
    """A smooth, size-agnostic 'network': depends on x and sigma."""
    return torch.tanh(x) * (1 + sigma.view(-1, 1, 1, 1)) - 0.3 * x.mean(dim=(2, 3), keepdim=True)


def scalewise(velocity_fn, schedule: ScaleSchedule, batch: int, channels: int, seed: int, callback=None) -> torch.Tensor:
    """Noise first: the starting noise and every stage's fresh noise from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, channels, *schedule.sizes[0], generator=generator)
    return sample_scalewise(velocity_fn, noise, schedule, generator_noise(generator, "cpu"), callback=callback)


def lcm_reference(schedule: ScaleSchedule, noise: torch.Tensor, seed: int) -> torch.Tensor:
    """diffusers' FlowMatchLCMScheduler stepping the same toy model."""
    scheduler = FlowMatchLCMScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=list(schedule.sigmas[:-1]))
    first = schedule.sizes[0][0]
    factors = [s[0] / first for s in schedule.sizes[1:]]
    if any(f != 1.0 for f in factors):
        scheduler.set_scale_factors(factors, "bicubic")
    generator = torch.Generator().manual_seed(seed)
    x = noise
    for i, t in enumerate(scheduler.timesteps):
        sigma = torch.full((x.shape[0],), schedule.sigmas[i])
        v = toy_velocity(x, sigma)
        if i + 1 == len(scheduler.timesteps):
            return x - schedule.sigmas[i] * v
        x = scheduler.step(v, t, x, generator=generator).prev_sample


@pytest.mark.parametrize("sizes", [[16, 16, 16, 16], [16, 20, 24, 32]])
def test_scalewise_equals_diffusers_lcm_scheduler(sizes):
    schedule = ScaleSchedule(sizes, [1.0, 0.8959, 0.7371, 0.6022, 0.0])
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = sample_scalewise(toy_velocity, noise, schedule, generator_noise(torch.Generator().manual_seed(7), "cpu"))
    theirs = lcm_reference(schedule, noise, seed=7)
    assert ours.shape == theirs.shape == (3, 1, sizes[-1], sizes[-1])
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_scalewise_stage_shapes_and_callback():
    schedule = ScaleSchedule([8, (10, 12), 16], [1.0, 0.8, 0.5, 0.0])
    seen = []
    out = scalewise(toy_velocity, schedule, 2, 3, 0, callback=seen.append)
    assert [tuple(s["x"].shape[-2:]) for s in seen] == [(8, 8), (10, 12), (16, 16)]
    assert [s["sigma"] for s in seen] == [1.0, 0.8, 0.5]
    assert out.shape == (2, 3, 16, 16)
    assert torch.equal(out, seen[-1]["denoised"])


def test_scalewise_seeded_determinism():
    schedule = ScaleSchedule([8, 16], [1.0, 0.6, 0.0])
    a = scalewise(toy_velocity, schedule, 2, 1, 3)
    b = scalewise(toy_velocity, schedule, 2, 1, 3)
    c = scalewise(toy_velocity, schedule, 2, 1, 4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_scalewise_upsamples_the_clean_prediction_not_the_noisy_input():
    """With a zero-velocity model x0_hat = x; the next input must be renoised at the new sigma."""
    schedule = ScaleSchedule([4, 8], [1.0, 0.5, 0.0])
    seen = []
    scalewise(lambda x, s: torch.zeros_like(x), schedule, 512, 1, 0, callback=seen.append)
    second = seen[1]["x"]
    # (1 - 0.5) * upsampled(N(0,1)) + 0.5 * fresh N(0,1): variance well below 1 but above 0.25
    var = second.var().item()
    assert 0.25 < var < 0.75


def test_scalewise_refuses_noise_of_another_size():
    schedule = ScaleSchedule([8, 16], [1.0, 0.6, 0.0])
    with pytest.raises(ValueError, match="first size"):
        sample_scalewise(toy_velocity, torch.randn(1, 1, 16, 16), schedule, generator_noise(torch.Generator(), "cpu"))


def test_the_4_step_constants_are_the_teacher_grid_rounded():
    from swd.config import SWD4_GRID_INDICES, SWD4_SIGMAS, SWD4_SIZES

    derived = ScaleSchedule.from_grid(SWD4_SIZES, SWD4_GRID_INDICES, 28, 3.0)
    assert [round(s, 4) for s in derived.sigmas] == list(SWD4_SIGMAS)
    assert derived.sizes == ScaleSchedule(SWD4_SIZES, SWD4_SIGMAS).sizes


def test_euler_exact_for_constant_velocity():
    sigmas = teacher_sigmas(5, 3.0)
    noise = torch.randn(2, 1, 4, 4)
    target = torch.randn(2, 1, 4, 4)
    out = sample_euler(lambda x, s: noise - target, noise, sigmas)
    assert torch.allclose(out, target, atol=1e-5)


def test_euler_callback_and_steps():
    sigmas = teacher_sigmas(4, 3.0)
    seen = []
    sample_euler(toy_velocity, torch.randn(1, 1, 4, 4), sigmas, callback=seen.append)
    assert [s["step"] for s in seen] == [0, 1, 2, 3]


class _Cond:
    def __init__(self, t):
        self.t = t

    def cat(self, other):
        return _Cond(torch.cat([self.t, other.t]))


def test_guidance_combines_conditional_and_unconditional():
    def model(x, sigma, cond):
        return x * 0 + cond.t.view(-1, 1, 1, 1)

    x = torch.zeros(2, 1, 2, 2)
    fn = guided_velocity(model, _Cond(torch.tensor([3.0, 3.0])), _Cond(torch.tensor([1.0, 1.0])), 2.5)
    out = fn(x, torch.ones(2))
    assert torch.allclose(out, torch.full_like(x, 1.0 + 2.5 * 2.0))
    no_guidance = guided_velocity(model, _Cond(torch.tensor([3.0, 3.0])), None, 1.0)
    assert torch.allclose(no_guidance(x, torch.ones(2)), torch.full_like(x, 3.0))


def test_network_evaluations_count_guidance_twice():
    from swd.generate import network_evaluations

    assert network_evaluations(28, 3.0) == 56
    assert network_evaluations(4, 1.0) == 4
    assert network_evaluations(4, 2.0, guided_steps=1) == 5
    assert network_evaluations(4, 1.0, guided_steps=4) == 4  # guidance 1 runs no unconditional pass


def test_interval_velocity_guides_only_inside_the_interval():
    from swd.sampling import interval_velocity

    fn = interval_velocity(lambda x, s: x * 0 + 2.0, lambda x, s: x * 0 + 1.0, (0.9, 1.0))
    x = torch.zeros(2, 1, 2, 2)
    assert [float(fn(x, torch.full((2,), s))[0, 0, 0, 0]) for s in (1.0, 0.9, 0.8959, 0.0)] == [2.0, 2.0, 1.0, 1.0]


@pytest.mark.parametrize("interval, match", [((0.9,), "two noise levels"), ((1.0, 0.9), "lo <= hi"), ((0.5, 1.5), "lo <= hi <= 1")])
def test_bad_guidance_intervals_are_refused(interval, match):
    from swd.sampling import check_guidance_interval

    with pytest.raises(ValueError, match=match):
        check_guidance_interval(interval)


def test_a_guidance_interval_guides_only_the_steps_inside_it(tiny_model_config):
    """On a 3-step schedule: an interval around every sigma equals guiding every step, one around none
    equals no guidance, and one around the first step alone is a third result costing one extra pass."""
    from swd.generate import Sampler
    from swd.models import build_denoiser

    torch.manual_seed(0)
    model = build_denoiser(tiny_model_config).eval()
    schedule = ScaleSchedule([8, 12, 16], [1.0, 0.8, 0.6, 0.0])
    labels = torch.tensor([0, 1, 2])

    def run(guidance, interval=None):
        sampler = Sampler("scalewise", schedule, guidance, guidance_interval=interval)
        with torch.inference_mode():
            return sampler(model, labels, torch.Generator().manual_seed(3)), sampler.nfe

    guided, guided_nfe = run(3.0)
    plain, plain_nfe = run(1.0)
    first, first_nfe = run(3.0, (0.9, 1.0))
    assert (guided_nfe, plain_nfe, first_nfe) == (6, 3, 4)
    torch.testing.assert_close(run(3.0, (0.5, 1.0))[0], guided)
    torch.testing.assert_close(run(3.0, (0.0, 0.5))[0], plain)
    assert (first - guided).abs().max() > 1e-5 and (first - plain).abs().max() > 1e-5
    with pytest.raises(ValueError, match="lo <= hi"):
        Sampler("scalewise", schedule, 3.0, guidance_interval=(1.0, 0.5))


def test_compile_for_sampling_keeps_the_samples_and_refuses_unknown_backends(tiny_model_config):
    from swd.generate import compile_for_sampling, generate_scalewise
    from swd.models import build_denoiser

    torch.manual_seed(0)
    model = build_denoiser(tiny_model_config).eval()
    schedule = ScaleSchedule([(8, 8), (16, 16)], [1.0, 0.7, 0.0])
    labels = torch.tensor([0, 1])
    with torch.inference_mode():
        eager = generate_scalewise(model, labels, schedule, torch.Generator().manual_seed(0))
        assert compile_for_sampling(model, None).transformer._compiled_call_impl is None  # None stays eager
        compiled = compile_for_sampling(model, "eager")  # dynamo graph capture, no C++ build: fast in tests
        assert compiled.transformer._compiled_call_impl is not None
        again = generate_scalewise(compiled, labels, schedule, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, eager)
    with pytest.raises(ValueError, match="unknown compile backend 'cuda'"):
        compile_for_sampling(model, "cuda")


def test_compile_options_use_the_cpp_wrapper_for_inductor_on_cpu_only():
    from swd.generate import compile_options

    assert compile_options("inductor", torch.device("cpu")) == {"cpp_wrapper": True}
    assert compile_options("inductor", torch.device("cuda")) == {}  # a device object only: nothing runs on it
    assert compile_options("eager", torch.device("cpu")) == {}
    assert compile_options("aot_eager", torch.device("cpu")) == {}


def test_inductor_compile_with_the_cpp_wrapper_keeps_the_samples(tiny_model_config, tmp_path, monkeypatch):
    """The real C++ build (about 30 s on one core), in a fresh inductor cache so it cannot be skipped."""
    from swd.generate import compile_for_sampling, generate_scalewise
    from swd.models import build_denoiser

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    model = build_denoiser(tiny_model_config).eval()
    schedule = ScaleSchedule([(8, 8), (16, 16)], [1.0, 0.7, 0.0])
    labels = torch.tensor([0, 1])
    with torch.inference_mode():
        eager = generate_scalewise(model, labels, schedule, torch.Generator().manual_seed(0))
        compiled = generate_scalewise(compile_for_sampling(model, "inductor"), labels, schedule, torch.Generator().manual_seed(0))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_bench_compile_needs_a_warmup_round():
    from swd.bench import run_bench
    from swd.config import load_config

    with pytest.raises(ValueError, match="bench.compile needs bench.warmup >= 1"):
        run_bench(load_config(None, ["bench.compile=inductor", "bench.warmup=0"]))
