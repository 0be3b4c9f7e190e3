import pytest
import torch

from swd.schedule import ScaleSchedule, add_noise, downsample, teacher_sigmas, upsample


def test_teacher_grid_matches_spec():
    sigmas = teacher_sigmas(28, 3.0)
    assert len(sigmas) == 29
    picked = [round(float(sigmas[i]), 4) for i in (0, 7, 14, 18, 28)]
    assert picked == [1.0, 0.8959, 0.7371, 0.6022, 0.0]


def test_from_grid_equals_explicit():
    a = ScaleSchedule.from_grid([16, 20, 24, 32], [0, 7, 14, 18])
    assert [round(s, 4) for s in a.sigmas] == [1.0, 0.8959, 0.7371, 0.6022, 0.0]
    assert a.sizes == ((16, 16), (20, 20), (24, 24), (32, 32))


def test_pairs_and_ints():
    s = ScaleSchedule([16, (20, 24), [24, 32]], [1.0, 0.8, 0.6, 0.0])
    assert s.sizes == ((16, 16), (20, 24), (24, 32))
    assert s.final_size == (24, 32)
    assert s.previous_size(0) == (16, 16) and s.previous_size(2) == (20, 24)
    assert s.tokens(2) == [64, 120, 192]


@pytest.mark.parametrize(
    "sizes, sigmas, message",
    [
        ([16, 32], [1.0, 0.0], "2 sizes and 2 sigmas"),
        ([16, 32], [1.0, 0.5, 0.1], "last sigma must be 0"),
        ([16, 32], [0.5, 0.7, 0.0], "strictly decrease"),
        ([16, 32], [1.2, 0.5, 0.0], "lie in [0, 1]"),
        ([32, 16], [1.0, 0.5, 0.0], "must not shrink"),
        ([16, "x"], [1.0, 0.5, 0.0], "int or an (height, width) pair"),
        ([16, (8, 8, 8)], [1.0, 0.5, 0.0], "int or an (height, width) pair"),
        ([0, 16], [1.0, 0.5, 0.0], "positive"),
        ([], [0.0], "at least one size"),
    ],
)
def test_schedule_rejects_bad_input(sizes, sigmas, message):
    with pytest.raises(ValueError) as err:
        ScaleSchedule(sizes, sigmas)
    assert message in str(err.value)


def test_schedule_is_frozen():
    s = ScaleSchedule([16], [1.0, 0.0])
    with pytest.raises(Exception):
        s.sizes = ((8, 8),)


def test_default_upsampling_is_not_nearest():
    x = torch.randn(2, 1, 8, 8)
    up = upsample(x, 16)
    nearest = torch.nn.functional.interpolate(x, size=(16, 16), mode="nearest")
    bicubic = torch.nn.functional.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False)
    assert not torch.allclose(up, nearest)
    assert torch.allclose(up, bicubic)
    assert torch.equal(upsample(x, 8), x)
    with pytest.raises(ValueError, match="unknown upsampling mode"):
        upsample(x, 16, mode="magic")


def test_downsample_is_area_average():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.allclose(downsample(x, 2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    with pytest.raises(ValueError, match="larger than the input"):
        downsample(x, 8)


def test_add_noise_endpoints():
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    assert torch.allclose(add_noise(x0, eps, 0.0), x0)
    assert torch.allclose(add_noise(x0, eps, 1.0), eps)
    per_sample = add_noise(x0, eps, torch.tensor([0.0, 1.0, 0.5]))
    assert torch.allclose(per_sample[2], 0.5 * x0[2] + 0.5 * eps[2])
